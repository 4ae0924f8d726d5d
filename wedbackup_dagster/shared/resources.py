"""Resources: `wedbackup` (the engine — source database, catalogue, vault, keys — built once per run, and the
settings, catalogue, source DSN and policy that sensors and schedules take from it), `replicas` (the core
replica of every provider, over one client resource each: dagster-aws S3Resource, dagster-gcp GCSResource and
an azure-storage-blob resource). Every value comes from an environment variable (EnvVar or the WEDBACKUP_*
environment read when a run starts), so no secret is in code, config or the UI."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource
from dagster_gcp import GCSResource
from pydantic import PrivateAttr

from wedbackup_dagster.core.catalogue.store import Catalogue
from ..core.config import Settings, dsn_setting, provider_timeout_from
from ..core.engine import Engine
from ..core.storage.providers import PROVIDERS
from wedbackup_dagster.core.keys.keyring import MasterKeyring, load_master_keyring
from wedbackup_dagster.core.policy.backup_policy import Policy


class WedbackupEngineResource(dg.ConfigurableResource):
    """The plain-Python engine, configured from the WEDBACKUP_* environment when a run (or a sensor or schedule
    evaluation) starts. Dagster gives each run its own copy of the resource: the engine, its catalogue
    connection and the settings are made once, on first use, and the catalogue is closed when the run ends."""

    _settings: Settings | None = PrivateAttr(default=None)
    _engine: Engine | None = PrivateAttr(default=None)
    _catalogue: Catalogue | None = PrivateAttr(default=None)
    _keyring: MasterKeyring | None = PrivateAttr(default=None)

    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.from_env()
        return self._settings

    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.settings(), load_master_keyring(os.environ))
        return self._engine

    def keyring(self) -> MasterKeyring:
        """The master keyring: the engine's when the run made one, else loaded once (media needs no source)."""
        if self._engine is not None:
            return self._engine.keyring
        if self._keyring is None:
            self._keyring = load_master_keyring(os.environ)
        return self._keyring

    def catalogue(self) -> Catalogue:
        """The catalogue, migrated: the engine's when the run made one, else its own connection (sensors and
        schedules need neither the master key nor the other settings)."""
        if self._engine is not None:
            return self._engine.catalogue
        if self._catalogue is None:
            catalogue = Catalogue(dsn_setting(os.environ, "WEDBACKUP_CATALOGUE_DSN"))
            catalogue.migrate()
            self._catalogue = catalogue
        return self._catalogue

    def source_dsn(self) -> str:
        return dsn_setting(os.environ, "WEDBACKUP_SOURCE_DSN")

    def policy(self) -> Policy:
        return Policy.from_env()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()

    def close(self) -> None:
        """Close the catalogue connections this copy opened (the run's end does it; so may a caller)."""
        for catalogue in (self._catalogue, self._engine.catalogue if self._engine is not None else None):
            if catalogue is not None:
                catalogue.close()


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


def make_replica(provider: str, settings: Any, client: Any) -> Any:
    """The core replica of one provider, over a client made by that provider's Dagster resource."""
    from wedbackup_dagster.core.storage.providers import replica_over

    return replica_over(provider, settings, client)


class ProviderReplicasResource(dg.ConfigurableResource):
    """The core replicas of S3, GCS and Azure, each over its provider's client resource, with the WEDBACKUP_*
    settings (buckets, prefixes, timeouts) of the running process. Clients are made when asked for, so a down
    provider does not stop work that reads another."""

    s3: S3ReplicaResource
    gcs: GCSResource
    azure: AzureBlobResource

    _settings: Settings | None = PrivateAttr(default=None)

    def _client(self, provider: str) -> Any:
        if provider == "s3":
            return self.s3.get_client()
        if provider == "gcs":
            return self.gcs.get_client()
        return self.azure.get_service()

    def replica(self, provider: str) -> Any:
        if self._settings is None:
            self._settings = Settings.from_env()
        return make_replica(provider, self._settings, self._client(provider))

    def all(self, only: Iterable[str] | None = None) -> dict[str, Any]:
        """provider -> replica, for every provider (or those in `only`), in PROVIDERS order."""
        wanted = set(PROVIDERS if only is None else only)
        return {p: self.replica(p) for p in PROVIDERS if p in wanted}


def build_resources() -> dict[str, Any]:
    s3 = S3ReplicaResource(max_attempts=2)
    gcs = GCSResource(project=dg.EnvVar("WEDBACKUP_GCS_PROJECT"))
    azure = AzureBlobResource(connection_string=dg.EnvVar("WEDBACKUP_AZURE_CONNECTION_STRING"))
    return {
        "wedbackup": WedbackupEngineResource(),
        "replicas": ProviderReplicasResource(s3=s3, gcs=gcs, azure=azure),
        # The client resources themselves stay available under their own keys (ops that need a raw client).
        "s3": s3,
        "gcs": gcs,
        "azure": azure,
    }
