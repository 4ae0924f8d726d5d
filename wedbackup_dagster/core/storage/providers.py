"""The storage providers by name (`PROVIDERS`), and the one factory that builds a provider's client and
replica from Settings, applying every setting (endpoint, region, credentials, `WEDBACKUP_PROVIDER_TIMEOUT`,
`WEDBACKUP_UPLOAD_CONCURRENCY`): the pipeline, the command line, the canaries and `ensure_targets` all
get their clients here, so a setting cannot apply to some of them and not to others."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from wedbackup_dagster.core.config import Settings
from wedbackup_dagster.core.errors import ConfigError
from wedbackup_dagster.core.partitions import shown

PROVIDERS = ("s3", "gcs", "azure")
CONNECT_TIMEOUT = 5.0  # seconds to open a connection, at most: a provider that is down fails fast


def check_provider(provider: str) -> str:
    if provider not in PROVIDERS:
        raise ConfigError("provider", f"{shown(provider)} is not one of {', '.join(PROVIDERS)}")
    return provider


def provider_client(provider: str, settings: Settings, env: Mapping[str, str] | None = None, *,
                    timeout: float | None = None, connect_timeout: float | None = None,
                    max_attempts: int = 2) -> Any:
    """The SDK client of `provider` for `settings`: boto3 S3 client, google-cloud-storage Client or Azure
    BlobServiceClient. `timeout` (default WEDBACKUP_PROVIDER_TIMEOUT) bounds one request's wait on the
    network. `max_attempts` is botocore's retry setting for S3 (2: three tries in all, as the pipeline has
always had; 1 for a canary) and gives Azure `max_attempts - 1` retries. S3 credentials come from `env`
(default os.environ)."""
    timeout = settings.provider_timeout if timeout is None else timeout
    connect = min(CONNECT_TIMEOUT, timeout) if connect_timeout is None else connect_timeout
    if check_provider(provider) == "s3":
        from wedbackup_dagster.core.storage.replicas.s3 import client_config, s3_client_from

        return s3_client_from(settings.s3, os.environ if env is None else env, config=client_config(
            connect_timeout=connect, read_timeout=timeout, max_attempts=max_attempts,
            # The upload threads share one client (boto3 clients are thread-safe), each up to 4 part uploads.
            max_pool_connections=max(10, 4 * settings.upload_concurrency)))
    if provider == "gcs":
        from wedbackup_dagster.core.storage.replicas.gcs import gcs_client_from

        return gcs_client_from(settings.gcs)  # timeouts are per call: see replica_over
    from wedbackup_dagster.core.storage.replicas.azure import azure_service_from

    return azure_service_from(settings.azure, connection_timeout=connect, read_timeout=timeout,
                              retry_total=max_attempts - 1)


def replica_over(provider: str, settings: Settings, client: Any, *, timeout: float | None = None,
                 connect_timeout: float | None = None, retry_seconds: float | None = None) -> Any:
    """The core replica of `provider` over an existing client (one a Dagster resource made, or
    provider_client's)."""
    from wedbackup_dagster.core.storage.replicas.azure import AzureReplica
    from wedbackup_dagster.core.storage.replicas.gcs import GCSReplica
    from wedbackup_dagster.core.storage.replicas.s3 import S3Replica

    timeout = settings.provider_timeout if timeout is None else timeout
    connect = min(CONNECT_TIMEOUT, timeout) if connect_timeout is None else connect_timeout
    if check_provider(provider) == "s3":
        return S3Replica(client, settings.s3)
    if provider == "gcs":
        # The SDK's retries of one request may go on as long as one slow upload may take (the provider
        # timeout), not the replica's 5 s default, under which queued uploads failed without a retry.
        return GCSReplica(client, settings.gcs, timeout=(connect, timeout),
                          retry_seconds=timeout if retry_seconds is None else retry_seconds)
    return AzureReplica(client, settings.azure)


def replica_for(provider: str, settings: Settings, env: Mapping[str, str] | None = None) -> Any:
    """The core replica of `provider`, with a client built from `settings`."""
    return replica_over(provider, settings, provider_client(provider, settings, env))


def ensure_targets(settings: Settings) -> dict[str, bool]:
    """Create the configured bucket, bucket and container when missing (local stack, demo); True = created."""
    from wedbackup_dagster.core.storage.replicas.azure import ensure_container
    from wedbackup_dagster.core.storage.replicas.gcs import ensure_gcs_bucket
    from wedbackup_dagster.core.storage.replicas.s3 import ensure_bucket

    return {
        "s3": ensure_bucket(provider_client("s3", settings), settings.s3),
        "gcs": ensure_gcs_bucket(provider_client("gcs", settings), settings.gcs),
        "azure": ensure_container(provider_client("azure", settings), settings.azure),
    }
