"""The replica steps upload many weddings side by side, through Dagster on the real stack: the partitioned
`azure_replica` asset over a range of weddings and `backup_wedding_list`'s `azure_replica_list` op. Azure
refuses some objects (another writer's leased blob sits at their keys): those weddings, and only those, are
named in the step's failure; every other wedding is materialized and recorded; no partial object is left."""
import dagster as dg
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from wedbackup_dagster.backups.list_pipeline import WeddingListConfig, azure_replica_list
from wedbackup_dagster.shared.wedding_outcomes import WeddingsOfStep as Step
from wedbackup_dagster.backups.constants import AZURE_REPLICA
from wedbackup_dagster.backups.launch import register_partitions
from wedbackup_dagster.shared.resources import build_resources
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.errors import WedbackupError
from wedbackup_dagster.core.storage.providers import ensure_targets
from wedbackup_dagster.core.storage.replicas.azure import AzureReplica, azure_service_from
from wedbackup_dagster_tests.core.test_parallel_uploads import JUNK, lease_other_content

WEDDINGS = [str(i) for i in range(1, 31)]
REFUSED = {"4", "17", "29"}


@pytest.fixture
def fleet(demo_env):
    """30 weddings sealed into the vault and the catalogue, Azure holding a leased foreign blob at the keys of
    REFUSED's archives, and a Dagster instance with the weddings as partitions."""
    dsns = demo_env(weddings=len(WEDDINGS), seed=13, document_bytes=256, WEDBACKUP_UPLOAD_CONCURRENCY="8")
    engine = Engine.from_env()
    ensure_targets(engine.settings)
    with engine.snapshot_session() as session:
        assert not [o for _, o in engine.back_up_each(WEDDINGS, session) if isinstance(o, WedbackupError)]
    replica = AzureReplica(azure_service_from(engine.settings.azure), engine.settings.azure)
    keys = {w: replica.object_key(w, engine.catalogue.require_latest_backup(w).archive_sha256) for w in WEDDINGS}
    for wedding in REFUSED:
        lease_other_content(replica, keys[wedding])
    with dg.instance_for_test() as instance:
        register_partitions(instance, dsns["source"])
        yield {"engine": engine, "replica": replica, "keys": keys, "instance": instance}


def materialized(instance: dg.DagsterInstance, partition: str) -> bool:
    return bool(instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=AZURE_REPLICA, asset_partitions=[partition]), limit=1).records)


def assert_only_the_refused_failed(fleet, description: str) -> None:
    engine, replica, keys, instance = fleet["engine"], fleet["replica"], fleet["keys"], fleet["instance"]
    for wedding in REFUSED:
        assert f"wedding {wedding}: " in description and keys[wedding] in description, (wedding, description)
        backup = engine.catalogue.require_latest_backup(wedding)
        assert "azure" not in {c.provider for c in engine.catalogue.copies(backup.id)}
        assert not materialized(instance, wedding)
        assert replica.container.get_blob_client(keys[wedding]).download_blob().readall() == JUNK
    for wedding in set(WEDDINGS) - REFUSED:
        assert f"wedding {wedding}: " not in description
        backup = engine.catalogue.require_latest_backup(wedding)
        assert "azure" in {c.provider for c in engine.catalogue.copies(backup.id)}, wedding
        assert materialized(instance, wedding), wedding
    # Nothing but whole archives: every object is one of ours, at its full size or the other writer's blob.
    listed = {o.key: o.size for o in replica.list()}
    assert set(listed) == set(keys.values())
    for wedding in set(WEDDINGS) - REFUSED:
        assert listed[keys[wedding]] == engine.catalogue.require_latest_backup(wedding).size


def test_the_partitioned_replica_asset_uploads_a_range_at_once_and_names_the_refused(fleet):
    from wedbackup_dagster.definitions import defs

    job = defs.resolve_job_def("backup_weddings")
    result = job.execute_in_process(
        instance=fleet["instance"], asset_selection=[AZURE_REPLICA], raise_on_error=False,
        tags={ASSET_PARTITION_RANGE_START_TAG: WEDDINGS[0], ASSET_PARTITION_RANGE_END_TAG: WEDDINGS[-1]})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    description = failure.step_failure_data.user_failure_data.description
    assert description.startswith(f"azure upload failed for {len(REFUSED)} of {len(WEDDINGS)} partition(s)")
    assert_only_the_refused_failed(fleet, description)


@dg.op(out=dg.Out(Step))
def already_sealed(config: WeddingListConfig) -> Step:
    """Stands in for snapshot_and_seal_list: these weddings' archives are already in the vault."""
    return {"ok": list(config.weddings), "failed": {}}


@dg.job(executor_def=dg.in_process_executor, resource_defs=build_resources())
def azure_uploads_only():
    azure_replica_list(already_sealed())


def test_the_list_runs_upload_op_uploads_at_once_and_keeps_each_weddings_outcome(fleet):
    result = azure_uploads_only.execute_in_process(
        instance=fleet["instance"], run_config={"ops": {"already_sealed": {"config": {"weddings": WEDDINGS}}}})
    step = result.output_for_node("azure_replica_list")
    assert set(step["failed"]) == REFUSED and set(step["ok"]) == set(WEDDINGS) - REFUSED
    assert_only_the_refused_failed(fleet, "\n".join(f"wedding {w}: {msg}" for w, msg in step["failed"].items()))
