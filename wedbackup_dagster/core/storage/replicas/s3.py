"""The S3 replica: multipart uploads checked against S3's own SHA-256 (whole-object or checksum of part
checksums), versioned objects, streaming verified downloads, and no unfinished multipart upload left behind."""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.utils import ChunksizeAdjuster

from wedbackup_dagster.core.config import S3Target
from wedbackup_dagster.core.errors import ReplicaChecksumMismatch, ReplicaError, ReplicaLocked

from wedbackup_dagster.core.storage.replicas.base import (READ_BLOCK, DigestNeeds, FileDigests, HashingWriter,
                                                          ListedObject, ProgressCallback, ProgressReader, ReplicaRecord,
                                                          archive_key, canary_round, check_key, check_list_prefix,
                                                          digest_file, digests_for_upload, object_metadata,
                                                          parse_archive_key, provider_error, upload_key)
from wedbackup_dagster.core.storage.replicas.s3_lean import LeanS3, RequestFailed, credential_secrets, lean_s3

PROVIDER = "s3"
DEFAULT_MULTIPART_THRESHOLD = 64 << 20
# Single-request uploads up to this size go through s3_lean's PUT, the body read into memory once (most
# weddings' archives are a few KB to a few MB); larger ones stream through boto3's put_object.
LEAN_PUT_MAX = 8 << 20
DEFAULT_PART_SIZE = 64 << 20
def abandoned_uploads(uploads: list[dict[str, Any]], cutoff: datetime) -> list[dict[str, Any]]:
    """The multipart uploads (list_multipart_uploads' `Uploads`) started before `cutoff`; one without a
    start time counts as abandoned (nothing says it is live)."""
    return [u for u in uploads if not (isinstance(u.get("Initiated"), datetime) and u["Initiated"] > cutoff)]


# A multipart upload older than this is abandoned (its process died): longer than run monitoring lets a run
# last (2 h, dagster.yaml), so a live upload of another run is never aborted.
ABANDONED_MULTIPART_SECONDS = 3 * 3600.0
_PARTS_SUFFIX = re.compile(r"-(\d+)$")
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchVersion"}


def client_config(connect_timeout: float = 5, read_timeout: float = 60, max_attempts: int = 2,
                  max_pool_connections: int = 10) -> Config:
    """Short timeouts and few retries: a provider that is down should fail a run in seconds, not minutes.
    `max_pool_connections`: enough for every upload thread sharing the client (botocore's default is 10)."""
    return Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                  retries={"max_attempts": max_attempts, "mode": "standard"},
                  max_pool_connections=max_pool_connections)


def s3_client_from(target: S3Target, env: Mapping[str, str] | None = None, *, config: Config | None = None):
    """A boto3 S3 client for `target`; credentials from `env` when given, else boto3's usual chain."""
    env = env or {}
    return boto3.client(
        "s3", endpoint_url=target.endpoint_url or None, region_name=target.region,
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
        config=config or client_config())


def ensure_bucket(client, target: S3Target) -> bool:
    """Create the target bucket with versioning when it is missing (local stack, demo). True when created."""
    try:
        client.head_bucket(Bucket=target.bucket)
        return False
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in {"404", "NoSuchBucket", "NotFound"}:
            raise provider_error(PROVIDER, None, f"head bucket {target.bucket}", exc, _secrets(client)) from None
    except BotoCoreError as exc:
        raise provider_error(PROVIDER, None, f"head bucket {target.bucket}", exc, _secrets(client)) from None
    try:
        kwargs: dict[str, Any] = {"Bucket": target.bucket}
        if target.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": target.region}
        if target.object_lock != "none":
            kwargs["ObjectLockEnabledForBucket"] = True  # only possible at creation (it also turns versioning on)
        client.create_bucket(**kwargs)
        client.put_bucket_versioning(Bucket=target.bucket, VersioningConfiguration={"Status": "Enabled"})
    except (ClientError, BotoCoreError) as exc:
        raise provider_error(PROVIDER, None, f"create bucket {target.bucket}", exc, _secrets(client)) from None
    return True


def _secrets(client) -> list[str | None]:
    # The signing secret never appears in botocore's messages, but scrub it anyway should a future one echo it.
    signer = getattr(client, "_request_signer", None)  # only read to know what to scrub
    return credential_secrets(getattr(signer, "_credentials", None))


def _lock(head: dict[str, Any]) -> dict[str, Any]:
    """ReplicaRecord's lock fields from a head_object answer: a retain-until date in the past locks nothing."""
    until = head.get("ObjectLockRetainUntilDate")
    if isinstance(until, str):
        until = datetime.fromisoformat(until.replace("Z", "+00:00"))
    if until is not None and until.tzinfo is None:
        until = until.replace(tzinfo=timezone.utc)
    if until is None or until <= datetime.now(timezone.utc):
        return {"locked_until": None, "lock_mode": None}
    return {"locked_until": until, "lock_mode": str(head.get("ObjectLockMode") or "").lower() or None}


# What a create-only PUT hears when something is already at the key (or a concurrent create-only PUT of the
# same key won the race, or an S3-compatible store does not do conditional writes): look and compare instead.
# The put_object arguments _lean_put_new spells as headers (anything else: put_object itself)
_LEAN_PUT_ARGS = frozenset({"ChecksumAlgorithm", "Metadata", "ContentType", "StorageClass", "ServerSideEncryption"})
_ALREADY_THERE = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "NotImplemented"})


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Replica:
    provider = PROVIDER

    def __init__(self, client, target: S3Target, *, multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
                 part_size: int = DEFAULT_PART_SIZE, max_concurrency: int = 4,
                 abandoned_after: float = ABANDONED_MULTIPART_SECONDS, lean_get: bool = True,
                 lean_put: bool = True):
        self.client = client
        # Downloads, and single-request uploads of archives up to LEAN_PUT_MAX, through s3_lean's lean requests
        # (the client's signer, session and settings, not its event system) when the client allows it; False
        # (or a client they cannot serve): boto3's get_object and put_object.
        self._lean: LeanS3 | None = None
        self._lean_wanted = lean_get or lean_put
        self._lean_get, self._lean_put = lean_get, lean_put
        self.abandoned_after = abandoned_after
        self.target = target
        self.prefix = target.prefix
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.max_concurrency = max_concurrency

    # ------------------------------------------------------------------------------------- keys

    def object_key(self, wedding_partition: str, sha256: str) -> str:
        return archive_key(PROVIDER, self.prefix, wedding_partition, sha256)

    def uri(self, key: str) -> str:
        return f"s3://{self.target.bucket}/{key}"

    def _fail(self, key: str | None, action: str, exc: BaseException) -> ReplicaError:
        return provider_error(PROVIDER, key, action, exc, _secrets(self.client))

    # ----------------------------------------------------------------------------------- upload

    def _part_size(self, size: int) -> int | None:
        """The part size of a multipart upload of `size` bytes; None below the multipart threshold."""
        return ChunksizeAdjuster().adjust_chunksize(self.part_size, size) if size >= self.multipart_threshold else None

    def digests_needed(self, size: int) -> DigestNeeds:
        """SHA-256 (always), and per part for a multipart upload: S3 checks each part and the whole."""
        return DigestNeeds(part_size=self._part_size(size))

    def upload(self, path: Path, *, partition: str, sha256: str, size: int, metadata: dict[str, str],
               progress: ProgressCallback | None = None, key: str | None = None,
               digests: FileDigests | None = None) -> ReplicaRecord:
        # `key`: somewhere other than the archive's content address (a key-store backup, core/keys/backup.py).
        # `digests`: the archive's, computed once for every provider of a run (base.digests_for_upload).
        # Only archives are written under Object Lock: a key-store backup must stay deletable, or a locked
        # one would keep an erased wedding's key readable (with a master key we hold) until its lock ends.
        lock = key is None and self.target.object_lock != "none"
        key = upload_key(PROVIDER, self.prefix, key, partition, sha256)
        meta = object_metadata(PROVIDER, partition, sha256, metadata)
        part_size = self._part_size(size)
        multipart = part_size is not None
        digests = digests_for_upload(Path(path), sha256, size, self.digests_needed(size), digests)

        if not multipart and not lock:
            # One request: S3 writes only if nothing is at the key, checks the body against our SHA-256 and
            # answers with the checksum it stored. An object already at the key takes the path below, which
            # looks first and replaces only what is not this archive.
            record = self._put_if_absent(Path(path), key, meta, digests, progress)
            if record is not None:
                return record

        existing = self._head_object(key)
        note = ""
        if existing is not None:
            matches, checksum, digests = self._matches(key, existing, Path(path), digests)
            if matches:
                existing = self._ensure_lock(key, existing) if lock else existing
                return self._record(key, existing, digests, checksum, already_present=True)
            note = (f"replaced version {existing.get('VersionId')} at {key}: it had {existing.get('ContentLength')} "
                    f"bytes and checksum {existing.get('ChecksumSHA256') or 'none'}, not this archive")

        self._abort_abandoned_multipart(key)
        self._transfer(Path(path), key, meta, part_size, progress, lock=lock)
        return self._confirm(key, Path(path), digests, lock=lock, note=note)

    def _confirm(self, key: str, path: Path, digests: FileDigests, *, lock: bool, note: str = "") -> ReplicaRecord:
        """After a write S3 did not confirm in its answer: look, and keep the new version only if S3's own
        checksum is this archive's."""
        head = self._head_object(key)
        if head is None:
            raise ReplicaError(PROVIDER, key, "upload reported success but no object is visible")
        matches, checksum, digests = self._matches(key, head, path, digests)
        if not matches:
            self._delete_version(key, head.get("VersionId"))
            raise ReplicaChecksumMismatch(
                PROVIDER, key, f"after upload S3 reports {head.get('ContentLength')} bytes and checksum "
                               f"{checksum or 'none'}, which is not this archive; the bad version was deleted")
        head = self._ensure_lock(key, head) if lock else head
        return self._record(key, head, digests, checksum, already_present=False, repaired=bool(note), note=note)

    def _put_args(self, meta: dict[str, str], *, lock: bool) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "ChecksumAlgorithm": "SHA256",
            "Metadata": meta,
            "ContentType": "application/octet-stream",
        }
        if self.target.storage_class:
            extra["StorageClass"] = self.target.storage_class
        if self.target.sse and self.target.sse != "none":
            extra["ServerSideEncryption"] = self.target.sse
        if lock:
            # Write-once: S3 refuses to delete or overwrite this version until the date (README, Immutability).
            extra["ObjectLockMode"] = self.target.object_lock.upper()
            extra["ObjectLockRetainUntilDate"] = self._retain_until()
        return extra

    def _put_if_absent(self, path: Path, key: str, meta: dict[str, str], digests: FileDigests,
                       progress: ProgressCallback | None) -> ReplicaRecord | None:
        """A single PUT with `If-None-Match: *` and our SHA-256 (S3 rejects a body that does not match it):
        the record when S3 confirms it stored exactly this archive; None when an object is already at the
        key (the caller looks and compares). An answer without that checksum is confirmed by a look."""
        lean = self._lean_s3() if self._lean_put and digests.size <= LEAN_PUT_MAX else None
        try:
            answer = self._lean_put_new(lean, path, key, meta, digests, progress) if lean is not None else None
            if answer is None:
                with open(path, "rb") as raw:
                    answer = self.client.put_object(Bucket=self.target.bucket, Key=key,
                                                    Body=ProgressReader(raw, progress), ContentLength=digests.size,
                                                    ChecksumSHA256=digests.sha256_b64, IfNoneMatch="*",
                                                    **self._put_args(meta, lock=False))
        except RequestFailed as exc:
            if exc.code in _ALREADY_THERE:
                return None
            raise ReplicaError(PROVIDER, key, f"upload failed: {exc}") from None
        except ClientError as exc:
            if _error_code(exc) in _ALREADY_THERE:
                return None
            raise self._fail(key, "upload", exc) from None
        except BotoCoreError as exc:
            raise self._fail(key, "upload", exc) from None
        if answer.get("ChecksumSHA256") != digests.sha256_b64:
            return self._confirm(key, path, digests, lock=False)
        stored = {"VersionId": answer.get("VersionId"), "ContentLength": digests.size, "ETag": answer.get("ETag"),
                  "StorageClass": self.target.storage_class or "STANDARD"}
        return self._record(key, stored, digests, answer["ChecksumSHA256"], already_present=False)

    def _lean_put_new(self, lean: LeanS3, path: Path, key: str, meta: dict[str, str], digests: FileDigests,
                      progress: ProgressCallback | None) -> dict[str, Any] | None:
        """The create-only PUT through the lean path, with the headers put_object sends for _put_args; None
        when _put_args asks for something this does not spell (then put_object)."""
        extra = self._put_args(meta, lock=False)
        if not set(extra) <= _LEAN_PUT_ARGS:
            return None
        with open(path, "rb") as raw:
            body = raw.read(digests.size + 1)  # at most LEAN_PUT_MAX (+1 to see a file that grew)
        if len(body) != digests.size:
            raise ReplicaError(PROVIDER, key, f"the archive {Path(path).name} has {len(body)} bytes, not the "
                                              f"{digests.size} hashed: it changed during the upload")
        headers = {"Content-Type": extra["ContentType"], "x-amz-checksum-sha256": digests.sha256_b64,
                   "x-amz-sdk-checksum-algorithm": extra["ChecksumAlgorithm"]}
        headers.update({f"x-amz-meta-{name}": value for name, value in extra["Metadata"].items()})
        if "StorageClass" in extra:
            headers["x-amz-storage-class"] = extra["StorageClass"]
        if "ServerSideEncryption" in extra:
            headers["x-amz-server-side-encryption"] = extra["ServerSideEncryption"]
        answer = lean.put_new(key, body, headers)
        if progress is not None:
            progress(len(body))
        return answer

    def _transfer(self, path: Path, key: str, meta: dict[str, str], part_size: int | None,
                  progress: ProgressCallback | None, *, lock: bool) -> None:
        extra = self._put_args(meta, lock=lock)
        config = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=part_size or self.part_size,
            max_concurrency=self.max_concurrency,
            use_threads=self.max_concurrency > 1,
        )
        try:
            # upload_file streams each part from disk: 4 MiB peak measured for a 100 MiB archive.
            self.client.upload_file(str(path), self.target.bucket, key, ExtraArgs=extra, Config=config,
                                    Callback=progress)
        except BaseException as exc:
            # s3transfer aborts its own multipart upload on failure; make sure, so no parts linger (and bill).
            self._abort_multipart(key)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise self._fail(key, "upload", exc) from None

    def _retain_until(self) -> datetime:
        return datetime.now(timezone.utc) + timedelta(days=self.target.object_lock_days)

    def _ensure_lock(self, key: str, head: dict[str, Any]) -> dict[str, Any]:
        """With Object Lock configured, the version must carry a lock: one uploaded before the setting was
        turned on, or by a path that dropped it (moto ignores the lock of a multipart upload), gets one now
        with PutObjectRetention. Returns the head to record."""
        if self.target.object_lock == "none" or _lock(head)["locked_until"] is not None:
            return head
        try:
            self.client.put_object_retention(
                Bucket=self.target.bucket, Key=key, VersionId=head["VersionId"],
                Retention={"Mode": self.target.object_lock.upper(), "RetainUntilDate": self._retain_until()})
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(key, "set Object Lock retention (is Object Lock enabled on the bucket?)", exc) from None
        return self._head_object(key, version_id=head.get("VersionId")) or head

    def abort_abandoned_uploads(self) -> None:
        """Abort the abandoned multipart uploads under this replica's prefix: an upload step calls it once
        (core/engine.py replicate_to_all), since a single-PUT upload never looks for them itself."""
        self._abort_abandoned_multipart_under(f"{self.prefix}/" if self.prefix else "")

    def _abort_abandoned_multipart(self, key: str) -> None:
        self._abort_abandoned_multipart_under(key.rsplit("/", 1)[0] + "/")

    def _abort_abandoned_multipart_under(self, folder: str) -> None:
        """Abort unfinished multipart uploads under `folder` (before a multipart upload: this wedding's
        archives): a process killed mid-upload never aborts its own, and S3 keeps (and bills) their parts
        until someone does. Only uploads started longer ago than `abandoned_after` (default: longer than any
        run may last, README's run monitoring) are aborted: another run may be uploading the same wedding
        right now."""
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=self.abandoned_after)
        try:
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.target.bucket,
                                                                                     Prefix=folder):
                for upload in abandoned_uploads(page.get("Uploads", []), cutoff):
                    self.client.abort_multipart_upload(Bucket=self.target.bucket, Key=upload["Key"],
                                                       UploadId=upload["UploadId"])
        except (ClientError, BotoCoreError):
            # Tidying only (and a role may lack s3:ListBucketMultipartUploads): the upload itself goes on, and
            # if S3 is down it reports that. A later upload of the wedding tries again.
            pass

    def _abort_multipart(self, key: str) -> None:
        try:
            listing = self.client.list_multipart_uploads(Bucket=self.target.bucket, Prefix=key)
            for upload in listing.get("Uploads", []):
                if upload.get("Key") == key:
                    self.client.abort_multipart_upload(Bucket=self.target.bucket, Key=key,
                                                       UploadId=upload["UploadId"])
        except (ClientError, BotoCoreError):
            pass  # the provider is down: nothing more we can do now, and the first error is the one to report

    # --------------------------------------------------------------------------- verification

    def _head_object(self, key: str, version_id: str | None = None, part_number: int | None = None
                     ) -> dict[str, Any] | None:
        kwargs: dict[str, Any] = {"Bucket": self.target.bucket, "Key": key, "ChecksumMode": "ENABLED"}
        if version_id:
            kwargs["VersionId"] = version_id
        if part_number:
            kwargs["PartNumber"] = part_number
        try:
            return self.client.head_object(**kwargs)
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                return None
            raise self._fail(key, "head", exc) from None
        except BotoCoreError as exc:
            raise self._fail(key, "head", exc) from None

    def _layout(self, key: str, head: dict[str, Any]) -> tuple[int, int | None]:
        """(parts, part size) the object was uploaded with; (1, None) for a single PUT."""
        checksum = head.get("ChecksumSHA256") or ""
        suffix = _PARTS_SUFFIX.search(checksum)
        etag_suffix = _PARTS_SUFFIX.search((head.get("ETag") or "").strip('"'))
        if not suffix and not etag_suffix:
            return 1, None
        first = self._head_object(key, version_id=head.get("VersionId"), part_number=1)
        if first is None:
            raise ReplicaError(PROVIDER, key, "object vanished while being checked")
        parts = int((suffix or etag_suffix).group(1))
        return int(first.get("PartsCount") or parts), int(first["ContentLength"])

    def _matches(self, key: str, head: dict[str, Any], path: Path, digests: FileDigests
                 ) -> tuple[bool, str, FileDigests]:
        """Whether S3's own checksum of the object is the one our archive has, for the part layout S3 used."""
        checksum = head.get("ChecksumSHA256") or ""
        if not checksum or int(head.get("ContentLength", -1)) != digests.size:
            return False, checksum, digests
        parts, part_size = self._layout(key, head)
        if part_size is None:
            return checksum == digests.sha256_b64, checksum, digests
        if part_size != digests.part_size:
            digests = digest_file(path, part_size=part_size)
        if len(digests.part_sha256) != parts:
            return False, checksum, digests
        # Real S3 reports a multipart checksum as "<composite>-<parts>"; moto leaves the suffix off.
        return _PARTS_SUFFIX.sub("", checksum) == digests.s3_composite(), checksum, digests

    def _record(self, key: str, head: dict[str, Any], digests: FileDigests, checksum: str, *,
                already_present: bool, repaired: bool = False, note: str = "") -> ReplicaRecord:
        return ReplicaRecord(
            provider=PROVIDER, uri=self.uri(key), key=key, version_id=head.get("VersionId"),
            size=int(head["ContentLength"]), sha256=digests.sha256, provider_checksum=checksum,
            storage_class=head.get("StorageClass") or "STANDARD", region=self.target.region,
            media=self.target.media, offsite=self.target.offsite, already_present=already_present,
            repaired=repaired, note=note, etag=(head.get("ETag") or "").strip('"') or None, **_lock(head))

    # ------------------------------------------------------------------------ read, list, delete

    def head(self, key: str) -> ReplicaRecord | None:
        """What S3 holds at `key`; `sha256` is the one we stamped in the metadata (not re-hashed here)."""
        check_key(PROVIDER, self.prefix, key)
        head = self._head_object(key)
        if head is None:
            return None
        sha = (head.get("Metadata") or {}).get("sha256") or parse_archive_key(self.prefix, key)[1] or ""
        return ReplicaRecord(
            provider=PROVIDER, uri=self.uri(key), key=key, version_id=head.get("VersionId"),
            size=int(head["ContentLength"]), sha256=sha, provider_checksum=head.get("ChecksumSHA256") or "",
            storage_class=head.get("StorageClass") or "STANDARD", region=self.target.region,
            media=self.target.media, offsite=self.target.offsite, already_present=True,
            etag=(head.get("ETag") or "").strip('"') or None, **_lock(head))

    def download(self, key: str, dest: BinaryIO, *, expected_sha256: str | None = None,
                 version_id: str | None = None) -> int:
        check_key(PROVIDER, self.prefix, key)
        out = HashingWriter(dest)
        lean = self._lean_s3() if self._lean_get else None
        if lean is not None:
            lean.get(key, out.write, version_id=version_id)
            return self._checked(key, out, expected_sha256)
        kwargs: dict[str, Any] = {"Bucket": self.target.bucket, "Key": key}
        if version_id:
            kwargs["VersionId"] = version_id
        try:
            body = self.client.get_object(**kwargs)["Body"]
            for chunk in body.iter_chunks(READ_BLOCK):
                out.write(chunk)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(key, "download", exc) from None
        return self._checked(key, out, expected_sha256)

    def _lean_s3(self) -> LeanS3 | None:  # made on first use (a presigned probe URL: botocore's endpoint rules)
        if self._lean_wanted and self._lean is None:
            self._lean = lean_s3(self.client, self.target.bucket)
            self._lean_wanted = self._lean is not None
        return self._lean

    @staticmethod
    def _checked(key: str, out: HashingWriter, expected_sha256: str | None) -> int:
        if expected_sha256 is not None and out.hexdigest() != expected_sha256:
            raise ReplicaChecksumMismatch(PROVIDER, key, f"downloaded bytes have sha256 {out.hexdigest()}, "
                                                         f"expected {expected_sha256}")
        return out.count

    def _delete_version(self, key: str, version_id: str | None) -> None:
        try:
            kwargs: dict[str, Any] = {"Bucket": self.target.bucket, "Key": key}
            if version_id:
                kwargs["VersionId"] = version_id
            self.client.delete_object(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(key, "delete version", exc) from None

    def delete(self, key: str) -> None:
        """Delete every version and delete marker of `key` (an unversioned bucket has one, 'null')."""
        check_key(PROVIDER, self.prefix, key)
        try:
            paginator = self.client.get_paginator("list_object_versions")
            doomed: list[dict[str, str]] = []
            for page in paginator.paginate(Bucket=self.target.bucket, Prefix=key):
                for entry in page.get("Versions", []) + page.get("DeleteMarkers", []):
                    if entry["Key"] == key:
                        doomed.append({"Key": key, "VersionId": entry["VersionId"]})
            for start in range(0, len(doomed), 1000):
                result = self.client.delete_objects(Bucket=self.target.bucket,
                                                    Delete={"Objects": doomed[start:start + 1000], "Quiet": True})
                errors = result.get("Errors") or []
                refused = [e for e in errors if e.get("Code") == "AccessDenied"]
                if refused:
                    # Object Lock refuses with AccessDenied: say until when, from the version's own head
                    # (moto's get_object_retention is unreliable; head_object carries the same fields).
                    raise self._locked(key, [e.get("VersionId") for e in refused])
                if errors:
                    first = errors[0]
                    raise ReplicaError(PROVIDER, key, f"delete refused for version {first.get('VersionId')}: "
                                                      f"{first.get('Code')} {first.get('Message')}")
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(key, "delete", exc) from None

    def _locked(self, key: str, version_ids: list[str | None]) -> ReplicaError:
        """ReplicaLocked naming the latest retain-until among the refused versions; a refusal that no lock
        explains stays a plain ReplicaError (a permissions problem, not immutability)."""
        until, mode, held = None, None, False
        for version_id in version_ids:
            head = self._head_object(key, version_id=version_id) or {}
            lock = _lock(head)
            held = held or head.get("ObjectLockLegalHoldStatus") == "ON"
            if lock["locked_until"] is not None and (until is None or lock["locked_until"] > until):
                until, mode = lock["locked_until"], lock["lock_mode"]
        if until is None and held:
            return ReplicaLocked(PROVIDER, key, f"delete refused: {len(version_ids)} version(s) under an Object "
                                                "Lock legal hold (no end date: lifted by hand)", mode="legal-hold")
        if until is None:
            return ReplicaError(PROVIDER, key, f"delete refused (AccessDenied) for {len(version_ids)} version(s), "
                                               "and no Object Lock explains it: check the bucket policy")
        return ReplicaLocked(PROVIDER, key, f"delete refused: {len(version_ids)} version(s) under Object Lock "
                                            f"({mode}) until {until:%Y-%m-%d %H:%M} UTC",
                             locked_until=until, mode=mode)

    def versions(self, key: str) -> list[str]:
        """Version ids held for `key` (newest first); for checks and tests."""
        check_key(PROVIDER, self.prefix, key)
        try:
            out = self.client.list_object_versions(Bucket=self.target.bucket, Prefix=key)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(key, "list versions", exc) from None
        return [v["VersionId"] for v in out.get("Versions", []) if v["Key"] == key]

    def version_keys(self, prefix: str = "") -> set[str]:
        """Every key under `prefix` with any version or delete marker: list() shows live objects only, and
        an erasure must also find keys whose newest entry is a delete marker over older versions."""
        full = check_list_prefix(PROVIDER, self.prefix, prefix)
        keys: set[str] = set()
        try:
            for page in self.client.get_paginator("list_object_versions").paginate(Bucket=self.target.bucket,
                                                                                   Prefix=full):
                keys.update(e["Key"] for e in page.get("Versions", []) + page.get("DeleteMarkers", []))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(full, "list versions", exc) from None
        return keys

    def list(self, prefix: str = "") -> Iterator[ListedObject]:
        full = check_list_prefix(PROVIDER, self.prefix, prefix)
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.target.bucket,
                                                                              Prefix=full):
                for obj in page.get("Contents", []):
                    partition, sha = parse_archive_key(self.prefix, obj["Key"])
                    yield ListedObject(provider=PROVIDER, uri=self.uri(obj["Key"]), key=obj["Key"],
                                       size=int(obj["Size"]), version_id=None,
                                       storage_class=obj.get("StorageClass"), modified=obj.get("LastModified"),
                                       partition=partition, sha256=sha)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(full, "list", exc) from None

    def canary(self) -> float:
        """Write, read back and delete a tiny object; the seconds it took. ProviderError when S3 is not usable."""
        bucket = self.target.bucket
        return canary_round(
            PROVIDER, self.prefix, fail=self._fail, delete=self.delete, errors=(ClientError, BotoCoreError),
            write=lambda key, data: self.client.put_object(Bucket=bucket, Key=key, Body=data,
                                                           ChecksumAlgorithm="SHA256"),
            read=lambda key: self.client.get_object(Bucket=bucket, Key=key)["Body"].read())


__all__ = ["S3Replica", "s3_client_from", "ensure_bucket", "client_config", "DEFAULT_MULTIPART_THRESHOLD",
           "DEFAULT_PART_SIZE"]
