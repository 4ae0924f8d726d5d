"""Media backup assembled from the environment: the source (WEDBACKUP_MEDIA_SOURCE), the catalogue, the
master keyring, the vault and the three replicas; one call per action for the command line and Dagster."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.config import Settings
from wedbackup_dagster.core.errors import ConfigError, WedbackupError

from wedbackup_dagster.core.keys.keyring import MasterKeyring, SecretKey, load_master_keyring
from wedbackup_dagster.core.catalogue.locks import partition_lock
from wedbackup_dagster.core.storage.providers import PROVIDERS

from .backup import MediaBackupResult, back_up_media
from .restore import MediaRestoreResult, restore_media
from .source import MEDIA_SOURCE_ENV, PLATFORM, MediaSource, partition_of, source_from_env
from .store import MediaStore
from .verify import MEDIA_VERIFY_SAMPLE_ENV, MediaVerifyResult, verify_media



def replicas_from(settings: Settings, env: Mapping[str, str]) -> dict[str, Any]:
    from wedbackup_dagster.core.storage.replicas import AzureReplica, GCSReplica, S3Replica
    from wedbackup_dagster.core.storage.replicas.azure import azure_service_from
    from wedbackup_dagster.core.storage.replicas.gcs import gcs_client_from
    from wedbackup_dagster.core.storage.replicas.s3 import s3_client_from

    return {"s3": S3Replica(s3_client_from(settings.s3, env), settings.s3),
            "gcs": GCSReplica(gcs_client_from(settings.gcs), settings.gcs),
            "azure": AzureReplica(azure_service_from(settings.azure), settings.azure)}


def verify_sample(env: Mapping[str, str]) -> int:
    text = (env.get(MEDIA_VERIFY_SAMPLE_ENV) or "0").strip()
    if not text.isdigit():
        raise ConfigError(MEDIA_VERIFY_SAMPLE_ENV, "must be a whole number of files (0: every file)")
    return int(text)


@dataclass
class MediaService:
    source: MediaSource | None
    catalogue: Catalogue
    keyring: MasterKeyring
    store: MediaStore
    sample: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, replicas: Mapping[str, Any] | None = None
                 ) -> "MediaService":
        """Everything from the environment (the command line); close() closes the catalogue it opened."""
        env = os.environ if environ is None else environ
        settings = Settings.from_env(env)
        catalogue = Catalogue(settings.catalogue_dsn)
        catalogue.migrate()
        return cls.over(settings, catalogue, load_master_keyring(env),
                        replicas if replicas is not None else replicas_from(settings, env), env)

    @classmethod
    def over(cls, settings: Settings, catalogue: Catalogue, keyring: MasterKeyring, replicas: Mapping[str, Any],
             environ: Mapping[str, str] | None = None) -> "MediaService":
        """Over parts the caller owns (a Dagster run's resources: its catalogue, keys, settings and replicas);
        only the media settings (source, verification sample) are read from the environment."""
        env = os.environ if environ is None else environ
        catalogue.partition_locks.timeout = settings.lock_timeout
        return cls(source_from_env(env), catalogue, keyring, MediaStore(settings.vault_dir, catalogue, replicas),
                   verify_sample(env))

    def require_source(self) -> MediaSource:
        if self.source is None:
            raise ConfigError(MEDIA_SOURCE_ENV, "not set: set it to s3://bucket/prefix or a directory of media")
        return self.source

    def resolve_key(self, key_id: str) -> SecretKey:
        return self.catalogue.key_by_id(key_id, self.keyring)

    def partitions(self) -> list[str]:
        """Every partition the source holds media for (weddings by the layout, and platform)."""
        found = {partition_of(o.path, self.require_source().wedding_prefix) for o in self.require_source().list()}
        return sorted(found - {PLATFORM}, key=lambda p: (len(p), p)) + ([PLATFORM] if PLATFORM in found else [])

    def back_up(self, partition: str) -> MediaBackupResult:
        erased = self.catalogue.erased_partitions()
        if partition in erased:
            raise WedbackupError(f"wedding {partition} was erased: its media is not backed up again")
        key = self.catalogue.wedding_key(partition, self.keyring)
        # One media backup of a partition at a time (the schedule and a command line may overlap). Its own
        # lock, apart from the rows' ("media:<id>"): a long media backup never holds up a wedding's rows.
        with partition_lock(self.catalogue, f"media:{partition}", purpose="media backup"):
            return back_up_media(partition, self.require_source(), self.store, key)

    def back_up_each(self, partitions: list[str]) -> Iterator[tuple[str, MediaBackupResult | WedbackupError]]:
        for partition in partitions:
            try:
                yield partition, self.back_up(partition)
            except WedbackupError as exc:
                yield partition, exc

    def replicate(self, partition: str, provider: str) -> tuple[int, int]:
        return self.store.replicate(partition, self.store.replicas[provider])

    def restore(self, partition: str, **kwargs: Any) -> MediaRestoreResult:
        return restore_media(self.store, partition, self.resolve_key, **kwargs)

    def verify(self, partition: str, provider: str, sample: int | None = None) -> MediaVerifyResult:
        return verify_media(self.store, partition, self.resolve_key, provider,
                            sample=self.sample if sample is None else sample)

    def next_provider(self, partition: str) -> str:
        """Rotate verification through the vault and the providers, one step per verification."""
        rows = self.store.snapshots(partition)
        n = rows[0].verifications if rows else 0
        return ("vault", *PROVIDERS)[n % 4]

    def close(self) -> None:
        self.catalogue.close()


def progress_printer(label: str, out: Any) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            print(f"  {label}: {done} of {total} files ({100 * done // max(total, 1)}%)", file=out, flush=True)
    return show
