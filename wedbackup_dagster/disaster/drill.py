"""The DR drill: `dr_drill_report`, an asset a person reads in the UI (markdown summary, per-phase and per-copy
tables, the trend against earlier drills), materialized by the `dr_drill` job and its weekly schedule. Each drill
restores the whole platform from one provider (rotating by week; never the vault) into a scratch database,
checks it, times it and drops it (core/disaster.drill); the month's first also rebuilds a scratch catalogue
from that provider alone and restores through it (the catalogue-lost scenario). Checks: `drill_complete` (every partition restored and
matching its manifest, every foreign key whole) and `drill_rto_within_target` (whole system within the target,
default the seeds' 4 h; each critical wedding within its own, default 1 min). Schedule, sample, provider,
targets and window come from the policy file's `drill` settings; run config overrides them per run."""
from collections.abc import Iterator
from typing import Any

import dagster as dg

from ..shared.metadata import metadata_table
from ..backups.constants import OWNERS
from ..shared.resources import ProviderReplicasResource, WedbackupEngineResource
from ..core import disaster
from ..core.config import redact
from ..core.errors import WedbackupError
from wedbackup_dagster.core.policy.backup_policy import Policy

DR_DRILL_REPORT = dg.AssetKey("dr_drill_report")


class DrillConfig(dg.Config):
    """Every field left unset comes from the policy file's `drill` settings (core/policy.DrillRule)."""

    provider: str | None = None  # s3, gcs or azure; default: the policy's, else rotating by ISO week
    jobs: int | None = None  # weddings restored at once
    rto_target_seconds: float | None = None  # the whole system (policy drill.rto_target, default 4 h)
    critical_target_seconds: float | None = None  # each critical wedding (drill.critical_rto_target, 1 min)
    window_seconds: float | None = None  # no wedding starts after this long; the drill is stopped (drill.window)
    catalogue_lost: str | None = None  # the catalogue-lost scenario in full: monthly (first drill), always, never
    sample: int | None = None  # N weddings (critical ones always in) plus the platform; default drill.sample
    every_wedding: bool = False  # ignore the policy's sample: the whole platform


@dg.asset(
    key=DR_DRILL_REPORT, owners=OWNERS, group_name="disaster_recovery", kinds={"postgres"},
    check_specs=[
        dg.AssetCheckSpec("drill_complete", asset=DR_DRILL_REPORT,
                          description="The drill restored every partition, each matching its manifest, and every "
                                      "foreign key of the restored platform points at a row."),
        dg.AssetCheckSpec("drill_rto_within_target", asset=DR_DRILL_REPORT,
                          description="The whole restore finished within the RTO target (default 4 h) and the "
                                      "critical wedding within its own (default 1 min); targets from the "
                                      "policy file's drill settings."),
    ],
    description="The weekly disaster-recovery drill: the whole platform restored from a provider (never the "
                "vault) into a scratch database, checked, timed per phase and dropped; achieved RTO and RPO, "
                "throughput per copy location, and the trend against earlier drills.",
)
def dr_drill_report(context: dg.AssetExecutionContext, config: DrillConfig, wedbackup: WedbackupEngineResource,
                    replicas: ProviderReplicasResource) -> Iterator[Any]:
    policy = wedbackup.policy()
    rule = policy.drill
    provider = config.provider or rule.provider or disaster.drill_provider()
    rto_target = config.rto_target_seconds if config.rto_target_seconds is not None else \
        rule.rto_target.total_seconds()
    critical_target = config.critical_target_seconds if config.critical_target_seconds is not None else \
        rule.critical_rto_target.total_seconds()
    window = config.window_seconds if config.window_seconds is not None else rule.window.total_seconds()
    sample = None if config.every_wedding else (config.sample if config.sample is not None else rule.sample)
    engine = wedbackup.engine()
    try:
        report = disaster.drill(engine, replicas.all(), provider,
                                jobs=config.jobs or rule.jobs, window_seconds=window,
                                catalogue_lost=disaster.drill_catalogue_lost(config.catalogue_lost
                                                                             or rule.catalogue_lost),
                                sample=sample, policy=policy, progress=lambda m: context.log.info(redact(m)))
    except WedbackupError as exc:
        raise dg.Failure(description=redact(str(exc))) from None
    r = report.restore
    slow_critical = report.critical_over(critical_target)
    critical = report.tiers.get("critical", {})
    rto_ok = report.rto_seconds <= rto_target and not slow_critical
    metadata = {
        "summary": dg.MetadataValue.md(redact(report.markdown(rto_target))),
        "tiers": metadata_table([{"tier": k, "partitions": v["partitions"], "rto_seconds": float(v["rto_seconds"]),
                          "slowest_seconds": float(v["slowest_seconds"]), "rpo_hours": v["rpo_seconds"] / 3600}
                         for k, v in report.tiers.items()],
                        [("tier", "string"), ("partitions", "int"), ("rto_seconds", "float"),
                         ("slowest_seconds", "float"), ("rpo_hours", "float")]),
        "sampled": "every wedding" if report.sampled is None else dg.MetadataValue.int(report.sampled),
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
            description=redact(
                f"whole restore {report.rto_seconds:.1f} s (target {rto_target:.0f} s); "
                + (f"{critical.get('partitions', 0)} critical wedding(s), slowest "
                   f"{critical.get('slowest_partition') or '-'} {float(critical.get('slowest_seconds', 0.0)):.1f} s "
                   f"(target {critical_target:.0f} s each)" if critical else "no critical wedding in this drill")
                + (f"; over the target: {', '.join(slow_critical[:20])}" if slow_critical else ""))[:2000],
            metadata={"rto_seconds": dg.MetadataValue.float(report.rto_seconds),
                      "critical_over_target": dg.MetadataValue.int(len(slow_critical)),
                      "slowest_critical_seconds": dg.MetadataValue.float(float(critical.get("slowest_seconds",
                                                                                              0.0)))}),
    ])


dr_drill = dg.define_asset_job(
    name="dr_drill", selection=dg.AssetSelection.assets(DR_DRILL_REPORT), executor_def=dg.in_process_executor,
    description="Disaster-recovery drill: the whole platform from a provider into a scratch database, checked, "
                "timed and dropped.")

_DRILL = Policy.from_env().drill  # the cron and zone must be known when the code location loads

dr_drill_schedule = dg.ScheduleDefinition(
    name="dr_drill_schedule",
    job=dr_drill,
    cron_schedule=_DRILL.cron,  # default weekly, Sunday 04:00: off-peak, after the nightly retention sweep
    execution_timezone=_DRILL.timezone,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Weekly: a DR drill from this week's provider (s3, gcs, azure in turn).",
)
