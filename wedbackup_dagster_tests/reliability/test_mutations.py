"""The seeded mutation loop (mutations.py) over real sealed archives and snapshot streams of a demo
database: a quick pass in `make test`, a long one in `make reliability` (WEDBACKUP_MUTATIONS inputs; 10,000
by default, 100,000 with WEDBACKUP_RELIABILITY_LONG=1). Every input must be refused with the format's own
error or read back as the original (streams: or with only their unchecksummed metadata text altered) —
never another exception, never altered table data accepted. The long pass writes
mutations-summary.txt / .json to WEDBACKUP_RELIABILITY_OUT (default: pytest's base temp folder)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from wedbackup_dagster.dev import demo_data

from ..conftest import temporary_database
from . import mutations

pytestmark = [pytest.mark.stack]

LONG = os.environ.get("WEDBACKUP_RELIABILITY_LONG", "").strip() not in ("", "0")
SEED = int(os.environ.get("WEDBACKUP_MUTATIONS_SEED", "14"))
COUNT = int(os.environ.get("WEDBACKUP_MUTATIONS", "100000" if LONG else "10000"))
QUICK = 2000


@pytest.fixture(scope="module")
def samples(stack):
    """Four real originals: three weddings of different sizes and the platform partition."""
    with temporary_database(stack, "mut") as dsn:
        demo_data.generate(dsn, weddings=3, seed=5, document_bytes=300)
        yield mutations.samples_from(dsn, ["1", "2", "3", "platform"])


def _check(report: mutations.MutationReport, count: int) -> None:
    assert report.total == count
    assert report.failure_count == 0, report.text()
    kinds = {k.split(":", 1)[1] for k in report.mutations}
    assert kinds >= set(mutations.ARCHIVE_KINDS) | set(mutations.STREAM_KINDS), report.text()
    rejected = {o for o in report.outcomes if "rejected" in o}
    assert any(o.startswith("archive") for o in rejected) and any(o.startswith("stream") for o in rejected)


def test_quick_mutation_loop(samples):
    report = mutations.run(samples, QUICK, seed=SEED)
    _check(report, QUICK)


@pytest.mark.reliability
@pytest.mark.slow
def test_mutation_loop(samples, tmp_path, capsys):
    report = mutations.run(samples, COUNT, seed=SEED)
    out = Path(os.environ.get("WEDBACKUP_RELIABILITY_OUT") or tmp_path.parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mutations-summary.txt").write_text(report.text() + "\n")
    (out / "mutations-summary.json").write_text(json.dumps(report.figures(), indent=2) + "\n")
    for key, data in report.failed_inputs.items():  # the damaged inputs, as read (samples differ per run)
        (out / f"mutation-failure-{key}.bin").write_bytes(data)
    with capsys.disabled():
        print("\n" + report.text())
    _check(report, COUNT)


# What the loop found in code outside the tests (issue 14), each fixed there and kept as a regression test.

NESTED = b"[" * 50_000 + b"]" * 50_000


def test_deeply_nested_json_in_a_record_is_the_formats_error(samples):
    from wedbackup_dagster.core.formats import snapshot_stream
    from wedbackup_dagster.core.errors import SnapshotFormatError
    from wedbackup_dagster.core.formats.snapshot_stream import MANIFEST

    from wedbackup_dagster_tests.core.formats.test_archive_fuzz import NAME, replace_record

    with pytest.raises(SnapshotFormatError, match=f"archive {NAME}: manifest record"):
        snapshot_stream.read_manifest([replace_record(samples[0].stream, MANIFEST, NESTED)], name=NAME)


def test_a_deeply_nested_label_is_the_formats_error(samples):
    from wedbackup_dagster.core.errors import ArchiveError

    from wedbackup_dagster_tests.core.formats.test_archive_fuzz import read_through

    _, exc = read_through(mutations._replace_label(samples[0].sealed, NESTED[:60_000]))
    assert isinstance(exc, ArchiveError)


def test_a_stream_repeating_a_table_is_refused(stack, make_database):
    import psycopg

    from wedbackup_dagster.core.postgres import load_snapshot as restore
    from wedbackup_dagster.core.errors import SnapshotFormatError

    source, target = make_database(), make_database()
    demo_data.generate(source, weddings=2, seed=5, document_bytes=64)
    with psycopg.connect(source) as conn:  # a tenant table without any unique key: nothing else refuses
        conn.execute("CREATE TABLE wedding_notes (wedding_id bigint NOT NULL REFERENCES weddings (id), note text)")
        conn.execute("INSERT INTO wedding_notes SELECT id, 'note ' || id FROM weddings")
    stream = mutations.samples_from(source, ["1"])[0].stream
    pos, size = next((p, s) for p, s in mutations._table_spans(mutations._spans(stream))
                     if b'"wedding_notes"' in stream[p:p + 200])
    repeated = stream[:pos + size] + stream[pos:pos + size] + stream[pos + size:]
    try:
        restore.restore_snapshot([repeated], target, create_schema=True, name="vault:1/repeated")
    except SnapshotFormatError:
        pass
    with psycopg.connect(target) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = 'public'").fetchone()[0]
    assert tables == 0, "the stream repeating table wedding_notes was restored (its rows twice)"


def test_a_table_begin_whose_columns_differ_from_the_manifest_is_refused(stack, make_database):
    import json as json_
    import psycopg

    from wedbackup_dagster.core.postgres import load_snapshot as restore
    from wedbackup_dagster.core.errors import WedbackupError
    from wedbackup_dagster.core.formats.snapshot_stream import TABLE_BEGIN

    source, target = make_database(), make_database()
    demo_data.generate(source, weddings=2, seed=5, document_bytes=64)
    stream = mutations.samples_from(source, ["1"])[0].stream
    for pos, size, kind in mutations._spans(stream):
        begin = json_.loads(stream[pos + 9:pos + size]) if kind == TABLE_BEGIN else {}
        if begin.get("name") == "guests":
            cols = begin["columns"]
            a, b = cols.index("first_name"), cols.index("last_name")  # both text: rows load into swapped columns
            cols[a], cols[b] = cols[b], cols[a]
            payload = json_.dumps(begin).encode()
            stream = stream[:pos] + kind + len(payload).to_bytes(8, "big") + payload + stream[pos + size:]
            break
    try:
        restore.restore_snapshot([stream], target, create_schema=True, name="vault:1/columns")
    except WedbackupError:
        pass
    with psycopg.connect(target) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = 'public'").fetchone()[0]
    assert tables == 0, "guests was restored with its first_name and last_name columns swapped"
