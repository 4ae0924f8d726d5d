"""restore --all's batch path on the real stack (core/disaster/batches.py): many weddings per transaction with
their progress rows; a batch that fails to load is rolled back and its weddings restored again alone — the
one at fault reported by name with its reason, the others restored; spools that spill to disk; and batch
sizes."""
from __future__ import annotations

import psycopg
import pytest

from wedbackup_dagster.core import disaster
from wedbackup_dagster.core.disaster import batches as disaster_batch
from wedbackup_dagster.core.formats.archive import open_archive
from wedbackup_dagster.core.postgres.load_snapshot import restore_snapshot
from wedbackup_dagster_tests.core.disaster.test_restore_all import (  # noqa: F401 (a fixture)
    WEDDINGS, s3_only, shared_platform)
from wedbackup_dagster.dev.compare import table_sums

pytestmark = pytest.mark.stack


def test_batch_sizes_share_the_work_between_loaders():
    assert disaster_batch.batch_size(5, 1) == 2
    assert disaster_batch.batch_size(6, 3) == 1
    assert disaster_batch.batch_size(2000, 4) == 125
    assert disaster_batch.batch_size(100_000, 8) == disaster_batch.BATCH_WEDDINGS
    assert disaster_batch.batch_size(0, 4) == 1


def test_weddings_load_in_batches_with_their_progress_rows(shared_platform, make_database, monkeypatch):
    monkeypatch.setattr(disaster_batch, "SPOOL_IN_MEMORY", 64)  # every wedding's rows spill to a file
    target, lines = make_database(), []
    report = disaster.restore_all(shared_platform["engine"], shared_platform["replicas"], target,
                                  disaster.RestoreAllOptions(providers=("s3",), jobs=1), progress=lines.append)
    assert report.complete, report.lines()
    assert not any("one by one" in line for line in lines), lines  # every wedding went through a batch
    assert report.restored_now == WEDDINGS + 1 and report.phases["load"] > 0 and report.phases["decrypt"] > 0
    assert table_sums(target) == shared_platform["expected"]


def test_a_batch_that_fails_to_load_is_retried_wedding_by_wedding(shared_platform, make_database):
    """Wedding 3's rows are already in the target (loaded behind restore --all's back): its batch fails on
    the duplicate key and rolls back, every wedding of it is restored again alone, and wedding 3 alone is
    reported, by name, with the reason."""
    engine, replicas = shared_platform["engine"], shared_platform["replicas"]
    target = make_database()
    first = disaster.restore_all(engine, replicas, target, s3_only(stop_after=0))  # the platform only
    assert first.stopped and first.restored_now == 1
    backup = engine.catalogue.latest_backup("3")
    with engine.fetched_copy(backup, "s3", replicas) as tmp:
        restore_snapshot(open_archive(tmp, name="wedding 3", resolve_key=engine.resolve_key), target,
                         create_schema=False)
    lines: list[str] = []
    report = disaster.restore_all(engine, replicas, target,
                                  disaster.RestoreAllOptions(providers=("s3",), jobs=1, resume=True),
                                  progress=lines.append)
    assert set(report.failed) == {"3"}
    assert "table public.weddings refused its rows: duplicate key value" in report.failed["3"]
    assert "NOT RESTORED wedding 3: restore of wedding 3 into" in "\n".join(report.lines())
    assert report.restored_now == WEDDINGS - 1 and not report.complete
    assert any("again one by one" in line and "failed to load" in line for line in lines), "\n".join(lines)
    got = {k: v for k, v in table_sums(target).items() if not k.startswith("wedbackup_restore.")}
    assert got == shared_platform["expected"]  # wedding 3 is there once (from the side load), every other wedding once
    with psycopg.connect(target) as conn:
        done = {r[0] for r in conn.execute("SELECT partition FROM wedbackup_restore.partitions")}
    assert done == {"platform", *shared_platform["weddings"]} - {"3"}


def test_every_recovery_point_in_one_query_equals_each_partitions_own(shared_platform):
    from wedbackup_dagster.core.postgres.restore_wedding import recovery_points

    catalogue = shared_platform["engine"].catalogue
    every = disaster.all_recovery_points(catalogue)
    assert set(every) == {"platform", *shared_platform["weddings"]}
    assert all(every[p] == recovery_points(catalogue, p) for p in every)
    assert all(point.verified_at is not None and point.copies for points in every.values() for point in points)


def test_the_one_by_one_path_still_works(shared_platform, make_database):
    target = make_database()
    report = disaster.restore_all(shared_platform["engine"], shared_platform["replicas"], target,
                                  s3_only(batches=False))
    assert report.complete, report.lines()
    assert table_sums(target) == shared_platform["expected"]


def test_from_the_vault_a_damaged_vault_copy_is_refused_and_the_wedding_comes_from_s3(demo_env, make_database):
    """The source lost, the vault kept (restore --all --from vault): each vault copy is read into memory and
    checked against the catalogue's SHA-256 on the bytes read; one damaged file sends its wedding to S3, named
    in the report, and the platform still equals the source."""
    import os

    from wedbackup_dagster.core.engine import Engine
    from wedbackup_dagster.core.storage.providers import ensure_targets
    from wedbackup_dagster_tests.core.disaster.test_restore_all import replicas_of

    dsns = demo_env(weddings=3, seed=5, document_bytes=64)
    engine = Engine.from_env()
    try:
        ensure_targets(engine.settings)
        replicas = {"s3": replicas_of(engine)["s3"]}
        with psycopg.connect(dsns["source"]) as conn:
            ids = [str(r[0]) for r in conn.execute("SELECT id FROM weddings ORDER BY id")]
        with engine.snapshot_session() as session:
            for p in ["platform", *ids]:
                engine.back_up(p, session)
        for p in ["platform", *ids]:
            engine.replicate(p, replicas["s3"])
            engine.verify(p, replicas, provider="s3")
        expected = table_sums(dsns["source"])
        damaged = ids[1]
        backup = engine.catalogue.latest_backup(damaged)
        path = engine.vault.path_for(damaged, backup.archive_sha256)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        os.chmod(path, 0o600)
        path.write_bytes(bytes(data))
        target = make_database()
        report = disaster.restore_all(engine, replicas, target,
                                      disaster.RestoreAllOptions(providers=("vault", "s3"), jobs=2))
        assert report.complete, report.lines()
        assert report.copies_used == {"vault": len(ids), "s3": 1}
        fell_back = [line for line in report.fallbacks if f"wedding {damaged}" in line and "damaged" in line]
        assert fell_back, report.fallbacks
        assert table_sums(target) == expected
    finally:
        engine.catalogue.close()
