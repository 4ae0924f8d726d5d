"""The per-wedding backup assets. Each step may cover many weddings (a batched run): it loops over
`context.partition_keys`, reports per-wedding metadata, and when some weddings fail it still records the
ones that succeeded before failing the step with the list of failures (shared/wedding_outcomes.py)."""

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import dagster as dg
from dagster import DagsterEventType

from ..core.errors import WedbackupError
from ..shared.metadata import archive_metadata, dump_metadata, log_key_backup, replica_metadata, verify_metadata
from wedbackup_dagster.core.progress import Progress
from ..shared.resources import ProviderReplicasResource, WedbackupEngineResource
from ..shared.retry import UPLOAD_RETRY
from ..shared.wedding_outcomes import WeddingOutcomes, finish_providers
from .constants import (
    DB_DUMP,
    ENCRYPTED_ARCHIVE,
    GROUP,
    OWNERS,
    REPLICA_KEYS,
    RESTORE_POOL,
    SOURCE_POOL,
    UPLOAD_POOL,
    VERIFIED_RESTORE,
)
from .partitions import validated_keys, weddings_partitions

BATCHED = dg.BackfillPolicy.single_run()

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
    outcomes = WeddingOutcomes("backup")
    keys = validated_keys(context.partition_keys)
    progress = Progress("snapshot and seal", len(keys), context.log.info)
    try:
        with engine.snapshot_session() as session:
            # Weddings go in batches: one COPY per table per batch, one sealed archive per wedding.
            for key, outcome in engine.back_up_each(keys, session):
                progress.step()
                if not isinstance(outcome, WedbackupError):
                    warn_broken_foreign_keys(context, outcome.manifest)
                outcomes.record(context, key, outcome, sealed_metadata)
    except WedbackupError as exc:
        # The source failed under a whole batch (e.g. the connection was lost): the weddings already sealed
        # are recorded, every other one is named with the reason.
        outcomes.fail_the_rest(context, keys, exc)
    yield from outcomes.finish_assets(context, [DB_DUMP, ENCRYPTED_ARCHIVE])


def sealed_metadata(outcome: Any) -> dict[dg.AssetKey, dict[str, Any]]:
    return {DB_DUMP: dump_metadata(outcome), ENCRYPTED_ARCHIVE: archive_metadata(outcome)}


def warn_broken_foreign_keys(context: Any, manifest: dict[str, Any]) -> None:
    for fk in manifest.get("broken_foreign_keys") or []:
        if fk.get("source_rows"):
            context.log.warning(
                f"{fk['source_rows']} row(s) of {fk['schema']}.{fk['table']} break foreign key "
                f"{fk['constraint']} (no parent in {fk['parent']}); rows that reach no wedding "
                "this way are carried by the platform backup. Repair or delete them on the source.")


def _replica_spec(provider: str, where: str) -> dg.AssetSpec:
    return dg.AssetSpec(
        REPLICA_KEYS[provider], deps=[ENCRYPTED_ARCHIVE], kinds={provider}, owners=OWNERS, group_name=GROUP,
        description=f"The sealed archive uploaded to {where}, its checksum confirmed by the provider; "
                    "content-addressed, so a re-run never duplicates it.",
    )


@dg.multi_asset(
    specs=[_replica_spec("s3", "Amazon S3 (ChecksumSHA256)"),
           _replica_spec("gcs", "Google Cloud Storage (crc32c and MD5)"),
           _replica_spec("azure", "Azure Blob Storage (Content-MD5)")],
    partitions_def=weddings_partitions,
    backfill_policy=BATCHED,
    pool=UPLOAD_POOL,
    retry_policy=UPLOAD_RETRY,
    can_subset=True,  # one provider alone: the provider-health catch-up, a re-run from the UI
    name="replicate_to_providers",
)
def replicate_to_providers(context: dg.AssetExecutionContext, wedbackup: WedbackupEngineResource,
                           replicas: ProviderReplicasResource) -> Iterator[Any]:
    """The selected providers' uploads side by side in one step (Engine.replicate_to_all): each archive read
    and hashed once for all of them, each provider bounded by its own upload concurrency, each asset
    recording its own weddings, and the step failing naming every (provider, wedding) that failed."""
    engine = wedbackup.engine()
    keys = validated_keys(context.partition_keys)
    providers = [p for p, asset_key in REPLICA_KEYS.items() if asset_key in context.selected_asset_keys]
    outcomes = {p: WeddingOutcomes(f"{p} upload") for p in providers}
    # A retry of the step (UPLOAD_RETRY) redoes only what an earlier attempt of this run did not record.
    done = _recorded_by_earlier_attempts(context) if context.retry_number else set()
    todo = {p: [k for k in keys if (REPLICA_KEYS[p], k) not in done] for p in providers}
    for provider in providers:
        outcomes[provider].recorded_before = len(keys) - len(todo[provider])
    built = replicas_or_failures(context, replicas, outcomes, todo)
    step = upload_progress(context, {p: todo[p] for p in built})
    for provider, key, outcome in engine.replicate_to_all(keys, built, wanted=todo,
                                                          processes=engine.settings.upload_workers):
        step(key)
        outcomes[provider].record(context, key, outcome, lambda o, p=provider: {REPLICA_KEYS[p]: replica_metadata(o)})
    yield from finish_providers(context, {REPLICA_KEYS[p]: outcomes[p] for p in providers}, whole_range=not done)


def upload_progress(context: Any, todo: dict[str, list[str]]) -> Callable[[str], None]:
    """`step(wedding)` once per (provider, wedding) done: ONE progress line for the step, counting weddings
    every provider is done with (each line is an event in the run's log, so not one line per provider)."""
    left = Counter(k for keys in todo.values() for k in keys)
    progress = Progress(f"uploads to {', '.join(todo) or 'no provider'}", len(left), context.log.info)

    def step(key: str) -> None:
        left[key] -= 1
        if not left[key]:
            progress.step()
    return step


def replicas_or_failures(context: Any, replicas: ProviderReplicasResource, outcomes: dict[str, WeddingOutcomes],
                         keys: dict[str, list[str]]) -> dict[str, Any]:
    """Each provider's replica; one that cannot be made (a malformed setting) fails its own weddings, by name,
    in `outcomes`, and the other providers go on."""
    built: dict[str, Any] = {}
    for provider in outcomes:
        try:
            built[provider] = replicas.replica(provider)
        except WedbackupError as exc:
            outcomes[provider].fail_the_rest(context, keys[provider], exc)
    return built


def _recorded_by_earlier_attempts(context: dg.AssetExecutionContext) -> set[tuple[dg.AssetKey, str]]:
    """(asset, wedding) pairs this run has already materialized: a retried step leaves them as recorded."""
    entries = context.instance.all_logs(context.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)
    wanted = set(context.selected_asset_keys)
    return {(e.dagster_event.asset_key, e.dagster_event.partition) for e in entries
            if e.dagster_event is not None and e.dagster_event.asset_key in wanted and e.dagster_event.partition}


class VerifyConfig(dg.Config):
    provider: str | None = None  # which copy to restore; default: rotate through the providers


@dg.asset(
    key=VERIFIED_RESTORE, deps=list(REPLICA_KEYS.values()), partitions_def=weddings_partitions,
    backfill_policy=BATCHED, pool=RESTORE_POOL, kinds={"postgres"}, owners=OWNERS, group_name=GROUP,
    description="One copy downloaded (rotating through the providers), decrypted, restored into a scratch "
                "database and checked against the manifest: row counts, SHA-256 per table, foreign keys.",
)
def verified_restore(context: dg.AssetExecutionContext, config: VerifyConfig, wedbackup: WedbackupEngineResource,
                     replicas: ProviderReplicasResource) -> Iterator[Any]:
    engine = wedbackup.engine()
    every_replica = replicas.all()
    log_key_backup(context, engine.back_up_new_keys(every_replica))  # a backup is not done while its key is only here
    outcomes = WeddingOutcomes("verified restore")
    keys = validated_keys(context.partition_keys)
    progress = Progress("verified restore", len(keys), context.log.info)
    # Weddings in batches, each batch restored into one scratch database and checked wedding by wedding.
    for key, outcome in engine.verify_each(keys, every_replica, provider=config.provider, on_progress=progress.step,
                                         workers=engine.settings.snapshot_workers):
        outcomes.record(context, key, outcome, lambda o: {VERIFIED_RESTORE: verify_metadata(o)})
    yield from outcomes.finish_assets(context, [VERIFIED_RESTORE])


backup_assets = [snapshot_and_seal, replicate_to_providers, verified_restore]
