"""Resources: the engine (source database, catalogue, vault, keys) and one client per provider —
dagster-aws S3Resource, dagster-gcp GCSResource and an azure-storage-blob resource. Every value comes
from an environment variable (EnvVar), so no secret is in code, config or the UI."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource
from dagster_gcp import GCSResource

from ..core.config import Settings, provider_timeout_from
from ..core.engine import Engine


class WedbackupEngineResource(dg.ConfigurableResource):
    """The plain-Python engine, configured from the WEDBACKUP_* environment at run time."""

    def engine(self) -> Engine:
        return Engine.from_env()

    def settings(self) -> Settings:
        return Settings.from_env()


class AzureBlobResource(dg.ConfigurableResource):
    connection_string: str

    def get_service(self) -> Any:
        from wedbackup_dagster.core.storage.replicas.azure import azure_service_from_connection_string

        # Short timeouts and one quick retry: the SDK's default retry would hold a down provider for minutes.
        return azure_service_from_connection_string(self.connection_string, read_timeout=provider_timeout_from())


class S3ReplicaResource(S3Resource):
    """dagster-aws's S3Resource, completed from the WEDBACKUP_* / AWS_* environment when the client is
    made (not when the code location loads), so the endpoint and keys are those of the running process
    and never appear in the resource's config."""

    def get_client(self) -> Any:
        from wedbackup_dagster.core.storage.replicas.s3 import client_config, s3_client_from

        settings = Settings.from_env()
        target = dataclasses.replace(settings.s3, endpoint_url=self.endpoint_url or settings.s3.endpoint_url,
                                     region=self.region_name or settings.s3.region)
        credentials = {
            "AWS_ACCESS_KEY_ID": self.aws_access_key_id or os.environ.get("AWS_ACCESS_KEY_ID") or "",
            "AWS_SECRET_ACCESS_KEY": self.aws_secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY") or "",
        }
        # dagster-aws's client keeps botocore's 60 s connect and read timeouts whatever we configure: a
        # provider that accepts and then hangs held each attempt for a minute. WEDBACKUP_PROVIDER_TIMEOUT bounds it.
        timeout = settings.provider_timeout
        return s3_client_from(target, credentials, config=client_config(
            connect_timeout=min(5.0, timeout), read_timeout=timeout, max_attempts=self.max_attempts,
            # The upload threads share this client (boto3 clients are thread-safe), each up to 4 part uploads.
            max_pool_connections=max(10, 4 * settings.upload_concurrency)))


def build_resources() -> dict[str, Any]:
    return {
        "wedbackup": WedbackupEngineResource(),
        "s3": S3ReplicaResource(max_attempts=2),
        "gcs": GCSResource(project=dg.EnvVar("WEDBACKUP_GCS_PROJECT")),
        "azure": AzureBlobResource(connection_string=dg.EnvVar("WEDBACKUP_AZURE_CONNECTION_STRING")),
    }
