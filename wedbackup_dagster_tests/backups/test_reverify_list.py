"""Re-verification and backfills from the UI that do not fragment: the backfill-consolidating sensor on a real
instance (exact run requests for scattered, contiguous and mixed backfills) and `reverify_wedding_list` with its
selection presets on the real stack."""
import time
import uuid

import dagster as dg
import pytest
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill

from wedbackup_dagster.backups.list_pipeline import list_run_config
from wedbackup_dagster.backups.reverify_list import (
    BACKFILL_TAG,
    RUN_SIZE,
    reverify_run_config,
    wedding_backfill_consolidation,
)
from wedbackup_dagster.backups.constants import (
    AZURE_REPLICA,
    DB_DUMP,
    ENCRYPTED_ARCHIVE,
    GCS_REPLICA,
    REPLICA_KEYS,
    S3_REPLICA,
    VERIFIED_RESTORE,
)
from wedbackup_dagster.backups.launch import register_partitions
from wedbackup_dagster.backups.partitions import weddings_partitions
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.errors import WedbackupError
from wedbackup_dagster.definitions import defs

WHOLE_JOB = [DB_DUMP, ENCRYPTED_ARCHIVE, *REPLICA_KEYS.values(), VERIFIED_RESTORE]


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        # Insertion order 1..3000: every third wedding is a scattered selection of 1,000.
        inst.add_dynamic_partitions(weddings_partitions.name, ["platform", *(str(i) for i in range(1, 3001))])
        yield inst


def launch_backfill(instance, assets, keys) -> str:
    """What the UI's "Launch backfill" stores: an asset backfill over `keys` of `assets`, status requested."""
    backfill_id = uuid.uuid4().hex[:8]
    instance.add_backfill(PartitionBackfill.from_asset_partitions(
        backfill_id=backfill_id, asset_graph=defs.resolve_asset_graph(), partition_names=keys,
        asset_selection=assets, backfill_timestamp=time.time(), tags={}, dynamic_partitions_store=instance,
        all_partitions=False, title=None, description=None, run_config=None))
    return backfill_id


def tick(instance):
    context = dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def())
    return wedding_backfill_consolidation(context)


def test_a_scattered_reverification_of_1000_weddings_becomes_four_list_runs(instance):
    scattered = [str(i) for i in range(3, 3001, 3)]
    assert len(scattered) == 1000
    backfill_id = launch_backfill(instance, [VERIFIED_RESTORE], scattered)

    requests = tick(instance)

    chunks = [scattered[i:i + RUN_SIZE] for i in range(0, 1000, RUN_SIZE)]
    assert len(chunks) == 4 <= 12
    assert [(r.job_name, r.run_key, r.run_config, r.tags) for r in requests] == [
        ("reverify_wedding_list", f"backfill-{backfill_id}-{n}", reverify_run_config(chunk),
         {BACKFILL_TAG: backfill_id, "wedbackup/trigger": "backfill"}) for n, chunk in enumerate(chunks)]
    # The backfill is cancelled, so Dagster's daemon makes no more range runs and cancels the queued ones.
    assert instance.get_backfill(backfill_id).status == BulkActionStatus.CANCELING
    assert isinstance(tick(instance), dg.SkipReason)  # asked once only
    # Outside a code location (no repository in the context) the sensor finds the asset graph itself.
    again = launch_backfill(instance, [VERIFIED_RESTORE], scattered[:300])
    requests = wedding_backfill_consolidation(dg.build_sensor_context(instance=instance))
    assert [r.run_config for r in requests] == [reverify_run_config(scattered[:250]),
                                                reverify_run_config(scattered[250:300])]
    assert instance.get_backfill(again).status == BulkActionStatus.CANCELING


def test_a_scattered_backup_backfill_becomes_backup_list_runs(instance):
    picked = ["2900", "7", "1500", "8", "42"]  # selection order does not matter: runs follow insertion order
    backfill_id = launch_backfill(instance, WHOLE_JOB, picked)
    requests = tick(instance)
    assert [(r.job_name, r.run_config) for r in requests] == [
        ("backup_wedding_list", list_run_config(["7", "8", "42", "1500", "2900"]))]
    assert instance.get_backfill(backfill_id).status == BulkActionStatus.CANCELING


def test_contiguous_backfills_and_replica_only_backfills_are_left_to_dagster(instance):
    contiguous = launch_backfill(instance, [VERIFIED_RESTORE], [str(i) for i in range(100, 600)])
    two_ranges = launch_backfill(instance, WHOLE_JOB, ["1", "2", "3", "10", "11"])
    replicas = launch_backfill(instance, [S3_REPLICA, GCS_REPLICA, AZURE_REPLICA], ["1", "5", "9", "13"])
    result = tick(instance)
    assert isinstance(result, dg.SkipReason) and "none of scattered weddings" in result.skip_message
    for backfill_id in (contiguous, two_ranges, replicas):
        assert instance.get_backfill(backfill_id).status == BulkActionStatus.REQUESTED


# ------------------------------------------------------------------------------- the list job on the stack


@pytest.fixture
def backed_up(demo_env):
    dsns = demo_env(weddings=6, seed=5, document_bytes=256)
    engine = Engine.from_env()
    with engine.snapshot_session() as session:
        assert not [o for _, o in engine.back_up_each([str(i) for i in range(1, 7)], session)
                    if isinstance(o, WedbackupError)]
    cat = Catalogue(dsns["catalogue"])
    # Wedding 2's latest restore failed, wedding 3's succeeded; the others were never restored.
    cat.record_restore(cat.require_latest_backup("2").id, provider="vault", ok=False, seconds=0.1,
                       detail={"error": "test"})
    cat.record_restore(cat.require_latest_backup("3").id, provider="vault", ok=True, seconds=0.1, detail={})
    with dg.instance_for_test() as inst:
        register_partitions(inst, dsns["source"])
        yield {"catalogue": cat, "instance": inst}
    cat.close()


def restores(cat: Catalogue) -> dict[str, int]:
    return {w: cat.restore_count(cat.require_latest_backup(w).id) for w in [str(i) for i in range(1, 7)]}


def verified_partitions(instance) -> set[str]:
    return {r.partition_key for r in instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=VERIFIED_RESTORE), limit=100).records}


def test_reverify_wedding_list_presets_select_from_the_catalogue(backed_up):
    cat, instance = backed_up["catalogue"], backed_up["instance"]
    job = defs.resolve_job_def("reverify_wedding_list")
    before = restores(cat)

    result = job.execute_in_process(instance=instance)  # the Launchpad's default: failed: true
    assert result.success
    assert {w for w, n in restores(cat).items() if n != before[w]} == {"2"}
    assert verified_partitions(instance) == {"2"}

    result = job.execute_in_process(instance=instance, run_config=reverify_run_config(["6", "4"]))
    assert result.success and verified_partitions(instance) == {"2", "4", "6"}

    result = job.execute_in_process(
        instance=instance, run_config={"ops": {"select_weddings": {"config": {"not_verified_for_days": 1}}}})
    assert result.success and verified_partitions(instance) == {"1", "2", "4", "5", "6"}
    assert restores(cat)["3"] == 1  # verified within the day: not again


def test_reverify_wedding_list_refuses_an_ambiguous_selection_naming_the_fields(backed_up):
    job = defs.resolve_job_def("reverify_wedding_list")
    result = job.execute_in_process(
        instance=backed_up["instance"], raise_on_error=False,
        run_config={"ops": {"select_weddings": {"config": {"failed": True, "weddings": ["1"]}}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    description = failure.step_failure_data.user_failure_data.description
    assert "exactly one of the config fields weddings, failed" in description
