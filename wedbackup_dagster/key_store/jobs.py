"""The `key_store_backup` and `rotate_keys` jobs, the hourly `key_store_backup_schedule` and the
`key_store_backup_after_backups` sensor. The core does the work; a backup that finds the newest key
backup already holds every live key writes nothing, so running often is cheap."""

import os

import dagster as dg

from ..backups.list_pipeline import backup_wedding_list
from ..backups.jobs import backup_weddings
from ..shared.resources import ProviderReplicasResource, WedbackupEngineResource
from ..core.errors import KeyBackupError


def _metadata(result) -> dict:
    return {"key_backup_sha256": result.sha256 or "", "wedding_keys": dg.MetadataValue.int(result.key_count),
            "master_key_id": result.master_key_id, "copies": ", ".join(sorted(result.copies)),
            "skipped": result.skipped, "deleted": str(result.deleted)}


@dg.op(tags={"kind": "keys"})
def back_up_key_store_op(context: dg.OpExecutionContext, wedbackup: WedbackupEngineResource,
                         replicas: ProviderReplicasResource) -> dg.Output:
    from wedbackup_dagster.core.keys.backup import back_up_key_store

    engine = wedbackup.engine()
    result = back_up_key_store(wedbackup.settings(), engine.catalogue, replicas.all(), engine.keyring)
    if not result.ok:
        raise KeyBackupError(f"{result.sha256}", "; ".join(f"{p}: {m}" for p, m in sorted(result.failures.items())))
    context.log.info(f"key backup {result.sha256[:16]}: {result.key_count} wedding keys "
                     f"{'(unchanged, kept)' if result.skipped else 'written'}")
    return dg.Output(None, metadata=_metadata(result))


@dg.op(tags={"kind": "keys"})
def rotate_master_key_op(context: dg.OpExecutionContext, wedbackup: WedbackupEngineResource,
                         replicas: ProviderReplicasResource) -> dg.Output:
    from wedbackup_dagster.core.keys.backup import refresh_key_backups
    from wedbackup_dagster.core.keys.rotation import rotate_master_key

    engine = wedbackup.engine()
    report = rotate_master_key(engine.catalogue, engine.keyring,
                               progress=lambda n: context.log.info(f"{n} wedding keys re-wrapped"))
    # Older key backups are sealed with the old master key: replace them so it can be retired.
    result = refresh_key_backups(wedbackup.settings(), engine.catalogue, replicas.all(), engine.keyring)
    return dg.Output(None, metadata={"master_key_id": report.master_key_id,
                                     "rewrapped": dg.MetadataValue.int(report.total),
                                     "already_current": dg.MetadataValue.int(report.already_current),
                                     **_metadata(result)})


@dg.job(executor_def=dg.in_process_executor, tags={"wedbackup/kind": "keys"},
        description="Back up the key store (every live wedding key, wrapped and sealed with the current master "
                    "key) to the vault and every provider; nothing is written when the newest one is current.")
def key_store_backup():
    back_up_key_store_op()


@dg.job(executor_def=dg.in_process_executor, tags={"wedbackup/kind": "keys"},
        description="Re-wrap every wedding key with the current (first) master key of WEDBACKUP_MASTER_KEY, "
                    "then replace the key backups; archives are not rewritten.")
def rotate_keys():
    rotate_master_key_op()


key_store_backup_schedule = dg.ScheduleDefinition(
    name="key_store_backup_schedule", cron_schedule="17 * * * *", job=key_store_backup,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Hourly: a key backup when the live wedding keys changed (a no-op otherwise).")


@dg.run_status_sensor(
    name="key_store_backup_after_backups", run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[backup_weddings, backup_wedding_list], request_job=key_store_backup,
    default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=60,
    description="After a successful backup run: a key backup when that run made a new wedding key.")
def key_store_backup_after_backups(context: dg.RunStatusSensorContext, wedbackup: WedbackupEngineResource):
    from wedbackup_dagster.core.keys.backup import key_backup_is_current
    from wedbackup_dagster.core.keys.keyring import load_master_keyring

    current, fingerprint = key_backup_is_current(wedbackup.catalogue(), load_master_keyring(os.environ))
    if current:
        return dg.SkipReason("the newest key backup already holds every live wedding key")
    # One run per key set: many backup runs finishing together ask once.
    return dg.RunRequest(run_key=f"keys-{fingerprint[:32]}")
