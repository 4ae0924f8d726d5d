"""The GCS replica: resumable uploads that GCS checks against our CRC32C, confirmed afterwards by both the
object's crc32c and md5, create-only preconditions, and streaming verified downloads."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from google.api_core import exceptions as gexc
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from wedbackup_dagster.core.config import GCSTarget
from wedbackup_dagster.core.errors import ReplicaChecksumMismatch, ReplicaError

from wedbackup_dagster.core.storage.replicas.base import (DigestNeeds, FileDigests, HashingWriter, ListedObject,
                                                          ProgressCallback, ProgressReader, ReplicaRecord, archive_key,
                                                          b64, canary_round, check_key, check_list_prefix,
                                                          digests_for_upload, lean_session, object_metadata,
                                                          parse_archive_key, provider_error, upload_key)

PROVIDER = "gcs"
# GCS requires resumable chunks in multiples of 256 KiB. Files up to 8 MiB go in one multipart request
# (google-cloud-storage's fixed threshold), larger ones resumably in chunks of this size.
CHUNK_QUANTUM = 256 << 10
DEFAULT_CHUNK_SIZE = 32 * CHUNK_QUANTUM  # 8 MiB
DEFAULT_TIMEOUT = (5.0, 60.0)  # (connect, read) seconds
DEFAULT_RETRY_SECONDS = 5.0


def gcs_client_from(target: GCSTarget) -> storage.Client:
    """A storage client for `target`: the emulator with anonymous credentials when one is configured."""
    if target.emulator_host:
        from google.auth.credentials import AnonymousCredentials

        client = storage.Client(project=target.project, credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": target.emulator_host})
    else:
        client = storage.Client(project=target.project)
    # The client's AuthorizedSession (made once, from its credentials) reads proxies, netrc and CA bundle
    # settings once, not per request, unless the environment configures a proxy or netrc (base.lean_session).
    lean_session(client._http)
    return client


def _secrets(client) -> list[str | None]:
    creds = getattr(client, "_credentials", None)
    return [getattr(creds, "token", None)]


def ensure_gcs_bucket(client: storage.Client, target: GCSTarget) -> bool:
    """Create the target bucket (object versioning on) when it is missing. True when created."""
    try:
        if client.lookup_bucket(target.bucket, timeout=DEFAULT_TIMEOUT,
                                retry=DEFAULT_RETRY.with_timeout(DEFAULT_RETRY_SECONDS)) is not None:
            return False
        bucket = client.bucket(target.bucket)
        bucket.versioning_enabled = True
        bucket.storage_class = target.storage_class
        client.create_bucket(bucket, timeout=DEFAULT_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - any SDK or transport failure becomes a ProviderError
        raise provider_error(PROVIDER, None, f"ensure bucket {target.bucket}", exc, _secrets(client)) from None
    return True


class GCSReplica:
    provider = PROVIDER

    def __init__(self, client: storage.Client, target: GCSTarget, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 timeout: float | tuple[float, float] = DEFAULT_TIMEOUT, retry_seconds: float = DEFAULT_RETRY_SECONDS):
        if chunk_size <= 0 or chunk_size % CHUNK_QUANTUM:
            raise ValueError(f"gcs chunk_size {chunk_size} is not a positive multiple of 256 KiB")
        self.client = client
        self.target = target
        self.prefix = target.prefix
        self.bucket = client.bucket(target.bucket)
        self.chunk_size = chunk_size
        self.timeout = timeout
        # The SDK's default retry keeps going for two minutes; a down provider must fail a run in seconds.
        self.retry = DEFAULT_RETRY.with_timeout(retry_seconds)
        self._region: str | None = None

    def object_key(self, wedding_partition: str, sha256: str) -> str:
        return archive_key(PROVIDER, self.prefix, wedding_partition, sha256)

    def uri(self, key: str) -> str:
        return f"gs://{self.target.bucket}/{key}"

    def _fail(self, key: str | None, action: str, exc: BaseException) -> ReplicaError:
        return provider_error(PROVIDER, key, action, exc, _secrets(self.client))

    def _get_blob(self, key: str) -> storage.Blob | None:
        try:
            return self.bucket.get_blob(key, timeout=self.timeout, retry=self.retry)
        except Exception as exc:  # noqa: BLE001
            raise self._fail(key, "head", exc) from None

    def region(self) -> str | None:
        if self._region is None:
            try:
                self.bucket.reload(timeout=self.timeout, retry=self.retry)
                self._region = self.bucket.location
            except Exception:  # noqa: BLE001 - the region is informative; without bucket.get rights it stays unknown
                return None
        return self._region

    # ----------------------------------------------------------------------------------- upload

    @staticmethod
    def _checksum(blob: storage.Blob) -> str:
        return f"crc32c:{blob.crc32c} md5:{blob.md5_hash}"

    @staticmethod
    def _matches(blob: storage.Blob, digests: FileDigests) -> bool:
        return (blob.size == digests.size and blob.crc32c == b64(digests.crc32c or b"")
                and blob.md5_hash == b64(digests.md5 or b""))

    def digests_needed(self, size: int) -> DigestNeeds:
        """CRC32C (GCS checks the upload against it) and MD5 (the object's md5Hash, confirmed with it)."""
        return DigestNeeds(md5=True, crc32c=True)

    def abort_abandoned_uploads(self) -> None:
        """Nothing to do: GCS drops a resumable upload that is never finished (after a week) by itself."""

    def upload(self, path: Path, *, partition: str, sha256: str, size: int, metadata: dict[str, str],
               progress: ProgressCallback | None = None, key: str | None = None,
               digests: FileDigests | None = None) -> ReplicaRecord:
        # `key`: somewhere other than the archive's content address (a key-store backup, core/keys/backup.py).
        # `digests`: the archive's, computed once for every provider of a run (base.digests_for_upload).
        key = upload_key(PROVIDER, self.prefix, key, partition, sha256)
        meta = object_metadata(PROVIDER, partition, sha256, metadata)
        digests = digests_for_upload(Path(path), sha256, size, self.digests_needed(size), digests)

        def write(generation: int) -> storage.Blob | None:
            """Create-only (generation 0) or replace exactly the generation seen; None when GCS refused it
            because the object is there or changed (412)."""
            blob = self.bucket.blob(key, chunk_size=self.chunk_size)
            blob.storage_class = self.target.storage_class
            blob.metadata = meta
            blob.content_type = "application/octet-stream"
            try:
                with open(path, "rb") as raw:
                    # GCS itself checks the whole upload against our CRC32C before committing.
                    blob.upload_from_file(
                        ProgressReader(raw, progress), size=size, timeout=self.timeout, retry=self.retry,
                        if_generation_match=generation, crc32c_checksum_value=b64(digests.crc32c or b""),
                        checksum="crc32c")
            except gexc.PreconditionFailed:
                return None
            except Exception as exc:  # noqa: BLE001 - an unfinished resumable session never becomes a visible object
                raise self._fail(key, "upload", exc) from None
            return blob

        # Create-only first: one request when the key is free, as it is for every new archive; a concurrent
        # writer is never overwritten.
        note = ""
        blob = write(0)
        if blob is None:
            existing = self._get_blob(key)
            if existing is not None and self._matches(existing, digests):
                return self._record(key, existing, digests, already_present=True)
            if existing is None:
                raise ReplicaError(PROVIDER, key, "another writer replaced the object during upload")
            note = (f"replaced generation {existing.generation} at {key}: it had {existing.size} bytes and "
                    f"{self._checksum(existing)}, not this archive")
            blob = write(existing.generation)
            if blob is None:
                # Someone else wrote the key between our look and our write: accept it only if it is this archive.
                raced = self._get_blob(key)
                if raced is not None and self._matches(raced, digests):
                    return self._record(key, raced, digests, already_present=True)
                raise ReplicaError(PROVIDER, key, "another writer replaced the object during upload")

        # The upload's own answer is GCS's object resource (size, crc32c, md5Hash, generation), which the SDK
        # sets on `blob`: confirm against it, and ask again only if an answer lacked the checksums.
        if blob.crc32c is None or blob.md5_hash is None or blob.size is None:
            try:
                blob.reload(timeout=self.timeout, retry=self.retry)
            except Exception as exc:  # noqa: BLE001
                raise self._fail(key, "confirm upload", exc) from None
        if not self._matches(blob, digests):
            raise ReplicaChecksumMismatch(
                PROVIDER, key, f"after upload GCS reports {blob.size} bytes and {self._checksum(blob)}, expected "
                               f"crc32c:{b64(digests.crc32c or b'')} md5:{b64(digests.md5 or b'')}")
        return self._record(key, blob, digests, already_present=False, repaired=bool(note), note=note)

    def _record(self, key: str, blob: storage.Blob, digests: FileDigests, *, already_present: bool,
                repaired: bool = False, note: str = "") -> ReplicaRecord:
        return ReplicaRecord(
            provider=PROVIDER, uri=self.uri(key), key=key,
            version_id=str(blob.generation) if blob.generation is not None else None, size=int(blob.size),
            sha256=digests.sha256, provider_checksum=self._checksum(blob),
            storage_class=blob.storage_class or self.target.storage_class, region=self.region(),
            media=self.target.media, offsite=self.target.offsite, already_present=already_present,
            repaired=repaired, note=note, etag=blob.etag)

    # ------------------------------------------------------------------------ read, list, delete

    def head(self, key: str) -> ReplicaRecord | None:
        """What GCS holds at `key`; `sha256` is the one we stamped in the metadata (not re-hashed here)."""
        check_key(PROVIDER, self.prefix, key)
        blob = self._get_blob(key)
        if blob is None:
            return None
        sha = (blob.metadata or {}).get("sha256") or parse_archive_key(self.prefix, key)[1] or ""
        return ReplicaRecord(
            provider=PROVIDER, uri=self.uri(key), key=key, version_id=str(blob.generation), size=int(blob.size),
            sha256=sha, provider_checksum=self._checksum(blob),
            storage_class=blob.storage_class or self.target.storage_class, region=self._region,
            media=self.target.media, offsite=self.target.offsite, already_present=True, etag=blob.etag)

    def download(self, key: str, dest: BinaryIO, *, expected_sha256: str | None = None,
                 version_id: str | None = None) -> int:
        check_key(PROVIDER, self.prefix, key)
        out = HashingWriter(dest)
        blob = self.bucket.blob(key, generation=int(version_id) if version_id else None)
        try:
            # Streams in the SDK's small reads; GCS's md5 is checked by the SDK, our sha256 below.
            blob.download_to_file(out, timeout=self.timeout, retry=self.retry, checksum="md5")
        except Exception as exc:  # noqa: BLE001
            raise self._fail(key, "download", exc) from None
        if expected_sha256 is not None and out.hexdigest() != expected_sha256:
            raise ReplicaChecksumMismatch(PROVIDER, key, f"downloaded bytes have sha256 {out.hexdigest()}, "
                                                         f"expected {expected_sha256}")
        return out.count

    def generations(self, key: str) -> list[int]:
        check_key(PROVIDER, self.prefix, key)
        try:
            return [b.generation for b in self.client.list_blobs(self.bucket, prefix=key, versions=True,
                                                                 timeout=self.timeout, retry=self.retry)
                    if b.name == key]
        except Exception as exc:  # noqa: BLE001
            raise self._fail(key, "list generations", exc) from None

    def delete(self, key: str) -> None:
        """Delete every generation of `key` (live and noncurrent, where the bucket keeps versions)."""
        for generation in self.generations(key):
            try:
                self.bucket.delete_blob(key, generation=generation, timeout=self.timeout, retry=self.retry)
            except gexc.NotFound:
                pass
            except Exception as exc:  # noqa: BLE001
                raise self._fail(key, f"delete generation {generation}", exc) from None

    def version_keys(self, prefix: str = "") -> set[str]:
        """Every object name under `prefix` with any generation, noncurrent ones included (erasure)."""
        full = check_list_prefix(PROVIDER, self.prefix, prefix)
        try:
            return {b.name for b in self.client.list_blobs(self.bucket, prefix=full, versions=True,
                                                             timeout=self.timeout, retry=self.retry)}
        except Exception as exc:  # noqa: BLE001
            raise self._fail(full, "list generations", exc) from None

    def list(self, prefix: str = "") -> Iterator[ListedObject]:
        full = check_list_prefix(PROVIDER, self.prefix, prefix)
        try:
            for blob in self.client.list_blobs(self.bucket, prefix=full, timeout=self.timeout, retry=self.retry):
                partition, sha = parse_archive_key(self.prefix, blob.name)
                yield ListedObject(provider=PROVIDER, uri=self.uri(blob.name), key=blob.name, size=int(blob.size),
                                   version_id=str(blob.generation), storage_class=blob.storage_class,
                                   modified=blob.updated, partition=partition, sha256=sha)
        except Exception as exc:  # noqa: BLE001
            raise self._fail(full, "list", exc) from None

    def canary(self) -> float:
        """Write, read back and delete a tiny object; the seconds it took. ProviderError when GCS is not usable."""
        opts = {"timeout": self.timeout, "retry": self.retry}
        return canary_round(
            PROVIDER, self.prefix, fail=self._fail, delete=self.delete,
            write=lambda key, data: self.bucket.blob(key).upload_from_string(data, if_generation_match=0, **opts),
            read=lambda key: self.bucket.blob(key).download_as_bytes(**opts))
