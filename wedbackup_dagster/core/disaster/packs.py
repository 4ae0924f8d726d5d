"""DR packs: the newest verified archive of every wedding, concatenated into a few large objects per provider,
so that `restore --all` and the drills read a whole platform from a provider in tens of requests instead of one
per wedding (pgBackRest's `repo-bundle` does the same for small files). A pack is a speed copy, never a copy
that counts: the catalogue does not record it, the 3-2-1 checks do not count it, and restore falls back to each
wedding's own object for anything a pack lacks, holds stale, or holds damaged.

Layout at a provider, under its prefix:
  dr-packs/segments/<sha256>.pack      archives back to back, each byte for byte the sealed archive (so still
                                       sealed with its wedding's key: an erased wedding's bytes stay unreadable)
  dr-packs/index/<stamp>-<sha256>.json which archive lies where; written last, so a pack exists once its index
                                       does (a build that dies part-way leaves only unreferenced segments)

Nothing read from a pack is trusted: each archive's bytes are checked against the SHA-256 the catalogue recorded
when it was backed up (an independent path), every segment against the SHA-256 in its key, every index against
the one in its name. A pack is built (pack_build.py) from the vault's copies (a provider's where the vault lacks
one), each checked against the catalogue as it is read. Segments are content-addressed and end at weddings
chosen by a hash of their id, so a wedding added or changed changes the segments around it and not the others,
and a rebuild uploads only what changed. Each build keeps the newest KEEP packs at each provider and deletes
what no kept pack references. This module is the format and how restore --all, pruning and erasure read it."""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, BinaryIO

from wedbackup_dagster.core.errors import (ArchiveError, ReplicaChecksumMismatch, ReplicaError,
                                           WedbackupError)
from wedbackup_dagster.core.partitions import is_partition
from wedbackup_dagster.core.storage.replicas.base import HashingWriter, check_key, stored_keys

PACK_DIR = "dr-packs"
SEGMENT_DIR = "segments"
INDEX_DIR = "index"
PACK_PARTITION = "dr-pack"  # what a pack object's `partition` metadata says (no wedding's: it holds many)
FORMAT = 1
KEEP = 2  # packs kept at each provider: the newest and the one before it
SEGMENT_BYTES = 8 << 20  # a segment ends once it holds about this much …
SEGMENT_WEDDINGS = 128  # … or this many archives …
BOUNDARY_EVERY = 32  # … or after a wedding whose id hashes to 0 modulo this (about 32 weddings a segment)
INDEX_MAX_BYTES = 64 << 20  # an index is read whole: a larger one (about 600,000 weddings) is refused, not read
YOUNG = timedelta(hours=1)  # an unreferenced segment younger than this may belong to a build still running

_INDEX_NAME = re.compile(r"(\d{8}T\d{12}Z)-([0-9a-f]{64})\.json")
_SEGMENT_NAME = re.compile(r"([0-9a-f]{64})\.pack")
_SHA256 = re.compile(r"[0-9a-f]{64}")

Progress = Callable[[str], None]


def quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Entry:
    """One archive inside a segment."""

    partition: str
    archive_sha256: str
    offset: int
    size: int


@dataclass(frozen=True)
class Segment:
    key: str
    sha256: str
    size: int
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class Pack:
    """One pack at one provider, as its index describes it (checked for shape, not yet for content)."""

    provider: str
    index_key: str
    created_at: str
    segments: tuple[Segment, ...]

    def locate(self) -> dict[str, tuple[Segment, Entry]]:
        """archive SHA-256 -> where it lies."""
        return {e.archive_sha256: (s, e) for s in self.segments for e in s.entries}


# --- keys ---------------------------------------------------------------------------------------------

def segment_key(replica: Any, sha256: str) -> str:
    return check_key(replica.provider, replica.prefix, f"{replica.prefix}/{PACK_DIR}/{SEGMENT_DIR}/{sha256}.pack")


def index_key(replica: Any, stamp: str, sha256: str) -> str:
    return check_key(replica.provider, replica.prefix,
                     f"{replica.prefix}/{PACK_DIR}/{INDEX_DIR}/{stamp}-{sha256}.json")


def stamp_of(when: datetime) -> str:
    """A sortable UTC stamp with microseconds: two builds never share one name."""
    return when.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def ends_segment(partition: str) -> bool:
    """Whether a segment ends after this wedding: chosen by its id alone, so boundaries stay put when other
    weddings are added or change."""
    return int(hashlib.sha256(partition.encode()).hexdigest()[:8], 16) % BOUNDARY_EVERY == 0


# --- the index ----------------------------------------------------------------------------------------

def index_document(created_at: str, segments: list[Segment]) -> bytes:
    return json.dumps({"format": FORMAT, "created_at": created_at, "segments": [
        {"key": s.key, "sha256": s.sha256, "size": s.size,
         "entries": [[e.partition, e.archive_sha256, e.offset, e.size] for e in s.entries]}
        for s in segments]}, separators=(",", ":")).encode()


# --- reading ------------------------------------------------------------------------------------------

def _indexes(replica: Any) -> list[tuple[str, str, str]]:
    """(stamp, sha256, key) of every index at the provider, newest first."""
    return [(stamp, sha, key) for stamp, sha, key, _ in _listed_indexes(replica)]


def _listed_indexes(replica: Any) -> list[tuple[str, str, str, int]]:
    found = []
    for listed in replica.list(f"{PACK_DIR}/{INDEX_DIR}/"):
        m = _INDEX_NAME.fullmatch(listed.key.rsplit("/", 1)[-1])
        if m:
            found.append((m.group(1), m.group(2), listed.key, int(listed.size)))
    return sorted(found, reverse=True)


class PackIndexError(WedbackupError):
    """An index that is not a well-formed index of ours (damaged, hostile, or of another format): unusable."""


_MAX_INT = 1 << 62  # offsets and sizes above this are no segment's


def _count(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < _MAX_INT:  # not a bool, a float, a string, or out of range
        raise ValueError(f"{what} {str(value)[:40]!r} is not a byte count")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number an index holds")


def parse_index(replica: Any, key: str, data: bytes) -> Pack:
    """An index's bytes as a Pack, its shape checked throughout: any value of the wrong type or range, an
    entry outside its segment or overlapping another, a segment key that is not its content address, is a
    PackIndexError naming the index (a pack is a hint: anything odd makes it unusable, never a restore wrong)."""
    try:
        doc = json.loads(data, parse_constant=_no_constant)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if type(doc.get("format")) is not int or doc["format"] != FORMAT:
            raise ValueError(f"format {str(doc.get('format'))[:20]!r}, not {FORMAT}")
        if not isinstance(doc.get("segments"), list) or not isinstance(doc.get("created_at"), str):
            raise ValueError("no list of segments, or no time it was made")
        segments, seen = [], set()
        for s in doc["segments"]:
            skey, ssha, size = s["key"], s["sha256"], _count(s["size"], "segment size")
            if not (isinstance(ssha, str) and _SHA256.fullmatch(ssha)) or skey != segment_key(replica, ssha):
                raise ValueError(f"segment key {str(skey)[:80]!r} is not the content address of {str(ssha)[:64]!r}")
            if ssha in seen:
                raise ValueError(f"segment {ssha[:12]}… is listed twice")
            seen.add(ssha)
            entries, end = [], 0
            for partition, sha, offset, length in s["entries"]:
                if not (isinstance(partition, str) and is_partition(partition) and isinstance(sha, str)
                        and _SHA256.fullmatch(sha)):
                    raise ValueError(f"entry {str(partition)[:70]!r} / {str(sha)[:70]!r} is malformed")
                offset, length = _count(offset, "offset"), _count(length, "length")
                if not (end <= offset and length > 0 and offset + length <= size):
                    raise ValueError(f"entry of wedding {partition} lies outside its segment or overlaps another")
                end = offset + length
                entries.append(Entry(partition, sha, offset, length))
            segments.append(Segment(skey, ssha, size, tuple(entries)))
        return Pack(replica.provider, key, doc["created_at"][:64], tuple(segments))
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError, WedbackupError) as exc:
        raise PackIndexError(f"DR pack index {key}: {str(exc)[:200] or type(exc).__name__}") from None


def _read_index(replica: Any, key: str, sha256: str) -> Pack:
    """The index at `key`, its bytes checked against the SHA-256 in its name (a provider's failure raises as
    the provider's error), then parsed (parse_index: a PackIndexError)."""
    with tempfile.SpooledTemporaryFile(max_size=16 << 20) as tmp:
        try:
            replica.download(key, tmp, expected_sha256=sha256)
        except ReplicaChecksumMismatch as exc:
            raise PackIndexError(f"DR pack index {key}: {str(exc)[:200]}") from None
        tmp.seek(0)
        data = tmp.read(INDEX_MAX_BYTES + 1)
    if len(data) > INDEX_MAX_BYTES:
        raise PackIndexError(f"DR pack index {key}: more than the {INDEX_MAX_BYTES:,} bytes an index may have")
    return parse_index(replica, key, data)


def newest_pack(replica: Any) -> tuple[Pack | None, list[str]]:
    """The provider's newest usable pack, and a note for each newer one that was not usable (None and the
    notes when it has none). Listing failures are notes too: restore goes on without a pack."""
    notes: list[str] = []
    try:
        indexes = _listed_indexes(replica)
    except Exception as exc:  # noqa: BLE001 - as above
        return None, [f"{replica.provider}: DR packs could not be listed: {str(exc)[:300]}"]
    for _, sha, key, size in indexes:
        if size > INDEX_MAX_BYTES:
            notes.append(f"{replica.provider}: DR pack not used: its index {key} has {size:,} bytes, more than "
                         f"the {INDEX_MAX_BYTES:,} an index may have")
            continue
        try:
            return _read_index(replica, key, sha), notes
        except Exception as exc:  # noqa: BLE001 - a pack is a hint: whatever is wrong with it, restore goes on
            notes.append(f"{replica.provider}: DR pack not used: {str(exc)[:300] or type(exc).__name__}")
    return None, notes


def plan(pack: Pack, points: list[Any]) -> tuple[list[tuple[Segment, list[tuple[Any, Entry]]]], list[Any]]:
    """(segments holding some of the points' chosen archives, each with those points and where their archives
    lie; the points no segment holds) — a point is served by a pack only for the very archive it chose."""
    where = pack.locate()
    by_segment: dict[str, tuple[Segment, list[tuple[Any, Entry]]]] = {}
    rest = []
    for point in points:
        found = where.get(point.archive_sha256)
        if found is None or found[1].partition != point.partition:
            rest.append(point)
            continue
        segment, entry = found
        by_segment.setdefault(segment.sha256, (segment, []))[1].append((point, entry))
    return list(by_segment.values()), rest


def download_segment(replica: Any, segment: Segment, dest: BinaryIO) -> None:
    """The segment into `dest`, checked against the SHA-256 in its key."""
    replica.download(segment.key, dest, expected_sha256=segment.sha256)


@contextlib.contextmanager
def archive_from(segment_file: BinaryIO, entry: Entry, expected_sha256: str, name: str) -> Iterator[Any]:
    """One archive cut from a downloaded segment into a temporary file, checked against `expected_sha256` (the
    catalogue's): a stale or damaged entry raises ArchiveError, and the caller reads the wedding's own object."""
    with tempfile.SpooledTemporaryFile(max_size=4 << 20) as tmp:
        out = HashingWriter(tmp)
        try:
            segment_file.seek(entry.offset)
        except (OSError, OverflowError, ValueError) as exc:
            raise ArchiveError(name, f"its place in the DR pack segment cannot be read ({exc})") from None
        left = entry.size
        while left > 0:
            block = segment_file.read(min(1 << 20, left))
            if not block:
                raise ArchiveError(name, "its DR pack segment ended before the archive did")
            out.write(block)
            left -= len(block)
        if out.hexdigest() != expected_sha256:
            raise ArchiveError(name, "its bytes in the DR pack do not match the catalogue's SHA-256")
        tmp.seek(0)
        yield tmp


# --- pruning and erasure ------------------------------------------------------------------------------

def prune(replica: Any, *, keep: int = KEEP, now: datetime | None = None, published: str | None = None) -> int:
    """Delete the provider's indexes beyond the newest `keep` readable ones (never `published`, the index a build
    just wrote, whatever other stamps there are), and damaged ones; then every segment no kept index references,
    but none younger than YOUNG (a build may be uploading it). When an index cannot be read for the provider's
    sake (not for its content), nothing is deleted this time. Returns objects deleted."""
    now = now or datetime.now(timezone.utc)
    kept: list[Pack] = []
    doomed: list[str] = []
    for _, sha, key in _indexes(replica):
        try:
            pack = _read_index(replica, key, sha)
        except PackIndexError:
            doomed.append(key)
            continue
        if len(kept) < keep or key == published:
            kept.append(pack)
        else:
            doomed.append(key)
    for key in doomed:
        replica.delete(key)
    referenced = {s.key for pack in kept for s in pack.segments}
    deleted = len(doomed)
    for listed in replica.list(f"{PACK_DIR}/{SEGMENT_DIR}/"):
        if listed.key in referenced or not _SEGMENT_NAME.fullmatch(listed.key.rsplit("/", 1)[-1]):
            continue
        if listed.modified is not None and now - listed.modified < YOUNG:
            continue
        replica.delete(listed.key)
        deleted += 1
    return deleted


def forget_wedding(replica: Any, partition: str) -> list[str]:
    """An erasure: every pack at the provider naming the wedding deleted — its index, then the segments
    holding the wedding's archives (sealed with a key already destroyed, but not left behind). A damaged index
    is deleted too (it may name the wedding), and so is every segment no remaining index references, whatever
    its age (a crashed build's, a damaged index's: either may hold the wedding; a build still uploading loses
    them, and its pack then serves fewer weddings, read from their own objects). Keys are listed with their
    old versions where the provider keeps them. A provider that fails raises (the erasure reports it and a
    re-run finishes). The other weddings of those packs are read from their own objects until the next build.
    Returns what was deleted."""
    deleted = []
    referenced: set[str] = set()
    for key in sorted(stored_keys(replica, f"{PACK_DIR}/{INDEX_DIR}/"), reverse=True):
        m = _INDEX_NAME.fullmatch(key.rsplit("/", 1)[-1])
        if m is None:
            continue
        try:
            pack = _read_index(replica, key, m.group(2))
        except PackIndexError:
            pack = None
        except ReplicaError:
            if replica.head(key) is not None:
                raise  # there, and not readable now: try again later
            pack = None  # only older versions under a delete marker: nothing to read, delete them
        if pack is None or any(e.partition == partition for s in pack.segments for e in s.entries):
            replica.delete(key)
            deleted.append(key)
        else:
            referenced |= {s.key for s in pack.segments}
    for key in sorted(stored_keys(replica, f"{PACK_DIR}/{SEGMENT_DIR}/")):
        if key not in referenced and _SEGMENT_NAME.fullmatch(key.rsplit("/", 1)[-1]):
            replica.delete(key)
            deleted.append(key)
    return deleted
