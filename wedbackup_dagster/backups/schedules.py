"""The backup schedule: every few minutes, ask the catalogue (not Dagster's event log) which weddings are
past their tier's RPO, record the unchanged ones as still covered, and request few, large, prioritized
runs for the rest — each run an explicit list of weddings, so Dagster never validates keys one by one."""
import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field

import dagster as dg

from .partitions import weddings_partitions
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.policy.backup_policy import Policy
from ..shared.resources import WedbackupEngineResource
from .list_pipeline import backup_wedding_list, list_run_config

TIER_TAG = "wedbackup/tier"
TRIGGER_TAG = "wedbackup/trigger"
DUE_TAG = "wedbackup/due_weddings"
PRIORITY_TAG = "dagster/priority"
FIRST_TAG = "wedbackup/first_wedding"
LAST_TAG = "wedbackup/last_wedding"


@dataclass
class TickPlan:
    """What one tick decided: run requests (already tagged), and the weddings recorded as covered."""

    requests: list[dg.RunRequest] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)  # due weddings in the requested runs
    covered: list[str] = field(default_factory=list)
    unregistered: list[str] = field(default_factory=list)  # due, but not (yet) a Dagster partition


def list_requests(due_by_tier: dict[str, list[str]], ordered: list[str], policy: Policy, *, key_prefix: str,
                  trigger: str) -> tuple[list[dg.RunRequest], list[str], list[str]]:
    """Run requests of `backup_wedding_list` covering `due_by_tier`, most urgent tier first, each at most the
    tier's max_run_size weddings (in the partitions' insertion order): (requests, due keys they cover, due
    keys Dagster does not know). No partition_key: Dagster does not look every key up (17 s per 2,000)."""
    position = {k: i for i, k in enumerate(ordered)}
    requests: list[dg.RunRequest] = []
    requested: list[str] = []
    unregistered: list[str] = []
    for tier in sorted(due_by_tier, key=lambda t: (-policy.priority(t), t)):
        keys = sorted((k for k in due_by_tier[tier] if k in position), key=position.__getitem__)
        unregistered += sorted(k for k in due_by_tier[tier] if k not in position)
        requested += keys
        rule = policy.tiers[tier]
        for i in range(0, len(keys), rule.max_run_size):
            chunk = keys[i:i + rule.max_run_size]
            requests.append(dg.RunRequest(
                run_key=f"{key_prefix}-{tier}-{i // rule.max_run_size}",
                run_config=list_run_config(chunk),
                tags={PRIORITY_TAG: str(rule.priority), TIER_TAG: tier, TRIGGER_TAG: trigger,
                      DUE_TAG: str(len(chunk)), FIRST_TAG: chunk[0], LAST_TAG: chunk[-1]}))
    return requests, requested, unregistered


def plan_tick(catalogue: Catalogue, policy: Policy, ordered: list[str], now: dt.datetime) -> TickPlan:
    """One tick's decisions, recorded in the catalogue (covered_at / requested_at)."""
    rows = catalogue.due_partitions(policy.bands(now), now)
    plan = TickPlan()
    due: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if row["action"] == "covered":
            plan.covered.append(row["partition"])
        else:
            due[row["tier"]].append(row["partition"])
    plan.requests, plan.requested, plan.unregistered = list_requests(
        due, ordered, policy, key_prefix=f"{now.astimezone(dt.timezone.utc):%Y%m%dT%H%M}", trigger="schedule")
    catalogue.mark_covered(plan.covered, now, {"reason": "source unchanged since the newest backup",
                                               "in_season": policy.in_season(now)})
    catalogue.mark_requested(plan.requested, now)
    return plan


def _tick_time(context: dg.ScheduleEvaluationContext) -> dt.datetime:
    when = context.scheduled_execution_time or dt.datetime.now(dt.timezone.utc)
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


_POLICY = Policy.from_env()  # the cron and zone must be known when the code location loads


@dg.schedule(
    name="backup_schedule",
    cron_schedule=_POLICY.cron,
    execution_timezone=_POLICY.timezone,
    job=backup_wedding_list,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every few minutes: back up the weddings whose newest backup is older than their tier's RPO "
                "(nearest weddings first, tighter in wedding season), in few batched runs; weddings "
                "unchanged since their newest backup are recorded as still covered instead.",
)
def backup_schedule(context: dg.ScheduleEvaluationContext, wedbackup: WedbackupEngineResource):
    now = _tick_time(context)
    ordered = list(context.instance.get_dynamic_partitions(weddings_partitions.name))
    plan = plan_tick(wedbackup.catalogue(), wedbackup.policy(), ordered, now)
    if plan.unregistered:
        context.log.warning(f"{len(plan.unregistered)} due partition(s) are not Dagster partitions yet "
                            f"(wedding_discovery adds them): {', '.join(plan.unregistered[:10])}")
    if plan.covered:
        context.log.info(f"{len(plan.covered)} wedding(s) unchanged since their newest backup: recorded as covered")
    if not plan.requests:
        if plan.covered:
            return dg.SkipReason(f"no backup due: {len(plan.covered)} due wedding(s) unchanged since their newest "
                                 "backup were recorded as still covered")
        if plan.unregistered:
            return dg.SkipReason(f"no backup requested: {len(plan.unregistered)} due partition(s) are not "
                                 "registered in Dagster yet")
        return dg.SkipReason("no backup due: every wedding's newest backup is within its tier's RPO")
    return plan.requests
