"""Restore a partition's media (all of it, or the files matching a glob) from one media snapshot, to a
directory or a bucket. Packs come from the first location that holds an intact copy (vault, s3, gcs,
azure, or only the one asked for); a damaged copy is named and the next location is tried. Every file is
written to a temporary name, its SHA-256 compared with the snapshot's, then renamed: never a torn file."""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from wedbackup_dagster.core.errors import RestoreError
from wedbackup_dagster.core.keys.keyring import SecretKey

from .packs import PackError, PackReader, pack_sha256
from .snapshot import MediaFile, MediaSnapshot, read_snapshot
from .store import PACK, SNAPSHOT, VAULT, MediaCopyError, MediaStore, SnapshotRow

LOCATIONS = (VAULT, "s3", "gcs", "azure")
_UNSAFE = {ord("%"), 0x7F, *range(0x20)}


def local_name(path: str) -> str:
    """A snapshot path as a relative path that stays inside the target directory: '%', control characters
    and the segments '', '.' and '..' are percent-encoded (so `a/../b` becomes `a/%2E%2E/b`); everything else,
    unicode included, is kept. Distinct paths stay distinct."""
    out = []
    for seg in path.split("/"):
        if seg in ("", ".", ".."):
            out.append("%" if not seg else "%2E" * len(seg))
            continue
        out.append("".join(f"%{ord(c):02X}" if ord(c) in _UNSAFE else c for c in seg))
    return "/".join(out)


@dataclass
class MediaRestoreResult:
    partition: str
    snapshot_sha256: str
    files: int = 0
    bytes: int = 0
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (snapshot path, where it was written)
    damaged: list[str] = field(default_factory=list)  # copies that were damaged or missing, by location
    locations: dict[str, int] = field(default_factory=dict)  # packs read from each location
    seconds: float = 0.0


class PackSource:
    """Packs of one partition, each fetched once into a temporary folder from the first location with an
    intact copy; damaged copies are remembered (by location and pack)."""

    def __init__(self, store: MediaStore, partition: str, resolve_key: Callable[[str], SecretKey],
                 locations: Iterable[str], tmp_dir: Path):
        self.store, self.partition, self.resolve_key = store, partition, resolve_key
        self.locations = tuple(locations)
        self.tmp_dir = tmp_dir
        self.readers: dict[str, PackReader] = {}
        self.damaged: list[str] = []
        self.used: dict[str, int] = {}

    def reader(self, pack_sha: str) -> PackReader:
        found = self.readers.get(pack_sha)
        if found is not None:
            return found
        problems = []
        for location in self.locations:
            path = self.tmp_dir / f"{pack_sha}.{location}"
            try:
                if location == VAULT:
                    fh = self._vault_copy(pack_sha)  # read in place: no temporary copy of a local file
                else:
                    with open(path, "wb") as out:
                        self.store.fetch(self.partition, PACK, pack_sha, out, location)
                    fh = open(path, "rb")
                reader = PackReader(fh, name=f"pack {pack_sha} ({location})", resolve_key=self.resolve_key)
            except (MediaCopyError, PackError) as exc:
                self.damaged.append(str(exc))
                problems.append(str(exc))
                path.unlink(missing_ok=True)
                continue
            self.readers[pack_sha] = reader
            self.used[location] = self.used.get(location, 0) + 1
            return reader
        raise RestoreError(f"media of {self.partition}: no intact copy of pack {pack_sha} at "
                           f"{', '.join(self.locations)}: " + "; ".join(problems))

    def _vault_copy(self, pack_sha: str) -> BinaryIO:
        try:
            fh = open(self.store.vault_path(self.partition, PACK, pack_sha), "rb")
        except FileNotFoundError:
            raise MediaCopyError(f"vault: pack {pack_sha} of {self.partition} is missing") from None
        found = pack_sha256(fh)
        if found != pack_sha:
            fh.close()
            raise MediaCopyError(f"vault: pack {pack_sha} of {self.partition} is damaged (its bytes hash to {found})")
        return fh

    def close(self) -> None:
        for reader in self.readers.values():
            reader._fileobj.close()  # noqa: SLF001 - the file is ours


def load_snapshot(store: MediaStore, row: SnapshotRow, resolve_key: Callable[[str], SecretKey],
                  locations: Iterable[str]) -> MediaSnapshot:
    problems = []
    for location in locations:
        with tempfile.TemporaryFile() as fh:
            try:
                store.fetch(row.partition, SNAPSHOT, row.sha256, fh, location)
            except MediaCopyError as exc:
                problems.append(str(exc))
                continue
            fh.seek(0)
            return read_snapshot(fh, name=f"media snapshot {row.sha256} ({location})", resolve_key=resolve_key)
    raise RestoreError(f"media of {row.partition}: no intact copy of snapshot {row.sha256}: " + "; ".join(problems))


def choose_snapshot(store: MediaStore, partition: str, as_of: Any = None) -> SnapshotRow:
    rows = store.snapshots(partition, as_of)
    if not rows:
        when = f" at or before {as_of}" if as_of else ""
        raise RestoreError(f"media of {partition}: no media snapshot{when}")
    return rows[0]


def write_file(f: MediaFile, packs: PackSource, chunk_pack: dict[str, str], out: BinaryIO) -> str:
    """The file's bytes, chunk by chunk, into `out`; returns their SHA-256 (computed here, from what was
    written, independently of the chunk ids)."""
    sha = hashlib.sha256()
    for hexid in f.chunks:
        pack = chunk_pack.get(hexid)
        if pack is None:
            raise RestoreError(f"media of {packs.partition}: {f.path!r} needs chunk {hexid[:16]}…, which no pack "
                               "in the catalogue holds")
        data = packs.reader(pack).read_chunk(bytes.fromhex(hexid))
        sha.update(data)
        out.write(data)
    return sha.hexdigest()


def _selected(snapshot: MediaSnapshot, path_glob: str | None) -> list[MediaFile]:
    return [f for f in snapshot.files if path_glob is None or fnmatch.fnmatchcase(f.path, path_glob)]


def restore_media(store: MediaStore, partition: str, resolve_key: Callable[[str], SecretKey], *,
                  to_dir: Path | str | None = None, to_bucket: Any = None, as_of: Any = None,
                  path_glob: str | None = None, provider: str | None = None,
                  progress: Callable[[int, int], None] | None = None) -> MediaRestoreResult:
    """Restore into `to_dir` (a directory) or `to_bucket` (an S3Source to put objects into)."""
    if (to_dir is None) == (to_bucket is None):
        raise RestoreError("restore media to exactly one of a directory or a bucket")
    started = time.monotonic()
    locations = (provider,) if provider else LOCATIONS
    row = choose_snapshot(store, partition, as_of)
    snapshot = load_snapshot(store, row, resolve_key, locations)
    files = _selected(snapshot, path_glob)
    chunk_pack = store.chunk_packs(row.key_id, {c for f in files for c in f.chunks})
    result = MediaRestoreResult(partition, row.sha256)
    target = Path(to_dir) if to_dir is not None else None
    if target is not None:
        target.mkdir(parents=True, exist_ok=True)
        target = target.resolve()
    with tempfile.TemporaryDirectory(prefix="wedbackup-media-") as tmp:
        packs = PackSource(store, partition, resolve_key, locations, Path(tmp))
        try:
            for n, f in enumerate(files, start=1):
                if target is not None:
                    _restore_to_dir(f, packs, chunk_pack, target, result)
                else:
                    _restore_to_bucket(f, packs, chunk_pack, to_bucket, Path(tmp))
                result.files += 1
                result.bytes += f.size
                if progress:
                    progress(n, len(files))
        finally:
            packs.close()
        result.damaged, result.locations = packs.damaged, packs.used
    result.seconds = time.monotonic() - started
    return result


def _restore_to_dir(f: MediaFile, packs: PackSource, chunk_pack: dict[str, str], target: Path,
                    result: MediaRestoreResult) -> None:
    name = local_name(f.path)
    final = (target / os.fsencode(name).decode("utf-8", "surrogateescape")).resolve()
    # Belt and braces: local_name cannot climb out, but a symbolic link already in the target could.
    if os.path.commonpath([final, target]) != str(target):
        raise RestoreError(f"media of {packs.partition}: {f.path!r} would be written outside {target}; refused")
    if name != f.path:
        result.renamed.append((f.path, name))
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".restoring-")
    try:
        with os.fdopen(fd, "wb") as out:
            sha = write_file(f, packs, chunk_pack, out)
            out.flush()
            os.fsync(out.fileno())
        if sha != f.sha256:
            raise RestoreError(f"media of {packs.partition}: {f.path!r} restored with SHA-256 {sha}, the snapshot "
                               f"says {f.sha256}; not written")
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _restore_to_bucket(f: MediaFile, packs: PackSource, chunk_pack: dict[str, str], bucket: Any, tmp: Path) -> None:
    with tempfile.TemporaryFile(dir=tmp) as out:
        sha = write_file(f, packs, chunk_pack, out)
        if sha != f.sha256:
            raise RestoreError(f"media of {packs.partition}: {f.path!r} restored with SHA-256 {sha}, the snapshot "
                               f"says {f.sha256}; not written")
        out.seek(0)
        bucket.put(f.path, out, base64.b64encode(bytes.fromhex(sha)).decode("ascii"), f.size)
