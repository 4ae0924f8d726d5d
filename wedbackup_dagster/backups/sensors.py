"""Sensors that keep the partitions and the catalogue in step with the source: wedding discovery (new
weddings become dynamic partitions, erased ones leave) and change capture (a change to a critical or
high-tier wedding is backed up within the sensor's interval), decided by the change feed when one runs,
else by an updated_at watermark."""
import datetime as dt
import os
from collections import defaultdict

import dagster as dg

from .partitions import validated_keys, weddings_partitions
from wedbackup_dagster.core.changefeed.slot import slot_from_env
from wedbackup_dagster.core.changefeed.store import FeedStore
from wedbackup_dagster.core.partitions import PLATFORM
from wedbackup_dagster.core.postgres.discovery import changed_weddings, digest, wedding_dates
from wedbackup_dagster.core.policy.backup_policy import CRITICAL, HIGH
from ..shared.resources import WedbackupEngineResource
from .list_pipeline import backup_wedding_list
from .schedules import list_requests

# Dagster adds partitions far faster in big batches (100k: ~2 s in batches of 1,000, 12 s in batches of 100).
PARTITION_BATCH = 10_000
# A row's updated_at is its transaction's start: a transaction that commits after a tick may carry an
# older stamp than that tick's watermark. Each tick looks this far behind the watermark to catch it.
WATERMARK_OVERLAP = dt.timedelta(minutes=2)
URGENT_TIERS = (CRITICAL, HIGH)


@dg.sensor(
    name="wedding_discovery",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds every new wedding of the source database as a partition and removes erased ones "
                "(in batches), and keeps the catalogue's partition list and wedding dates current.",
)
def wedding_discovery(context: dg.SensorEvaluationContext, wedbackup: WedbackupEngineResource):
    catalogue = wedbackup.catalogue()
    # An erased wedding stays out even while its row is still in the source (README, GDPR erasure).
    erased = catalogue.erased_partitions()
    present = [(PLATFORM, None), *(w for w in wedding_dates(wedbackup.source_dsn()) if w[0] not in erased)]
    fingerprint = digest(present)
    if context.cursor == fingerprint:
        return dg.SkipReason("no wedding added, removed or re-dated since the last tick")
    changed, removed = catalogue.sync_partitions(present)
    keys = validated_keys([k for k, _ in present])
    wanted = set(keys)
    known = list(context.instance.get_dynamic_partitions(weddings_partitions.name))
    known_set = set(known)
    new = [k for k in keys if k not in known_set]
    gone = [k for k in known if k not in wanted]
    requests: list = [weddings_partitions.build_add_request(new[i:i + PARTITION_BATCH])
                      for i in range(0, len(new), PARTITION_BATCH)]
    if gone:
        requests.append(weddings_partitions.build_delete_request(gone))
    context.log.info(f"partitions: {len(new)} new, {len(gone)} removed; catalogue: {len(changed)} new or re-dated, "
                     f"{len(removed)} marked removed")
    if not requests:
        reason = f"partitions unchanged; {len(changed)} catalogue row(s) re-dated or restored"
        return dg.SensorResult(cursor=fingerprint, skip_reason=reason)
    return dg.SensorResult(dynamic_partitions_requests=requests, cursor=fingerprint)


def _watermark(cursor: str | None) -> dt.datetime | None:
    if not cursor:
        return None
    try:
        return dt.datetime.fromisoformat(cursor)
    except ValueError:
        return None  # an unreadable cursor: start over from the beginning (safe: only re-marks changes)


@dg.sensor(
    name="wedding_change_capture",
    job=backup_wedding_list,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests a backup at once for a changed critical or high-tier wedding. Which weddings changed: "
                "when a change feed runs, what its drains recorded (deletes and tables without updated_at "
                "included); without one, the updated_at columns of the tenant tables, recorded in the catalogue "
                "(the schedule's fingerprint). Cursor: how far the feed had captured, or the updated_at "
                "watermark.",
)
def wedding_change_capture(context: dg.SensorEvaluationContext, wedbackup: WedbackupEngineResource):
    since = _watermark(context.cursor)
    catalogue = wedbackup.catalogue()
    captured = FeedStore(catalogue).deciding_watermark(slot_from_env(os.environ))
    if captured is not None:
        # The feed decides for the weddings: its drains recorded each wedding's newest commit. The overlap
        # covers a drain that recorded its changes just after this tick read how far it had captured. The
        # platform's tables are not in the feed: updated_at still decides for the platform partition.
        platform, newest = changed_weddings(wedbackup.source_dsn(), since - WATERMARK_OVERLAP if since else None,
                                            weddings=False)
        catalogue.record_source_changes(platform)
        rows = catalogue.source_changes_since(since - WATERMARK_OVERLAP if since else None)
        watermark = max(captured, newest, since) if since else max(captured, newest)
        decided_by = "change feed"
    else:
        changes, newest = changed_weddings(wedbackup.source_dsn(), since - WATERMARK_OVERLAP if since else None)
        watermark = max(newest, since) if since else newest
        rows = catalogue.record_source_changes(changes) if changes else []
        decided_by = "updated_at"
    cursor = watermark.isoformat()
    if not rows:
        return dg.SensorResult(cursor=cursor, skip_reason=f"no change since {cursor} ({decided_by})")
    changes = rows
    policy = wedbackup.policy()
    now = dt.datetime.now(dt.timezone.utc)
    today = policy.today(now)
    urgent: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        tier = policy.tier(row["wedding_date"], today)
        if row["partition"] == PLATFORM or tier not in URGENT_TIERS:
            continue
        changed = row["snapshot_time"] is None or row["source_updated_at"] > row["snapshot_time"]
        asked = row["requested_at"] is not None and row["requested_at"] >= row["source_updated_at"]
        if changed and not asked:
            urgent[tier].append(row["partition"])
    ordered = list(context.instance.get_dynamic_partitions(weddings_partitions.name))
    requests, requested, _ = list_requests(
        urgent, ordered, policy, key_prefix=f"change-{watermark.astimezone(dt.timezone.utc):%Y%m%dT%H%M%S%f}",
        trigger="change")
    catalogue.mark_requested(requested, now)
    context.log.info(f"{len(changes)} partition(s) changed ({decided_by}); {len(requested)} critical/high wedding(s) "
                     "requested")
    if not requests:
        return dg.SensorResult(cursor=cursor, skip_reason=f"{len(changes)} partition(s) changed, none critical "
                                                          "or high tier with an unrequested change")
    return dg.SensorResult(run_requests=requests, cursor=cursor)
