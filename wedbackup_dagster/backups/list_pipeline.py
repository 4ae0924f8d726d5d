"""The list pipeline: `backup_wedding_list`, a second copy of the backup assets' pipeline (snapshot+seal, the S3,
GCS and Azure uploads side by side in one op, verified restore) as ops over an explicit list of weddings from
the run config, recording each wedding's materializations itself, in batches (instance/event_batches.py). It
exists for measured reasons: the schedule's and change capture's due weddings are scattered over the
partitions' insertion order, and a partition-range run would take them one run each (README, Automation;
benchmarks/dagster_overhead.py). A wedding that fails is modelled as in the assets
(shared/wedding_outcomes.py)."""
from typing import Any

import dagster as dg

from ..instance.event_batches import in_batches
from ..shared.metadata import log_key_backup, replica_metadata, verify_metadata
from wedbackup_dagster.core.progress import Progress
from ..shared.resources import ProviderReplicasResource, WedbackupEngineResource
from ..shared.wedding_outcomes import WeddingOutcomes, WeddingsOfStep, failure_of_steps
from .assets import replicas_or_failures, sealed_metadata, upload_progress
from .checks import log_shrinkage_evaluations
from .constants import REPLICA_KEYS, RESTORE_POOL, SOURCE_POOL, UPLOAD_POOL, VERIFIED_RESTORE
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


@dg.op(pool=UPLOAD_POOL, out=dg.Out(WeddingsOfStep))
def replicate_list(context: dg.OpExecutionContext, sealed: WeddingsOfStep, wedbackup: WedbackupEngineResource,
                   replicas: ProviderReplicasResource):
    """Every provider's uploads side by side (Engine.replicate_to_all): each archive read and hashed once for all
    of them, each provider bounded by its own upload concurrency; each wedding's outcome is kept per provider."""
    engine = wedbackup.engine()
    outcomes = {p: WeddingOutcomes(f"{p} upload") for p in REPLICA_KEYS}
    built = replicas_or_failures(context, replicas, outcomes, {p: sealed["ok"] for p in outcomes})
    step = upload_progress(context, {p: sealed["ok"] for p in built})
    for provider, key, outcome in engine.replicate_to_all(sealed["ok"], built,
                                                          processes=engine.settings.upload_workers):
        step(key)
        outcomes[provider].record(context, key, outcome, lambda o, p=provider: {REPLICA_KEYS[p]: replica_metadata(o)})
    yield from in_batches(context, (m for o in outcomes.values() for m in o.materializations()))
    yield dg.Output(uploads_of_step(sealed["ok"], outcomes))


def uploads_of_step(weddings: list[str], outcomes: dict[str, WeddingOutcomes]) -> WeddingsOfStep:
    """The upload op's weddings for the verification: `ok` those with a copy at some provider (a restore can
    check them), `failed` those some provider failed (with every provider's reason), and `by_provider` each
    provider's own step, which the run's failure names one by one."""
    failed: dict[str, list[str]] = {}
    for provider, o in outcomes.items():
        for key, msg in o.failed.items():
            failed.setdefault(key, []).append(f"{provider} upload: {msg}")
    return {"ok": [k for k in weddings if any(k in o.done for o in outcomes.values())],
            "failed": {k: "; ".join(msgs) for k, msgs in failed.items()},
            "by_provider": {p: o.as_step() for p, o in outcomes.items()}}


@dg.op(pool=RESTORE_POOL, out={})
def verified_restore_list(context: dg.OpExecutionContext, sealed: WeddingsOfStep, uploaded: WeddingsOfStep,
                          wedbackup: WedbackupEngineResource, replicas: ProviderReplicasResource):
    engine = wedbackup.engine()
    every_replica = replicas.all()
    log_key_backup(context, engine.back_up_new_keys(every_replica))  # a backup is not done while its key is only here
    copied = set(uploaded["ok"])
    with_a_copy = [k for k in sealed["ok"] if k in copied]
    # Weddings in batches, each batch restored into one scratch database and checked wedding by wedding.
    progress = Progress("verified restore", len(with_a_copy), context.log.info)
    outcomes = WeddingOutcomes("verify")
    for key, outcome in engine.verify_each(with_a_copy, every_replica, on_progress=progress.step,
                                         workers=engine.settings.snapshot_workers):
        outcomes.record(context, key, outcome, lambda o: {VERIFIED_RESTORE: verify_metadata(o)})
    yield from in_batches(context, outcomes.materializations())
    # Each provider's failures under its own name; a step without them (a re-verification's selection) as one.
    uploads = list(uploaded.get("by_provider", {}).items()) or [("upload", uploaded)]
    failure = failure_of_steps((("backup", sealed), *uploads, ("verify", outcomes.as_step())))
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
    verified_restore_list(sealed, replicate_list(sealed))


def list_run_config(weddings: list[str]) -> dict[str, Any]:
    return {"ops": {"snapshot_and_seal_list": {"config": {"weddings": list(weddings)}}}}
