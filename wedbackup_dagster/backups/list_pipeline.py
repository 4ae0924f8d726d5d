"""The list pipeline: `backup_wedding_list`, a second copy of the backup assets' pipeline (snapshot+seal,
S3, GCS, Azure, verified restore) as ops over an explicit list of weddings from the run config, recording each
wedding's materializations itself, in batches (instance/event_batches.py). It exists for measured reasons:
the schedule's and change capture's due weddings are scattered over the partitions' insertion order, and a
partition-range run would take them one run each (README, Automation; benchmarks/dagster_overhead.py). A
wedding that fails is modelled as in the assets (shared/wedding_outcomes.py)."""
from typing import Any

import dagster as dg

from ..instance.event_batches import in_batches
from ..shared.metadata import log_key_backup, replica_metadata, verify_metadata
from wedbackup_dagster.core.progress import Progress
from ..shared.resources import ProviderReplicasResource, WedbackupEngineResource
from ..shared.wedding_outcomes import WeddingOutcomes, WeddingsOfStep, failure_of_steps
from .assets import sealed_metadata
from .checks import log_shrinkage_evaluations
from .constants import REPLICA_KEYS, RESTORE_POOL, SOURCE_POOL, UPLOAD_POOLS, VERIFIED_RESTORE
from .partitions import validated_keys

class WeddingListConfig(dg.Config):
    weddings: list[str]  # partition keys (wedding ids or `platform`), in the order to back them up


@dg.op(pool=SOURCE_POOL, out=dg.Out(WeddingsOfStep))
def snapshot_and_seal_list(context: dg.OpExecutionContext, config: WeddingListConfig,
                           wedbackup: WedbackupEngineResource):
    engine = wedbackup.engine()
    keys = validated_keys(config.weddings)
    progress = Progress("snapshot and seal", len(keys), context.log.info)
    outcomes = WeddingOutcomes("backup")
    with engine.snapshot_session() as session:
        for key, outcome in engine.back_up_each(keys, session):
            progress.step()
            outcomes.record(context, key, outcome, sealed_metadata)
    yield from in_batches(context, outcomes.materializations())
    # The shrinkage check of each new backup, as backup_weddings runs it (recorded per wedding partition).
    log_shrinkage_evaluations(context, engine, outcomes.ok)
    yield dg.Output(outcomes.as_step())


def _replicate(context: dg.OpExecutionContext, provider: str, sealed: WeddingsOfStep,
               wedbackup: WedbackupEngineResource, replicas: ProviderReplicasResource):
    engine = wedbackup.engine()
    replica = replicas.replica(provider)
    progress = Progress(f"{provider} upload", len(sealed["ok"]), context.log.info)
    outcomes = WeddingOutcomes(f"{provider} upload")
    # The uploads run side by side (WEDBACKUP_UPLOAD_CONCURRENCY); each wedding's outcome is kept on its own.
    for key, outcome in engine.replicate_each(sealed["ok"], replica):
        progress.step()
        outcomes.record(context, key, outcome, lambda o: {REPLICA_KEYS[provider]: replica_metadata(o)})
    yield from in_batches(context, outcomes.materializations())
    yield dg.Output(outcomes.as_step())


# One op per provider, each in its provider's pool: a slow or failing provider holds only its own slots.
@dg.op(pool=UPLOAD_POOLS["s3"], out=dg.Out(WeddingsOfStep))
def s3_replica_list(context: dg.OpExecutionContext, sealed: WeddingsOfStep, wedbackup: WedbackupEngineResource,
                    replicas: ProviderReplicasResource):
    yield from _replicate(context, "s3", sealed, wedbackup, replicas)


@dg.op(pool=UPLOAD_POOLS["gcs"], out=dg.Out(WeddingsOfStep))
def gcs_replica_list(context: dg.OpExecutionContext, sealed: WeddingsOfStep, wedbackup: WedbackupEngineResource,
                     replicas: ProviderReplicasResource):
    yield from _replicate(context, "gcs", sealed, wedbackup, replicas)


@dg.op(pool=UPLOAD_POOLS["azure"], out=dg.Out(WeddingsOfStep))
def azure_replica_list(context: dg.OpExecutionContext, sealed: WeddingsOfStep, wedbackup: WedbackupEngineResource,
                       replicas: ProviderReplicasResource):
    yield from _replicate(context, "azure", sealed, wedbackup, replicas)


@dg.op(pool=RESTORE_POOL, out={})
def verified_restore_list(context: dg.OpExecutionContext, sealed: WeddingsOfStep, s3_done: WeddingsOfStep,
                          gcs_done: WeddingsOfStep, azure_done: WeddingsOfStep, wedbackup: WedbackupEngineResource,
                          replicas: ProviderReplicasResource):
    engine = wedbackup.engine()
    every_replica = replicas.all()
    log_key_backup(context, engine.back_up_new_keys(every_replica))  # a backup is not done while its key is only here
    uploaded = [k for k in sealed["ok"] if any(k in step["ok"] for step in (s3_done, gcs_done, azure_done))]
    # Weddings in batches, each batch restored into one scratch database and checked wedding by wedding.
    progress = Progress("verified restore", len(uploaded), context.log.info)
    outcomes = WeddingOutcomes("verify")
    for key, outcome in engine.verify_each(uploaded, every_replica, on_progress=progress.step,
                                         workers=engine.settings.snapshot_workers):
        outcomes.record(context, key, outcome, lambda o: {VERIFIED_RESTORE: verify_metadata(o)})
    yield from in_batches(context, outcomes.materializations())
    failure = failure_of_steps((("backup", sealed), ("s3", s3_done), ("gcs", gcs_done), ("azure", azure_done),
                                ("verify", outcomes.as_step())))
    if failure is not None:
        raise failure


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
