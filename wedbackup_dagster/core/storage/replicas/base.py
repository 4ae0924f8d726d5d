"""What every replica shares: the record of an uploaded copy, content-addressed object keys that cannot
leave their prefix, one-pass file digests (one read serving every provider of a run), hashing streams, and
provider errors scrubbed of secrets."""
from __future__ import annotations

import base64
import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

import google_crc32c

from wedbackup_dagster.core.config import redact
from wedbackup_dagster.core.errors import ArchiveError, ReplicaChecksumMismatch, ReplicaError, ReplicaKeyRejected
from wedbackup_dagster.core.partitions import PLATFORM, is_partition, shown

ARCHIVE_SUFFIX = ".wbk"
CANARY_DIR = "_canary"
KEY_BACKUP_DIR = "keys"  # encrypted key-store backups: <prefix>/keys/<sha256>.wbk (core/keys/backup.py)
KEY_BACKUP_METADATA_PARTITION = "key-store"  # what a key backup's `partition` metadata says
READ_BLOCK = 1 << 20  # one MiB: the most any replica holds of an archive per read

_SHA256 = re.compile(r"[0-9a-f]{64}")
# Azure metadata names must be C# identifiers, the strictest of the three providers, so a '-' in a name
# becomes '_' everywhere: the same archive carries the same metadata at every provider.
_META_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_META_VALUE = re.compile(r"[\x20-\x7e]{0,256}")
_KEY_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,255}")
_RESERVED_METADATA = frozenset({"sha256", "partition"})

ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class ReplicaRecord:
    """One copy of a sealed archive at one provider: what the catalogue and the Dagster UI record."""

    provider: str
    uri: str
    key: str
    version_id: str | None
    size: int
    sha256: str
    provider_checksum: str
    storage_class: str
    region: str | None
    media: str
    offsite: bool
    already_present: bool
    # Set when an object with other content sat at the key and was replaced: the note says what was found.
    repaired: bool = False
    note: str = ""
    etag: str | None = None
    # Object Lock (S3): the copy cannot be deleted before locked_until (mode governance or compliance).
    locked_until: datetime | None = None
    lock_mode: str | None = None


@dataclass(frozen=True)
class ListedObject:
    """An object seen in a provider listing (for inventory); nothing in it has been verified."""

    provider: str
    uri: str
    key: str
    size: int
    version_id: str | None
    storage_class: str | None
    modified: datetime | None
    partition: str | None
    sha256: str | None  # from the content-addressed key, when the key is one of ours


@runtime_checkable
class Replica(Protocol):
    provider: str

    def object_key(self, wedding_partition: str, sha256: str) -> str: ...

    def digests_needed(self, size: int) -> DigestNeeds: ...

    def abort_abandoned_uploads(self) -> None:
        """Drop the parts of uploads whose process died; an upload step calls it once. Only S3 keeps them
        (until aborted); GCS and Azure drop unfinished uploads themselves, so theirs does nothing."""

    def upload(self, path: Path, *, partition: str, sha256: str, size: int, metadata: dict[str, str],
               progress: ProgressCallback | None = None, digests: FileDigests | None = None) -> ReplicaRecord: ...

    def head(self, key: str) -> ReplicaRecord | None: ...

    def download(self, key: str, dest: BinaryIO, *, expected_sha256: str | None = None) -> int: ...

    def delete(self, key: str) -> None: ...

    def list(self, prefix: str = "") -> Iterator[ListedObject]: ...

    def canary(self) -> float: ...


# ---------------------------------------------------------------------------------------- HTTP sessions


@dataclass(frozen=True)
class EnvironmentHTTP:
    """What the environment asks of the requests sessions under the GCS and Azure clients. A session with
    `trust_env` reads it again on every request (proxies and NO_PROXY, ~/.netrc, the CA bundle variables: a
    scan of os.environ and a stat or two per request, under the GIL); when no proxy and no netrc is
    configured, the clients read it once here instead (`lean`), with the CA bundle the variables name."""

    lean: bool
    ca_bundle: str | None


def environment_http(environ: dict[str, str] | None = None) -> EnvironmentHTTP:
    env = os.environ if environ is None else environ
    # Any *_proxy variable set (http, https, all...; NO_PROXY alone names no proxy), as requests reads them.
    proxies = [k for k, v in env.items() if k.lower().endswith("_proxy") and k.lower() != "no_proxy" and v]
    netrc = env.get("NETRC") or os.path.exists(os.path.expanduser("~/.netrc")) or os.path.exists(
        os.path.expanduser("~/_netrc"))
    bundle = env.get("REQUESTS_CA_BUNDLE") or env.get("CURL_CA_BUNDLE") or None
    return EnvironmentHTTP(lean=not proxies and not netrc, ca_bundle=bundle)


def lean_session(session: object, environ: dict[str, str] | None = None) -> None:
    """A requests session that no longer reads the environment per request, when `environment_http` says
    nothing there needs it (proxies or a netrc: left as it is, reading the environment as before)."""
    http = environment_http(environ)
    if http.lean:
        session.trust_env = False  # type: ignore[attr-defined]
        if http.ca_bundle and getattr(session, "verify", None) is True:
            session.verify = http.ca_bundle  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- keys


def validate_partition(provider: str, partition: str) -> str:
    if not is_partition(partition):
        raise ReplicaKeyRejected(provider, f"partition {shown(partition)} is not 'platform' or [A-Za-z0-9_-]{{1,64}}")
    return partition


def validate_sha256(provider: str, sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ReplicaKeyRejected(provider, f"sha256 {shown(sha256)} is not 64 lower-case hex digits")
    return sha256


def archive_key(provider: str, prefix: str, partition: str, sha256: str) -> str:
    """The content-addressed key of a sealed archive; the same archive always lands on the same key."""
    validate_partition(provider, partition)
    validate_sha256(provider, sha256)
    if partition == PLATFORM:
        return f"{prefix}/{PLATFORM}/{sha256}{ARCHIVE_SUFFIX}"
    return f"{prefix}/weddings/{partition}/{sha256}{ARCHIVE_SUFFIX}"


def parse_archive_key(prefix: str, key: str) -> tuple[str | None, str | None]:
    """(partition, sha256) of one of our archive keys, or (None, None) for anything else under the prefix."""
    rest = key[len(prefix) + 1:] if key.startswith(prefix + "/") else ""
    parts = rest.split("/")
    name = parts[-1]
    if not name.endswith(ARCHIVE_SUFFIX) or not _SHA256.fullmatch(name[: -len(ARCHIVE_SUFFIX)]):
        return None, None
    sha = name[: -len(ARCHIVE_SUFFIX)]
    if parts[:-1] == [PLATFORM]:
        return PLATFORM, sha
    if len(parts) == 3 and parts[0] == "weddings" and is_partition(parts[1]):
        return parts[1], sha
    return None, None


def key_backup_key(provider: str, prefix: str, sha256: str) -> str:
    """The content-addressed key of an encrypted key-store backup: apart from every archive key, so no
    archive listing, rebuild or inventory mistakes one for a wedding's archive."""
    validate_sha256(provider, sha256)
    return f"{prefix}/{KEY_BACKUP_DIR}/{sha256}{ARCHIVE_SUFFIX}"


def parse_key_backup_key(prefix: str, key: str) -> str | None:
    """The SHA-256 of one of our key-backup keys, or None for anything else."""
    head = f"{prefix}/{KEY_BACKUP_DIR}/"
    name = key[len(head):] if key.startswith(head) else ""
    if not name.endswith(ARCHIVE_SUFFIX) or not _SHA256.fullmatch(name[: -len(ARCHIVE_SUFFIX)]):
        return None
    return name[: -len(ARCHIVE_SUFFIX)]


def upload_key(provider: str, prefix: str, key: str | None, partition: str, sha256: str) -> str:
    """Where an upload goes: the archive's content address, or a caller's key (a key-store backup) that
    must lie inside the prefix."""
    if key is None:
        return archive_key(provider, prefix, partition, sha256)
    return check_key(provider, prefix, key)


def check_key(provider: str, prefix: str, key: str) -> str:
    """A key handed back to us (head, download, delete) must lie inside our prefix, segment by segment."""
    if not isinstance(key, str) or not key.startswith(prefix + "/") or len(key) > 1024:
        raise ReplicaKeyRejected(provider, f"key {shown(key)} is not inside the prefix {prefix!r}")
    for segment in key[len(prefix) + 1:].split("/"):
        if segment in (".", "..") or not _KEY_SEGMENT.fullmatch(segment):
            raise ReplicaKeyRejected(provider, f"key {shown(key)} has an unsafe path segment {shown(segment)}")
    return key


def check_list_prefix(provider: str, prefix: str, sub: str) -> str:
    """`prefix/sub` for listing; `sub` may be empty or end with '/', but never climbs out."""
    if not sub:
        return prefix + "/"
    check_key(provider, prefix, f"{prefix}/{sub.rstrip('/')}")
    return f"{prefix}/{sub}"


def object_metadata(provider: str, partition: str, sha256: str, metadata: dict[str, str]) -> dict[str, str]:
    """Our own stamp (sha256, partition) plus the caller's metadata, restricted to what all providers accept
    ('-' in names stored as '_'); the caller may repeat our own names only with the same values."""
    out = {"sha256": sha256, "partition": partition}
    for name, value in (metadata or {}).items():
        if not isinstance(name, str) or not _META_KEY.fullmatch(name):
            raise ReplicaKeyRejected(provider, f"metadata name {shown(name)} is not [a-z][a-z0-9_-]{{0,62}}")
        if not isinstance(value, str) or not _META_VALUE.fullmatch(value):
            raise ReplicaKeyRejected(provider, f"metadata {name} value {shown(value)} is not printable ASCII "
                                               "of at most 256 characters")
        stored = name.replace("-", "_")
        if stored in out and out[stored] != value:
            what = "is ours" if stored in _RESERVED_METADATA else "is given twice"
            raise ReplicaKeyRejected(provider, f"metadata name {name!r} {what}, with another value {shown(value)}")
        out[stored] = value
    return out


# ------------------------------------------------------------------------------------------ digests


@dataclass(frozen=True)
class FileDigests:
    size: int
    sha256: str  # hex
    md5: bytes | None = None
    crc32c: bytes | None = None  # big-endian, as GCS reports it
    part_size: int | None = None
    part_sha256: tuple[bytes, ...] = field(default=(), repr=False)

    @property
    def sha256_b64(self) -> str:
        return b64(bytes.fromhex(self.sha256))

    def s3_composite(self) -> str:
        """S3's checksum of checksums for a multipart upload with this part size (without the -N suffix)."""
        return b64(hashlib.sha256(b"".join(self.part_sha256)).digest())

    def covers(self, needs: DigestNeeds) -> bool:
        """Whether these digests hold everything `needs` asks for (a part layout must be the same one)."""
        return ((not needs.md5 or self.md5 is not None) and (not needs.crc32c or self.crc32c is not None)
                and (needs.part_size is None or needs.part_size == self.part_size))


@dataclass(frozen=True)
class DigestNeeds:
    """What one provider's upload of an archive needs hashed besides its SHA-256: MD5 (GCS, Azure), CRC32C
    (GCS), S3's per-part SHA-256 for a multipart upload of that part size. The needs of every provider of a
    run are merged (`|`) so each archive is read and hashed once for all of them."""

    md5: bool = False
    crc32c: bool = False
    part_size: int | None = None

    def __or__(self, other: DigestNeeds) -> DigestNeeds:
        if self.part_size and other.part_size and self.part_size != other.part_size:
            raise ValueError(f"two part layouts asked for one archive: {self.part_size} and {other.part_size}")
        return DigestNeeds(md5=self.md5 or other.md5, crc32c=self.crc32c or other.crc32c,
                           part_size=self.part_size or other.part_size)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def digest_file(path: Path, *, md5: bool = False, crc32c: bool = False, part_size: int | None = None) -> FileDigests:
    """Every digest a provider needs, from one streaming read of the archive."""
    sha = hashlib.sha256()
    md = hashlib.md5(usedforsecurity=False) if md5 else None
    crc = google_crc32c.Checksum() if crc32c else None
    parts: list[bytes] = []
    part = hashlib.sha256() if part_size else None
    in_part = 0
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BLOCK if not part_size else min(READ_BLOCK, part_size - in_part))
            if not block:
                break
            size += len(block)
            sha.update(block)
            if md is not None:
                md.update(block)
            if crc is not None:
                crc.update(block)
            if part is not None:
                part.update(block)
                in_part += len(block)
                if in_part == part_size:
                    parts.append(part.digest())
                    part, in_part = hashlib.sha256(), 0
    if part is not None and in_part:
        parts.append(part.digest())
    return FileDigests(size=size, sha256=sha.hexdigest(), md5=md.digest() if md else None,
                       crc32c=crc.digest() if crc else None, part_size=part_size, part_sha256=tuple(parts))


def digest_archive(path: Path, sha256: str, size: int, needs: DigestNeeds) -> FileDigests:
    """The digests `needs` asks for from one read of the vault file, which must be the archive it claims to
    be (its size and SHA-256): an ArchiveError naming the file otherwise, before any provider gets a copy."""
    digests = digest_file(Path(path), md5=needs.md5, crc32c=needs.crc32c, part_size=needs.part_size)
    check_archive_file(Path(path), digests, sha256, size)
    return digests


def digests_for_upload(path: Path, sha256: str, size: int, needs: DigestNeeds,
                       given: FileDigests | None) -> FileDigests:
    """What a replica's upload hashes with: the digests its caller computed once for every provider when they
    cover `needs` (checked against the archive's claimed SHA-256 and size again), else a read of its own."""
    if given is not None and given.covers(needs):
        check_archive_file(Path(path), given, sha256, size)
        return given
    return digest_archive(path, sha256, size, needs)


def check_archive_file(path: Path, digests: FileDigests, sha256: str, size: int) -> None:
    """The vault file must be the archive it claims to be before any provider gets a copy of it."""
    if digests.size != size:
        raise ArchiveError(str(path), f"vault file has {digests.size} bytes, expected {size}")
    if digests.sha256 != sha256:
        raise ArchiveError(str(path), f"vault file's sha256 is {digests.sha256}, expected {sha256}")


def stored_keys(replica: Any, sub: str) -> set[str]:
    """Every object key the provider holds under `sub` (relative to its prefix), noncurrent versions and keys
    under a delete marker included where the replica can list them (`version_keys`: S3, GCS, Azure); else the
    live objects. What an erasure must find."""
    lister = getattr(replica, "version_keys", None)
    if lister is not None:
        return set(lister(sub))
    return {o.key for o in replica.list(sub)}


class HashingWriter:
    """Passes writes through to `dest` while hashing them, so a download is verified as it streams."""

    def __init__(self, dest: BinaryIO):
        self._dest = dest
        self._sha = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes) -> int:
        self._sha.update(data)
        self.count += len(data)
        self._dest.write(data)
        return len(data)

    def tell(self) -> int:
        return self.count

    def flush(self) -> None:
        flush = getattr(self._dest, "flush", None)
        if flush:
            flush()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class ProgressReader:
    """A read-only file wrapper that reports every chunk read (progress bars, and failure injection in tests)."""

    def __init__(self, raw: BinaryIO, progress: ProgressCallback | None):
        self._raw = raw
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if data and self._progress:
            self._progress(len(data))
        return data

    def readinto(self, buffer) -> int:  # noqa: ANN001 - any writable buffer
        n = self._raw.readinto(buffer)
        if n and self._progress:
            self._progress(n)
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


def read_blocks(f: BinaryIO, total: int, block_size: int) -> Iterator[bytes]:
    """`total` bytes of `f` in blocks of at most `block_size`; a short file is an error, not a short upload."""
    remaining = total
    while remaining:
        want = min(block_size, remaining)
        chunks, got = [], 0
        while got < want:
            data = f.read(want - got)
            if not data:
                raise EOFError(f"file ended {remaining - got} bytes early")
            chunks.append(data)
            got += len(data)
        remaining -= want
        yield b"".join(chunks) if len(chunks) > 1 else chunks[0]


# ------------------------------------------------------------------------------------------- errors

_SECRET_PAIRS = re.compile(
    r"(?i)\b(AccountKey|SharedAccessSignature|sig|se|sp|sv|skoid|sktid|X-Amz-Signature|X-Amz-Credential|"
    r"X-Amz-Security-Token|Signature|AWSAccessKeyId|access_token|token)=([^;&\s\"']+)")
_BEARER = re.compile(r"(?i)\b(Bearer|SharedKey|AWS4-HMAC-SHA256)\s+[^\s\"']+")


def scrub(text: str, secrets: Iterable[str | None] = ()) -> str:
    """The text with every known secret and anything shaped like a credential replaced by ***."""
    out = redact(text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            out = out.replace(secret, "***")
    out = _SECRET_PAIRS.sub(lambda m: f"{m.group(1)}=***", out)
    return _BEARER.sub(lambda m: f"{m.group(1)} ***", out)


def provider_error(provider: str, key: str | None, action: str, exc: BaseException,
                   secrets: Iterable[str | None] = ()) -> ReplicaError:
    """A ReplicaError for a failed provider call: names provider, key and action; the SDK's text is scrubbed."""
    text = " ".join(str(exc).split())
    if len(text) > 400:
        text = text[:397] + "..."
    return ReplicaError(provider, key, scrub(f"{action} failed: {type(exc).__name__}: {text}", secrets))


def canary_round(provider: str, prefix: str, *, write: Callable[[str, bytes], object],
                 read: Callable[[str], bytes], delete: Callable[[str], None],
                 fail: Callable[[str, str, BaseException], ReplicaError],
                 errors: tuple[type[BaseException], ...] = (Exception,)) -> float:
    """One canary round at a provider: write a tiny new object under `<prefix>/_canary/`, read it back,
    delete it; the seconds it took. A provider's refusal (`errors`) becomes `fail(key, action, exc)`, a
    ProviderError naming the provider and the key; a failed read still deletes the canary if it can."""
    key = f"{prefix}/{CANARY_DIR}/{uuid.uuid4().hex}.txt"
    payload = f"wedbackup canary {time.time()}".encode()
    start = time.monotonic()
    try:
        write(key, payload)
    except errors as exc:
        raise fail(key, "canary write", exc) from None
    try:
        got = read(key)
    except errors as exc:
        error = fail(key, "canary read", exc)
        try:
            delete(key)
        except ReplicaError:
            pass  # a leftover canary is harmless; the read failure is the one to report
        raise error from None
    delete(key)
    if got != payload:
        raise ReplicaChecksumMismatch(provider, key, "canary read back different bytes")
    return time.monotonic() - start
