"""Re-verification and backfills from the UI without one run per wedding. Dagster runs one partition range
per run (dagster-io/dagster#32335), so a backfill over scattered weddings (the failed ones, a filtered list)
becomes a run per contiguous piece. Two ways around it, both ending in list runs of a few hundred weddings:

- `reverify_wedding_list`: verified_restore (no new dump) over a selection given in run config: listed
  weddings, or a preset (`failed`: newest backup's latest restore failed; `not_verified_for_days: N`;
  `every_wedding`). Launched from the job's Launchpad, it is one run whatever the selection.
- `wedding_backfill_consolidation` (sensor): a backfill of wedding assets launched from the UI whose weddings
  fall into more than a couple of contiguous ranges is cancelled (Dagster then cancels the runs it queued)
  and the same weddings are requested as `reverify_wedding_list` runs (a selection of verified_restore only)
  or `backup_wedding_list` runs (a selection with db_dump / encrypted_archive)."""
from typing import Any

import dagster as dg
from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus, PartitionBackfill

from .constants import DB_DUMP, ENCRYPTED_ARCHIVE, VERIFIED_RESTORE
from .partitions import validated_keys, weddings_partitions
from ..shared.resources import WedbackupEngineResource
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.postgres.discovery import contiguous_ranges
from ..core.errors import WedbackupError
from wedbackup_dagster.core.policy.rules import CheckQueries
from ..shared.wedding_outcomes import WeddingsOfStep
from .assets import backup_assets
from .list_pipeline import backup_wedding_list, list_run_config, verified_restore_list
from .verify_selection import select_for_verify

REVERIFY_JOB = "reverify_wedding_list"
RUN_SIZE = 250  # weddings per consolidated run: a few runs, so several run workers can share a large selection
LEFT_TO_DAGSTER = 2  # a backfill of at most this many contiguous ranges already costs at most this many runs
BACKFILL_TAG = "wedbackup/backfill"  # the consolidated backfill's id on each list run
SNAPSHOT_ASSETS = frozenset({DB_DUMP, ENCRYPTED_ARCHIVE})


class ReverifySelection(dg.Config):
    """Exactly one of: `weddings`, `failed`, `not_verified_for_days`, `every_wedding`."""

    weddings: list[str] = []  # these weddings (partition keys), in this order
    failed: bool = False  # every wedding whose newest backup's latest restore failed
    not_verified_for_days: float | None = None  # newest backup not restored successfully for N days, or never
    every_wedding: bool = False  # every partition with a backup


def failed_last_restore(catalogue: Catalogue) -> list[str]:
    """Partitions whose newest backup's most recent restore failed."""
    with catalogue.connect() as conn:
        rows = conn.execute(
            "SELECT n.partition FROM (SELECT DISTINCT ON (partition) id, partition FROM wedbackup.backups "
            "ORDER BY partition, snapshot_time DESC, id DESC) n "
            "JOIN LATERAL (SELECT r.ok FROM wedbackup.restores r WHERE r.backup_id = n.id "
            "ORDER BY r.at DESC, r.id DESC LIMIT 1) latest ON NOT latest.ok").fetchall()
    return [r["partition"] for r in rows]


def selected_weddings(config: ReverifySelection, catalogue: Catalogue) -> list[str]:
    """The partitions `config` asks for, erased weddings left out (their keys are destroyed)."""
    chosen = [bool(config.weddings), config.failed, config.not_verified_for_days is not None, config.every_wedding]
    if sum(chosen) != 1:
        raise WedbackupError("reverify_wedding_list: set exactly one of the config fields weddings, failed, "
                             "not_verified_for_days, every_wedding (ops.select_weddings.config)")
    erased = catalogue.erased_partitions()
    verified = {p: at for p, at in CheckQueries(catalogue).last_verified().items() if p not in erased}
    if config.failed:
        return [p for p in failed_last_restore(catalogue) if p in verified]
    return select_for_verify(verified, all_=config.every_wedding, weddings=validated_keys(config.weddings),
                             older_than_days=config.not_verified_for_days)


@dg.op(out=dg.Out(WeddingsOfStep))
def select_weddings(context: dg.OpExecutionContext, config: ReverifySelection,
                    wedbackup: WedbackupEngineResource) -> WeddingsOfStep:
    try:
        keys = selected_weddings(config, wedbackup.catalogue())
    except WedbackupError as exc:
        raise dg.Failure(description=str(exc)) from None
    context.log.info(f"re-verifying {len(keys)} partition(s)")
    return {"ok": keys, "failed": {}}


@dg.job(
    name=REVERIFY_JOB,
    executor_def=dg.in_process_executor,
    config={"ops": {"select_weddings": {"config": {"failed": True}}}},
    description="Restore and check existing backups again (no new dump) for a selection in run config: "
                "`weddings: [..]`, or `failed: true` (latest restore failed), `not_verified_for_days: N`, "
                "`every_wedding: true`. One run whatever the selection, each wedding recorded on its partition.",
)
def reverify_wedding_list():
    chosen = select_weddings()
    # Every chosen wedding counts as sealed and uploaded: verified_restore_list restores each one's newest backup.
    verified_restore_list(chosen, chosen)


def reverify_run_config(weddings: list[str]) -> dict[str, Any]:
    return {"ops": {"select_weddings": {"config": {"weddings": list(weddings)}}}}


# ---------------------------------------------------------------------------------------------- the sensor


def backfill_weddings(backfill: PartitionBackfill, wedding_assets: set[dg.AssetKey]
                      ) -> tuple[set[dg.AssetKey], list[str]] | None:
    """The assets and wedding partitions a backfill targets, or None when it targets anything else too (an
    unpartitioned asset, an asset not in `wedding_assets`, those partitioned by wedding) or nothing."""
    if backfill.is_asset_backfill and backfill.asset_backfill_data is not None:
        subset = backfill.asset_backfill_data.target_subset
        if subset.non_partitioned_asset_keys:
            return None
        keys: set[str] = set()
        assets = set()
        for asset_key, partitions in subset.partitions_subsets_by_asset_key.items():
            if asset_key not in wedding_assets:
                return None
            assets.add(asset_key)
            keys.update(partitions.get_partition_keys())
        return (assets, sorted(keys)) if keys else None
    if backfill.job_name in ("reverify_weddings", "backup_weddings") and backfill.partition_names:
        assets = {VERIFIED_RESTORE} if backfill.job_name == "reverify_weddings" else set(SNAPSHOT_ASSETS)
        return assets, list(backfill.partition_names)
    return None


def consolidation_plan(backfill: PartitionBackfill, ordered: list[str], wedding_assets: set[dg.AssetKey]
                       ) -> tuple[str, list[str]] | None:
    """(list job, weddings in insertion order) for a backfill worth consolidating, else None."""
    target = backfill_weddings(backfill, wedding_assets)
    if target is None:
        return None
    assets, keys = target
    if assets & SNAPSHOT_ASSETS:
        job = backup_wedding_list.name
    elif assets == {VERIFIED_RESTORE}:
        job = REVERIFY_JOB
    else:
        return None  # replicas without a new dump or restore: left to Dagster's range runs
    known = set(ordered)
    keys = [k for k in keys if k in known]
    if len(contiguous_ranges(keys, ordered)) <= LEFT_TO_DAGSTER:
        return None
    wanted = set(keys)
    return job, [k for k in ordered if k in wanted]


@dg.sensor(
    name="wedding_backfill_consolidation",
    jobs=[reverify_wedding_list, backup_wedding_list],
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Turns a backfill of wedding assets over scattered weddings (one run per contiguous range in "
                "Dagster) into a few list runs of the same weddings, and cancels the backfill.",
)
def wedding_backfill_consolidation(context: dg.SensorEvaluationContext):
    instance = context.instance
    backfills = instance.get_backfills(filters=BulkActionsFilter(statuses=[BulkActionStatus.REQUESTED]))
    if not backfills:
        return dg.SkipReason("no backfill waiting")
    ordered = list(instance.get_dynamic_partitions(weddings_partitions.name))
    if context.repository_def is not None:
        graph = context.repository_def.asset_graph
        wedding_assets = {key for key in graph.materializable_asset_keys
                          if graph.get(key).partitions_def == weddings_partitions}
    else:  # evaluated outside a code location (a bare build_sensor_context): the backup assets are those
        wedding_assets = {key for a in backup_assets if a.partitions_def == weddings_partitions for key in a.keys}
    requests: list[dg.RunRequest] = []
    for backfill in backfills:
        plan = consolidation_plan(backfill, ordered, wedding_assets)
        if plan is None:
            continue
        job, keys = plan
        chunks = [keys[i:i + RUN_SIZE] for i in range(0, len(keys), RUN_SIZE)]
        # Cancelling stops the backfill daemon after its current chunk of runs and cancels the runs it queued.
        instance.update_backfill(backfill.with_status(BulkActionStatus.CANCELING))
        context.log.info(f"backfill {backfill.backfill_id}: {len(keys)} wedding(s) in "
                         f"{len(contiguous_ranges(keys, ordered))} ranges -> {len(chunks)} {job} run(s)")
        for n, chunk in enumerate(chunks):
            config = reverify_run_config(chunk) if job == REVERIFY_JOB else list_run_config(chunk)
            requests.append(dg.RunRequest(
                run_key=f"backfill-{backfill.backfill_id}-{n}", job_name=job, run_config=config,
                tags={BACKFILL_TAG: backfill.backfill_id, "wedbackup/trigger": "backfill"}))
    return requests or dg.SkipReason(f"{len(backfills)} backfill(s) waiting, none of scattered weddings")
