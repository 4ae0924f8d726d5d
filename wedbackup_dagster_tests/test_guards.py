"""Guards against hostile or careless input (issue 14): restore targets compared by the database they reach,
not by the variable that names them; the catalogue never the source; crafted JSON in archives and snapshot
streams failing as the format's own error; one wedding under one partition name; the secrets scan
finding raw key bytes in bytea columns of big tables."""
from __future__ import annotations

import hashlib
import io
import os

import psycopg
import pytest

from wedbackup_dagster.core.formats.archive import MAGIC, read_header
from wedbackup_dagster.core.errors import ArchiveCorrupt, SnapshotFormatError
from wedbackup_dagster_tests.cli.test_app import cli_env  # noqa: F401  (a fixture)

NESTED = b"[" * 20_000 + b"]" * 20_000  # deeper than json's recursion limit, small enough for a header label


# --- 3. crafted JSON in archives and snapshot streams -----------------------------------------------

def crafted_archive(label: bytes) -> bytes:
    """An archive whose header carries `label` verbatim (a real writer only writes labels it made)."""
    from wedbackup_dagster.core.formats.archive import _encode_header

    return _encode_header("1.abcdef012345", b"w" * 60, b"n" * 7, 1 << 20, label) + b"\0" * 64


def test_a_deeply_nested_header_label_is_a_corrupt_archive_naming_it():
    assert crafted_archive(b"{}").startswith(MAGIC)
    with pytest.raises(ArchiveCorrupt, match=r"^archive crafted\.wbk: header is malformed: the label is not valid"):
        read_header(io.BytesIO(crafted_archive(b'{"a":' + NESTED + b"}")), name="crafted.wbk")


def test_deeply_nested_snapshot_records_and_manifests_fail_with_the_format_error():
    from wedbackup_dagster.core.formats.snapshot_stream import Record
    from wedbackup_dagster.core.formats.snapshot_stream import MANIFEST, Manifest

    with pytest.raises(SnapshotFormatError, match="manifest record at offset 7 is not valid JSON"):
        Record(MANIFEST, NESTED, 7, "archive x.wbk").json()
    with pytest.raises(ValueError, match="nested too deeply"):
        Manifest.from_json(NESTED)


def test_rebuild_goes_on_past_an_archive_with_a_crafted_label_and_reports_it(demo_env):
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from wedbackup_dagster.core.engine import Engine
    from wedbackup_dagster.core.catalogue.rebuild_from_storage import rebuild_from
    from wedbackup_dagster.core.storage.replicas import S3Replica
    from wedbackup_dagster.core.storage.providers import ensure_targets
    from wedbackup_dagster.core.storage.replicas.base import archive_key
    from wedbackup_dagster.core.storage.replicas.s3 import s3_client_from

    demo_env(weddings=3, seed=5, document_bytes=64)
    engine = Engine.from_env()
    ensure_targets(engine.settings)
    s3 = S3Replica(s3_client_from(engine.settings.s3, os.environ), engine.settings.s3)
    with engine.snapshot_session() as session:
        engine.back_up("1", session)
    engine.replicate("1", s3)
    crafted = crafted_archive(b'{"a":' + NESTED + b"}")
    sha = hashlib.sha256(crafted).hexdigest()
    key = archive_key("s3", engine.settings.s3.prefix, "2", sha)
    s3.client.put_object(Bucket=engine.settings.s3.bucket, Key=key, Body=crafted)
    with psycopg.connect(engine.settings.catalogue_dsn) as conn:
        conn.execute("DELETE FROM wedbackup.backups")
    report = rebuild_from(s3, Catalogue(engine.settings.catalogue_dsn), engine.keyring, vault=engine.vault)
    assert report.listed == 2 and report.backups_added == 1
    assert len(report.skipped) == 1 and report.skipped[0].startswith(f"{key}: archive s3:{key}: header is malformed")


def test_a_key_backup_with_nested_json_is_a_key_backup_error():
    from wedbackup_dagster.core.formats.archive import ArchiveWriter
    from wedbackup_dagster.core.errors import KeyBackupError
    from wedbackup_dagster.core.keys.backup import FORMAT_NAME, read_key_backup, sealing_key
    from wedbackup_dagster.core.keys.keyring import MasterKeyring, SecretKey

    keyring = MasterKeyring([SecretKey("mk1", b"k" * 32)])
    sealed = io.BytesIO()
    with ArchiveWriter(sealed, wedding_key=sealing_key(keyring.current), label={"kind": FORMAT_NAME}) as writer:
        writer.write(NESTED + b"\n")
    sealed.seek(0)
    with pytest.raises(KeyBackupError, match="keys.wbk.*do not parse"):
        read_key_backup(sealed, name="keys.wbk", keyring=keyring)


# --- 1. the restore target guard compares databases, not variable names ------------------------------

@pytest.fixture
def pooler(stack):
    """A plain TCP relay on another port in front of the stack's PostgreSQL, as a pooler or proxy would be:
    no DSN comparison can tell that it reaches the same server."""
    from wedbackup_dagster_tests.reliability.faultproxy import FaultProxy, FaultSchedule

    port = int(stack.env()["WEDBACKUP_SOURCE_DSN"].rsplit(":", 1)[1].split("/")[0])
    with FaultProxy("pooler", ("127.0.0.1", port), FaultSchedule(seed=1, rate=0.0), mode="tcp") as proxy:
        yield proxy.port


def through(dsn: str, port: int) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    return make_conninfo(**{**conninfo_to_dict(dsn), "port": str(port)})


def spellings(dsn: str, tmp_path, monkeypatch) -> dict[str, str]:
    """The same database written other ways: keyword form, another host alias, extra parameters, a
    service file, PG* variables, hostaddr."""
    from psycopg.conninfo import conninfo_to_dict

    p = conninfo_to_dict(dsn)
    service = tmp_path / "pg_service.conf"
    service.write_text(f"[prod]\nhost={p['host']}\nport={p['port']}\ndbname={p['dbname']}\nuser={p['user']}\n")
    monkeypatch.setenv("PGSERVICEFILE", str(service))
    for variable, value in (("PGHOST", "localhost"), ("PGPORT", p["port"]), ("PGUSER", p["user"]),
                            ("PGPASSWORD", p["password"])):
        monkeypatch.setenv(variable, value)
    return {
        "keyword form": f"host={p['host']} port={p['port']} dbname={p['dbname']} user={p['user']} "
                        f"password={p['password']}",
        "localhost": f"postgresql://{p['user']}:{p['password']}@localhost:{p['port']}/{p['dbname']}",
        "extra parameters": f"{dsn}?application_name=innocent&connect_timeout=7&sslmode=disable",
        "service file": "service=prod",
        "PG* variables": f"dbname={p['dbname']}",
        "hostaddr": f"host=db.invalid hostaddr=127.0.0.1 port={p['port']} dbname={p['dbname']} "
                    f"user={p['user']} password={p['password']}",
    }


def test_the_source_and_the_catalogue_are_refused_as_targets_in_every_spelling(demo_env, make_database, tmp_path,
                                                                               monkeypatch, pooler):
    from wedbackup_dagster.core.postgres.identity import check_restore_target, same_database
    from wedbackup_dagster.core.errors import RestoreError

    env = demo_env(weddings=2, seed=5, document_bytes=64)
    source, catalogue = env["source"], env["catalogue"]
    other = make_database()
    live_spellings = {**spellings(source, tmp_path, monkeypatch), "through a pooler": through(source, pooler)}
    for label, live in live_spellings.items():
        with pytest.raises(RestoreError, match="live source database") as err:
            check_restore_target(live, source_dsn=source, catalogue_dsn=catalogue, mode="target")
        assert live not in str(err.value), label  # never the DSN itself
        check_restore_target(live, source_dsn=source, catalogue_dsn=catalogue, mode="schema")  # inspection: allowed
        assert same_database(live, source), label
    for label, cat in {**spellings(catalogue, tmp_path, monkeypatch), "pooler": through(catalogue, pooler)}.items():
        for mode in ("target", "schema"):
            with pytest.raises(RestoreError, match="catalogue database"):
                check_restore_target(cat, source_dsn=source, catalogue_dsn=catalogue, mode=mode)
    check_restore_target(other, source_dsn=source, catalogue_dsn=catalogue, mode="target")
    assert not same_database(other, source) and not same_database(through(other, pooler), source)


def test_the_command_line_and_the_engine_refuse_the_source_written_another_way(cli_env, tmp_path, monkeypatch,
                                                                               capsys, pooler):
    from wedbackup_dagster.cli.app import main
    from wedbackup_dagster.core.engine import Engine
    from wedbackup_dagster.core.errors import RestoreError

    source = cli_env["source"]
    assert main(["backup", "--wedding", "2"]) == 0
    with psycopg.connect(source) as conn:
        before = conn.execute("SELECT count(*) FROM guests").fetchone()
    live = spellings(source, tmp_path, monkeypatch)
    capsys.readouterr()
    for label in ("keyword form", "localhost"):
        assert main(["restore", "--wedding", "2", "--target-dsn", live[label]]) == 1, label
        err = capsys.readouterr().err
        assert "the restore target is the live source database" in err and "--in-place" in err, label
        assert live[label] not in err
    for target in (live["extra parameters"], through(source, pooler)):
        with pytest.raises(RestoreError, match="live source database"):
            Engine.from_env().restore_to("2", target, {})
    with psycopg.connect(source) as conn:
        assert conn.execute("SELECT count(*) FROM guests").fetchone() == before


# --- 2. the catalogue is not the source ---------------------------------------------------------------

def test_a_catalogue_that_is_the_source_is_refused_naming_both_variables(demo_env, tmp_path, monkeypatch, pooler):
    from wedbackup_dagster.core.config import Settings
    from wedbackup_dagster.core.engine import Engine
    from wedbackup_dagster.core.errors import ConfigError

    env = demo_env(weddings=2, seed=5, document_bytes=64)
    live = spellings(env["source"], tmp_path, monkeypatch)
    for label in ("keyword form", "service file", "localhost"):  # caught from the DSNs alone
        monkeypatch.setenv("WEDBACKUP_CATALOGUE_DSN", live[label])
        with pytest.raises(ConfigError, match="WEDBACKUP_CATALOGUE_DSN.*same database as WEDBACKUP_SOURCE_DSN"):
            Settings.from_env()
    monkeypatch.setenv("WEDBACKUP_CATALOGUE_DSN", through(env["source"], pooler))  # only the servers tell
    with pytest.raises(ConfigError, match="WEDBACKUP_CATALOGUE_DSN.*same database as WEDBACKUP_SOURCE_DSN"):
        Engine.from_env()
    monkeypatch.setenv("WEDBACKUP_CATALOGUE_DSN", env["catalogue"])
    Engine.from_env()


# --- 4. one wedding, one partition name ---------------------------------------------------------------

def test_a_wedding_id_spelt_another_way_gets_no_partition_archive_or_key_of_its_own(demo_env, capsys):
    from wedbackup_dagster.core.engine import Engine
    from wedbackup_dagster.core.errors import CryptoKeyError, UnknownWeddingError

    demo_env(weddings=5, seed=5, document_bytes=64)
    engine = Engine.from_env()
    with engine.snapshot_session() as session:
        with pytest.raises(UnknownWeddingError, match=r"wedding 03: public\.weddings\.id writes this wedding's key "
                                                      r"as '3'.*as wedding 3"):
            engine.back_up("03", session)
        batch = engine.back_up_many(["003", "2", "3"], session)
    assert isinstance(batch["003"], UnknownWeddingError) and "'3'" in str(batch["003"])
    assert not isinstance(batch["2"], Exception) and not isinstance(batch["3"], Exception)
    with psycopg.connect(engine.settings.catalogue_dsn) as conn:
        partitions = [r[0] for r in conn.execute("SELECT partition FROM wedbackup.backups ORDER BY 1")]
    assert partitions == ["2", "3"]
    assert not [f for p in ("03", "003") for f in (engine.vault.root / p).glob("*.wbk")]
    # Once wedding 3 has its key and backups, no other spelling of it gets a key of its own.
    with pytest.raises(CryptoKeyError, match=r"wedding '0003' is another spelling of wedding '3'.*use '3'"):
        engine.catalogue.wedding_key("0003", engine.keyring)
    # The command line only knows the source's own spelling.
    from wedbackup_dagster.cli.app import main

    capsys.readouterr()
    assert main(["backup", "--wedding", "03"]) == 2
    assert "unknown wedding(s): '03'" in capsys.readouterr().err


def test_other_spellings_match_exactly_the_same_id():
    import re

    from wedbackup_dagster.core.partitions import other_spellings

    def same(a: str, b: str) -> bool:
        pattern = other_spellings(a)
        return pattern is not None and re.search(pattern.replace("(?i)", ""), b, re.I if "(?i)" in pattern else 0) \
            is not None

    assert same("7", "07") and same("07", "7") and same("0", "000") and same("-7", "-007")
    assert not same("7", "70") and not same("7", "17") and not same("-7", "7") and not same("07", "0")
    uuid = "0b9f6b4e-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
    assert same(uuid, uuid.upper()) and other_spellings("wedding_a") is None and other_spellings("platform") is None


# --- 5. the secrets scan: raw key bytes in bytea, big tables streamed ---------------------------------

def test_raw_key_bytes_in_bytea_columns_are_found_in_small_and_big_tables(make_database):
    import base64
    import time

    from wedbackup_dagster_tests.secretscan import SecretScanner, secret_parts

    master = bytes(range(100, 132))
    wedding = bytes(range(7, 39))
    scanner = SecretScanner(secret_parts({"WEDBACKUP_MASTER_KEY": f"prod-1:{base64.b64encode(master).decode()}"}))
    dsn = make_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE small (id int, blob bytea)")
        conn.execute("INSERT INTO small VALUES (1, %s)", (b"\x00junk" + master + b"more",))
        conn.execute("CREATE TABLE big (id int, note text, blob bytea)")
        conn.execute("INSERT INTO big SELECT g, 'row ' || g, decode(repeat(md5(g::text), 16), 'hex') "
                     "FROM generate_series(1, 40000) g")
        conn.execute("INSERT INTO big VALUES (20000, 'x', %s), (40001, 'y', %s)",
                     (b"\xff" * 300 + wedding + b"\x01", b"\x02" + master))
        size = conn.execute("SELECT pg_total_relation_size('big')").fetchone()[0]
    assert size > 8 << 20
    found, _ = scanner.scan_database(dsn, label="src", max_table_bytes=4 << 20)
    got = {(f.where, f.secret) for f in found}
    assert ("database src, public.small.blob", "WEDBACKUP_MASTER_KEY #1 (prod-1) as raw bytes") in got
    assert ("database src, public.big (one of its columns blob, note)",
            "WEDBACKUP_MASTER_KEY #1 (prod-1) as raw bytes") in got
    scanner = scanner.with_secrets({"wedding key 12.abc as raw bytes": wedding})
    started = time.monotonic()
    found, searched = scanner.scan_database(dsn, label="src", max_table_bytes=4 << 20)
    seconds = time.monotonic() - started
    got = {(f.where, f.secret) for f in found}
    assert ("database src, public.big (one of its columns blob, note)", "wedding key 12.abc as raw bytes") in got
    assert searched == 3 and seconds < 30
    assert all(master.hex() not in str(f) and "prod-1:" not in str(f) for f in found)


def test_the_guard_knows_a_catalogue_s_wedding_keys_as_raw_bytes(demo_env):
    from wedbackup_dagster.core.engine import Engine
    from wedbackup_dagster_tests.secretscan import SecretScanner, wedding_key_secrets

    env = demo_env(weddings=2, seed=5, document_bytes=64)
    engine = Engine.from_env()
    key = engine.catalogue.wedding_key("1", engine.keyring)
    secrets = wedding_key_secrets(env["catalogue"], os.environ)
    assert secrets == {f"wedding key {key.key_id} as raw bytes": key.material}
    assert wedding_key_secrets(env["source"], os.environ) == {}  # no key table there
    with psycopg.connect(env["catalogue"], autocommit=True) as conn:
        conn.execute("CREATE TABLE wedbackup.leak (b bytea)")
        conn.execute("INSERT INTO wedbackup.leak VALUES (%s)", (key.material,))
        found, _ = SecretScanner(secrets).scan_database(env["catalogue"], label="cat", schemas=["wedbackup"])
        conn.execute("DROP TABLE wedbackup.leak")  # planted here only: the session's own guard scans it too
    assert [str(f) for f in found] == [f"wedding key {key.key_id} as raw bytes found in database cat, "
                                       "wedbackup.leak.b"]


def test_restore_and_points_name_the_spelling_the_catalogue_knows(cli_env, make_database, capsys):
    from wedbackup_dagster.cli.app import main

    assert main(["backup", "--wedding", "2"]) == 0
    capsys.readouterr()
    for argv in (["points", "--wedding", "002"], ["restore", "--wedding", "02", "--target-dsn", make_database()]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"wedding {argv[2]!r} is recorded as wedding '2'" in err and "use --wedding 2" in err
