"""The `change_feed` asset and its job and sensor. Each materialization is one drain (repeated while a pass
was cut short, at most `max_passes`), then the new segments are copied to S3, GCS and Azure. A lost or
invalidated slot is recovered here: a new feed, every live wedding marked changed (so the backup schedule
takes fresh snapshots), and the gap named in the failed `slot_health` check."""

import os
from datetime import datetime, timezone
from typing import Any

import dagster as dg

from ..backups.constants import OWNERS
from ..core.config import redact
from ..shared.resources import ProviderReplicasResource, WedbackupEngineResource

CHANGE_FEED = dg.AssetKey("change_feed")
LAG_CHECK = "feed_lag_within_rpo"
SLOT_CHECK = "slot_health"
# Seconds the newest captured change may trail the drain: the critical tier's target (issue 18: 10 s).
MAX_LAG_SETTING = "WEDBACKUP_CHANGEFEED_MAX_LAG"
DEFAULT_MAX_LAG = 10.0
# The slot is ERROR once less than this share of max_slot_wal_keep_size is left before invalidation.
SLOT_ERROR_SHARE = 0.25


class DrainConfig(dg.Config):
    max_passes: int = 10  # drains per run while a pass is cut at max_changes
    replicate: bool = True  # copy the new segments to every provider in the same run


def _max_lag() -> float:
    try:
        return float(os.environ.get(MAX_LAG_SETTING) or DEFAULT_MAX_LAG)
    except ValueError:
        return DEFAULT_MAX_LAG


def slot_check(state: dict[str, Any]) -> tuple[bool, str]:
    """(healthy, why) from the slot's retained WAL against what the server still allows (pure)."""
    safe, retained = state.get("safe_wal_size"), state.get("retained_bytes") or 0
    if state.get("wal_status") == "lost":
        return False, "the slot was invalidated"
    if safe is None:
        return True, f"retained WAL {retained:,} bytes; max_slot_wal_keep_size is unlimited"
    limit = safe + retained
    ok = safe >= SLOT_ERROR_SHARE * limit
    return ok, (f"retained WAL {retained:,} bytes, {safe:,} bytes left before the server invalidates the slot "
                f"({safe / limit:.0%} of max_slot_wal_keep_size)" if limit else "no WAL retained")


@dg.asset(
    key=CHANGE_FEED, owners=OWNERS, group_name="change_feed", kinds={"postgres"},
    check_specs=[
        dg.AssetCheckSpec(LAG_CHECK, asset=CHANGE_FEED,
                          description="The feed has captured every commit up to at most "
                                      f"{MAX_LAG_SETTING} (default {DEFAULT_MAX_LAG:g} s) before this drain ended."),
        dg.AssetCheckSpec(SLOT_CHECK, asset=CHANGE_FEED,
                          description="The slot exists, and its retained WAL leaves at least a quarter of "
                                      "max_slot_wal_keep_size before the server would invalidate it."),
    ],
    description="The logical change feed: one drain pass seals every wedding's new changes into change segments "
                "(vault, then S3, GCS and Azure), so any wedding can be restored to any second after a snapshot.",
)
def change_feed(context: dg.AssetExecutionContext, config: DrainConfig, wedbackup: WedbackupEngineResource,
                replicas: ProviderReplicasResource) -> dg.MaterializeResult:
    from ..core.changefeed.drain import ChangeFeed
    from ..core.changefeed.errors import SlotLost
    from ..core.changefeed.slot import slot_from_env

    engine = wedbackup.engine()
    feed = ChangeFeed.from_settings(engine.settings, engine.keyring, engine.catalogue, slot=slot_from_env(os.environ))
    if feed.store.live_feed(feed.slot) is None and not feed.store.feeds():
        raise dg.Failure(description=f"no change feed on slot {feed.slot}: start it once with "
                                     "`wedbackup changes start`")
    recovered = None
    results = []
    try:
        for _ in range(max(1, config.max_passes)):
            results.append(feed.drain())
            if not results[-1].more:
                break
    except SlotLost as exc:
        gap = redact(str(exc))
        context.log.error(f"change feed: {gap}; starting a new feed and asking for fresh snapshots of every wedding")
        recovered = feed.recover()
        now = datetime.now(timezone.utc)
        engine.catalogue.record_source_changes({p: now for p in engine.catalogue.live_partitions()})
    copies: dict[str, Any] = {}
    if config.replicate and results and any(r.segments for r in results):
        for provider, replica in replicas.all().items():
            copies[provider] = feed.replicate(replica)
    status = feed.status()
    state = status["slot_state"] or {}
    live = status["feed"]
    now = datetime.now(timezone.utc)
    lag = (now - live["covered_until"]).total_seconds() if live else float("inf")
    seconds = sum(r.seconds for r in results) or 1e-9
    changes = sum(r.changes for r in results)
    weddings = [{"wedding": w["partition"], "newest_change": w["newest_commit"].isoformat(),
                 "lag_seconds": round((now - w["newest_commit"]).total_seconds(), 1),
                 "segments": int(w["segments"]), "changes": int(w["changes"])} for w in status["weddings"][:200]]
    if recovered:
        gap_from = recovered["gap_from"].isoformat() if recovered.get("gap_from") else "the feed's start"
        slot_ok, slot_why = False, (
            f"slot lost and recovered: a gap in the continuous range of every wedding from {gap_from} to "
            f"{recovered['gap_to'].isoformat()} (no wedding can be restored to a second inside it); a new feed "
            f"(id {recovered['feed']}) runs on slot {recovered['slot']} and every wedding is marked changed so "
            "the backup schedule takes fresh snapshots")
    else:
        slot_ok, slot_why = slot_check(state)
    metadata = {
        "transactions": dg.MetadataValue.int(sum(r.transactions for r in results)),
        "changes": dg.MetadataValue.int(changes),
        "changes_per_second": dg.MetadataValue.float(round(changes / seconds, 1)),
        "segments": dg.MetadataValue.int(sum(len(r.segments) for r in results)),
        "lag_seconds": dg.MetadataValue.float(round(lag, 3)),
        "slot_lag_bytes": dg.MetadataValue.int(int(state.get("lag_bytes") or 0)),
        "retained_wal_bytes": dg.MetadataValue.int(int(state.get("retained_bytes") or 0)),
        "captured_up_to": live["covered_until"].isoformat() if live else "-",
        "barriers": dg.MetadataValue.json([{k: str(v) for k, v in b.items()} for r in results for b in r.barriers]),
        "not_sealed_erased": ", ".join(sorted({w for r in results for w in r.erased})) or "none",
        "copies": dg.MetadataValue.json({p: {"uploaded": c["uploaded"], "failed": len(c["failed"])}
                                         for p, c in copies.items()}),
        "weddings": dg.MetadataValue.table(
            records=[dg.TableRecord(w) for w in weddings],
            schema=dg.TableSchema(columns=[dg.TableColumn("wedding", "string"),
                                           dg.TableColumn("newest_change", "string"),
                                           dg.TableColumn("lag_seconds", "float"), dg.TableColumn("segments", "int"),
                                           dg.TableColumn("changes", "int")])),
    }
    return dg.MaterializeResult(asset_key=CHANGE_FEED, metadata=metadata, check_results=[
        dg.AssetCheckResult(check_name=LAG_CHECK, passed=lag <= _max_lag(), severity=dg.AssetCheckSeverity.WARN,
                            description=f"captured up to {lag:.1f} s before now (target {_max_lag():g} s)"),
        dg.AssetCheckResult(check_name=SLOT_CHECK, passed=slot_ok, severity=dg.AssetCheckSeverity.ERROR,
                            description=slot_why),
    ])


change_feed_drain = dg.define_asset_job(
    name="change_feed_drain", selection=dg.AssetSelection.assets(CHANGE_FEED), executor_def=dg.in_process_executor,
    tags={"wedbackup/kind": "change-feed"},
    description="One drain of the logical change feed: segments sealed, copied, the slot advanced.")


@dg.sensor(job=change_feed_drain, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Launches a drain every 30 s while none is running. Off by default: turn it on once the "
                       "feed is started (`wedbackup changes start`); for lag in seconds run `wedbackup changes drain "
                       "--follow 2` as a long-running process instead (docs/CHANGEFEED.md).")
def change_feed_sensor(context: dg.SensorEvaluationContext):
    running = context.instance.get_runs(filters=dg.RunsFilter(
        job_name=change_feed_drain.name, statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTED,
                                                    dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED]),
        limit=1)
    if running:
        return dg.SkipReason(f"a drain is still running ({running[0].run_id[:8]}): the next one waits for it")
    return dg.RunRequest()
