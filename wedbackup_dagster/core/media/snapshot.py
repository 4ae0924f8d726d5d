"""The media snapshot of one backup of one partition: every file (path exactly as the source names it,
size, SHA-256, the source's ETag / version id / mtime, its chunk ids in order) and every object skipped,
with the reason. Sealed with the wedding's key in the archive format (docs/FORMAT.md) as JSON lines."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, Callable

from wedbackup_dagster.core.formats.archive import ArchiveStats, ArchiveWriter, open_archive
from wedbackup_dagster.core.errors import ArchiveError
from wedbackup_dagster.core.keys.keyring import SecretKey

KIND = "wedbackup-media-snapshot"
VERSION = 1


@dataclass(frozen=True)
class MediaFile:
    path: str  # relative to the source root, exactly (control characters, '..', unicode kept)
    size: int
    sha256: str
    etag: str | None
    version_id: str | None
    mtime: str | None
    chunks: tuple[str, ...] = field(default=())  # hex keyed chunk ids, in file order

    def same_source(self, other: "MediaFile") -> bool:
        """Whether the source says it is the same object: size and its ETag / version id / mtime."""
        return (self.size == other.size and self.etag == other.etag and self.version_id == other.version_id
                and self.mtime == other.mtime)


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class MediaSnapshot:
    partition: str
    taken_at: str
    source: str
    files: list[MediaFile]
    skipped: list[Skipped]

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    def chunk_ids(self) -> set[str]:
        return {c for f in self.files for c in f.chunks}


def write_snapshot(fileobj: BinaryIO, snapshot: MediaSnapshot, wedding_key: SecretKey) -> ArchiveStats:
    """Seal the snapshot into `fileobj`: a header line, one line per file, one per skipped object."""
    with ArchiveWriter(fileobj, wedding_key=wedding_key, label={"app": "wedbackup", "kind": KIND}) as writer:
        head = {"kind": KIND, "version": VERSION, "partition": snapshot.partition, "taken_at": snapshot.taken_at,
                "source": snapshot.source, "files": len(snapshot.files), "skipped": len(snapshot.skipped)}
        writer.write(_line(head))
        for f in snapshot.files:
            writer.write(_line({"file": {**asdict(f), "chunks": list(f.chunks)}}))
        for s in snapshot.skipped:
            writer.write(_line({"skipped": asdict(s)}))
    return writer.close()


def _line(obj: dict[str, Any]) -> bytes:
    # ensure_ascii: a path with lone surrogates (a local file name that is not UTF-8) survives as \udcxx.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"


def read_snapshot(fileobj: BinaryIO, *, name: str, resolve_key: Callable[[str], SecretKey]) -> MediaSnapshot:
    """Open and parse a sealed snapshot; any damage or a count that does not add up is an ArchiveError."""
    reader = open_archive(fileobj, name=name, resolve_key=resolve_key)
    lines = _lines(reader)
    try:
        head = json.loads(next(lines))
        if head.get("kind") != KIND or head.get("version") != VERSION:
            raise ArchiveError(name, f"not a media snapshot of version {VERSION}")
        files: list[MediaFile] = []
        skipped: list[Skipped] = []
        for raw in lines:
            item = json.loads(raw)
            if "file" in item:
                f = item["file"]
                files.append(MediaFile(path=f["path"], size=int(f["size"]), sha256=f["sha256"], etag=f["etag"],
                                       version_id=f["version_id"], mtime=f["mtime"], chunks=tuple(f["chunks"])))
            else:
                skipped.append(Skipped(**item["skipped"]))
    except (StopIteration, ValueError, KeyError, TypeError) as exc:
        raise ArchiveError(name, f"media snapshot is malformed: {type(exc).__name__}") from None
    if len(files) != head["files"] or len(skipped) != head["skipped"]:
        raise ArchiveError(name, "media snapshot lists fewer entries than its header says")
    return MediaSnapshot(head["partition"], head["taken_at"], head["source"], files, skipped)


def _lines(reader: Iterable[bytes]) -> Iterator[bytes]:
    rest = b""
    for piece in reader:
        rest += piece
        *complete, rest = rest.split(b"\n")
        yield from complete
    if rest:
        yield rest
