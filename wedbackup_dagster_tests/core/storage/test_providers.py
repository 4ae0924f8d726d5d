"""The one provider factory: every client it builds applies WEDBACKUP_PROVIDER_TIMEOUT (the command line's,
the canaries', ensure_targets' and the pipeline's replicas alike), and the replicas it builds work against
the real stand-ins."""
from __future__ import annotations

import os

import pytest

from wedbackup_dagster.core.config import Settings
from wedbackup_dagster.core.errors import ConfigError
from wedbackup_dagster.core.storage.providers import (PROVIDERS, check_provider, ensure_targets, provider_client,
                                                      replica_for, replica_over)
from wedbackup_dagster.core.storage.replicas import AzureReplica, GCSReplica, S3Replica

ENV = {
    "WEDBACKUP_SOURCE_DSN": "postgresql://app@127.0.0.1:9/wedding_platform",
    "WEDBACKUP_CATALOGUE_DSN": "postgresql://app@127.0.0.1:9/catalogue",
    "WEDBACKUP_S3_ENDPOINT_URL": "http://127.0.0.1:9",
    "WEDBACKUP_AZURE_CONNECTION_STRING": ("DefaultEndpointsProtocol=http;AccountName=a;AccountKey=YQ==;"
                                          "BlobEndpoint=http://127.0.0.1:9/a;"),
    "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9",
    "WEDBACKUP_PROVIDER_TIMEOUT": "2.5",
    "WEDBACKUP_UPLOAD_CONCURRENCY": "6",
}
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}


def test_the_provider_names():
    assert PROVIDERS == ("s3", "gcs", "azure")
    with pytest.raises(ConfigError, match=r"'ftp' is not one of s3, gcs, azure"):
        check_provider("ftp")


def test_every_client_applies_the_provider_timeout_and_concurrency():
    settings = Settings.from_env(ENV)
    s3 = provider_client("s3", settings, CREDENTIALS)
    assert (s3.meta.config.connect_timeout, s3.meta.config.read_timeout) == (2.5, 2.5)
    assert s3.meta.config.max_pool_connections == 24 and s3.meta.config.retries["total_max_attempts"] == 3
    azure = provider_client("azure", settings)
    assert azure._pipeline._transport.connection_config.read_timeout == 2.5
    assert azure._pipeline._transport.connection_config.timeout == 2.5  # connect
    assert provider_client("azure", settings, max_attempts=1)._config.retry_policy.total_retries == 0
    gcs = replica_over("gcs", settings, provider_client("gcs", settings))
    assert gcs.timeout == (2.5, 2.5)


def test_a_long_timeout_keeps_connecting_fast_and_the_canary_can_override_both():
    settings = Settings.from_env({**ENV, "WEDBACKUP_PROVIDER_TIMEOUT": "120"})
    s3 = provider_client("s3", settings, CREDENTIALS)
    assert (s3.meta.config.connect_timeout, s3.meta.config.read_timeout) == (5.0, 120.0)
    canary = provider_client("s3", settings, CREDENTIALS, timeout=3, connect_timeout=3, max_attempts=1)
    assert (canary.meta.config.connect_timeout, canary.meta.config.read_timeout) == (3, 3)
    assert canary.meta.config.retries["total_max_attempts"] == 2
    assert replica_over("gcs", settings, provider_client("gcs", settings)).timeout == (5.0, 120.0)


def test_the_replicas_are_the_providers_own():
    settings = Settings.from_env(ENV)
    kinds = {p: type(replica_for(p, settings, CREDENTIALS)) for p in PROVIDERS}
    assert kinds == {"s3": S3Replica, "gcs": GCSReplica, "azure": AzureReplica}


@pytest.mark.stack
def test_replicas_from_the_factory_work_against_the_stand_ins(stack, s3_bucket, gcs_bucket, azure_container,
                                                              monkeypatch):
    for name, value in {"WEDBACKUP_S3_BUCKET": s3_bucket, "WEDBACKUP_GCS_BUCKET": gcs_bucket,
                        "WEDBACKUP_AZURE_CONTAINER": azure_container}.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    assert ensure_targets(settings) == {"s3": False, "gcs": False, "azure": False}  # the fixtures made them
    for provider in PROVIDERS:
        replica = replica_for(provider, settings, os.environ)
        assert replica.canary() >= 0  # write, read back, delete, through the factory's client
