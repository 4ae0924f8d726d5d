"""Standing verification, on by default: a daily `check_weddings` over every wedding, a daily
`reconcile_inventory`, and the rolling re-verification — each tick restores its share of the weddings' newest
backups again (`reverify_wedding_list` runs of a few hundred weddings; the engine picks each wedding's provider
in rotation), least recently verified first, so every wedding is re-verified within the policy's window — and
the `reverification_status` asset whose check `weddings_reverified_within_window` fails naming the overdue
weddings. Times come from the policy file's `standing` settings; the choice is core.standing."""
import datetime as dt

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from dagster._utils.schedules import cron_string_iterator

from ..backups.check_jobs import check_weddings
from ..backups.constants import OWNERS
from ..backups.partitions import weddings_partitions
from ..backups.reverify_list import REVERIFY_JOB, RUN_SIZE, reverify_run_config, reverify_wedding_list
from ..backups.schedules import TRIGGER_TAG
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.policy.backup_policy import Policy
from wedbackup_dagster.core.policy.rules import CheckQueries
from ..core.standing import not_reverified, tick_share
from ..providers.inventory_reconciliation import reconcile_inventory
from ..shared.resources import WedbackupEngineResource

REVERIFICATION_STATUS = dg.AssetKey("reverification_status")
REVERIFIED_CHECK = "weddings_reverified_within_window"
CHECK_RUN_SIZE = 1000  # weddings per check_weddings run: a contiguous range each, a few runs for a large fleet
OVERDUE_TAG = "wedbackup/overdue_weddings"
SHOWN = 50  # overdue weddings named in a check's description and metadata; the count covers all

_POLICY = Policy.from_env()  # the crons must be known when the code location loads


def _tick_time(context: dg.ScheduleEvaluationContext) -> dt.datetime:
    when = context.scheduled_execution_time or dt.datetime.now(dt.timezone.utc)
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def time_between_ticks(cron: str, timezone: str, now: dt.datetime) -> dt.timedelta:
    """The time from the cron's next tick after `now` to the one after it."""
    ticks = cron_string_iterator(now.timestamp(), cron, timezone)
    first = next(ticks)
    return next(ticks) - first


def reverified_last(catalogue: Catalogue) -> dict[str, dt.datetime | None]:
    """{partition with a backup, erased weddings left out: when its newest backup last restored (None: never)}."""
    erased = catalogue.erased_partitions()
    return {p: at for p, at in CheckQueries(catalogue).last_verified().items() if p not in erased}


# --------------------------------------------------------------------------------- daily checks and inventory


def check_requests(ordered: list[str], day: str) -> list[dg.RunRequest]:
    """check_weddings over every registered partition: contiguous ranges of at most CHECK_RUN_SIZE."""
    requests = []
    for n, i in enumerate(range(0, len(ordered), CHECK_RUN_SIZE)):
        chunk = ordered[i:i + CHECK_RUN_SIZE]
        requests.append(dg.RunRequest(
            run_key=f"check-weddings-{day}-{n}",
            tags={ASSET_PARTITION_RANGE_START_TAG: chunk[0], ASSET_PARTITION_RANGE_END_TAG: chunk[-1],
                  TRIGGER_TAG: "standing"}))
    return requests


@dg.schedule(
    name="check_weddings_daily", job=check_weddings, cron_schedule=_POLICY.standing.check_weddings_cron,
    execution_timezone=_POLICY.timezone, default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily: every per-wedding check (integrity, replica checksums, 3-2-1, restore, freshness) over "
                "every wedding, in a few runs of contiguous ranges.")
def check_weddings_daily(context: dg.ScheduleEvaluationContext):
    ordered = list(context.instance.get_dynamic_partitions(weddings_partitions.name))
    if not ordered:
        return dg.SkipReason("no wedding is registered yet (wedding_discovery adds them)")
    return check_requests(ordered, f"{_tick_time(context):%Y%m%d}")


reconcile_inventory_daily = dg.ScheduleDefinition(
    name="reconcile_inventory_daily", job=reconcile_inventory, cron_schedule=_POLICY.standing.reconcile_inventory_cron,
    execution_timezone=_POLICY.timezone, default_status=dg.DefaultScheduleStatus.RUNNING,
    tags={TRIGGER_TAG: "standing"},
    description="Daily: every object on every provider and in the vault reconciled against the catalogue.")


# ------------------------------------------------------------------------------- rolling re-verification


def reverify_requests(weddings: list[str], overdue: int, stamp: str) -> list[dg.RunRequest]:
    """`reverify_wedding_list` runs of at most RUN_SIZE weddings, in the order given (least recently verified
    first)."""
    return [dg.RunRequest(run_key=f"standing-reverify-{stamp}-{n}", job_name=REVERIFY_JOB,
                          run_config=reverify_run_config(weddings[i:i + RUN_SIZE]),
                          tags={TRIGGER_TAG: "standing", OVERDUE_TAG: str(max(0, min(RUN_SIZE, overdue - i)))})
            for n, i in enumerate(range(0, len(weddings), RUN_SIZE))]


@dg.schedule(
    name="rolling_reverification", job=reverify_wedding_list, cron_schedule=_POLICY.standing.reverify_cron,
    execution_timezone=_POLICY.timezone, default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Each tick restores again its share of the weddings' newest backups (all of them once per "
                "window, default 7 days), least recently verified first, from rotating providers, in a few "
                "list runs; a wedding that would fall out of the window before the next tick is always in.")
def rolling_reverification(context: dg.ScheduleEvaluationContext, wedbackup: WedbackupEngineResource):
    now = _tick_time(context)
    policy = wedbackup.policy()
    verified = reverified_last(wedbackup.catalogue())
    every = time_between_ticks(policy.standing.reverify_cron, policy.timezone, now)
    share = tick_share(verified, now, policy.standing.reverify_window, every)
    if not share.weddings:
        return dg.SkipReason("no wedding has a backup to re-verify")
    context.log.info(f"re-verifying {len(share.weddings)} of {share.total} partition(s): {len(share.overdue)} "
                     f"overdue before the next tick, share {share.share} per tick")
    return reverify_requests(share.weddings, len(share.overdue), f"{now.astimezone(dt.timezone.utc):%Y%m%dT%H%M}")


@dg.asset(
    key=REVERIFICATION_STATUS, owners=OWNERS, group_name="disaster_recovery", kinds={"postgres"},
    check_specs=[dg.AssetCheckSpec(
        REVERIFIED_CHECK, asset=REVERIFICATION_STATUS,
        description="Every wedding's newest backup restored successfully within the re-verification window "
                    "(policy standing.reverify_window, default 7 days); fails naming the overdue weddings.")],
    description="Standing verification: when each wedding's newest backup last restored, how many are within "
                "the re-verification window and which are overdue.",
)
def reverification_status(wedbackup: WedbackupEngineResource) -> dg.MaterializeResult:
    window = wedbackup.policy().standing.reverify_window
    verified = reverified_last(wedbackup.catalogue())
    now = dt.datetime.now(dt.timezone.utc)
    overdue = not_reverified(verified, now, window)
    known = [at for at in verified.values() if at is not None]
    named = ", ".join(overdue[:SHOWN]) + (f" and {len(overdue) - SHOWN} more" if len(overdue) > SHOWN else "")
    days = window.total_seconds() / 86400
    return dg.MaterializeResult(
        metadata={"partitions": dg.MetadataValue.int(len(verified)),
                  "overdue": dg.MetadataValue.int(len(overdue)),
                  "never_verified": dg.MetadataValue.int(sum(at is None for at in verified.values())),
                  "oldest_verification": str(min(known).isoformat()) if known else "-",
                  "window_days": dg.MetadataValue.float(days)},
        check_results=[dg.AssetCheckResult(
            check_name=REVERIFIED_CHECK, passed=not overdue, severity=dg.AssetCheckSeverity.ERROR,
            description=(f"all {len(verified)} partition(s) re-verified within {days:g} day(s)" if not overdue else
                         f"{len(overdue)} of {len(verified)} partition(s) not re-verified within {days:g} day(s): "
                         f"{named}"),
            metadata={"overdue": dg.MetadataValue.int(len(overdue)),
                      "overdue_weddings": dg.MetadataValue.json(overdue[:SHOWN])})])


reverification_status_job = dg.define_asset_job(
    name="reverification_status_job", selection=dg.AssetSelection.assets(REVERIFICATION_STATUS),
    executor_def=dg.in_process_executor,
    description="Evaluate the weddings_reverified_within_window check from the catalogue.")

reverification_status_daily = dg.ScheduleDefinition(
    name="reverification_status_daily", job=reverification_status_job,
    cron_schedule=_POLICY.standing.check_weddings_cron, execution_timezone=_POLICY.timezone,
    default_status=dg.DefaultScheduleStatus.RUNNING, tags={TRIGGER_TAG: "standing"},
    description="Daily: whether every wedding was re-verified within the window (its check names the overdue).")
