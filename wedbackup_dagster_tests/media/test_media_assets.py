"""The media assets in Dagster on the real stack: `backup_media` snapshots, replicates and verifies a
wedding's media with per-wedding metadata and passing checks; a second run uploads nothing."""
from __future__ import annotations

import dagster as dg

from wedbackup_dagster.definitions import defs
from wedbackup_dagster.dev.demo_media import S3Sink, generate_media
from wedbackup_dagster.media.constants import MEDIA_REPLICA_KEYS, MEDIA_SNAPSHOT, VERIFIED_MEDIA

from .conftest import TEST_SCALE


def _env(world, monkeypatch) -> None:
    monkeypatch.setenv("WEDBACKUP_CATALOGUE_DSN", world.catalogue.dsn)
    monkeypatch.setenv("WEDBACKUP_VAULT_DIR", str(world.settings.vault_dir))
    monkeypatch.setenv("WEDBACKUP_S3_BUCKET", world.settings.s3.bucket)
    monkeypatch.setenv("WEDBACKUP_GCS_BUCKET", world.settings.gcs.bucket)
    monkeypatch.setenv("WEDBACKUP_AZURE_CONTAINER", world.settings.azure.container)
    monkeypatch.setenv("WEDBACKUP_MEDIA_SOURCE", f"s3://{world.bucket}")


def _metadata(instance, key: dg.AssetKey, partition: str) -> dict:
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]),
                                              limit=1).records
    assert records, (key, partition)
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def test_backup_media_job(media_world, monkeypatch):
    world = media_world
    _env(world, monkeypatch)
    generate_media(S3Sink(world.s3, world.bucket), ["21", "22"], seed=11, scale=TEST_SCALE)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("weddings", ["21", "22", "platform"])
    job = defs.resolve_job_def("backup_media")
    result = job.execute_in_process(instance=instance, tags={"dagster/asset_partition_range_start": "21",
                                                             "dagster/asset_partition_range_end": "platform"})
    assert result.success
    snap = _metadata(instance, MEDIA_SNAPSHOT, "22")
    assert snap["files"] > 5 and 0 < snap["new_bytes"] < snap["read_bytes"] and snap["dedup_ratio"] > 1
    assert not snap["unchanged"] and snap["packs"] >= 1
    for provider, key in MEDIA_REPLICA_KEYS.items():
        assert _metadata(instance, key, "21")["uploaded_objects"] >= 2, provider
    assert _metadata(instance, VERIFIED_MEDIA, "platform")["files_checked"] > 0
    evaluations = [e for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    checks = {(e.event_specific_data.check_name, e.event_specific_data.partition): e.event_specific_data.passed
              for e in evaluations}
    assert checks[("media_integrity", "21")] and checks[("media_three_two_one", "22")]
    assert checks[("media_freshness", "platform")]
    assert len(checks) == 9 and all(checks.values()), checks

    again = job.execute_in_process(instance=instance, tags={"dagster/asset_partition_range_start": "21",
                                                            "dagster/asset_partition_range_end": "platform"})
    assert again.success
    assert _metadata(instance, MEDIA_SNAPSHOT, "21")["unchanged"] is True
    for key in MEDIA_REPLICA_KEYS.values():
        assert _metadata(instance, key, "22")["uploaded_objects"] == 0


def test_media_assets_take_the_runs_resources(media_world, monkeypatch):
    """The media steps use the run's `replicas` resource, not clients of their own from the environment: an
    Azure resource pointed at a closed port fails media_azure_replica (naming the wedding), while the
    environment's Azure settings are sound and S3, from the same resources, uploads."""
    import base64

    from wedbackup_dagster.media.assets import media_assets
    from wedbackup_dagster.shared.resources import AzureBlobResource, ProviderReplicasResource, build_resources

    world = media_world
    _env(world, monkeypatch)
    generate_media(S3Sink(world.s3, world.bucket), ["31"], seed=5, scale=TEST_SCALE)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("weddings", ["31"])
    resources = build_resources()
    unreachable = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey="
                   + base64.b64encode(b"not the account key of any stack").decode()
                   + ";BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;")
    resources["replicas"] = ProviderReplicasResource(s3=resources["s3"], gcs=resources["gcs"],
                                                     azure=AzureBlobResource(connection_string=unreachable))
    snapshot, s3_replica, azure_replica = media_assets[0], media_assets[1], media_assets[3]
    assert azure_replica.key == MEDIA_REPLICA_KEYS["azure"] and s3_replica.key == MEDIA_REPLICA_KEYS["s3"]
    result = dg.materialize([snapshot, s3_replica, azure_replica], partition_key="31", resources=resources,
                            instance=instance, raise_on_error=False)
    assert not result.success
    failed = {e.step_key for e in result.all_events if e.event_type_value == "STEP_FAILURE"}
    assert failed == {"media_azure_replica"}, failed
    assert _metadata(instance, MEDIA_REPLICA_KEYS["s3"], "31")["uploaded_objects"] >= 2
    providers = {c["provider"] for c in world.store.copies("31")}
    assert providers == {"vault", "s3"}, providers
