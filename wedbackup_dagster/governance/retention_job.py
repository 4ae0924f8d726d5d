"""The `retention_sweep` job and its daily schedule: prune every wedding's backups to the retention policy
(core.retention.prune, rules from WEDBACKUP_POLICY_FILE), then its media snapshots by the same rules with the
packs no kept snapshot needs (core.media.retention.prune_all_media). Locked copies are reported, not failures;
a provider that could not be reached fails the run (the next sweep retries)."""
import dagster as dg

from ..shared.resources import ProviderReplicasResource, WedbackupEngineResource
from wedbackup_dagster.core.governance import retention
from wedbackup_dagster.core.policy.backup_policy import Policy


class PruneConfig(dg.Config):
    dry_run: bool = False
    partition: str | None = None  # one wedding only; default: every partition


@dg.op(tags={"kind": "retention"})
def prune_backups(context: dg.OpExecutionContext, config: PruneConfig, wedbackup: WedbackupEngineResource,
                  replicas: ProviderReplicasResource) -> dg.Output:
    engine = wedbackup.engine()
    policy = Policy.from_env()
    report = retention.prune(engine.catalogue, engine.vault, replicas.all(),
                             policy, dry_run=config.dry_run, partition=config.partition)
    summary = report.summary()
    context.log.info(f"retention: {summary}")
    media = sweep_media(engine, replicas, policy, config)
    context.log.info(f"media retention: {media.summary()}")
    metadata = {**summary, **media.summary()}
    locked = [f"{d.partition}/{d.archive_sha256[:12]} {p} until {u}"
              for d in report.locked for p, u in d.locked.items()]
    metadata["locked"] = dg.MetadataValue.json(locked[:100])
    # Backups a flagged drop in rows holds until a person acknowledges it (`wedbackup ack`), with their reasons.
    metadata["held"] = dg.MetadataValue.json([f"{h['partition']}/#{h['backup_id']}: {h['reason']}"
                                              for h in report.held[:100]])
    metadata["media_failures"] = dg.MetadataValue.json(media.failed[:100])
    if report.failed or media.failed:
        failed = [f"{p}: {e}" for d in report.failed for p, e in d.failed.items()] + media.failed
        raise dg.Failure(description=f"retention: {len(report.failed)} backup(s) kept copies that could not be "
                                     f"deleted, {len(media.failed)} media deletion(s) failed (provider "
                                     f"unreachable?); the next sweep retries: {'; '.join(failed[:3])}",
                         metadata=metadata)
    return dg.Output(None, metadata=metadata)


def sweep_media(engine, replicas: ProviderReplicasResource, policy: Policy, config: PruneConfig):
    from wedbackup_dagster.core.media.retention import sweep_engine_media

    return sweep_engine_media(engine, replicas.all(), policy, partition=config.partition, dry_run=config.dry_run)


@dg.job(executor_def=dg.in_process_executor,
        description="Delete the backups and media snapshots the retention policy no longer keeps, and the media "
                    "packs no kept snapshot needs, on every provider and in the vault.")
def retention_sweep():
    prune_backups()


retention_sweep_schedule = dg.ScheduleDefinition(
    name="retention_sweep",
    job=retention_sweep,
    cron_schedule="30 3 * * *",  # daily, at a quiet hour
    execution_timezone="Europe/London",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily: prune backups and media to the retention policy (grandfather-father-son per tier).",
)
