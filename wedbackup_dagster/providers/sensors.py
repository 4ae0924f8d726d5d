"""Provider health and run-failure sensors: a canary per provider every 30 s, catch-up replica runs for
exactly the partitions that missed a provider once it recovers, and alerts for failed runs (log + webhook)."""

import os
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from ..backups.constants import REPLICA_KEYS
from ..backups.jobs import backup_weddings
from ..backups.partitions import weddings_partitions
from wedbackup_dagster.core.catalogue.store import Catalogue
from ..core.config import redact
from ..core.errors import ConfigError
from wedbackup_dagster.core.storage.health import (
    HealthSettings,
    ProviderState,
    canary_replicas,
    catchup_ranges,
    check_providers,
    iso,
    states_from_catalogue,
)
from ..core.config import url_setting
from ..shared.resources import WedbackupEngineResource

HEALTH_INTERVAL_SECONDS = 30
# Catch-up restores redundancy of backups that already exist (the vault and the other providers hold
# them): it queues below fresh backups of critical (100), high (50) and platform (40) partitions and above
# the routine normal (10) and older tiers (core/policy.py).
CATCHUP_PRIORITY = "20"
CATCHUP_TAG = "wedbackup/catchup"
# Catch-up runs cover exactly the partitions that missed the provider, one run per range of insertion
# order, up to this many runs. Past it (a long outage across scattered weddings would make thousands of
# runs, about 2.4 s each, and ~7 s just to validate 2,000 requests: README, Automation) the smallest gaps made only
# of partitions that already have their copy are folded in: re-checking those is a no-op of milliseconds.
MAX_CATCHUP_RUNS = 50
CATCHUP_MAX_GAP = 0  # gaps of up to this many such partitions are folded even under MAX_CATCHUP_RUNS
WEBHOOK_VARIABLE = "WEDBACKUP_ALERT_WEBHOOK_URL"
WEBHOOK_TIMEOUT_SECONDS = 5.0


def cursor_states(cursor: str | None) -> dict[str, ProviderState]:
    """The provider states a previous tick left in the cursor ({} when there is none or it is unreadable)."""
    if not cursor:
        return {}
    try:
        return {p: ProviderState.from_json(s) for p, s in json.loads(cursor).items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def catchup_requests(provider: str, recovered_at: str, catalogue: Catalogue, ordered: list[str], *,
                     max_runs: int = MAX_CATCHUP_RUNS, max_gap: int = CATCHUP_MAX_GAP,
                     ) -> tuple[list[dg.RunRequest], list[str], list[str]]:
    """Run requests re-replicating to `provider` exactly the partitions whose newest backup has no copy there:
    one run per range of the partitions' insertion order, only that provider's replica asset selected.
    Returns (requests, partitions covered, partitions the instance does not know and so were left out)."""
    coverage = catalogue.copy_coverage(provider)
    missing = {p for p, has_copy in coverage.items() if not has_copy}
    harmless = {p for p, has_copy in coverage.items() if has_copy}
    ranges, unknown = catchup_ranges(missing, ordered, harmless, max_runs=max_runs, max_gap=max_gap)
    requests = []
    for i, (first, last) in enumerate(ranges):
        tags = {"dagster/priority": CATCHUP_PRIORITY, CATCHUP_TAG: provider}
        if first != last:
            tags.update({ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last})
        requests.append(dg.RunRequest(
            run_key=f"catchup-{provider}-{recovered_at}-{i}", asset_selection=[REPLICA_KEYS[provider]],
            partition_key=first if first == last else None, tags=tags))
    return requests, sorted(missing.difference(unknown)), unknown


@dg.sensor(
    name="provider_health", job=backup_weddings, minimum_interval_seconds=HEALTH_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Every 30 s a canary write / read / delete per provider. A provider is down after "
                "WEDBACKUP_PROVIDER_DOWN_AFTER failures in a row; when it recovers, the partitions whose newest "
                "backup missed it get replica runs for that provider only.",
)
def provider_health(context: dg.SensorEvaluationContext, wedbackup: WedbackupEngineResource):
    settings = wedbackup.settings()
    health = HealthSettings.from_env()
    catalogue = wedbackup.catalogue()
    # The cursor is the sensor's own memory; the catalogue covers a new or reset sensor.
    previous = cursor_states(context.cursor) or states_from_catalogue(catalogue)
    checks = check_providers(canary_replicas(settings, health.canary_timeout), catalogue, previous,
                             settings=health, now=datetime.now(timezone.utc))
    requests: list[dg.RunRequest] = []
    notes: list[str] = []
    ordered: list[str] | None = None
    for provider, check in checks.items():
        state = check.state
        if check.transition == "down":
            context.log.warning(f"provider {provider} is DOWN after {state.consecutive_failures} failed "
                                f"canaries: {check.probe.error}")
        elif not check.probe.ok:
            context.log.warning(f"provider {provider} canary failed ({state.consecutive_failures} in a row): "
                                f"{check.probe.error}")
            if state.ok:
                notes.append(f"{provider} canary failed ({state.consecutive_failures} of "
                             f"{health.down_after} before it counts as down): {check.probe.error}")
        if not state.ok:
            # The gap, made visible: backups go on reaching the other providers, not this one.
            gap = len(catalogue.partitions_missing_copy(provider))
            notes.append(f"{provider} down since {state.since} ({state.consecutive_failures} failed canaries; "
                          f"last: {check.probe.error}); newest backup of {gap} partition(s) lacks a "
                          f"{provider} copy")
        elif check.transition == "recovered":
            if ordered is None:
                ordered = list(context.instance.get_dynamic_partitions(weddings_partitions.name))
            new, covered, unknown = catchup_requests(provider, state.since, catalogue, ordered)
            requests.extend(new)
            context.log.info(f"provider {provider} recovered at {state.since}: {len(new)} catch-up run(s) "
                             f"for {len(covered)} partition(s)")
            if unknown:
                context.log.warning(f"{len(unknown)} partition(s) missing a {provider} copy are not Dagster "
                                    f"partitions (yet): {', '.join(unknown[:10])}")
            notes.append(f"{provider} recovered: {len(covered)} partition(s) to catch up")
    cursor = json.dumps({p: c.state.to_json() for p, c in sorted(checks.items())}, sort_keys=True)
    if requests:
        context.log.info("; ".join(notes))  # a tick with runs has no skip message: the states go to its log
        return dg.SensorResult(run_requests=requests, cursor=cursor)
    summary = "; ".join(notes) if notes else "all providers up (" + ", ".join(
        f"{p} {c.probe.seconds:.2f} s" for p, c in sorted(checks.items())) + ")"
    return dg.SensorResult(skip_reason=dg.SkipReason(summary), cursor=cursor)


# ------------------------------------------------------------------------------------ run failures

def _run_partitions(tags: Mapping[str, str]) -> dict[str, str] | None:
    if "dagster/partition" in tags:
        return {"partition": tags["dagster/partition"]}
    if ASSET_PARTITION_RANGE_START_TAG in tags:
        return {"first": tags[ASSET_PARTITION_RANGE_START_TAG], "last": tags.get(ASSET_PARTITION_RANGE_END_TAG, "")}
    return None


def _step_message(event: dg.DagsterEvent) -> str:
    data = event.step_failure_data
    if data is not None and data.user_failure_data is not None and data.user_failure_data.description:
        text = data.user_failure_data.description
    elif data is not None and data.error is not None:
        text = data.error.message.strip()
    else:
        text = event.message or "step failed"
    return redact(text)[:2000]


def failure_alert(context: dg.RunFailureSensorContext) -> dict[str, Any]:
    """What an on-call engineer needs first: job, run, weddings, and each failing step in its own words.
    Every text is redacted; run config and tags are left out, as they are not needed and might hold secrets."""
    run = context.dagster_run
    return {
        "source": "wedbackup",
        "kind": "run_failure",
        "job": run.job_name,
        "run_id": run.run_id,
        "partitions": _run_partitions(run.tags),
        "catchup_provider": run.tags.get(CATCHUP_TAG),
        "message": redact(context.failure_event.message or "")[:2000],
        "steps": [{"step": e.step_key, "message": _step_message(e)} for e in context.get_step_failure_events()],
        "at": iso(datetime.now(timezone.utc)),
    }


def alert_text(alert: Mapping[str, Any]) -> str:
    parts = alert["partitions"]
    where = ("" if not parts else f" partition {parts['partition']}" if "partition" in parts
             else f" partitions {parts['first']}..{parts['last']}")
    lines = [f"RUN FAILED: job {alert['job']}{where}, run {alert['run_id']}: {alert['message']}"]
    lines += [f"  step {s['step']}: {s['message']}" for s in alert["steps"]]
    return "\n".join(lines)


def post_alert(url: str, alert: Mapping[str, Any], *, timeout: float = WEBHOOK_TIMEOUT_SECONDS) -> str | None:
    """POST the alert as JSON; None when the webhook took it, else why not (for the log — never raised:
    an unreachable webhook must not hide the alert, which is already in the sensor's log)."""
    request = urllib.request.Request(url, data=json.dumps(alert).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "wedbackup"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) checked
            response.read(1024)
        return None
    except urllib.error.HTTPError as exc:
        return f"webhook answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return redact(f"webhook not reachable: {type(exc).__name__}: {reason}")


def webhook_url() -> str:
    """The configured webhook, '' when unset; ConfigError (naming the variable, not the URL) when malformed."""
    return url_setting(os.environ, WEBHOOK_VARIABLE)


@dg.run_failure_sensor(
    name="run_failure_alerts", default_status=dg.DefaultSensorStatus.RUNNING,
    description="Logs a readable alert for every failed run (job, run, partitions, failing steps) and POSTs "
                "it as JSON to WEDBACKUP_ALERT_WEBHOOK_URL when that is set.",
)
def run_failure_alerts(context: dg.RunFailureSensorContext):
    alert = failure_alert(context)
    context.log.error(alert_text(alert))
    try:
        url = webhook_url()
    except ConfigError as exc:
        context.log.error(f"alert not posted: {exc}")
        return
    if url:
        problem = post_alert(url, alert)
        if problem:
            context.log.error(f"alert for run {alert['run_id']} not posted: {problem}")

