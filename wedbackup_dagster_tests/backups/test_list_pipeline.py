"""`backup_wedding_list` on the real stack: an explicit, scattered list of weddings backed up through the
whole pipeline in one run, each wedding's materializations recorded against its own partition; a wedding
that fails is named while the others still land."""
from __future__ import annotations

import dagster as dg
import psycopg
import pytest

from wedbackup_dagster.backups.list_pipeline import list_run_config
from wedbackup_dagster.backups.constants import DB_DUMP, ENCRYPTED_ARCHIVE, REPLICA_KEYS, VERIFIED_RESTORE
from wedbackup_dagster.backups.launch import register_partitions
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.storage.providers import ensure_targets


@pytest.fixture
def fleet(demo_env):
    dsns = demo_env(weddings=5, seed=5, document_bytes=256)
    source, catalogue = dsns["source"], dsns["catalogue"]
    ensure_targets(Engine.from_env().settings)
    with dg.instance_for_test() as instance:
        register_partitions(instance, source)
        yield {"source": source, "catalogue": Catalogue(catalogue), "instance": instance}


def latest(instance, asset_key, partition):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1).records
    return records[0].asset_materialization if records else None


def test_scattered_weddings_back_up_in_one_run(fleet):
    from wedbackup_dagster.definitions import defs

    instance, cat = fleet["instance"], fleet["catalogue"]
    job = defs.resolve_job_def("backup_wedding_list")
    result = job.execute_in_process(run_config=list_run_config(["2", "5", "platform"]), instance=instance)
    assert result.success
    for key in ("2", "5", "platform"):
        backup = cat.require_latest_backup(key)
        assert {c.provider for c in cat.copies(backup.id)} == {"vault", "s3", "gcs", "azure"}
        assert cat.restore_count(backup.id) == 1
        assert latest(instance, ENCRYPTED_ARCHIVE, key).metadata["archive_sha256"].value == backup.archive_sha256
        for asset_key in (DB_DUMP, *REPLICA_KEYS.values(), VERIFIED_RESTORE):
            assert latest(instance, asset_key, key) is not None, (asset_key, key)
    # Only the listed weddings: nothing else was touched.
    assert cat.latest_backup("3") is None and latest(instance, DB_DUMP, "3") is None


def test_a_failing_wedding_is_named_and_the_others_still_land(fleet):
    from wedbackup_dagster.definitions import defs

    with psycopg.connect(fleet["source"]) as conn:
        conn.execute("DELETE FROM weddings WHERE id = 4")
    job = defs.resolve_job_def("backup_wedding_list")
    result = job.execute_in_process(run_config=list_run_config(["1", "4"]), instance=fleet["instance"],
                                    raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "verified_restore_list"
    assert "backup 4:" in failure.step_failure_data.user_failure_data.description
    assert fleet["catalogue"].restore_count(fleet["catalogue"].require_latest_backup("1").id) == 1
    assert latest(fleet["instance"], VERIFIED_RESTORE, "1") is not None
    assert latest(fleet["instance"], DB_DUMP, "4") is None


def test_the_runs_materializations_are_stored_in_one_batch_per_asset(fleet, postgres_dagster_instance, monkeypatch):
    import os

    from wedbackup_dagster.definitions import defs
    from wedbackup_dagster.instance.event_batches import BATCH_SIZE_SETTING
    from wedbackup_dagster_tests.instance.test_event_batches import batch_writes

    # Loading the code location (as a run worker does) turned batching on.
    assert int(os.environ[BATCH_SIZE_SETTING]) > 0
    instance = postgres_dagster_instance
    register_partitions(instance, fleet["source"])
    sizes = batch_writes(instance, monkeypatch)
    result = defs.resolve_job_def("backup_wedding_list").execute_in_process(
        run_config=list_run_config(["1", "3", "5"]), instance=instance)
    assert result.success
    # Six assets, three weddings each: six writes of three events instead of eighteen single ones.
    assert sizes == [3] * 6
    cat = fleet["catalogue"]
    for key in ("1", "3", "5"):
        sha = cat.require_latest_backup(key).archive_sha256
        assert latest(instance, ENCRYPTED_ARCHIVE, key).metadata["archive_sha256"].value == sha
        for asset_key in (DB_DUMP, *REPLICA_KEYS.values(), VERIFIED_RESTORE):
            assert latest(instance, asset_key, key) is not None, (asset_key, key)
