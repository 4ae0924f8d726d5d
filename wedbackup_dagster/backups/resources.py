"""Resources: the engine (source database, catalogue, vault, keys) and one client per provider —
dagster-aws S3Resource, dagster-gcp GCSResource and an azure-storage-blob resource. Every value comes
from an environment variable (EnvVar), so no secret is in code, config or the UI."""
from __future__ import annotations

import os
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource
from dagster_gcp import GCSResource

from ..core.config import Settings
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
        from ..core.replicas.azure import azure_service_from_connection_string

        # Short timeouts and one quick retry: the SDK's default retry would hold a down provider for minutes.
        return azure_service_from_connection_string(self.connection_string)


def _optional(name: str, default: str | None = None) -> Any:
    # EnvVar keeps the value out of the UI; a plain default is used when the variable is unset.
    return dg.EnvVar(name) if os.environ.get(name) else default


def build_resources() -> dict[str, Any]:
    return {
        "wedbackup": WedbackupEngineResource(),
        "s3": S3Resource(
            endpoint_url=_optional("WEDBACKUP_S3_ENDPOINT_URL"),
            region_name=_optional("WEDBACKUP_S3_REGION", "eu-west-1"),
            aws_access_key_id=_optional("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=_optional("AWS_SECRET_ACCESS_KEY"),
            max_attempts=3,
        ),
        "gcs": GCSResource(project=_optional("WEDBACKUP_GCS_PROJECT", "wedbackup-local")),
        "azure": AzureBlobResource(connection_string=dg.EnvVar("WEDBACKUP_AZURE_CONNECTION_STRING")),
    }
