"""The DR drill: `dr_drill_report`, an asset a person reads in the UI (markdown summary, per-phase and per-copy
tables, the trend against earlier drills), materialized by the `dr_drill` job and its weekly schedule. Each drill
restores the whole platform from one provider (rotating by week; never the vault) into a scratch database,
checks it, times it and drops it (core/disaster.drill); the month's first also rebuilds a scratch catalogue
from that provider alone and restores through it (the catalogue-lost scenario). Checks: `drill_complete` (every partition restored and
matching its manifest, every foreign key whole) and `drill_rto_within_target` (whole system within the target,
default the seeds' 4 h; the slowest partition within its own, default 1 min)."""
from collections.abc import Iterator
from typing import Any

import dagster as dg

from ..shared.metadata import metadata_table
from ..backups.constants import OWNERS
from ..shared.resources import ProviderReplicasResource, WedbackupEngineResource
from ..core import disaster
from ..core.config import redact
from ..core.errors import WedbackupError

DR_DRILL_REPORT = dg.AssetKey("dr_drill_report")


class DrillConfig(dg.Config):
    provider: str | None = None  # s3, gcs or azure; default: rotating by ISO week
    jobs: int = 4  # weddings restored at once
    rto_target_seconds: float = disaster.RTO_TARGET_SECONDS
    partition_target_seconds: float = disaster.PARTITION_TARGET_SECONDS
    window_seconds: float = disaster.RTO_TARGET_SECONDS  # no wedding starts after this long; the drill is stopped
    catalogue_lost: str = "monthly"  # the catalogue-lost scenario in full: monthly (first drill), always, never


@dg.asset(
    key=DR_DRILL_REPORT, owners=OWNERS, group_name="disaster_recovery", kinds={"postgres"},
    check_specs=[
        dg.AssetCheckSpec("drill_complete", asset=DR_DRILL_REPORT,
                          description="The drill restored every partition, each matching its manifest, and every "
                                      "foreign key of the restored platform points at a row."),
        dg.AssetCheckSpec("drill_rto_within_target", asset=DR_DRILL_REPORT,
                          description="The whole restore finished within the RTO target (default 4 h) and the "
                                      "slowest partition within its own (default 1 min)."),
    ],
    description="The weekly disaster-recovery drill: the whole platform restored from a provider (never the "
                "vault) into a scratch database, checked, timed per phase and dropped; achieved RTO and RPO, "
                "throughput per copy location, and the trend against earlier drills.",
)
def dr_drill_report(context: dg.AssetExecutionContext, config: DrillConfig, wedbackup: WedbackupEngineResource,
                    replicas: ProviderReplicasResource) -> Iterator[Any]:
    provider = config.provider or disaster.drill_provider()
    engine = wedbackup.engine()
    try:
        report = disaster.drill(engine, replicas.all(), provider, jobs=config.jobs,
                                window_seconds=config.window_seconds,
                                catalogue_lost=disaster.drill_catalogue_lost(config.catalogue_lost),
                                progress=lambda m: context.log.info(redact(m)))
    except WedbackupError as exc:
        raise dg.Failure(description=redact(str(exc))) from None
    r = report.restore
    slowest = float(r.slowest.get("seconds", 0.0))
    rto_ok = report.rto_seconds <= config.rto_target_seconds and slowest <= config.partition_target_seconds
    metadata = {
        "summary": dg.MetadataValue.md(redact(report.markdown(config.rto_target_seconds))),
        "provider": provider, "complete": report.complete,
        "rto_seconds": dg.MetadataValue.float(report.rto_seconds),
        "rpo_seconds": dg.MetadataValue.float(report.rpo_seconds),
        "partitions_restored": dg.MetadataValue.int(r.restored_now),
        "partitions_total": dg.MetadataValue.int(r.partitions_total),
        "rows": dg.MetadataValue.int(r.rows), "bytes": dg.MetadataValue.int(r.bytes),
        "phases": metadata_table([{"phase": k, "seconds": float(v)} for k, v in r.phases.items()],
                         [("phase", "string"), ("seconds", "float")]),
        "throughput": metadata_table([{"copy": k, "bytes_per_second": v} for k, v in report.throughput.items()],
                             [("copy", "string"), ("bytes_per_second", "float")]),
        "not_restored": dg.MetadataValue.json(r.failed),
        "stopped": r.stopped or "no",
        "catalogue_rebuilt": dg.MetadataValue.json(report.catalogue_rebuilt or {}),
    }
    problems = len(r.failed) + len(r.foreign_key_problems)
    yield dg.MaterializeResult(asset_key=DR_DRILL_REPORT, metadata=metadata, check_results=[
        dg.AssetCheckResult(
            check_name="drill_complete", passed=report.complete, severity=dg.AssetCheckSeverity.ERROR,
            description=(f"all {r.partitions_total} partition(s) restored and matching" if report.complete else
                         redact("; ".join(([f"stopped: {r.stopped}"] if r.stopped else [])
                                          + [f"{k}: {v}" for k, v in r.failed.items()] + r.foreign_key_problems)
                                [:2000])),
            metadata={"problems": dg.MetadataValue.int(problems)}),
        dg.AssetCheckResult(
            check_name="drill_rto_within_target", passed=rto_ok, severity=dg.AssetCheckSeverity.ERROR,
            description=(f"whole restore {report.rto_seconds:.1f} s (target {config.rto_target_seconds:.0f} s); "
                         f"slowest partition {r.slowest.get('partition', '-')} {slowest:.1f} s "
                         f"(target {config.partition_target_seconds:.0f} s)"),
            metadata={"rto_seconds": dg.MetadataValue.float(report.rto_seconds),
                      "slowest_partition_seconds": dg.MetadataValue.float(slowest)}),
    ])


dr_drill = dg.define_asset_job(
    name="dr_drill", selection=dg.AssetSelection.assets(DR_DRILL_REPORT), executor_def=dg.in_process_executor,
    description="Disaster-recovery drill: the whole platform from a provider into a scratch database, checked, "
                "timed and dropped.")

dr_drill_schedule = dg.ScheduleDefinition(
    name="dr_drill_schedule",
    job=dr_drill,
    cron_schedule="0 4 * * 0",  # weekly, Sunday 04:00: off-peak, after the nightly retention sweep
    execution_timezone="Europe/London",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Weekly: a DR drill from this week's provider (s3, gcs, azure in turn).",
)
