"""One media backup of one partition: list the source, reuse the previous snapshot's chunk lists for
objects the source says are unchanged (size + ETag / version id / mtime), chunk and seal only the rest,
store only chunks the partition does not have yet, and seal a new snapshot into the vault. Unchanged media
costs a listing and no write at all. Replication to providers is store.replicate, a separate step.

Which chunks are new is asked of the catalogue in batches (`_NewChunks`), never by loading every chunk id of
the wedding into memory: a wedding of millions of chunks costs the same few MiB as a small one."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from wedbackup_dagster.core.keys.keyring import SecretKey

from .chunker import MediaKeys, chunks, maybe_compress
from .packs import PACK_TARGET_BYTES, PackWriter
from .snapshot import MediaFile, MediaSnapshot, Skipped, write_snapshot
from .source import MediaSource, SourceChanged, SourceUnreadable
from .store import SNAPSHOT, MediaStore


@dataclass
class MediaBackupResult:
    partition: str
    snapshot_sha256: str
    snapshot_id: int
    unchanged: bool
    files: int
    bytes: int
    read_bytes: int  # bytes read from the source (0 when nothing changed)
    new_bytes: int  # plaintext bytes of chunks this partition did not have
    stored_bytes: int  # sealed pack bytes written
    packs_written: int
    packs: int  # packs the snapshot references
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def dedup_ratio(self) -> float:
        """Bytes read per byte of new chunk data (1.0: nothing deduplicated)."""
        return self.read_bytes / self.new_bytes if self.new_bytes else (float("inf") if self.read_bytes else 1.0)

    def metadata(self) -> dict[str, Any]:
        return {"files": self.files, "bytes": self.bytes, "read_bytes": self.read_bytes, "new_bytes": self.new_bytes,
                "stored_bytes": self.stored_bytes, "packs_written": self.packs_written, "packs": self.packs,
                "skipped": len(self.skipped), "unchanged": self.unchanged, "snapshot_sha256": self.snapshot_sha256}


class _Packer:
    """Gathers new chunks into packs of ~PACK_TARGET_BYTES, each committed to the vault and recorded."""

    def __init__(self, store: MediaStore, partition: str, wedding_key: SecretKey):
        self.store, self.partition, self.wedding_key = store, partition, wedding_key
        self._open: Any = None
        self.pending: set[str] = set()
        self.written = 0
        self.stored_bytes = 0

    def add(self, chunk_id: bytes, data: memoryview) -> None:
        if self._open is None:
            ctx = self.store.incoming(self.partition)
            fh, tmp = ctx.__enter__()
            self._open = (ctx, fh, tmp, PackWriter(fh, self.wedding_key))
        stored, compressed = maybe_compress(data)
        self._open[3].add(chunk_id, stored, len(data), compressed)
        self.pending.add(chunk_id.hex())
        if self._open[3].size >= PACK_TARGET_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._open is None:
            return
        ctx, fh, tmp, writer = self._open
        self._open = None
        try:
            info = writer.close()
            self.store.commit(fh, tmp, self.partition, "pack", info.sha256, info.size)
            self.store.record_pack(self.partition, info)
        finally:
            ctx.__exit__(None, None, None)
        self.written += 1
        self.stored_bytes += info.size
        self.pending.clear()

    def abort(self) -> None:
        if self._open is not None:
            self._open[0].__exit__(None, None, None)
            self._open = None


# Chunks of the files being read are held (copied) until this much is waiting, then looked up in the
# catalogue in one query: ~20 average chunks a query, and at most this plus one 4 MiB chunk in memory.
LOOKUP_BATCH_BYTES = 16 << 20


class _NewChunks:
    """Sends the chunks the partition does not have yet to the packer, deciding in batches: the chunk ids of
    a batch are looked up in the catalogue (packs already recorded) and in the packer's open pack; a chunk
    repeated within the batch is stored once."""

    def __init__(self, store: MediaStore, key_id: str, packer: _Packer):
        self.store, self.key_id, self.packer = store, key_id, packer
        self._batch: list[tuple[bytes, bytes]] = []
        self._held = 0
        self.new_bytes = 0
        self.lookups = 0

    def add(self, chunk_id: bytes, data: memoryview) -> None:
        self._batch.append((chunk_id, bytes(data)))  # the chunker reuses its buffer: keep a copy
        self._held += len(data)
        if self._held >= LOOKUP_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._batch:
            return
        batch, self._batch, self._held = self._batch, [], 0
        known = self.store.known_among(self.key_id, {cid.hex() for cid, _ in batch})
        self.lookups += 1
        for cid, data in batch:
            hexid = cid.hex()
            # pending: the open pack's chunks (the catalogue learns them when the pack is recorded); `known`
            # grows with what this batch stores, as a pack may be recorded (and pending cleared) mid-batch.
            if hexid in known or hexid in self.packer.pending:
                continue
            known.add(hexid)
            self.new_bytes += len(data)
            self.packer.add(cid, memoryview(data))


def previous_snapshot(store: MediaStore, partition: str, resolve_key: Callable[[str], SecretKey]
                      ) -> tuple[Any, MediaSnapshot | None]:
    rows = store.snapshots(partition)
    if not rows:
        return None, None
    from .restore import LOCATIONS, load_snapshot

    # From the vault, or from a provider when the vault lost it (the snapshot's SHA-256 is checked either way).
    return rows[0], load_snapshot(store, rows[0], resolve_key, LOCATIONS)


def back_up_media(partition: str, source: MediaSource, store: MediaStore, wedding_key: SecretKey, *,
                  now: datetime | None = None) -> MediaBackupResult:
    started = time.monotonic()
    now = now or datetime.now(timezone.utc)
    keys = MediaKeys.of(wedding_key)
    prev_row, prev = previous_snapshot(store, partition, lambda key_id: wedding_key)
    if prev_row is not None and prev_row.key_id != wedding_key.key_id:
        prev_row, prev = None, None  # another key: none of its chunks can be shared
    before = {f.path: f for f in prev.files} if prev else {}
    listing = list(source.list(partition))
    skipped = [Skipped(path, reason) for path, reason in getattr(source, "refused", [])]
    files: list[MediaFile] = []
    read_bytes = read_files = 0
    packer = _Packer(store, partition, wedding_key)
    new_chunks = _NewChunks(store, wedding_key.key_id, packer)
    try:
        for obj in listing:
            old = before.get(obj.path)
            if old is not None and old.same_source(MediaFile(obj.path, obj.size, "", obj.etag, obj.version_id,
                                                             obj.mtime)):
                files.append(old)
                continue
            try:
                ids: list[str] = []
                with source.open(obj) as stream:
                    for view in chunks(keys, stream):
                        cid = keys.chunk_id(view)
                        ids.append(cid.hex())
                        new_chunks.add(cid, view)
                    sha = stream.finish()
                    read_bytes += stream.count
                    read_files += 1
            except (SourceChanged, SourceUnreadable) as exc:
                skipped.append(Skipped(obj.path, str(exc)))
                continue
            files.append(MediaFile(obj.path, obj.size, sha, obj.etag, obj.version_id, obj.mtime, tuple(ids)))
        new_chunks.flush()
        packer.flush()
    except BaseException:
        packer.abort()
        raise
    bytes_ = sum(f.size for f in files)
    if prev is not None and read_files == 0 and not packer.written and len(files) == len(prev.files) \
            and {s.path for s in skipped} == {s.path for s in prev.skipped}:
        store.confirm_snapshot(prev_row.id, now)
        return MediaBackupResult(partition, prev_row.sha256, prev_row.id, True, len(files), bytes_, 0, 0, 0, 0,
                                 prev_row.packs, skipped, time.monotonic() - started)
    new_bytes = new_chunks.new_bytes
    snapshot = MediaSnapshot(partition, now.isoformat(), source.description, files, skipped)
    packs = len(store.packs_holding(wedding_key.key_id, snapshot.chunk_ids())[0])
    with store.incoming(partition) as (fh, tmp):
        stats = write_snapshot(fh, snapshot, wedding_key)
        store.commit(fh, tmp, partition, SNAPSHOT, stats.sha256, stats.sealed_bytes)
    snapshot_id = store.record_snapshot(
        partition=partition, sha256=stats.sha256, key_id=wedding_key.key_id, taken_at=now, files=len(files),
        bytes_=bytes_, new_bytes=new_bytes, stored_bytes=packer.stored_bytes, packs=packs,
        skipped=[{"path": s.path, "reason": s.reason} for s in skipped])
    return MediaBackupResult(partition, stats.sha256, snapshot_id, False, len(files), bytes_, read_bytes, new_bytes,
                             packer.stored_bytes, packer.written, packs, skipped, time.monotonic() - started)
