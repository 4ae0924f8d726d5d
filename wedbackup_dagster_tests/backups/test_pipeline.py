"""The whole pipeline through Dagster on the real stack: every partition of a demo database backed up
(dump, seal, vault, S3, GCS, Azure, verified restore) and restored into an empty database, table for
table; and what happens when a wedding vanishes or a provider is down."""
from __future__ import annotations

import socket

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from wedbackup_dagster.backups.constants import (AZURE_REPLICA, DB_DUMP, ENCRYPTED_ARCHIVE, GCS_REPLICA, S3_REPLICA,
                                                  VERIFIED_RESTORE)
from wedbackup_dagster.backups.launch import register_partitions, run_job_for
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.storage.providers import ensure_targets


def table_fingerprints(dsn: str) -> dict[str, tuple[int, str]]:
    """Row count and an ordered checksum of every user table: equal fingerprints = equal contents."""
    out = {}
    with psycopg.connect(dsn) as conn:
        tables = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'"
        ).fetchall()
        for schema, name in tables:
            ident = sql.Identifier(schema, name)
            row = conn.execute(sql.SQL("SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') "
                                       "FROM {} t").format(ident)).fetchone()
            out[f"{schema}.{name}"] = (row[0], row[1])
    return out


@pytest.fixture
def pipeline(demo_env):
    dsns = demo_env(weddings=24, seed=11, document_bytes=512)
    source, catalogue = dsns["source"], dsns["catalogue"]
    engine = Engine.from_env()
    ensure_targets(engine.settings)
    with dg.instance_for_test() as instance:
        keys = register_partitions(instance, source)
        yield {"source": source, "catalogue": Catalogue(catalogue), "engine": engine, "instance": instance,
               "keys": keys}


def test_a_run_spreads_snapshot_and_verification_over_worker_processes_and_keeps_each_weddings_record(
        pipeline, monkeypatch):
    # Batches of 8 and shares of 8: 23 weddings make three snapshot batches and two verification shares,
    # side by side in two worker processes (WEDBACKUP_SNAPSHOT_WORKERS, core/parallel_backup.py).
    monkeypatch.setenv("WEDBACKUP_SNAPSHOT_WORKERS", "2")
    monkeypatch.setattr(Engine, "batch_size", 8)
    monkeypatch.setattr(Engine, "verify_min_share", 8)
    instance, keys = pipeline["instance"], pipeline["keys"]
    results = run_job_for("backup_weddings", keys, instance=instance)
    assert len(results) == 1 and results[0].success, results
    cat: Catalogue = pipeline["catalogue"]
    for key in keys:
        backup = cat.require_latest_backup(key)
        assert {c.provider for c in cat.copies(backup.id)} == {"vault", "s3", "gcs", "azure"}
        assert cat.restore_count(backup.id) == 1
        # Each wedding's own materializations, with its own archive and its own verified copy.
        assert _latest_for(instance, ENCRYPTED_ARCHIVE, key).metadata["archive_sha256"].value == backup.archive_sha256
        assert _latest_for(instance, VERIFIED_RESTORE, key).metadata["checked_copy"].value in {"s3", "gcs", "azure"}


def test_every_partition_backs_up_and_restores_into_an_empty_database(pipeline, make_database):
    instance, keys = pipeline["instance"], pipeline["keys"]
    results = run_job_for("backup_weddings", keys, instance=instance)
    assert len(results) == 1 and results[0].success, results  # one batched run for the whole fleet
    # Progress a person can see in the run's log in the UI: done out of the total, rate, ETA; per step.
    messages = [e.user_message for e in instance.all_logs(results[0].run_id)]
    for what in ("snapshot and seal", "uploads to s3, gcs, azure", "verified restore"):
        assert any(m.startswith(f"{what}: {len(keys)} of {len(keys)} weddings (100%)") for m in messages), what

    cat: Catalogue = pipeline["catalogue"]
    for key in keys:
        backup = cat.require_latest_backup(key)
        assert {c.provider for c in cat.copies(backup.id)} == {"vault", "s3", "gcs", "azure"}
        assert cat.restore_count(backup.id) == 1  # verified_restore ran for every partition

    # Each wedding's materialization carries its own metadata, not the batch's.
    wedding = keys[1]
    event = instance.get_latest_materialization_event(DB_DUMP)
    assert event is not None
    dump = _latest_for(instance, DB_DUMP, wedding)
    manifest = cat.require_latest_backup(wedding).manifest
    assert dump.metadata["rows"].value == sum(t["rows"] for t in manifest["tables"])
    archive = _latest_for(instance, ENCRYPTED_ARCHIVE, wedding)
    assert archive.metadata["archive_sha256"].value == cat.require_latest_backup(wedding).archive_sha256
    assert _latest_for(instance, VERIFIED_RESTORE, wedding).metadata["checked_copy"].value in {"s3", "gcs", "azure"}
    # verified_restore rotates through the providers.
    checked = {_latest_for(instance, VERIFIED_RESTORE, k).metadata["checked_copy"].value for k in keys}
    assert checked == {"s3", "gcs", "azure"}

    # Restore everything into an empty database: platform first (creates the schema), then each wedding.
    target = make_database()
    engine: Engine = pipeline["engine"]
    replicas = {}
    for key in keys:
        engine.restore_to(key, target, replicas)
    assert table_fingerprints(target) == table_fingerprints(pipeline["source"])


def _latest_for(instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1).records
    assert records, f"no materialization of {asset_key.to_user_string()} for {partition}"
    return records[0].asset_materialization


def test_wedding_deleted_after_discovery_fails_alone(pipeline):
    instance, keys = pipeline["instance"], pipeline["keys"]
    gone = keys[3]
    with psycopg.connect(pipeline["source"]) as conn:
        conn.execute("SET session_replication_role = replica")  # drop it with its rows, as the app would
        conn.execute("DELETE FROM weddings WHERE id = %s", (int(gone),))
    results = run_job_for("backup_weddings", keys[1:6], instance=instance)
    assert not results[0].success
    assert any(f"wedding {gone}" in f for f in results[0].failures), results[0].failures
    cat: Catalogue = pipeline["catalogue"]
    assert cat.latest_backup(gone) is None
    for key in [k for k in keys[1:6] if k != gone]:
        assert cat.latest_backup(key) is not None, key
        assert _latest_for(instance, ENCRYPTED_ARCHIVE, key).metadata["archive_sha256"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_down_other_replicas_succeed_then_catch_up(pipeline, monkeypatch):
    instance, keys = pipeline["instance"], pipeline["keys"]
    wedding = keys[2]
    good_endpoint = pipeline["engine"].settings.s3.endpoint_url
    monkeypatch.setenv("WEDBACKUP_S3_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    results = run_job_for("backup_weddings", [wedding], instance=instance)
    assert not results[0].success
    assert any("s3" in f for f in results[0].failures)
    cat: Catalogue = pipeline["catalogue"]
    backup = cat.require_latest_backup(wedding)
    assert {c.provider for c in cat.copies(backup.id)} == {"vault", "gcs", "azure"}
    run = instance.get_run_by_id(results[0].run_id)
    stats = instance.get_run_step_stats(run.run_id)
    upload_step = next(s for s in stats if s.step_key == "replicate_to_providers")
    assert upload_step.attempts > 1  # retried by Dagster with backoff before giving up
    # GCS and Azure were recorded by the first attempt, once: the retries redid only S3's upload.
    def in_this_run(asset_key: dg.AssetKey) -> int:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[wedding]), limit=20).records
        return sum(r.run_id == run.run_id for r in records)

    assert in_this_run(GCS_REPLICA) == in_this_run(AZURE_REPLICA) == 1
    assert in_this_run(S3_REPLICA) == 0

    monkeypatch.setenv("WEDBACKUP_S3_ENDPOINT_URL", good_endpoint)
    from wedbackup_dagster.definitions import defs

    job = defs.resolve_job_def("backup_weddings")
    outcome = job.execute_in_process(instance=instance, partition_key=wedding, asset_selection=[S3_REPLICA],
                                     raise_on_error=False)
    assert outcome.success
    assert {c.provider for c in cat.copies(backup.id)} == {"vault", "s3", "gcs", "azure"}
