"""Where the platform keeps its media: an S3-compatible bucket (`s3://bucket/prefix`) or a local directory,
with the per-wedding layout `weddings/<id>/…` (everything else belongs to the `platform` partition).
Lists objects per partition and reads them as checked streams: a read that does not match what the
listing said (changed, vanished, cut short) raises SourceChanged, so a torn file is never marked good."""
from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from wedbackup_dagster.core.errors import ConfigError, WedbackupError
from wedbackup_dagster.core.partitions import PLATFORM, is_partition

DEFAULT_WEDDING_PREFIX = "weddings/"
MEDIA_SOURCE_ENV = "WEDBACKUP_MEDIA_SOURCE"
READ_BLOCK = 1 << 20


class SourceChanged(WedbackupError):
    """The object changed, vanished or was cut short while it was read: skip it, with this reason."""


class SourceUnreadable(WedbackupError):
    """The object cannot be read at all (permissions, provider error): skip it, named, and go on."""


@dataclass(frozen=True)
class SourceObject:
    path: str  # relative to the source root, exactly as the source names it
    size: int
    etag: str | None
    version_id: str | None
    mtime: str | None


def partition_of(path: str, wedding_prefix: str = DEFAULT_WEDDING_PREFIX) -> str:
    """`weddings/<id>/…` belongs to wedding <id>; everything else (vendor portfolios, odd names) to platform."""
    if path.startswith(wedding_prefix):
        wedding, sep, rest = path[len(wedding_prefix):].partition("/")
        if sep and rest and wedding != PLATFORM and is_partition(wedding):
            return wedding
    return PLATFORM


class MediaSource(Protocol):
    description: str
    wedding_prefix: str

    def list(self, partition: str | None = None) -> Iterator[SourceObject]: ...

    def open(self, obj: SourceObject) -> Any: ...  # a context manager yielding a CheckedStream


class CheckedStream:
    """A read-only stream over one source object that hashes what passes (SHA-256, and MD5 when the
    source's ETag is one) and, at finish(), checks it against the listing."""

    def __init__(self, raw: BinaryIO, obj: SourceObject, *, md5: bool = False):
        self._raw = raw
        self.obj = obj
        self.count = 0
        self._sha = hashlib.sha256()
        self._md5 = hashlib.md5(usedforsecurity=False) if md5 else None

    def _left(self, want: int) -> int:
        # One byte past the listed size is enough to know the object grew; a source that never ends
        # (a file appended to as fast as it is read) cannot keep the backup reading forever.
        left = self.obj.size + 1 - self.count
        return left if want is None or want < 0 else min(want, left)

    def readinto(self, buffer) -> int:  # noqa: ANN001 - pyfastcdc hands a memoryview
        view = memoryview(buffer)
        data = self._raw.read(self._left(len(view))) if self._left(len(view)) > 0 else b""
        n = len(data)
        view[:n] = data
        self._sha.update(data)
        if self._md5 is not None:
            self._md5.update(data)
        self.count += n
        return n

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(self._left(size)) if self._left(size) > 0 else b""
        self._sha.update(data)
        if self._md5 is not None:
            self._md5.update(data)
        self.count += len(data)
        return data

    def finish(self) -> str:
        """The SHA-256 of what was read, once the bytes are shown to be the listed object's."""
        if self.count != self.obj.size:
            raise SourceChanged(f"{self.obj.path!r}: read {self.count} bytes, the listing said {self.obj.size}: "
                                "changed or cut short while being read")
        if self._md5 is not None and self.obj.etag and self._md5.hexdigest() != self.obj.etag:
            raise SourceChanged(f"{self.obj.path!r}: the bytes read do not match the listed ETag: changed while "
                                "being read")
        return self._sha.hexdigest()


class DirectorySource:
    """A local directory. Regular files only (symbolic links and devices are skipped, never followed);
    the mtime (ns), size and inode before and after the read must agree."""

    def __init__(self, root: Path | str, wedding_prefix: str = DEFAULT_WEDDING_PREFIX):
        self.root = Path(root)
        self.wedding_prefix = wedding_prefix
        self.description = f"directory {self.root}"
        self.refused: list[tuple[str, str]] = []  # (path, reason) of entries the last listing could not take

    def _rel(self, full: str) -> str:
        return os.path.relpath(full, self.root).replace(os.sep, "/")

    def list(self, partition: str | None = None) -> Iterator[SourceObject]:
        if not self.root.is_dir():
            raise ConfigError(MEDIA_SOURCE_ENV, f"the media directory {self.root} does not exist")
        self.refused = []
        start = self.root
        if partition is not None and partition != PLATFORM:
            start = self.root / self.wedding_prefix / partition
            if not start.is_dir():
                return
        for folder, dirs, names in os.walk(start, followlinks=False):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(folder, name)
                rel = self._rel(full)
                if partition is not None and partition_of(rel, self.wedding_prefix) != partition:
                    continue
                try:
                    st = os.lstat(full)
                except OSError as exc:
                    self.refused.append((rel, f"cannot stat: {exc.strerror}"))
                    continue
                if not stat.S_ISREG(st.st_mode):
                    self.refused.append((rel, "not a regular file (symbolic link or device): not followed"))
                    continue
                yield SourceObject(rel, st.st_size, None, None, str(st.st_mtime_ns))

    @contextmanager
    def open(self, obj: SourceObject) -> Iterator[CheckedStream]:
        full = self.root / os.fsencode(obj.path).decode("utf-8", "surrogateescape")
        try:
            fh = open(full, "rb", buffering=0)
        except FileNotFoundError:
            raise SourceChanged(f"{obj.path!r}: disappeared after it was listed") from None
        except OSError as exc:
            raise SourceUnreadable(f"{obj.path!r}: cannot be read: {exc.strerror}") from None
        with fh:
            before = os.fstat(fh.fileno())
            if str(before.st_mtime_ns) != obj.mtime or before.st_size != obj.size:
                raise SourceChanged(f"{obj.path!r}: changed after it was listed")
            stream = CheckedStream(fh, obj)
            yield stream
            after = os.fstat(fh.fileno())
            if (after.st_mtime_ns, after.st_size, after.st_ino) != (before.st_mtime_ns, before.st_size, before.st_ino):
                raise SourceChanged(f"{obj.path!r}: changed while being read")


class S3Source:
    """An S3-compatible bucket. Reads are pinned to the listed ETag (`IfMatch`), so a GET after an overwrite
    fails instead of mixing versions; a single-part ETag (an MD5) is also checked against the bytes."""

    def __init__(self, client: Any, bucket: str, prefix: str = "", wedding_prefix: str = DEFAULT_WEDDING_PREFIX):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.wedding_prefix = wedding_prefix
        self.description = f"s3://{bucket}/{self.prefix}"

    def list(self, partition: str | None = None) -> Iterator[SourceObject]:
        sub = "" if partition in (None, PLATFORM) else f"{self.wedding_prefix}{partition}/"
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + sub):
            for item in page.get("Contents", []):
                rel = item["Key"][len(self.prefix):]
                if partition is not None and partition_of(rel, self.wedding_prefix) != partition:
                    continue
                # Size and ETag say whether an object changed; its LastModified does not (a restore that
                # puts the same bytes back is the same object), so it is not compared.
                yield SourceObject(rel, int(item["Size"]), (item.get("ETag") or "").strip('"') or None, None, None)

    @contextmanager
    def open(self, obj: SourceObject) -> Iterator[CheckedStream]:
        from botocore.exceptions import BotoCoreError, ClientError

        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.prefix + obj.path}
        if obj.etag:
            kwargs["IfMatch"] = f'"{obj.etag}"'
        try:
            body = self.client.get_object(**kwargs)["Body"]
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in {"NoSuchKey", "404", "NotFound"}:
                raise SourceChanged(f"{obj.path!r}: disappeared after it was listed") from None
            if code in {"PreconditionFailed", "412"}:
                raise SourceChanged(f"{obj.path!r}: changed after it was listed (ETag differs)") from None
            raise SourceUnreadable(f"{obj.path!r}: cannot be read: {code or type(exc).__name__}") from None
        except BotoCoreError as exc:
            raise SourceUnreadable(f"{obj.path!r}: cannot be read: {type(exc).__name__}") from None
        single_part = bool(obj.etag) and "-" not in obj.etag and len(obj.etag) == 32
        try:
            yield CheckedStream(body, obj, md5=single_part)
        finally:
            body.close()

    # S3's limit for one PUT; bigger restored objects go up in parts.
    single_put_max = 5 << 30

    def put(self, path: str, fileobj: BinaryIO, sha256_b64: str, size: int) -> None:
        """Write one restored object (restore to a bucket). One PUT carries the whole object's SHA-256 and S3
        refuses bytes that do not match it; a larger object goes up in parts, each with its own SHA-256 that
        S3 checks (the whole file's was checked against the snapshot before the upload)."""
        if size <= self.single_put_max:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + path, Body=fileobj,
                                   ChecksumSHA256=sha256_b64)
            return
        from boto3.s3.transfer import TransferConfig

        part = max(8 << 20, -(-size // 9000))  # S3 allows 10,000 parts
        self.client.upload_fileobj(fileobj, self.bucket, self.prefix + path,
                                   ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                                   Config=TransferConfig(multipart_threshold=part, multipart_chunksize=part))


def source_from_env(environ: Mapping[str, str] | None = None) -> MediaSource | None:
    """The configured media source, or None when WEDBACKUP_MEDIA_SOURCE is unset (media is not backed up)."""
    env = os.environ if environ is None else environ
    text = (env.get(MEDIA_SOURCE_ENV) or "").strip()
    if not text:
        return None
    wedding_prefix = (env.get("WEDBACKUP_MEDIA_WEDDING_PREFIX") or DEFAULT_WEDDING_PREFIX).strip("/") + "/"
    if text.startswith("s3://"):
        bucket, _, prefix = text[5:].partition("/")
        if not bucket:
            raise ConfigError(MEDIA_SOURCE_ENV, "an s3:// source needs a bucket: s3://bucket/prefix")
        return S3Source(media_s3_client(env), bucket, prefix, wedding_prefix)
    if "://" in text:
        raise ConfigError(MEDIA_SOURCE_ENV, "must be s3://bucket/prefix or a directory path")
    return DirectorySource(Path(text), wedding_prefix)


def media_s3_client(env: Mapping[str, str]) -> Any:
    """The media bucket's client: its own endpoint and keys when set (WEDBACKUP_MEDIA_S3_*), else the
    replica S3's endpoint and AWS_* keys."""
    import boto3

    from wedbackup_dagster.core.storage.replicas.s3 import client_config

    endpoint = env.get("WEDBACKUP_MEDIA_S3_ENDPOINT_URL") or env.get("WEDBACKUP_S3_ENDPOINT_URL") or None
    return boto3.client(
        "s3", endpoint_url=endpoint,
        region_name=env.get("WEDBACKUP_MEDIA_S3_REGION") or env.get("WEDBACKUP_S3_REGION") or "eu-west-1",
        aws_access_key_id=env.get("WEDBACKUP_MEDIA_AWS_ACCESS_KEY_ID") or env.get("AWS_ACCESS_KEY_ID") or None,
        aws_secret_access_key=(env.get("WEDBACKUP_MEDIA_AWS_SECRET_ACCESS_KEY") or env.get("AWS_SECRET_ACCESS_KEY")
                               or None),
        config=client_config())
