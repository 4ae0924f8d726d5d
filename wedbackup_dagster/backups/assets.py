"""The per-wedding backup assets. Each step may cover many weddings (a batched run): it loops over
`context.partition_keys`, reports per-wedding metadata, and when some weddings fail it still records the
ones that succeeded before failing the step with the list of failures."""

from collections.abc import Iterator, Mapping
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource
from dagster_gcp import GCSResource

from ..core.engine import PROVIDERS, BackupOutcome, ReplicaOutcome, VerifyOutcome
from ..core.errors import WedbackupError
from ..partition_metadata import add_partition_metadata
from ..progress import Progress
from .constants import (
    DB_DUMP,
    ENCRYPTED_ARCHIVE,
    GROUP,
    OWNERS,
    REPLICA_KEYS,
    RESTORE_POOL,
    SOURCE_POOL,
    UPLOAD_POOLS,
    VERIFIED_RESTORE,
)
from .partitions import validated_keys, weddings_partitions
from .resources import AzureBlobResource, WedbackupEngineResource

BATCHED = dg.BackfillPolicy.single_run()
# A provider hiccup is retried with growing pauses; uploads are content-addressed, so a retry after a
# partial success is a no-op for the weddings already uploaded.
UPLOAD_RETRY = dg.RetryPolicy(max_retries=3, delay=1, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)

PerKeyMetadata = dict[str, dict[dg.AssetKey, dict[str, Any]]]


def _finish(context: dg.AssetExecutionContext, asset_keys: list[dg.AssetKey], done: PerKeyMetadata,
            failures: dict[str, str], what: str) -> Iterator[Any]:
    """Report every wedding's own metadata; fail the step naming the weddings that failed, if any."""
    if not failures:
        # One read of the run's range for the whole step, not one per wedding (partition_metadata.py).
        add_partition_metadata(context, ((key, asset_key, metadata) for key, per_asset in done.items()
                                         for asset_key, metadata in per_asset.items()))
        for asset_key in asset_keys:
            yield dg.MaterializeResult(asset_key=asset_key)
        return
    # Some weddings failed: record the successes one by one (an output would mark every wedding of
    # the run as materialized), then fail, so Dagster's retry and the UI show exactly what is missing.
    for key, per_asset in done.items():
        for asset_key, metadata in per_asset.items():
            yield dg.AssetMaterialization(asset_key=asset_key, partition=key, metadata=metadata)
    lines = "\n".join(f"- wedding {k}: {msg}" for k, msg in sorted(failures.items()))
    raise dg.Failure(description=f"{what} failed for {len(failures)} of {len(failures) + len(done)} "
                                 f"partition(s):\n{lines}",
                     metadata={"failed_partitions": dg.MetadataValue.json(sorted(failures))})


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> dg.MetadataValue:
    schema = dg.TableSchema(columns=[dg.TableColumn(name, type_) for name, type_ in columns])
    records = [dg.TableRecord({name: row.get(name) for name, _ in columns}) for row in rows]
    return dg.MetadataValue.table(records=records, schema=schema)


def dump_metadata(o: BackupOutcome) -> dict[str, Any]:
    m = o.manifest
    tables = [{"table": f"{t['schema']}.{t['name']}", "rows": int(t["rows"]), "bytes": int(t["bytes"])}
              for t in m["tables"]]
    return {
        "rows": dg.MetadataValue.int(sum(t["rows"] for t in tables)),
        "raw_bytes": dg.MetadataValue.int(sum(t["bytes"] for t in tables)),
        "tables": _table(tables, [("table", "string"), ("rows", "int"), ("bytes", "int")]),
        "snapshot_time": dg.MetadataValue.text(str(m["snapshot_time"])),
        "txid": dg.MetadataValue.text(str(m.get("txid", ""))),
        "server_version": dg.MetadataValue.text(str(m.get("server_version", ""))),
        "schema_fingerprint": dg.MetadataValue.text(str(m.get("schema_fingerprint", ""))[:16]),
        **_broken_keys_metadata(m),
    }


def _broken_keys_metadata(m: dict[str, Any]) -> dict[str, Any]:
    """Platform only: rows that break a validated foreign key on the source (those on a wedding path reach
    no wedding; the platform archive carries them), per key, so the UI shows them on every platform backup."""
    if m.get("partition") != "platform" or not isinstance(m.get("broken_foreign_keys"), list):
        return {}
    rows = [{"table": f"{fk.get('schema')}.{fk.get('table')}", "constraint": str(fk.get("constraint")),
             "parent": str(fk.get("parent")), "rows": int(fk.get("source_rows") or 0)}
            for fk in m["broken_foreign_keys"] if isinstance(fk, dict) and fk.get("source_rows")]
    return {"rows_breaking_foreign_keys": dg.MetadataValue.int(sum(r["rows"] for r in rows)),
            "broken_foreign_keys": _table(rows, [("table", "string"), ("constraint", "string"),
                                                 ("parent", "string"), ("rows", "int")])}


def archive_metadata(o: BackupOutcome) -> dict[str, Any]:
    s = o.stats
    return {
        "vault_path": dg.MetadataValue.path(str(o.vault.path)),
        "archive_sha256": dg.MetadataValue.text(s.sha256),
        "raw_bytes": dg.MetadataValue.int(s.raw_bytes),
        "compressed_bytes": dg.MetadataValue.int(s.compressed_bytes),
        "sealed_bytes": dg.MetadataValue.int(s.sealed_bytes),
        "compression_ratio": dg.MetadataValue.float(round(s.raw_bytes / max(s.compressed_bytes, 1), 2)),
        "key_id": dg.MetadataValue.text(s.key_id),
        "seconds": dg.MetadataValue.float(round(o.seconds, 3)),
    }


def replica_metadata(o: ReplicaOutcome) -> dict[str, Any]:
    r = o.record
    uri_value = dg.MetadataValue.url(r.uri) if r.uri.startswith("http") else dg.MetadataValue.text(r.uri)
    return {
        "uri": uri_value,
        "version_id": dg.MetadataValue.text(str(r.version_id or "")),
        "size": dg.MetadataValue.int(r.size),
        "archive_sha256": dg.MetadataValue.text(r.sha256),
        "provider_checksum": dg.MetadataValue.text(str(r.provider_checksum)),
        "storage_class": dg.MetadataValue.text(str(r.storage_class)),
        "region": dg.MetadataValue.text(str(r.region or "")),
        "already_present": dg.MetadataValue.bool(bool(r.already_present)),
        "seconds": dg.MetadataValue.float(round(o.seconds, 3)),
    }


def verify_metadata(o: VerifyOutcome) -> dict[str, Any]:
    return {
        "checked_copy": dg.MetadataValue.text(o.provider),
        "archive_sha256": dg.MetadataValue.text(o.backup.archive_sha256),
        "restore_seconds": dg.MetadataValue.float(round(o.restore_seconds, 3)),
        "download_seconds": dg.MetadataValue.float(round(o.download_seconds, 3)),
        "total_seconds": dg.MetadataValue.float(round(o.seconds, 3)),
        "tables_checked": dg.MetadataValue.int(len(o.tables)),
        "foreign_keys_checked": dg.MetadataValue.int(o.fk_checked),
        "foreign_keys_external": dg.MetadataValue.int(o.fk_external),
    }


@dg.multi_asset(
    specs=[
        dg.AssetSpec(DB_DUMP, description="Consistent logical snapshot of one wedding (REPEATABLE READ): COPY of "
                     "every tenant table, its DDL and a manifest of rows and SHA-256 per table.",
                     kinds={"postgres"}, owners=OWNERS, group_name=GROUP),
        dg.AssetSpec(ENCRYPTED_ARCHIVE, deps=[DB_DUMP], description="The snapshot, zstd-compressed and sealed "
                     "with AES-256-GCM (chunked STREAM), written atomically to the on-site vault: copy #1.",
                     kinds={"python", "file"}, owners=OWNERS, group_name=GROUP),
    ],
    partitions_def=weddings_partitions,
    backfill_policy=BATCHED,
    pool=SOURCE_POOL,
    name="snapshot_and_seal",
)
def snapshot_and_seal(context: dg.AssetExecutionContext, wedbackup: WedbackupEngineResource):
    """One streaming step for both assets: plaintext never lands on disk and the data is read once."""
    engine = wedbackup.engine()
    done: PerKeyMetadata = {}
    failures: dict[str, str] = {}
    keys = validated_keys(context.partition_keys)
    progress = Progress("snapshot and seal", len(keys), context.log.info)
    try:
        with engine.snapshot_session() as session:
            # Weddings go in batches: one COPY per table per batch, one sealed archive per wedding.
            for key, outcome in engine.back_up_each(keys, session):
                progress.step()
                if isinstance(outcome, WedbackupError):
                    context.log.error(str(outcome))
                    failures[key] = str(outcome)
                    continue
                for fk in outcome.manifest.get("broken_foreign_keys") or []:
                    if fk.get("source_rows"):
                        context.log.warning(
                            f"{fk['source_rows']} row(s) of {fk['schema']}.{fk['table']} break foreign key "
                            f"{fk['constraint']} (no parent in {fk['parent']}); rows that reach no wedding "
                            "this way are carried by the platform backup. Repair or delete them on the source.")
                done[key] = {DB_DUMP: dump_metadata(outcome), ENCRYPTED_ARCHIVE: archive_metadata(outcome)}
    except WedbackupError as exc:
        # The source failed under a whole batch (e.g. the connection was lost): the weddings already sealed
        # are recorded, every other one is named with the reason.
        context.log.error(str(exc))
        failures.update({k: str(exc) for k in keys if k not in done and k not in failures})
    yield from _finish(context, [DB_DUMP, ENCRYPTED_ARCHIVE], done, failures, "backup")


def make_replica(provider: str, settings: Any, client: Any) -> Any:
    """The core replica of one provider, over a client made by that provider's Dagster resource."""
    from ..core import replicas

    if provider == "s3":
        return replicas.S3Replica(client, settings.s3)
    if provider == "gcs":
        timeout = settings.provider_timeout
        # The SDK's retries of one request may go on as long as one slow upload may take (the provider
        # timeout), not the replica's 5 s default, under which queued uploads failed without a retry.
        return replicas.GCSReplica(client, settings.gcs, timeout=(min(5.0, timeout), timeout),
                                   retry_seconds=timeout)
    return replicas.AzureReplica(client, settings.azure)


def _replicate_all(context: dg.AssetExecutionContext, provider: str, wedbackup: WedbackupEngineResource,
                   client: Any) -> Iterator[Any]:
    engine = wedbackup.engine()
    replica = make_replica(provider, wedbackup.settings(), client)
    done: PerKeyMetadata = {}
    failures: dict[str, str] = {}
    keys = validated_keys(context.partition_keys)
    progress = Progress(f"{provider} upload", len(keys), context.log.info)
    # Many weddings' archives upload at once (WEDBACKUP_UPLOAD_CONCURRENCY), each recorded on its own.
    for key, outcome in engine.replicate_each(keys, replica):
        progress.step()
        if isinstance(outcome, WedbackupError):
            context.log.error(str(outcome))
            failures[key] = str(outcome)
            continue
        done[key] = {REPLICA_KEYS[provider]: replica_metadata(outcome)}
    yield from _finish(context, [REPLICA_KEYS[provider]], done, failures, f"{provider} upload")


def _replica_spec(provider: str, where: str) -> dict[str, Any]:
    return dict(
        key=REPLICA_KEYS[provider], deps=[ENCRYPTED_ARCHIVE], partitions_def=weddings_partitions,
        backfill_policy=BATCHED, pool=UPLOAD_POOLS[provider], retry_policy=UPLOAD_RETRY,
        kinds={provider}, owners=OWNERS, group_name=GROUP,
        description=f"The sealed archive uploaded to {where}, its checksum confirmed by the provider; "
                    "content-addressed, so a re-run never duplicates it.",
    )


@dg.asset(**_replica_spec("s3", "Amazon S3 (ChecksumSHA256)"))
def s3_replica(context: dg.AssetExecutionContext, wedbackup: WedbackupEngineResource, s3: S3Resource) -> Iterator[Any]:
    yield from _replicate_all(context, "s3", wedbackup, s3.get_client())


@dg.asset(**_replica_spec("gcs", "Google Cloud Storage (crc32c and MD5)"))
def gcs_replica(context: dg.AssetExecutionContext, wedbackup: WedbackupEngineResource, gcs: GCSResource) -> Iterator[Any]:
    yield from _replicate_all(context, "gcs", wedbackup, gcs.get_client())


@dg.asset(**_replica_spec("azure", "Azure Blob Storage (Content-MD5)"))
def azure_replica(context: dg.AssetExecutionContext, wedbackup: WedbackupEngineResource,
                  azure: AzureBlobResource) -> Iterator[Any]:
    yield from _replicate_all(context, "azure", wedbackup, azure.get_service())


def log_key_backup(context: Any, result: Any) -> None:
    """Say what the run's key-store backup did (Engine.back_up_new_keys; None: every key was backed up)."""
    if result is not None:
        context.log.info(f"key-store backup {result.sha256[:16]}: {result.key_count} wedding keys at "
                         f"{', '.join(sorted(result.copies))}" + (f"; failed: {', '.join(sorted(result.failures))}"
                                                                  if result.failures else ""))


class VerifyConfig(dg.Config):
    provider: str | None = None  # which copy to restore; default: rotate through the providers


@dg.asset(
    key=VERIFIED_RESTORE, deps=list(REPLICA_KEYS.values()), partitions_def=weddings_partitions,
    backfill_policy=BATCHED, pool=RESTORE_POOL, kinds={"postgres"}, owners=OWNERS, group_name=GROUP,
    description="One copy downloaded (rotating through the providers), decrypted, restored into a scratch "
                "database and checked against the manifest: row counts, SHA-256 per table, foreign keys.",
)
def verified_restore(context: dg.AssetExecutionContext, config: VerifyConfig, wedbackup: WedbackupEngineResource,
                     s3: S3Resource, gcs: GCSResource, azure: AzureBlobResource) -> Iterator[Any]:
    engine = wedbackup.engine()
    clients: Mapping[str, Any] = {"s3": s3.get_client(), "gcs": gcs.get_client(), "azure": azure.get_service()}
    settings = wedbackup.settings()
    replicas = {p: make_replica(p, settings, clients[p]) for p in PROVIDERS}
    log_key_backup(context, engine.back_up_new_keys(replicas))  # a backup is not done while its key is only here
    done: PerKeyMetadata = {}
    failures: dict[str, str] = {}
    keys = validated_keys(context.partition_keys)
    progress = Progress("verified restore", len(keys), context.log.info)
    # Weddings in batches, each batch restored into one scratch database and checked wedding by wedding.
    for key, outcome in engine.verify_each(keys, replicas, provider=config.provider, on_progress=progress.step):
        if isinstance(outcome, WedbackupError):
            context.log.error(str(outcome))
            failures[key] = str(outcome)
            continue
        done[key] = {VERIFIED_RESTORE: verify_metadata(outcome)}
    yield from _finish(context, [VERIFIED_RESTORE], done, failures, "verified restore")


backup_assets = [snapshot_and_seal, s3_replica, gcs_replica, azure_replica, verified_restore]
