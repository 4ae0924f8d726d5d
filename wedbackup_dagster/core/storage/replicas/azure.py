"""The Azure Blob replica: single put or staged blocks (each checked by Azure against its MD5), committed
create-only with our whole-archive Content-MD5 and tier, and streaming verified downloads."""
from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit, urlunsplit

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import BlobBlock, BlobServiceClient, ContentSettings, ExponentialRetry, StandardBlobTier

from wedbackup_dagster.core.config import AzureTarget
from wedbackup_dagster.core.errors import ConfigError, ReplicaChecksumMismatch, ReplicaError
from wedbackup_dagster.core.storage.replicas.azure_lean import LeanPut, PutFailed
from wedbackup_dagster.core.storage.replicas.azure_lean import lean_put as lean_put_for
from wedbackup_dagster.core.storage.replicas.base import (DigestNeeds, FileDigests, HashingWriter, ListedObject,
                                                          ProgressCallback, ProgressReader, ReplicaRecord, archive_key,
                                                          b64, canary_round, check_key, check_list_prefix,
                                                          digests_for_upload, environment_http, object_metadata,
                                                          parse_archive_key, provider_error, read_blocks, scrub,
                                                          upload_key)

PROVIDER = "azure"
DEFAULT_MAX_SINGLE_PUT_SIZE = 8 << 20
DEFAULT_MAX_BLOCK_SIZE = 8 << 20
DEFAULT_DOWNLOAD_RANGE_SIZE = 2 << 20


def azure_service_from(target: AzureTarget, *, connection_timeout: float = 5, read_timeout: float = 60,
                       retry_total: int = 1) -> BlobServiceClient:
    """A BlobServiceClient for `target` with short timeouts and one retry, so a down provider fails fast."""
    return azure_service_from_connection_string(target.connection_string, connection_timeout=connection_timeout,
                                                read_timeout=read_timeout, retry_total=retry_total)


def azure_service_from_connection_string(connection_string: str, *, connection_timeout: float = 5,
                                         read_timeout: float = 60, retry_total: int = 1) -> BlobServiceClient:
    if not connection_string:
        raise ConfigError("WEDBACKUP_AZURE_CONNECTION_STRING", "is not set")
    try:
        # The storage SDK's own default retry waits 15 s, then 45 s, ... before giving up on a refused connection.
        retry = ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=retry_total, random_jitter_range=1)
        # The transport's requests session reads proxies, netrc and the CA bundle variables once, here, not per
        # request, unless the environment configures a proxy or netrc (base.environment_http).
        http = environment_http()
        lean = {"use_env_settings": False, **({"connection_verify": http.ca_bundle} if http.ca_bundle else {})
                } if http.lean else {}
        return BlobServiceClient.from_connection_string(
            connection_string, connection_timeout=connection_timeout, read_timeout=read_timeout,
            retry_policy=retry, **lean)
    except Exception:  # noqa: BLE001 - the SDK's message may quote the connection string
        raise ConfigError("WEDBACKUP_AZURE_CONNECTION_STRING", "is not a usable Azure connection string") from None


def _secrets(service: BlobServiceClient, target: AzureTarget) -> list[str | None]:
    credential = getattr(service, "credential", None)
    found: list[str | None] = [target.connection_string]
    if isinstance(credential, str):  # a SAS token
        found.append(credential)
    for attr in ("account_key", "signature"):
        found.append(getattr(credential, attr, None))
    return found


def ensure_container(service: BlobServiceClient, target: AzureTarget) -> bool:
    """Create the target container when it is missing. True when created."""
    try:
        service.create_container(target.container)
        return True
    except ResourceExistsError:
        return False
    except Exception as exc:  # noqa: BLE001
        raise provider_error(PROVIDER, None, f"create container {target.container}", exc,
                             _secrets(service, target)) from None


class AzureReplica:
    provider = PROVIDER

    def __init__(self, service: BlobServiceClient, target: AzureTarget, *,
                 max_single_put_size: int = DEFAULT_MAX_SINGLE_PUT_SIZE, max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
                 download_range_size: int = DEFAULT_DOWNLOAD_RANGE_SIZE, lean_put: bool = True):
        self.service = service
        self.target = target
        self.prefix = target.prefix
        self.container = service.get_container_client(target.container)
        # New archives small enough for a single put (max_single_put_size) through azure_lean's Put Blob (the
        # client's own signing policy and transport, not the SDK's pipeline) when the client allows it; False (or
        # a client it cannot serve): upload_blob.
        self._lean: LeanPut | None = lean_put_for(self.container) if lean_put else None
        self.max_single_put_size = max_single_put_size
        self.max_block_size = max_block_size
        self.download_range_size = download_range_size

    def object_key(self, wedding_partition: str, sha256: str) -> str:
        return archive_key(PROVIDER, self.prefix, wedding_partition, sha256)

    def uri(self, key: str) -> str:
        # A SAS credential rides in the URL's query: the recorded URI must never carry it. The blob's URL is the
        # container's and the key quoted as BlobClient quotes it (without making a BlobClient for each).
        parts = urlsplit(self.container.url)
        return urlunsplit((parts.scheme, parts.netloc, f"{parts.path.rstrip('/')}/{quote(key, safe='~/')}", "", ""))

    def _fail(self, key: str | None, action: str, exc: BaseException) -> ReplicaError:
        return provider_error(PROVIDER, key, action, exc, _secrets(self.service, self.target))

    def _properties(self, key: str):
        try:
            return self.container.get_blob_client(key).get_blob_properties()
        except ResourceNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001
            raise self._fail(key, "head", exc) from None

    # ----------------------------------------------------------------------------------- upload

    @staticmethod
    def _md5_of(props) -> bytes | None:
        md5 = props.content_settings.content_md5
        return bytes(md5) if md5 else None

    def _matches(self, props, digests: FileDigests) -> bool:
        return props.size == digests.size and self._md5_of(props) == digests.md5

    def digests_needed(self, size: int) -> DigestNeeds:
        """MD5: the whole archive's Content-MD5, which we set and Azure's answer confirms."""
        return DigestNeeds(md5=True)

    def abort_abandoned_uploads(self) -> None:
        """Nothing to do: Azure drops uncommitted blocks (after a week) by itself."""

    def upload(self, path: Path, *, partition: str, sha256: str, size: int, metadata: dict[str, str],
               progress: ProgressCallback | None = None, key: str | None = None,
               digests: FileDigests | None = None) -> ReplicaRecord:
        # `key`: somewhere other than the archive's content address (a key-store backup, core/keys/backup.py).
        # `digests`: the archive's, computed once for every provider of a run (base.digests_for_upload).
        key = upload_key(PROVIDER, self.prefix, key, partition, sha256)
        meta = object_metadata(PROVIDER, partition, sha256, metadata)
        digests = digests_for_upload(Path(path), sha256, size, self.digests_needed(size), digests)

        # Azure keeps whatever Content-MD5 the committer sends for a block blob (and Azurite none at all
        # after block uploads), so we send the MD5 of the whole archive ourselves.
        settings = ContentSettings(content_type="application/octet-stream", content_md5=bytearray(digests.md5 or b""))
        tier = StandardBlobTier(self.target.tier)

        def write(conditions: dict[str, Any]) -> dict[str, Any] | None:
            """The write (create-only, or replace exactly the etag seen); None when Azure refused it because
            the blob is there or changed."""
            try:
                with open(path, "rb") as raw:
                    reader = ProgressReader(raw, progress)
                    if size <= self.max_single_put_size:
                        data = reader.read(size)  # bounded by max_single_put_size
                        if self._lean is not None and "etag" not in conditions:
                            return self._lean_put_new(key, data, digests, meta, tier)
                        blob = self.container.get_blob_client(key)
                        # validate_content: Azure checks the body against its MD5 before storing it.
                        return blob.upload_blob(data, length=len(data), overwrite=True, content_settings=settings,
                                                metadata=meta, standard_blob_tier=tier, validate_content=True,
                                                **conditions)
                    self._upload_blocks(self.container.get_blob_client(key), reader, size, settings, meta, tier,
                                        conditions)
                    return {}  # a block list's answer says nothing of the whole blob's bytes: look below
            except (ResourceExistsError, ResourceModifiedError):
                return None
            except ReplicaError:
                raise
            except PutFailed as exc:
                raise ReplicaError(PROVIDER, key, scrub(f"upload failed: {exc}", _secrets(self.service, self.target)
                                                        )) from None
            except Exception as exc:  # noqa: BLE001 - staged blocks stay uncommitted and invisible (GC'd in 7 days)
                raise self._fail(key, "upload", exc) from None

        # Create-only first: one request when the key is free, as it is for every new archive.
        note = ""
        answer = write({"match_condition": MatchConditions.IfMissing})
        if answer is None:
            existing = self._properties(key)
            if existing is not None and self._matches(existing, digests):
                return self._record(key, existing, digests, already_present=True)
            if existing is None:
                raise ReplicaError(PROVIDER, key, "another writer changed the blob during upload")
            md5 = self._md5_of(existing)
            note = (f"replaced {key} (etag {existing.etag}): it had {existing.size} bytes and Content-MD5 "
                    f"{b64(md5) if md5 else 'none'}, not this archive")
            answer = write({"etag": existing.etag, "match_condition": MatchConditions.IfNotModified})
            if answer is None:
                raced = self._properties(key)
                if raced is not None and self._matches(raced, digests):
                    return self._record(key, raced, digests, already_present=True)
                raise ReplicaError(PROVIDER, key, "another writer changed the blob during upload")

        # A single put's answer carries the MD5 Azure computed of what it stored: that confirms it. Otherwise
        # (staged blocks, or an answer without it) look at the blob.
        if answer.get("content_md5") and bytes(answer["content_md5"]) == digests.md5:
            return self._record_written(key, answer, digests, repaired=bool(note), note=note)
        props = self._properties(key)
        if props is None:
            raise ReplicaError(PROVIDER, key, "upload reported success but no blob is visible")
        if not self._matches(props, digests):
            md5 = self._md5_of(props)
            raise ReplicaChecksumMismatch(
                PROVIDER, key, f"after upload Azure reports {props.size} bytes and Content-MD5 "
                               f"{b64(md5) if md5 else 'none'}, expected {b64(digests.md5 or b'')}")
        return self._record(key, props, digests, already_present=False, repaired=bool(note), note=note)

    def _lean_put_new(self, key: str, data: bytes, digests: FileDigests, meta: dict[str, str],
                      tier: StandardBlobTier) -> dict[str, Any] | None:
        """The create-only single put through the lean path, with the headers upload_blob sends for it: the
        answer (as upload_blob's), or None when a blob is already there."""
        if len(data) != digests.size:
            raise ReplicaError(PROVIDER, key, f"the archive has {len(data)} bytes, not the {digests.size} hashed: "
                                              "it changed during the upload")
        headers = {"x-ms-blob-content-type": "application/octet-stream", "x-ms-access-tier": tier.value,
                   **{f"x-ms-meta-{name}": value for name, value in meta.items()}}
        return self._lean.put_new(key, data, bytes(digests.md5 or b""), headers)

    def _upload_blocks(self, blob, reader: ProgressReader, size: int, settings: ContentSettings,
                       meta: dict[str, str], tier: StandardBlobTier, conditions: dict[str, Any]) -> None:
        # Ids unique to this attempt, all the same length (Azure requires that), so an abandoned attempt's
        # uncommitted blocks can never be mixed into this one.
        attempt = uuid.uuid4().hex[:16]
        blocks: list[BlobBlock] = []
        for index, data in enumerate(read_blocks(reader, size, self.max_block_size)):
            block_id = base64.b64encode(f"{attempt}-{index:07d}".encode()).decode("ascii")
            # validate_content: Azure rejects a block whose bytes do not match the MD5 we computed for it.
            blob.stage_block(block_id, data, length=len(data), validate_content=True)
            blocks.append(BlobBlock(block_id=block_id))
        blob.commit_block_list(blocks, content_settings=settings, metadata=meta, standard_blob_tier=tier,
                               **conditions)

    def _record(self, key: str, props, digests: FileDigests, *, already_present: bool, repaired: bool = False,
                note: str = "") -> ReplicaRecord:
        md5 = self._md5_of(props)
        return ReplicaRecord(
            provider=PROVIDER, uri=self.uri(key), key=key, version_id=props.version_id, size=int(props.size),
            sha256=digests.sha256, provider_checksum=b64(md5) if md5 else "",
            storage_class=str(props.blob_tier or self.target.tier), region=None, media=self.target.media,
            offsite=self.target.offsite, already_present=already_present, repaired=repaired, note=note,
            etag=props.etag)

    def _record_written(self, key: str, answer: dict[str, Any], digests: FileDigests, *, repaired: bool,
                        note: str) -> ReplicaRecord:
        """The record of a single put from Azure's answer (etag, version, the MD5 it computed)."""
        return ReplicaRecord(
            provider=PROVIDER, uri=self.uri(key), key=key, version_id=answer.get("version_id"), size=digests.size,
            sha256=digests.sha256, provider_checksum=b64(bytes(answer["content_md5"])),
            storage_class=str(self.target.tier), region=None, media=self.target.media, offsite=self.target.offsite,
            already_present=False, repaired=repaired, note=note, etag=answer.get("etag"))

    # ------------------------------------------------------------------------ read, list, delete

    def head(self, key: str) -> ReplicaRecord | None:
        """What Azure holds at `key`; `sha256` is the one we stamped in the metadata (not re-hashed here)."""
        check_key(PROVIDER, self.prefix, key)
        props = self._properties(key)
        if props is None:
            return None
        md5 = self._md5_of(props)
        sha = (props.metadata or {}).get("sha256") or parse_archive_key(self.prefix, key)[1] or ""
        return ReplicaRecord(
            provider=PROVIDER, uri=self.uri(key), key=key, version_id=props.version_id, size=int(props.size),
            sha256=sha, provider_checksum=b64(md5) if md5 else "",
            storage_class=str(props.blob_tier or self.target.tier), region=None, media=self.target.media,
            offsite=self.target.offsite, already_present=True, etag=props.etag)

    def download(self, key: str, dest: BinaryIO, *, expected_sha256: str | None = None,
                 version_id: str | None = None) -> int:
        check_key(PROVIDER, self.prefix, key)
        out = HashingWriter(dest)
        blob = self.container.get_blob_client(key)
        try:
            # Ranged reads, every one after the first pinned to the etag the first saw. The SDK's whole-blob
            # downloader peaked at about three times the blob (288 MiB for 100 MiB); one ranged call still
            # peaks near 9x its range, so ranges stay small. The first range's answer names the blob's size
            # (Content-Range), so a blob of one range (most archives) costs one request, not two.
            first = blob.download_blob(offset=0, length=self.download_range_size, version_id=version_id)
            size = int(str(first.properties.content_range).rsplit("/", 1)[1])
            etag = first.properties.etag
            data = first.readall()
            for offset in range(0, size, self.download_range_size):
                length = min(self.download_range_size, size - offset)
                if offset:
                    data = blob.download_blob(offset=offset, length=length, version_id=version_id, etag=etag,
                                              match_condition=MatchConditions.IfNotModified).readall()
                if len(data) != length:
                    raise ReplicaError(PROVIDER, key, f"range at {offset} returned {len(data)} bytes, not {length}")
                out.write(data)
        except ReplicaError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._fail(key, "download", exc) from None
        if expected_sha256 is not None and out.hexdigest() != expected_sha256:
            raise ReplicaChecksumMismatch(PROVIDER, key, f"downloaded bytes have sha256 {out.hexdigest()}, "
                                                         f"expected {expected_sha256}")
        return out.count

    def versions(self, key: str) -> list[str | None]:
        """Version ids held for `key` (None for the blob itself where the account keeps no versions)."""
        check_key(PROVIDER, self.prefix, key)
        try:
            return [b.version_id for b in self.container.list_blobs(name_starts_with=key, include=["versions"])
                    if b.name == key]
        except Exception as exc:  # noqa: BLE001
            raise self._fail(key, "list versions", exc) from None

    def delete(self, key: str) -> None:
        """Delete the blob, its snapshots and every version (deleting a versioned blob leaves a version)."""
        check_key(PROVIDER, self.prefix, key)
        blob = self.container.get_blob_client(key)
        try:
            try:
                blob.delete_blob(delete_snapshots="include")
            except ResourceNotFoundError:
                pass
            for version_id in self.versions(key):
                if version_id:
                    try:
                        blob.delete_blob(version_id=version_id)
                    except ResourceNotFoundError:
                        pass
        except ReplicaError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._fail(key, "delete", exc) from None

    def version_keys(self, prefix: str = "") -> set[str]:
        """Every blob name under `prefix` with any version, previous versions included (erasure)."""
        full = check_list_prefix(PROVIDER, self.prefix, prefix)
        try:
            return {b.name for b in self.container.list_blobs(name_starts_with=full, include=["versions"])}
        except Exception as exc:  # noqa: BLE001
            raise self._fail(full, "list versions", exc) from None

    def list(self, prefix: str = "") -> Iterator[ListedObject]:
        full = check_list_prefix(PROVIDER, self.prefix, prefix)
        try:
            for item in self.container.list_blobs(name_starts_with=full):
                partition, sha = parse_archive_key(self.prefix, item.name)
                yield ListedObject(provider=PROVIDER, uri=self.uri(item.name), key=item.name, size=int(item.size),
                                   version_id=item.version_id,
                                   storage_class=str(item.blob_tier) if item.blob_tier else None,
                                   modified=item.last_modified, partition=partition, sha256=sha)
        except Exception as exc:  # noqa: BLE001
            raise self._fail(full, "list", exc) from None

    def canary(self) -> float:
        """Write, read back and delete a tiny blob; the seconds it took. ProviderError when Azure is not usable."""
        blob = self.container.get_blob_client
        return canary_round(
            PROVIDER, self.prefix, fail=self._fail, delete=self.delete,
            write=lambda key, data: blob(key).upload_blob(data, overwrite=False),
            read=lambda key: blob(key).download_blob().readall())
