"""`backup_wedding_list`: the same pipeline as the backup assets (snapshot+seal, S3, GCS, Azure, verified
restore) over an explicit list of weddings from the run config, recording each wedding's materializations
itself, in batches (wedbackup_dagster/event_batches.py). The schedule and change capture use it: due
weddings are scattered over the partitions' insertion order, and a partition-range run would take them
one run each (see README, Automation)."""
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource
from dagster_gcp import GCSResource

from ..backups.assets import (archive_metadata, dump_metadata, log_key_backup, make_replica, replica_metadata,
                              verify_metadata)
from ..backups.constants import (DB_DUMP, ENCRYPTED_ARCHIVE, REPLICA_KEYS, RESTORE_POOL, SOURCE_POOL, UPLOAD_POOLS,
                                 VERIFIED_RESTORE)
from ..backups.partitions import validated_keys
from ..checks.wedding_checks import log_shrinkage_evaluations
from ..backups.resources import AzureBlobResource, WedbackupEngineResource
from wedbackup_dagster.core.storage.providers import PROVIDERS
from ..core.errors import WedbackupError
from ..event_batches import in_batches
from ..progress import Progress

Step = dict[str, Any]  # {"ok": [wedding ids that succeeded], "failed": {wedding id: reason}}


class WeddingListConfig(dg.Config):
    weddings: list[str]  # partition keys (wedding ids or `platform`), in the order to back them up


def _each(context: dg.OpExecutionContext, keys: list[str], work, what: str = ""
          ) -> tuple[Step, list[dg.AssetMaterialization]]:
    ok: list[str] = []
    failed: dict[str, str] = {}
    events: list[dg.AssetMaterialization] = []
    progress = Progress(what, len(keys), context.log.info) if what else None
    for key in keys:
        if progress is not None:
            progress.step()
        try:
            events += work(key)
        except WedbackupError as exc:
            context.log.error(str(exc))
            failed[key] = str(exc)
            continue
        ok.append(key)
    return {"ok": ok, "failed": failed}, events


@dg.op(pool=SOURCE_POOL, out=dg.Out(Step))
def snapshot_and_seal_list(context: dg.OpExecutionContext, config: WeddingListConfig,
                           wedbackup: WedbackupEngineResource):
    engine = wedbackup.engine()
    keys = validated_keys(config.weddings)
    progress = Progress("snapshot and seal", len(keys), context.log.info)
    outcomes = {}
    with engine.snapshot_session() as session:
        for key, outcome in engine.back_up_each(keys, session):
            progress.step()
            outcomes[key] = outcome

    def work(key: str) -> list[dg.AssetMaterialization]:
        o = outcomes[key]
        if isinstance(o, WedbackupError):
            raise o
        return [dg.AssetMaterialization(DB_DUMP, partition=key, metadata=dump_metadata(o)),
                dg.AssetMaterialization(ENCRYPTED_ARCHIVE, partition=key, metadata=archive_metadata(o))]

    step, events = _each(context, list(outcomes), work)
    yield from in_batches(context, events)
    # The shrinkage check of each new backup, as backup_weddings runs it (recorded per wedding partition).
    log_shrinkage_evaluations(context, engine, step["ok"])
    yield dg.Output(step)


def _replicate(context: dg.OpExecutionContext, provider: str, sealed: Step, wedbackup: WedbackupEngineResource,
               client: Any):
    engine = wedbackup.engine()
    replica = make_replica(provider, wedbackup.settings(), client)

    # The uploads run side by side (WEDBACKUP_UPLOAD_CONCURRENCY); each wedding's outcome is kept on its own.
    outcomes = dict(engine.replicate_each(sealed["ok"], replica))

    def work(key: str) -> list[dg.AssetMaterialization]:
        o = outcomes[key]
        if isinstance(o, WedbackupError):
            raise o
        return [dg.AssetMaterialization(REPLICA_KEYS[provider], partition=key, metadata=replica_metadata(o))]

    step, events = _each(context, sealed["ok"], work, f"{provider} upload")
    yield from in_batches(context, events)
    yield dg.Output(step)


# One op per provider, each in its provider's pool: a slow or failing provider holds only its own slots.
@dg.op(pool=UPLOAD_POOLS["s3"], out=dg.Out(Step))
def s3_replica_list(context: dg.OpExecutionContext, sealed: Step, wedbackup: WedbackupEngineResource, s3: S3Resource):
    yield from _replicate(context, "s3", sealed, wedbackup, s3.get_client())


@dg.op(pool=UPLOAD_POOLS["gcs"], out=dg.Out(Step))
def gcs_replica_list(context: dg.OpExecutionContext, sealed: Step, wedbackup: WedbackupEngineResource,
                     gcs: GCSResource):
    yield from _replicate(context, "gcs", sealed, wedbackup, gcs.get_client())


@dg.op(pool=UPLOAD_POOLS["azure"], out=dg.Out(Step))
def azure_replica_list(context: dg.OpExecutionContext, sealed: Step, wedbackup: WedbackupEngineResource,
                       azure: AzureBlobResource):
    yield from _replicate(context, "azure", sealed, wedbackup, azure.get_service())


@dg.op(pool=RESTORE_POOL, out={})
def verified_restore_list(context: dg.OpExecutionContext, sealed: Step, s3_done: Step, gcs_done: Step,
                          azure_done: Step, wedbackup: WedbackupEngineResource, s3: S3Resource, gcs: GCSResource,
                          azure: AzureBlobResource):
    engine = wedbackup.engine()
    settings = wedbackup.settings()
    clients = {"s3": s3.get_client(), "gcs": gcs.get_client(), "azure": azure.get_service()}
    replicas = {p: make_replica(p, settings, clients[p]) for p in PROVIDERS}
    log_key_backup(context, engine.back_up_new_keys(replicas))  # a backup is not done while its key is only here
    uploaded = [k for k in sealed["ok"] if any(k in step["ok"] for step in (s3_done, gcs_done, azure_done))]
    # Weddings in batches, each batch restored into one scratch database and checked wedding by wedding.
    progress = Progress("verified restore", len(uploaded), context.log.info)
    outcomes = {}
    for key, outcome in engine.verify_each(uploaded, replicas, on_progress=progress.step):
        outcomes[key] = outcome

    def work(key: str) -> list[dg.AssetMaterialization]:
        o = outcomes[key]
        if isinstance(o, WedbackupError):
            raise o
        return [dg.AssetMaterialization(VERIFIED_RESTORE, partition=key, metadata=verify_metadata(o))]

    step, events = _each(context, uploaded, work)
    yield from in_batches(context, events)
    steps = (("backup", sealed), ("s3", s3_done), ("gcs", gcs_done), ("azure", azure_done), ("verify", step))
    failures = {f"{what} {k}": msg for what, done in steps for k, msg in done["failed"].items()}
    if failures:
        lines = "\n".join(f"- {k}: {msg}" for k, msg in sorted(failures.items()))
        raise dg.Failure(description=f"{len(failures)} step(s) failed for the listed weddings:\n{lines}",
                         metadata={"failed": dg.MetadataValue.json(sorted(failures))})


@dg.job(
    name="backup_wedding_list",
    executor_def=dg.in_process_executor,
    description="Back up an explicit list of weddings (run config) through the whole pipeline, recording "
                "per-wedding materializations of the backup assets. Used by the backup schedule and "
                "change capture, whose due weddings are scattered over the partitions.",
)
def backup_wedding_list():
    sealed = snapshot_and_seal_list()
    verified_restore_list(
        sealed, s3_replica_list(sealed), gcs_replica_list(sealed), azure_replica_list(sealed))


def list_run_config(weddings: list[str]) -> dict[str, Any]:
    return {"ops": {"snapshot_and_seal_list": {"config": {"weddings": list(weddings)}}}}
