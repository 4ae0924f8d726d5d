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
the one in its name. A pack is built from the vault's copies (a provider's where the vault lacks one), each
checked against the catalogue as it is read. Segments are content-addressed and end at weddings chosen by a hash
of their id, so a wedding added or changed changes the segments around it and not the others, and a rebuild
uploads only what changed. Each build keeps the newest KEEP packs at each provider and deletes what no kept
pack references."""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO

from wedbackup_dagster.core.errors import WedbackupError
from wedbackup_dagster.core.partitions import PLATFORM, is_partition
from wedbackup_dagster.core.storage.replicas.base import check_key, digest_file

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


@dataclass
class PackReport:
    """What a build did: archives packed, what was left to its own objects and why, per provider."""

    created_at: str
    weddings: int = 0
    segments: int = 0
    bytes: int = 0
    left_out: dict[str, str] = field(default_factory=dict)  # partition -> why it is not in the pack
    uploaded: dict[str, int] = field(default_factory=dict)  # provider -> segments written now
    already_there: dict[str, int] = field(default_factory=dict)  # provider -> segments a rebuild found in place
    published: dict[str, str] = field(default_factory=dict)  # provider -> the new index's key
    failed: dict[str, str] = field(default_factory=dict)  # provider -> why its pack was not published
    pruned: dict[str, int] = field(default_factory=dict)  # provider -> older objects deleted
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and bool(self.published)

    def to_dict(self) -> dict[str, Any]:
        return {"created_at": self.created_at, "weddings": self.weddings, "segments": self.segments,
                "bytes": self.bytes, "left_out": dict(list(sorted(self.left_out.items()))[:50]),
                "left_out_count": len(self.left_out), "uploaded": self.uploaded, "already_there": self.already_there,
                "published": self.published, "failed": self.failed, "pruned": self.pruned, "seconds": self.seconds}

    def lines(self) -> list[str]:
        out = [f"DR pack {self.created_at}: {self.weddings} wedding archive(s) in {self.segments} segment(s), "
               f"{self.bytes:,} bytes, {self.seconds:.1f} s"]
        for provider in sorted(set(self.published) | set(self.failed)):
            if provider in self.published:
                out.append(f"  {provider}: published {self.published[provider]} ({self.uploaded.get(provider, 0)} "
                           f"segment(s) written, {self.already_there.get(provider, 0)} already there; "
                           f"{self.pruned.get(provider, 0)} older object(s) deleted)")
            else:
                out.append(f"  {provider}: NOT PUBLISHED: {self.failed[provider]}")
        for partition, why in list(sorted(self.left_out.items()))[:20]:
            out.append(f"  left to its own objects: wedding {partition}: {why}")
        if len(self.left_out) > 20:
            out.append(f"  … and {len(self.left_out) - 20} more wedding(s) left to their own objects")
        return out


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


# --- building -----------------------------------------------------------------------------------------

def chosen_points(engine: Any, as_of: datetime) -> tuple[list[Any], dict[str, str]]:
    """(each wedding's newest verified recovery point at or before `as_of`, in restore order; weddings without
    one, with why) — what restore --all would choose."""
    from .restore_all import all_recovery_points, planned_partitions
    from wedbackup_dagster.core.postgres.restore_wedding import NoRecoveryPointError, choose_point

    weddings, _ = planned_partitions(engine.catalogue)
    every = all_recovery_points(engine.catalogue)
    points, left_out = [], {}
    for wedding in weddings:
        try:
            points.append(choose_point(every.get(wedding, []), wedding, as_of))
        except NoRecoveryPointError as exc:
            left_out[wedding] = str(exc)
    return points, left_out


def _copy_archive(engine: Any, backup: Any, replicas: Mapping[str, Any], out: BinaryIO) -> None:
    """The archive appended to `out`, checked against the catalogue's SHA-256: the vault's copy, or (the vault
    lost, or its copy damaged) the first provider's that downloads and matches."""
    problems = []
    if engine.vault.get(backup.partition, backup.archive_sha256) is not None:
        start = out.tell()
        try:
            engine.copy_from_vault(backup, out)  # checked on the bytes written
            return
        except (WedbackupError, OSError) as exc:
            out.seek(start)
            out.truncate()
            problems.append(f"vault: {str(exc)[:200]}")
    for copy in engine.catalogue.copies(backup.id):
        if copy.provider not in replicas:
            continue
        with tempfile.SpooledTemporaryFile(max_size=4 << 20) as tmp:
            try:
                engine.download_copy(replicas[copy.provider], copy.object_key, tmp, backup)
            except (WedbackupError, OSError) as exc:
                problems.append(f"{copy.provider}: {str(exc)[:200]}")
                continue
            tmp.seek(0)
            shutil.copyfileobj(tmp, out, 1 << 20)
            return
    raise WedbackupError("no copy could be packed: " + ("; ".join(problems) or "none in the vault or at "
                                                         + (", ".join(sorted(replicas)) or "any provider")))


def _write_segments(engine: Any, points: list[Any], replicas: Mapping[str, Any], folder: Path,
                    report: PackReport, progress: Progress) -> list[tuple[Path, Segment]]:
    """The chosen archives into segment files in `folder`, each checked against the catalogue's SHA-256 as it
    is copied (an archive no copy of which matches is left out, never packed)."""
    backups = engine.catalogue.backups_by_sha([p.archive_sha256 for p in points], manifests=False)
    written: list[tuple[Path, Segment]] = []
    entries: list[Entry] = []
    path = folder / f"segment-{len(written)}"
    out = open(path, "wb")

    def close() -> None:
        nonlocal out, entries, path
        out.close()
        if entries:
            sha = digest_file(path).sha256
            written.append((path, Segment("", sha, path.stat().st_size, tuple(entries))))
            progress(f"DR pack: segment {len(written)}, {len(entries)} archive(s), {path.stat().st_size:,} bytes")
        else:
            path.unlink()
        entries = []
        path = folder / f"segment-{len(written)}"
        out = open(path, "wb")

    try:
        for point in points:
            backup = backups.get(point.archive_sha256)
            if backup is None:
                report.left_out[point.partition] = "its backup left the catalogue while the pack was built"
                continue
            offset = out.tell()
            try:
                _copy_archive(engine, backup, replicas, out)
            except (WedbackupError, OSError) as exc:
                out.seek(offset)
                out.truncate()
                report.left_out[point.partition] = str(exc)[:300]
                continue
            entries.append(Entry(point.partition, point.archive_sha256, offset, out.tell() - offset))
            if len(entries) >= SEGMENT_WEDDINGS or out.tell() >= SEGMENT_BYTES or ends_segment(point.partition):
                close()
        close()
    finally:
        out.close()
    return written


def _index_document(created_at: str, segments: list[Segment]) -> bytes:
    return json.dumps({"format": FORMAT, "created_at": created_at, "segments": [
        {"key": s.key, "sha256": s.sha256, "size": s.size,
         "entries": [[e.partition, e.archive_sha256, e.offset, e.size] for e in s.entries]}
        for s in segments]}, separators=(",", ":")).encode()


def build_pack(engine: Any, replicas: Mapping[str, Any], *, as_of: datetime | None = None,
               progress: Progress = quiet) -> PackReport:
    """Build a pack of every wedding's newest verified archive (at or before `as_of`, default now) from the
    vault (a provider's copy where the vault has none that matches), and publish it at every provider of
    `replicas`: its segments first, its index last; then the provider's packs beyond the newest KEEP deleted.
    A provider that fails gets no new index (its older packs stay as they were); the others are published."""
    started = time.perf_counter()
    when = as_of or datetime.now(timezone.utc)
    report = PackReport(when.isoformat())
    points, report.left_out = chosen_points(engine, when)
    folder = engine.vault.root if engine.vault.root.exists() else None
    with tempfile.TemporaryDirectory(prefix="wedbackup-dr-pack-", dir=folder) as work:
        written = _write_segments(engine, points, replicas, Path(work), report, progress)
        report.weddings = sum(len(s.entries) for _, s in written)
        report.segments = len(written)
        report.bytes = sum(s.size for _, s in written)
        for provider, replica in sorted(replicas.items()):
            try:
                report.published[provider] = _publish(replica, written, report, when, Path(work))
            except WedbackupError as exc:
                report.failed[provider] = str(exc)[:300]
                progress(f"DR pack: {provider}: not published: {str(exc)[:300]}")
                continue
            try:
                report.pruned[provider] = prune(replica)
            except WedbackupError as exc:
                progress(f"DR pack: {provider}: older packs not pruned: {str(exc)[:300]}")
    report.seconds = round(time.perf_counter() - started, 3)
    engine.catalogue.audit("dr-pack", PLATFORM, {k: v for k, v in report.to_dict().items() if k != "left_out"})
    return report


def _publish(replica: Any, written: list[tuple[Path, Segment]], report: PackReport, when: datetime,
             work: Path) -> str:
    provider = replica.provider
    segments = []
    for path, segment in written:
        key = segment_key(replica, segment.sha256)
        record = replica.upload(path, partition=PACK_PARTITION, sha256=segment.sha256, size=segment.size,
                                metadata={"kind": "wedbackup-dr-pack"}, key=key)
        counter = report.already_there if record.already_present else report.uploaded
        counter[provider] = counter.get(provider, 0) + 1
        segments.append(Segment(key, segment.sha256, segment.size, segment.entries))
    document = _index_document(when.isoformat(), segments)
    sha = hashlib.sha256(document).hexdigest()
    path = work / f"index-{provider}.json"
    path.write_bytes(document)
    key = index_key(replica, stamp_of(when), sha)
    replica.upload(path, partition=PACK_PARTITION, sha256=sha, size=len(document),
                   metadata={"kind": "wedbackup-dr-pack-index"}, key=key)
    return key


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


def _read_index(replica: Any, key: str, sha256: str) -> Pack:
    """The index at `key`, its bytes checked against the SHA-256 in its name and its shape checked entry by
    entry (a pack is a hint: anything odd in it makes it unusable, never a restore wrong)."""
    with tempfile.SpooledTemporaryFile(max_size=16 << 20) as tmp:
        replica.download(key, tmp, expected_sha256=sha256)
        tmp.seek(0)
        try:
            doc = json.load(tmp)
        except ValueError as exc:
            raise WedbackupError(f"DR pack index {key}: not JSON ({exc})") from None
    try:
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, not {FORMAT}")
        segments = []
        for s in doc["segments"]:
            skey, ssha, size = s["key"], s["sha256"], int(s["size"])
            if not (isinstance(ssha, str) and _SHA256.fullmatch(ssha)) or skey != segment_key(replica, ssha):
                raise ValueError(f"segment key {str(skey)[:80]!r} is not the content address of {str(ssha)[:64]!r}")
            entries, end = [], 0
            for partition, sha, offset, length in s["entries"]:
                if not (isinstance(partition, str) and is_partition(partition) and isinstance(sha, str)
                        and _SHA256.fullmatch(sha)):
                    raise ValueError(f"entry {str(partition)[:70]!r} / {str(sha)[:70]!r} is malformed")
                if not (isinstance(offset, int) and isinstance(length, int) and end <= offset
                        and length > 0 and offset + length <= size):
                    raise ValueError(f"entry of wedding {partition} lies outside its segment or overlaps another")
                end = offset + length
                entries.append(Entry(partition, sha, offset, length))
            segments.append(Segment(skey, ssha, size, tuple(entries)))
        return Pack(replica.provider, key, str(doc["created_at"]), tuple(segments))
    except (KeyError, TypeError, ValueError, AttributeError, WedbackupError) as exc:
        raise WedbackupError(f"DR pack index {key}: {str(exc)[:200]}") from None


def newest_pack(replica: Any) -> tuple[Pack | None, list[str]]:
    """The provider's newest usable pack, and a note for each newer one that was not usable (None and the
    notes when it has none). Listing failures are notes too: restore goes on without a pack."""
    notes: list[str] = []
    try:
        indexes = _listed_indexes(replica)
    except WedbackupError as exc:
        return None, [f"{replica.provider}: DR packs could not be listed: {str(exc)[:300]}"]
    for _, sha, key, size in indexes:
        if size > INDEX_MAX_BYTES:
            notes.append(f"{replica.provider}: DR pack not used: its index {key} has {size:,} bytes, more than "
                         f"the {INDEX_MAX_BYTES:,} an index may have")
            continue
        try:
            return _read_index(replica, key, sha), notes
        except WedbackupError as exc:
            notes.append(f"{replica.provider}: DR pack not used: {str(exc)[:300]}")
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
    from wedbackup_dagster.core.errors import ArchiveError

    with tempfile.SpooledTemporaryFile(max_size=4 << 20) as tmp:
        digest = hashlib.sha256()
        segment_file.seek(entry.offset)
        left = entry.size
        while left > 0:
            block = segment_file.read(min(1 << 20, left))
            if not block:
                raise ArchiveError(name, "its DR pack segment ended before the archive did")
            digest.update(block)
            tmp.write(block)
            left -= len(block)
        if digest.hexdigest() != expected_sha256:
            raise ArchiveError(name, "its bytes in the DR pack do not match the catalogue's SHA-256")
        tmp.seek(0)
        yield tmp


# --- pruning and erasure ------------------------------------------------------------------------------

def prune(replica: Any, *, keep: int = KEEP, now: datetime | None = None) -> int:
    """Delete the provider's indexes beyond the newest `keep`, then every segment no kept index references
    (but none younger than YOUNG: a build may be uploading it). Returns objects deleted."""
    now = now or datetime.now(timezone.utc)
    indexes = _indexes(replica)
    deleted = 0
    for _, _, key in indexes[keep:]:
        replica.delete(key)
        deleted += 1
    referenced: set[str] = set()
    for _, sha, key in indexes[:keep]:
        try:
            referenced |= {s.key for s in _read_index(replica, key, sha).segments}
        except WedbackupError:
            continue  # an unreadable index protects nothing
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
    holding the wedding's archives (sealed with a key already destroyed, but not left behind). The other
    weddings' archives in those packs go back to their own objects until the next build. Returns what was
    deleted (an index that cannot be read is deleted too: it may name the wedding)."""
    deleted = []
    for _, sha, key in _indexes(replica):
        try:
            pack = _read_index(replica, key, sha)
        except WedbackupError:
            replica.delete(key)
            deleted.append(key)
            continue
        holding = [s for s in pack.segments if any(e.partition == partition for e in s.entries)]
        if not holding:
            continue
        replica.delete(key)
        deleted.append(key)
        for segment in holding:
            replica.delete(segment.key)
            deleted.append(segment.key)
    return deleted
