"""The upload step uploads many weddings side by side to every selected provider at once, through Dagster on
the real stack: the partitioned `replicate_to_providers` multi-asset over a range of weddings (all three
providers, or one alone) and `backup_wedding_list`'s `replicate_list` op. Azure refuses some objects (another
writer's leased blob sits at their keys): those weddings, and only those, are named in the step's failure,
under Azure; every other wedding is materialized and recorded, at every provider; no partial object is left."""
import dagster as dg
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from wedbackup_dagster.backups.list_pipeline import WeddingListConfig, replicate_list
from wedbackup_dagster.shared.wedding_outcomes import WeddingsOfStep as Step
from wedbackup_dagster.backups.constants import AZURE_REPLICA, REPLICA_KEYS
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


def materialized(instance: dg.DagsterInstance, partition: str, asset_key: dg.AssetKey = AZURE_REPLICA) -> bool:
    return bool(instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1).records)


def copies_of(engine: Engine, wedding: str) -> set[str]:
    return {c.provider for c in engine.catalogue.copies(engine.catalogue.require_latest_backup(wedding).id)}


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


def _run_range(fleet, selection: list[dg.AssetKey]) -> tuple[dg.ExecuteInProcessResult, str]:
    from wedbackup_dagster.definitions import defs

    job = defs.resolve_job_def("backup_weddings")
    result = job.execute_in_process(
        instance=fleet["instance"], asset_selection=selection, raise_on_error=False,
        tags={ASSET_PARTITION_RANGE_START_TAG: WEDDINGS[0], ASSET_PARTITION_RANGE_END_TAG: WEDDINGS[-1]})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return result, failure.step_failure_data.user_failure_data.description


def test_one_provider_alone_uploads_a_range_at_once_and_names_the_refused(fleet):
    """A subset of the upload step (the provider-health catch-up selects one provider's asset like this)."""
    _, description = _run_range(fleet, [AZURE_REPLICA])
    assert description.startswith(f"azure upload failed for {len(REFUSED)} of {len(WEDDINGS)} partition(s)")
    assert_only_the_refused_failed(fleet, description)
    for wedding in WEDDINGS:  # the providers not selected were left alone
        assert copies_of(fleet["engine"], wedding) <= {"vault", "azure"}
        assert not materialized(fleet["instance"], wedding, REPLICA_KEYS["s3"])
        assert not materialized(fleet["instance"], wedding, REPLICA_KEYS["gcs"])


@pytest.mark.parametrize("in_workers", [False, True], ids=["in the step's process", "in worker processes"])
def test_the_upload_step_materializes_every_provider_and_fails_only_the_refused_azure_partitions(
        fleet, in_workers, monkeypatch):
    if in_workers:  # shares of 10 weddings uploaded by two worker processes (Engine.replicate_to_all)
        monkeypatch.setattr(Engine, "upload_min_share", 10)
        monkeypatch.setenv("WEDBACKUP_UPLOAD_WORKERS", "2")
    from wedbackup_dagster.core import parallel_backup

    calls: list[int] = []
    real = parallel_backup.upload_in_workers
    monkeypatch.setattr(parallel_backup, "upload_in_workers",
                        lambda *args, **kwargs: calls.append(args[5]) or real(*args, **kwargs))
    result, description = _run_range(fleet, list(REPLICA_KEYS.values()))
    assert description.startswith(f"azure upload failed for {len(REFUSED)} of {len(WEDDINGS)} partition(s)")
    assert "s3 upload failed" not in description and "gcs upload failed" not in description
    assert_only_the_refused_failed(fleet, description)
    for wedding in WEDDINGS:  # S3 and GCS: every wedding materialized (once) and recorded
        assert {"s3", "gcs"} <= copies_of(fleet["engine"], wedding), wedding
        for provider in ("s3", "gcs"):
            records = fleet["instance"].fetch_materializations(dg.AssetRecordsFilter(
                asset_key=REPLICA_KEYS[provider], asset_partitions=[wedding]), limit=5).records
            assert len(records) == 1 and records[0].run_id == result.run_id, (provider, wedding)
            assert records[0].asset_materialization.metadata["provider_checksum"].value
    assert calls == ([2] if in_workers else [])


@dg.op(out=dg.Out(Step))
def already_sealed(config: WeddingListConfig) -> Step:
    """Stands in for snapshot_and_seal_list: these weddings' archives are already in the vault."""
    return {"ok": list(config.weddings), "failed": {}}


@dg.job(executor_def=dg.in_process_executor, resource_defs=build_resources())
def uploads_only():
    replicate_list(already_sealed())


def test_the_list_runs_upload_op_uploads_at_once_and_keeps_each_weddings_outcome(fleet):
    result = uploads_only.execute_in_process(
        instance=fleet["instance"], run_config={"ops": {"already_sealed": {"config": {"weddings": WEDDINGS}}}})
    step = result.output_for_node("replicate_list")
    azure = step["by_provider"]["azure"]
    assert set(azure["failed"]) == REFUSED and set(azure["ok"]) == set(WEDDINGS) - REFUSED
    for provider in ("s3", "gcs"):
        assert not step["by_provider"][provider]["failed"] and set(step["by_provider"][provider]["ok"]) == set(WEDDINGS)
    assert set(step["ok"]) == set(WEDDINGS)  # every wedding has a copy somewhere to verify
    assert set(step["failed"]) == REFUSED and all(m.startswith("azure upload: ") for m in step["failed"].values())
    assert_only_the_refused_failed(fleet, "\n".join(f"wedding {w}: {msg}" for w, msg in azure["failed"].items()))
