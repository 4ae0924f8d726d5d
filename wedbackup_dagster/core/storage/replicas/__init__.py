"""Replicas: copies of sealed archives at S3, GCS and Azure, uploaded under content-addressed keys and
confirmed against each provider's own checksum. One module per provider; the shared parts live in base."""
from __future__ import annotations

from wedbackup_dagster.core.storage.replicas.azure import AzureReplica, azure_service_from, ensure_container
from wedbackup_dagster.core.storage.replicas.base import (DigestNeeds, FileDigests, ListedObject, Replica,
                                                          ReplicaRecord, archive_key, check_key, digest_archive,
                                                          digest_file, key_backup_key, parse_archive_key,
                                                          parse_key_backup_key, validate_partition, validate_sha256)
from wedbackup_dagster.core.storage.replicas.gcs import GCSReplica, ensure_gcs_bucket, gcs_client_from
from wedbackup_dagster.core.storage.replicas.s3 import S3Replica, ensure_bucket, s3_client_from



__all__ = [
    "DigestNeeds", "FileDigests", "ListedObject", "Replica", "ReplicaRecord", "archive_key", "check_key",
    "digest_archive", "digest_file", "key_backup_key", "parse_archive_key", "parse_key_backup_key",
    "validate_partition", "validate_sha256",
    "S3Replica", "s3_client_from", "ensure_bucket",
    "GCSReplica", "gcs_client_from", "ensure_gcs_bucket",
    "AzureReplica", "azure_service_from", "ensure_container",
]
