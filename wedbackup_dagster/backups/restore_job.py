"""The `restore_wedding` job: restore one wedding (or the platform) as of a time — into another database,
into a new schema for inspection, or in place in the live database — or dry-run it. Thin wiring over
core/recovery.py. DSNs never enter the run config: the target's is read from an environment variable
named in the config, the live database's from WEDBACKUP_SOURCE_DSN."""
import logging
import os

import dagster as dg

from wedbackup_dagster.core.postgres import restore_wedding as recovery
from ..core.config import redact
from ..core.errors import ConfigError, WedbackupError
from ..shared.metadata import metadata_table
from .partitions import validated_keys
from ..shared.resources import ProviderReplicasResource, WedbackupEngineResource

TARGET_DSN_VARIABLE = "WEDBACKUP_RESTORE_TARGET_DSN"
# A "target" restore overwrites its target, so it may never be pointed (from the UI's launchpad, say) at a
# database wedbackup itself depends on: the catalogue, or the live platform (that is what --in-place is for,
# with its own checks).
FORBIDDEN_TARGET_VARIABLES = frozenset({"WEDBACKUP_SOURCE_DSN", "WEDBACKUP_CATALOGUE_DSN"})
TABLE_COLUMNS = [("table", "string"), ("archive_rows", "int"), ("live_rows", "int"), ("add", "int"),
                 ("remove", "int"), ("change", "int"), ("seconds", "float")]
# Progress lines also go to this Python logger, so the command line can show them on stderr.
progress_logger = logging.getLogger("wedbackup.restore")


class RestoreConfig(dg.Config):
    partition: str
    mode: str = "target"  # target (another database), schema (a new schema, to inspect), in_place
    as_of: str | None = None  # ISO 8601 with timezone; default: now
    schema_name: str | None = None  # mode schema: the new schema's name
    schema_in_target: bool = False  # mode schema: in the target database instead of the source database
    dry_run: bool = False  # report rows to add, remove and change; write nothing
    include_unverified: bool = False  # also consider backups no restore has verified yet
    target_dsn_env: str = TARGET_DSN_VARIABLE  # the variable holding the target's DSN (never the DSN itself)
    provider: str | None = None  # vault, s3, gcs or azure; default: the vault copy when present
    lock_timeout_seconds: float = recovery.DEFAULT_LOCK_TIMEOUT  # in place: wait at most this long per lock
    skip_moved_rows: bool = False  # in place: leave rows another wedding holds now where they are (listed)


@dg.op(tags={"kind": "restore"})
def restore_partition(context: dg.OpExecutionContext, config: RestoreConfig, wedbackup: WedbackupEngineResource,
                      replicas: ProviderReplicasResource) -> dg.Output[dict]:
    partition = validated_keys([config.partition])[0]
    if config.mode not in recovery.MODES:
        raise ConfigError("mode", f"must be one of {', '.join(recovery.MODES)}, not {config.mode!r}")
    target = None
    if config.mode == "target" or (config.mode == "schema" and config.schema_in_target):
        if config.target_dsn_env in FORBIDDEN_TARGET_VARIABLES:
            raise ConfigError("target_dsn_env", f"may not name {config.target_dsn_env}: restore into the live "
                                                "database with mode in_place, never as a target")
        target = os.environ.get(config.target_dsn_env, "")
        if not target:
            raise ConfigError(config.target_dsn_env, "is not set: the DSN of the database to restore into")
    engine = wedbackup.engine()
    # Only the providers that may be read are made: a down provider does not stop a restore from another.
    readable = replicas.all(only=None if config.provider is None else [config.provider])
    request = recovery.RecoveryRequest(
        partition=partition, mode=config.mode, as_of=recovery.parse_as_of(config.as_of), dry_run=config.dry_run,
        provider=config.provider, schema=config.schema_name, include_unverified=config.include_unverified,
        lock_timeout=config.lock_timeout_seconds, skip_moved_rows=config.skip_moved_rows)

    def progress(message: str) -> None:
        message = redact(message)
        context.log.info(message)
        progress_logger.info(message)

    try:
        report = recovery.recover(engine, request, readable, target_dsn=target, progress=progress)
    except WedbackupError as exc:
        # Our errors already say what is at fault; a Failure shows them as the step's own words.
        raise dg.Failure(description=redact(str(exc))) from None
    for line in report.lines():
        context.log.info(line)
    totals = report.totals
    return dg.Output(report.to_dict(), metadata={
        "partition": partition,
        "mode": config.mode,
        "dry_run": config.dry_run,
        "target": report.target,
        "copy": report.copy,
        "archive_sha256": report.archive_sha256,
        "snapshot_time": report.snapshot_time,
        "rows": dg.MetadataValue.int(totals["archive_rows"]),
        "rows_added": dg.MetadataValue.int(totals["add"]),
        "rows_removed": dg.MetadataValue.int(totals["remove"]),
        "rows_changed": dg.MetadataValue.int(totals["change"]),
        "tables": metadata_table(report.to_dict()["tables"], TABLE_COLUMNS),
        "report": dg.MetadataValue.md("```\n" + "\n".join(report.lines()) + "\n```"),
        "seconds": dg.MetadataValue.float(report.seconds),
    })


@dg.job(executor_def=dg.in_process_executor,
        description="Restore one wedding or the platform as of a time: into another database, into a new schema "
                    "to inspect, or in place (one transaction, only that wedding's rows); or dry-run it.")
def restore_wedding():
    restore_partition()
