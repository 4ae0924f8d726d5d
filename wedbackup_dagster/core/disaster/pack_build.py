"""Building a DR pack (the format, and how restore --all and erasure read it: packs.py): each wedding's newest
verified archive at or before a time — what restore --all would choose — copied from the vault (a provider's copy
where the vault has none that matches, each checked against the catalogue's SHA-256 as it is copied) into
segments, each uploaded to every provider as soon as it is written (one segment on local disk at a time), the
index last, named by the build's time; then each provider's packs beyond the newest KEEP pruned. One build at
a time (a catalogue advisory lock). The `dr_pack` job and `wedbackup dr pack` call build_pack."""
from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import psycopg

from wedbackup_dagster.core.errors import WedbackupError
from wedbackup_dagster.core.partitions import PLATFORM, partition_label
from wedbackup_dagster.core.postgres.restore_wedding import NoRecoveryPointError, choose_point
from wedbackup_dagster.core.storage.replicas.base import digest_file

from .packs import (PACK_PARTITION, SEGMENT_BYTES, SEGMENT_WEDDINGS, Entry, Progress, Segment, index_document,
                    ends_segment, index_key, prune, quiet, segment_key, stamp_of)
from .restore_all import all_recovery_points, partition_order, planned_partitions


@dataclass
class PackReport:
    """What a build did: archives packed, what was left to its own objects and why, per provider."""

    created_at: str  # when it was built (its index's name)
    as_of: str  # the time its archives were chosen at (the newest verified at or before it)
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
        return {"created_at": self.created_at, "as_of": self.as_of, "weddings": self.weddings,
                "segments": self.segments, "bytes": self.bytes,
                "left_out": dict(list(sorted(self.left_out.items()))[:50]),
                "left_out_count": len(self.left_out), "uploaded": self.uploaded, "already_there": self.already_there,
                "published": self.published, "failed": self.failed, "pruned": self.pruned, "seconds": self.seconds}

    def lines(self) -> list[str]:
        chosen = "" if self.as_of == self.created_at else f" (archives as of {self.as_of})"
        out = [f"DR pack {self.created_at}{chosen}: {self.weddings} wedding archive(s) in {self.segments} segment(s), "
               f"{self.bytes:,} bytes, {self.seconds:.1f} s"]
        for provider in sorted(set(self.published) | set(self.failed)):
            if provider in self.published:
                out.append(f"  {provider}: published {self.published[provider]} ({self.uploaded.get(provider, 0)} "
                           f"segment(s) written, {self.already_there.get(provider, 0)} already there; "
                           f"{self.pruned.get(provider, 0)} older object(s) deleted)")
            else:
                out.append(f"  {provider}: NOT PUBLISHED: {self.failed[provider]}")
        for partition, why in list(sorted(self.left_out.items()))[:20]:
            out.append(f"  left to its own objects: {partition_label(partition)}: {why}")
        if len(self.left_out) > 20:
            out.append(f"  … and {len(self.left_out) - 20} more wedding(s) left to their own objects")
        return out


def chosen_points(engine: Any, as_of: datetime) -> tuple[list[Any], dict[str, str]]:
    """(each wedding's newest verified recovery point at or before `as_of`, in restore order; weddings without
    one, with why) — what restore --all would choose."""
    weddings, _ = planned_partitions(engine.catalogue)
    every = all_recovery_points(engine.catalogue)
    points, left_out = [], {}
    for wedding in weddings:
        try:
            points.append(choose_point(every.get(wedding, []), wedding, as_of))
        except NoRecoveryPointError as exc:
            left_out[wedding] = str(exc).removeprefix(f"{partition_label(wedding)}: ")
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
                    report: PackReport, progress: Progress,
                    on_segment: Callable[[Path, Segment], None]) -> None:
    """The chosen archives into segment files in `folder`, each archive checked against the catalogue's SHA-256
    as it is copied (one no copy of which matches is left out, never packed); `on_segment(path, segment)` for
    each segment once it is closed (it uploads it), after which the same file is emptied for the next: one
    segment on disk at a time, whatever the platform's size."""
    backups = engine.catalogue.backups_by_sha([p.archive_sha256 for p in points], manifests=False)
    entries: list[Entry] = []
    path = folder / "segment"
    out = open(path, "wb")

    def close_segment() -> None:
        nonlocal out, entries
        out.close()
        size = path.stat().st_size
        segment = Segment("", digest_file(path).sha256, size, tuple(entries))
        report.weddings += len(entries)
        report.segments += 1
        report.bytes += size
        progress(f"DR pack: segment {report.segments}, {len(entries)} archive(s), {size:,} bytes")
        on_segment(path, segment)
        entries = []
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
                close_segment()
        if entries:
            close_segment()
    finally:
        out.close()


@contextlib.contextmanager
def _build_lock(settings: Any) -> Iterator[None]:
    """One build at a time across every machine sharing the catalogue (two at once could each prune a segment
    the other found already in place, before publishing): a session advisory lock on a connection of its own,
    released when the build ends or its process dies."""
    with psycopg.connect(settings.catalogue_dsn, autocommit=True, application_name="wedbackup-dr-pack") as conn:
        if not conn.execute("SELECT pg_try_advisory_lock(hashtext('wedbackup-dr-pack'))").fetchone()[0]:
            raise WedbackupError("another DR pack build is running (the catalogue's wedbackup-dr-pack lock is held); "
                                 "let it finish")
        yield


def build_pack(engine: Any, replicas: Mapping[str, Any], *, as_of: datetime | None = None,
               progress: Progress = quiet) -> PackReport:
    """Build a pack of every wedding's newest verified archive (at or before `as_of`, default now) from the
    vault (a provider's copy where the vault has none that matches), and publish it at every provider of
    `replicas`: each segment uploaded everywhere as soon as it is written, the index last, named by the build's
    time; then the provider's packs beyond the newest KEEP deleted. A provider that fails gets no new index
    (its older packs stay as they were); the others are published. One build at a time (_build_lock)."""
    started = time.perf_counter()
    now = datetime.now(timezone.utc)
    when = as_of or now
    report = PackReport(now.isoformat(), when.isoformat())
    with _build_lock(engine.settings):
        points, report.left_out = chosen_points(engine, when)
        uploaded: dict[str, list[Segment]] = {provider: [] for provider in replicas}

        def upload(path: Path, segment: Segment) -> None:
            for provider, replica in sorted(replicas.items()):
                if provider in report.failed:
                    continue
                try:
                    key = segment_key(replica, segment.sha256)
                    record = replica.upload(path, partition=PACK_PARTITION, sha256=segment.sha256, size=segment.size,
                                            metadata={"kind": "wedbackup-dr-pack"}, key=key)
                except WedbackupError as exc:
                    report.failed[provider] = str(exc)[:300]
                    progress(f"DR pack: {provider}: not published: {str(exc)[:300]}")
                    continue
                counter = report.already_there if record.already_present else report.uploaded
                counter[provider] = counter.get(provider, 0) + 1
                uploaded[provider].append(Segment(key, segment.sha256, segment.size, segment.entries))

        folder = engine.vault.root if engine.vault.root.exists() else None
        # The dot keeps the folder from being taken for a partition's (as keys.d, changes.d) if it outlives a crash
        with tempfile.TemporaryDirectory(prefix="dr-pack.tmp-", dir=folder) as work:
            _write_segments(engine, points, replicas, Path(work), report, progress, upload)
            for provider, replica in sorted(replicas.items()):
                if provider in report.failed:
                    continue
                try:
                    report.published[provider] = _publish(engine, replica, uploaded[provider], report, now,
                                                          Path(work))
                except WedbackupError as exc:
                    report.failed[provider] = str(exc)[:300]
                    progress(f"DR pack: {provider}: not published: {str(exc)[:300]}")
                    continue
                try:
                    report.pruned[provider] = prune(replica, published=report.published[provider])
                except WedbackupError as exc:
                    progress(f"DR pack: {provider}: older packs not pruned: {str(exc)[:300]}")
    report.seconds = round(time.perf_counter() - started, 3)
    engine.catalogue.audit("dr-pack", PLATFORM, {k: v for k, v in report.to_dict().items() if k != "left_out"})
    return report


def _erased_in(engine: Any, segments: list[Segment]) -> set[str]:
    return {e.partition for s in segments for e in s.entries} & set(engine.catalogue.erased_partitions())


def _drop(replica: Any, segments: list[Segment], erased: set[str], index: str | None = None) -> None:
    if index is not None:
        replica.delete(index)
    for segment in segments:
        if any(e.partition in erased for e in segment.entries):
            replica.delete(segment.key)


def _publish(engine: Any, replica: Any, segments: list[Segment], report: PackReport, now: datetime,
             work: Path) -> str:
    """The index of the segments uploaded to `replica`, named by the build's time — unless a wedding of them
    was erased meanwhile (its erasure has already forgotten, or is forgetting, the packs naming it): checked
    before the index is written and again after, so that an erasure between the two sees the index (it lists
    after marking the wedding erased) or this build sees the erasure; either way the index goes."""
    erased = _erased_in(engine, segments)
    if not erased:
        document = index_document(report.as_of, segments)
        sha = hashlib.sha256(document).hexdigest()
        path = work / f"index-{replica.provider}.json"
        path.write_bytes(document)
        key = index_key(replica, stamp_of(now), sha)
        replica.upload(path, partition=PACK_PARTITION, sha256=sha, size=len(document),
                       metadata={"kind": "wedbackup-dr-pack-index"}, key=key)
        erased = _erased_in(engine, segments)
        if not erased:
            return key
        _drop(replica, segments, erased, key)
    else:
        _drop(replica, segments, erased)
    raise WedbackupError(f"wedding(s) {', '.join(sorted(erased, key=partition_order))} erased while the pack was "
                         f"built: not published, the segments holding them deleted; build it again")
