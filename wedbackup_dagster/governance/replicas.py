"""The three replicas, built from the Dagster provider resources, for jobs that work on every provider."""
from __future__ import annotations

from typing import Any

from dagster_aws.s3 import S3Resource
from dagster_gcp import GCSResource

from ..backups.assets import make_replica
from ..backups.resources import AzureBlobResource, WedbackupEngineResource
from wedbackup_dagster.core.storage.providers import PROVIDERS


def all_replicas(wedbackup: WedbackupEngineResource, s3: S3Resource, gcs: GCSResource,
                 azure: AzureBlobResource) -> dict[str, Any]:
    clients = {"s3": s3.get_client, "gcs": gcs.get_client, "azure": azure.get_service}
    settings = wedbackup.settings()
    return {p: make_replica(p, settings, clients[p]()) for p in PROVIDERS}
