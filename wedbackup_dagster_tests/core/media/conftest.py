"""Fixtures for media tests on the real stack: a catalogue, a vault, the three replicas on this test's
buckets, and a media source bucket on the S3 stand-in filled with demo media."""
from __future__ import annotations

import dataclasses
import os

import pytest

from wedbackup_dagster.dev.demo_media import MediaScale

# Small enough for `make test`: 3 photos of 2-3 MB per wedding, their duplicates, documents, an empty file.
TEST_SCALE = MediaScale(photos=3, photo_min=2 << 20, photo_max=3 << 20, documents=5, videos=0, vendors=2)


@pytest.fixture
def media_world(stack, make_database, tmp_path, s3_client, s3_bucket, gcs_bucket, azure_container):
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from wedbackup_dagster.core.config import Settings
    from wedbackup_dagster.core.keys.keyring import load_master_keyring
    from wedbackup_dagster.core.media.source import S3Source
    from wedbackup_dagster.core.media.store import MediaStore
    from wedbackup_dagster.core.storage.replicas import AzureReplica, GCSReplica, S3Replica
    from wedbackup_dagster.core.storage.replicas.azure import azure_service_from
    from wedbackup_dagster.core.storage.replicas.gcs import gcs_client_from
    from wedbackup_dagster.core.storage.replicas.s3 import s3_client_from
    from wedbackup_dagster_tests.conftest import unique_name

    catalogue_dsn = make_database()
    env = {**os.environ, "WEDBACKUP_CATALOGUE_DSN": catalogue_dsn, "WEDBACKUP_VAULT_DIR": str(tmp_path / "vault"),
           "WEDBACKUP_S3_BUCKET": s3_bucket, "WEDBACKUP_GCS_BUCKET": gcs_bucket,
           "WEDBACKUP_AZURE_CONTAINER": azure_container}
    settings = Settings.from_env(env)
    catalogue = Catalogue(catalogue_dsn)
    catalogue.migrate()
    keyring = load_master_keyring(env)
    replicas = {"s3": S3Replica(s3_client_from(settings.s3, env), settings.s3),
                "gcs": GCSReplica(gcs_client_from(settings.gcs), settings.gcs),
                "azure": AzureReplica(azure_service_from(settings.azure), settings.azure)}
    media_bucket = unique_name("media")
    s3_client.create_bucket(Bucket=media_bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    world = dataclasses.make_dataclass("MediaWorld", ["settings", "catalogue", "keyring", "replicas", "store",
                                                      "source", "s3", "bucket", "tmp"])(
        settings, catalogue, keyring, replicas, MediaStore(settings.vault_dir, catalogue, replicas),
        S3Source(s3_client, media_bucket), s3_client, media_bucket, tmp_path)
    yield world
    catalogue.close()
