"""The `restore_partition` job: restore one wedding (or the platform) from its newest backup into a
target database. The target DSN is read from an environment variable named in the config, so no
password ever lands in Dagster's run storage."""
import os

import dagster as dg
from dagster_aws.s3 import S3Resource
from dagster_gcp import GCSResource

from ..core.config import redact
from ..core.engine import PROVIDERS
from ..core.errors import ConfigError
from .assets import make_replica
from .partitions import validated_keys
from .resources import AzureBlobResource, WedbackupEngineResource

TARGET_DSN_VARIABLE = "WEDBACKUP_RESTORE_TARGET_DSN"


class RestoreConfig(dg.Config):
    partition: str
    target_dsn_env: str = TARGET_DSN_VARIABLE
    provider: str | None = None  # vault, s3, gcs or azure; default: the vault copy when present


@dg.op(tags={"kind": "restore"})
def restore_partition(context: dg.OpExecutionContext, config: RestoreConfig, wedbackup: WedbackupEngineResource,
                      s3: S3Resource, gcs: GCSResource, azure: AzureBlobResource) -> dg.Output:
    partition = validated_keys([config.partition])[0]
    target = os.environ.get(config.target_dsn_env, "")
    if not target:
        raise ConfigError(config.target_dsn_env, "is not set: the DSN of the database to restore into")
    engine = wedbackup.engine()
    clients = {"s3": s3.get_client, "gcs": gcs.get_client, "azure": azure.get_service}
    settings = wedbackup.settings()
    replicas = {p: make_replica(p, settings, clients[p]()) for p in PROVIDERS
                if config.provider in (None, p)}
    backup, chosen, report = engine.restore_to(partition, target, replicas, provider=config.provider)
    context.log.info(redact(f"restored {partition} from {chosen} copy {backup.archive_sha256[:16]}"))
    return dg.Output(None, metadata={
        "partition": partition,
        "copy": chosen,
        "archive_sha256": backup.archive_sha256,
        "snapshot_time": str(backup.snapshot_time),
        "rows": dg.MetadataValue.int(report.total_rows),
    })


@dg.job(executor_def=dg.in_process_executor, description="Restore one wedding or the platform into a database.")
def restore_wedding():
    restore_partition()
