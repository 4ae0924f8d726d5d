"""The `restore_platform` job: the whole platform — the platform partition, then every wedding's newest
verified backup at or before one time — into an empty database, on N workers, resumable
(core/disaster/). The target's DSN never enters the run config: it is read from the environment variable
the config names (default WEDBACKUP_RESTORE_TARGET_DSN), and may not be the source's or the catalogue's."""
import os

import dagster as dg

from ..shared.metadata import metadata_table
from ..shared.resources import ProviderReplicasResource, WedbackupEngineResource
from ..backups.restore_job import FORBIDDEN_TARGET_VARIABLES, TARGET_DSN_VARIABLE, progress_logger
from wedbackup_dagster.core import disaster
from wedbackup_dagster.core.postgres import restore_wedding as recovery
from ..core.config import redact
from ..core.errors import ConfigError, WedbackupError


class RestorePlatformConfig(dg.Config):
    as_of: str | None = None  # ISO 8601 with timezone: one common point for every partition; default now
    copy_from: str | None = None  # vault, s3, gcs or azure first (then the other providers); default vault first
    jobs: int = 4  # weddings restored at once, each in its own transaction
    resume: bool = False  # finish an interrupted restore --all in the same target
    include_unverified: bool = False  # also consider backups no restore has verified yet
    packs: bool = True  # from a provider: read the weddings its newest DR pack holds from the pack
    target_dsn_env: str = TARGET_DSN_VARIABLE  # the variable holding the target's DSN (never the DSN itself)


PHASE_COLUMNS = [("phase", "string"), ("seconds", "float")]


@dg.op(tags={"kind": "restore"})
def restore_all_partitions(context: dg.OpExecutionContext, config: RestorePlatformConfig,
                           wedbackup: WedbackupEngineResource, replicas: ProviderReplicasResource) -> dg.Output[dict]:
    if config.target_dsn_env in FORBIDDEN_TARGET_VARIABLES:
        raise ConfigError("target_dsn_env", f"may not name {config.target_dsn_env}: the whole platform is restored "
                                            f"only into a new, empty database")
    target = os.environ.get(config.target_dsn_env, "")
    if not target:
        raise ConfigError(config.target_dsn_env, "is not set: the DSN of the empty database to restore into")
    if config.jobs < 1:
        raise ConfigError("jobs", f"must be at least 1, not {config.jobs}")

    def progress(message: str) -> None:
        message = redact(message)
        context.log.info(message)
        progress_logger.info(message)

    try:
        options = disaster.RestoreAllOptions(
            as_of=recovery.parse_as_of(config.as_of) if config.as_of else None,
            providers=disaster.copy_order(config.copy_from), jobs=config.jobs, resume=config.resume,
            include_unverified=config.include_unverified, packs=config.packs)
        engine = wedbackup.engine()
        report = disaster.restore_all(engine, replicas.all(), target, options,
                                      progress=progress)
    except WedbackupError as exc:
        raise dg.Failure(description=redact(str(exc))) from None
    for line in report.lines():
        context.log.info(redact(line))
    metadata = {
        "target": report.target, "as_of": report.as_of, "complete": report.complete,
        "partitions_total": dg.MetadataValue.int(report.partitions_total),
        "partitions_restored": dg.MetadataValue.int(report.restored_now + report.restored_before),
        "restored_by_earlier_runs": dg.MetadataValue.int(report.restored_before),
        "rows": dg.MetadataValue.int(report.rows), "bytes": dg.MetadataValue.int(report.bytes),
        "newest_recovery_point": report.newest_point, "oldest_recovery_point": report.oldest_point,
        "not_restored": dg.MetadataValue.json(report.failed),
        "phases": metadata_table([{"phase": k, "seconds": float(v)} for k, v in report.phases.items()], PHASE_COLUMNS),
        "report": dg.MetadataValue.md("```\n" + redact("\n".join(report.lines())) + "\n```"),
        "seconds": dg.MetadataValue.float(report.seconds),
    }
    return dg.Output(report.to_dict(), metadata=metadata)


@dg.job(executor_def=dg.in_process_executor,
        description="Disaster recovery: the platform partition, then every wedding's newest verified backup (at "
                    "or before as_of), into an empty database on N workers; resumable; a report of what was "
                    "restored, from which copies, how long each phase took, and what could not be restored.")
def restore_platform():
    restore_all_partitions()
