"""Where media backups live: packs and sealed snapshots in the vault (`<vault>/media.d/<partition>/`,
written to a temporary file, fsynced, renamed to their SHA-256) and at every provider under
content-addressed keys (`<prefix>/media/weddings/<id>/packs/<sha256>.pack`), each copy confirmed by the
provider's own checksum and recorded in the catalogue (tables in core/media/schema.py)."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.errors import ReplicaError, WedbackupError
from wedbackup_dagster.core.storage.vault import Vault, check_sha256, fsync_dir
from wedbackup_dagster.core.partitions import check_partition

from .packs import PackInfo

MEDIA_DIR = "media.d"  # the dot keeps it from being taken for a partition folder by the row vault
PACK = "pack"
SNAPSHOT = "snapshot"
_SUFFIX = {PACK: ".pack", SNAPSHOT: ".wbk"}
_FOLDER = {PACK: "packs", SNAPSHOT: "snapshots"}
VAULT = "vault"
LOOKUP_IDS = 10_000  # chunk ids per catalogue query when many are looked up: ~700 KB of parameters


# Chunk lookups join the asked ids (unnest) to the primary key (key_id, chunk_id): one index probe per id
# whatever the planner knows. `chunk_id = ANY(array)` was planned from statistics and, on a table just grown by
# millions of chunks and not yet analyzed, became a bitmap scan of the whole key: 0.6 s against 0.045 s for
# 4,096 ids among 2,000,000 (measured 2026-12-05).
_ASKED = ("unnest(%s::text[]) AS asked(chunk_id) "
          "JOIN wedbackup.media_chunks c ON c.key_id = %s AND c.chunk_id = asked.chunk_id")
KNOWN_AMONG = "SELECT c.chunk_id FROM " + _ASKED
CHUNK_PACKS = "SELECT c.chunk_id, c.pack_sha256 FROM " + _ASKED
PACKS_HOLDING = "SELECT DISTINCT c.pack_sha256, count(*) OVER () AS found FROM " + _ASKED


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass(frozen=True)
class SnapshotRow:
    id: int
    partition: str
    sha256: str
    key_id: str
    taken_at: Any
    confirmed_at: Any
    files: int
    bytes: int
    new_bytes: int
    stored_bytes: int
    packs: int
    skipped: list
    verified_at: Any
    verifications: int


class MediaStore:
    def __init__(self, vault_root: Path | str, catalogue: Catalogue, replicas: Mapping[str, Any] | None = None):
        self.root = Path(vault_root) / MEDIA_DIR
        self.catalogue = catalogue
        self.replicas = dict(replicas or {})

    # ---- the vault -------------------------------------------------------------------------------
    def vault_path(self, partition: str, kind: str, sha256: str) -> Path:
        return self.root / check_partition(partition) / _FOLDER[kind] / f"{check_sha256(sha256)}{_SUFFIX[kind]}"

    def incoming(self, partition: str) -> Any:
        """A locked temporary file in the partition's media folder (the vault's own), removed unless
        commit() renamed it: a context manager yielding (file, path)."""
        return Vault(self.root).incoming(partition)

    def commit(self, fh: BinaryIO, tmp: Path, partition: str, kind: str, sha256: str, size: int) -> Path:
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        final = self.vault_path(partition, kind, sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists() and final.stat().st_size == size:
            tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, final)
            fsync_dir(final.parent)
        self._record_copy(sha256, kind, partition, VAULT, final.as_uri(), final.name, None, size, sha256, "disk", False)
        return final

    # ---- provider keys ---------------------------------------------------------------------------
    @staticmethod
    def object_key(replica: Any, partition: str, kind: str, sha256: str) -> str:
        where = "platform" if check_partition(partition) == "platform" else f"weddings/{partition}"
        return f"{replica.prefix}/media/{where}/{_FOLDER[kind]}/{check_sha256(sha256)}{_SUFFIX[kind]}"

    # ---- catalogue ---------------------------------------------------------------------------------
    def _record_copy(self, sha256: str, kind: str, partition: str, provider: str, uri: str, key: str,
                     version_id: str | None, size: int, checksum: str | None, media: str, offsite: bool) -> None:
        with self.catalogue.connect() as conn:
            conn.execute(
                """INSERT INTO wedbackup.media_copies (object_sha256, kind, partition, provider, uri, object_key,
                       version_id, size, checksum, media, offsite) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)
                   ON CONFLICT (object_sha256, provider) DO UPDATE SET uri = excluded.uri,
                       object_key = excluded.object_key, version_id = excluded.version_id, size = excluded.size,
                       checksum = excluded.checksum""",
                (sha256, kind, partition, provider, uri, key, version_id, size, checksum, media, offsite))

    def record_pack(self, partition: str, info: PackInfo, *, chunks: bool = True) -> None:
        """The pack and its chunks, in one transaction, after its vault copy is durable: a chunk is never
        known before the bytes that hold it are. Without `chunks`, the pack only (a repacked pack, whose
        chunks move to it once it is at every location: move_chunks)."""
        with self.catalogue.connect() as conn:
            conn.execute("INSERT INTO wedbackup.media_packs (pack_sha256, partition, key_id, size, blobs, raw_bytes) "
                         "VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                         (info.sha256, partition, info.key_id, info.size, len(info.entries), info.raw_bytes))
            if chunks:
                with conn.cursor() as cur:
                    cur.executemany("INSERT INTO wedbackup.media_chunks (key_id, chunk_id, pack_sha256, raw_bytes) "
                                    "VALUES (%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                                    [(info.key_id, e.chunk_id.hex(), info.sha256, e.raw_len) for e in info.entries])

    def move_chunks(self, info: PackInfo) -> None:
        """Point the chunks a repacked pack holds at it, in one transaction (their old pack may then go)."""
        with self.catalogue.connect() as conn:
            with conn.cursor() as cur:
                cur.executemany("UPDATE wedbackup.media_chunks SET pack_sha256 = %s "
                                "WHERE key_id = %s AND chunk_id = %s",
                                [(info.sha256, info.key_id, e.chunk_id.hex()) for e in info.entries])

    def known_among(self, key_id: str, chunk_ids: Iterable[str]) -> set[str]:
        """Which of these chunk ids (a backup's lookup batch) the partition's key already has in a pack: one
        indexed query, never the whole index of the wedding in memory."""
        with self.catalogue.connect() as conn:
            return {r["chunk_id"] for r in conn.execute(
                KNOWN_AMONG, (list(chunk_ids), key_id)).fetchall()}

    def chunk_packs(self, key_id: str, chunk_ids: Iterable[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        with self.catalogue.connect() as conn:
            for batch in _batches(chunk_ids, LOOKUP_IDS):
                rows = conn.execute(CHUNK_PACKS, (batch, key_id)).fetchall()
                found.update((r["chunk_id"], r["pack_sha256"]) for r in rows)
        return found

    def packs_holding(self, key_id: str, chunk_ids: Iterable[str]) -> tuple[set[str], int]:
        """The packs holding these chunks, and how many of the chunks no pack holds: in batches, so a
        snapshot of millions of chunks never has a chunk -> pack map in memory."""
        packs: set[str] = set()
        missing = 0
        with self.catalogue.connect() as conn:
            for batch in _batches(chunk_ids, LOOKUP_IDS):
                rows = conn.execute(PACKS_HOLDING, (batch, key_id)).fetchall()
                packs.update(r["pack_sha256"] for r in rows)
                missing += len(batch) - (rows[0]["found"] if rows else 0)
        return packs, missing

    def record_snapshot(self, *, partition: str, sha256: str, key_id: str, taken_at: Any, files: int, bytes_: int,
                        new_bytes: int, stored_bytes: int, packs: int, skipped: list[dict[str, str]]) -> int:
        with self.catalogue.connect() as conn:
            row = conn.execute(
                """INSERT INTO wedbackup.media_snapshots (partition, snapshot_sha256, key_id, taken_at, confirmed_at,
                       files, bytes, new_bytes, stored_bytes, packs, skipped)
                   VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)
                   ON CONFLICT (snapshot_sha256) DO UPDATE SET confirmed_at = excluded.confirmed_at RETURNING id""",
                (partition, sha256, key_id, taken_at, taken_at, files, bytes_, new_bytes, stored_bytes, packs,
                 json.dumps(skipped))).fetchone()
        return row["id"]

    def confirm_snapshot(self, snapshot_id: int, at: Any) -> None:
        with self.catalogue.connect() as conn:
            conn.execute("UPDATE wedbackup.media_snapshots SET confirmed_at = %s WHERE id = %s", (at, snapshot_id))

    def mark_verified(self, snapshot_id: int, at: Any) -> None:
        with self.catalogue.connect() as conn:
            conn.execute("UPDATE wedbackup.media_snapshots SET verified_at = %s, verifications = verifications + 1 "
                         "WHERE id = %s", (at, snapshot_id))

    def snapshots(self, partition: str, as_of: Any = None) -> list[SnapshotRow]:
        """The partition's snapshots, newest first (at or before `as_of` when given)."""
        with self.catalogue.connect() as conn:
            rows = conn.execute(
                "SELECT * FROM wedbackup.media_snapshots WHERE partition = %s "
                "AND (%s::timestamptz IS NULL OR taken_at <= %s::timestamptz) ORDER BY taken_at DESC, id DESC",
                (partition, as_of, as_of)).fetchall()
        return [SnapshotRow(r["id"], r["partition"], r["snapshot_sha256"], r["key_id"], r["taken_at"],
                            r["confirmed_at"], r["files"], r["bytes"], r["new_bytes"], r["stored_bytes"], r["packs"],
                            r["skipped"], r["verified_at"], r["verifications"]) for r in rows]

    def partitions(self) -> list[str]:
        """Every partition with a media snapshot."""
        with self.catalogue.connect() as conn:
            return [r["partition"] for r in conn.execute(
                "SELECT DISTINCT partition FROM wedbackup.media_snapshots ORDER BY partition").fetchall()]

    def copies(self, partition: str) -> list[dict[str, Any]]:
        with self.catalogue.connect() as conn:
            return conn.execute("SELECT * FROM wedbackup.media_copies WHERE partition = %s ORDER BY kind, "
                                "object_sha256, provider", (partition,)).fetchall()

    def copies_of(self, sha256: str) -> dict[str, dict[str, Any]]:
        with self.catalogue.connect() as conn:
            rows = conn.execute("SELECT * FROM wedbackup.media_copies WHERE object_sha256 = %s", (sha256,)).fetchall()
        return {r["provider"]: r for r in rows}

    # ---- replication -------------------------------------------------------------------------------
    def replicate(self, partition: str, replica: Any) -> tuple[int, int]:
        """Upload every pack and snapshot of the partition that is in the vault but not yet at this provider
        (packs first, so a snapshot never reaches a provider before its packs). Returns (uploaded, bytes)."""
        with self.catalogue.connect() as conn:
            rows = conn.execute(
                """SELECT v.object_sha256, v.kind, v.size FROM wedbackup.media_copies v
                   WHERE v.partition = %s AND v.provider = 'vault' AND NOT EXISTS (
                       SELECT FROM wedbackup.media_copies c WHERE c.object_sha256 = v.object_sha256
                       AND c.provider = %s) ORDER BY v.kind = 'snapshot', v.created_at""",
                (partition, replica.provider)).fetchall()
        uploaded = sent = 0
        for row in rows:
            path = self.vault_path(partition, row["kind"], row["object_sha256"])
            record = replica.upload(path, partition=partition, sha256=row["object_sha256"], size=row["size"],
                                    metadata={"kind": f"media-{row['kind']}"},
                                    key=self.object_key(replica, partition, row["kind"], row["object_sha256"]))
            self._record_copy(row["object_sha256"], row["kind"], partition, replica.provider, record.uri, record.key,
                              record.version_id, record.size, record.provider_checksum, record.media, record.offsite)
            if not record.already_present:
                uploaded += 1
                sent += record.size
        return uploaded, sent

    # ---- reading copies back ---------------------------------------------------------------------
    def fetch(self, partition: str, kind: str, sha256: str, dest: BinaryIO, provider: str) -> None:
        """Copy one object from `provider` (vault or a replica) into `dest`, its SHA-256 checked on the way:
        a damaged copy raises an error naming the provider and object."""
        from wedbackup_dagster.core.storage.replicas.base import HashingWriter

        if provider == VAULT:
            path = self.vault_path(partition, kind, sha256)
            out = HashingWriter(dest)
            try:
                with open(path, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 20)
            except FileNotFoundError:
                raise MediaCopyError(f"vault: {kind} {sha256} of {partition} is missing ({path})") from None
            if out.hexdigest() != sha256:
                raise MediaCopyError(f"vault: {kind} {sha256} of {partition} is damaged (its bytes hash to "
                                     f"{out.hexdigest()})")
            return
        replica = self.replicas.get(provider)
        if replica is None:
            raise MediaCopyError(f"{provider}: not configured")
        try:
            replica.download(self.object_key(replica, partition, kind, sha256), dest, expected_sha256=sha256)
        except ReplicaError as exc:
            raise MediaCopyError(f"{provider}: {kind} {sha256} of {partition}: {exc}") from None


class MediaCopyError(WedbackupError):
    """One copy of a pack or snapshot could not be read intact at one location."""


def erase_media(catalogue: Catalogue, vault_root: Path | str, replicas: Mapping[str, Any], partition: str) -> list[str]:
    """GDPR erasure of a wedding's media, after its key was shredded (which already makes every copy
    unreadable): delete its packs and snapshots at every provider (every version) and in the vault, and
    forget them in the catalogue. Returns what could not be deleted (a re-run finishes it)."""
    failed: list[str] = []
    check_partition(partition)
    if partition == "platform":
        raise WedbackupError("the platform partition's media is never erased as a wedding")
    for provider, replica in replicas.items():
        sub = f"media/weddings/{partition}/"
        try:
            lister = getattr(replica, "version_keys", None)
            keys = set(lister(sub)) if lister is not None else {o.key for o in replica.list(sub)}
        except WedbackupError as exc:
            failed.append(f"{provider}: listing the wedding's media failed: {exc}")
            continue
        for key in sorted(keys):
            try:
                replica.delete(key)
            except WedbackupError as exc:
                failed.append(str(exc)[:300])
        if not any(f.startswith(provider) for f in failed):
            with catalogue.connect() as conn:
                conn.execute("DELETE FROM wedbackup.media_copies WHERE partition = %s AND provider = %s",
                             (partition, provider))
    folder = Path(vault_root) / MEDIA_DIR / partition
    if folder.is_dir():
        shutil.rmtree(folder)
        fsync_dir(folder.parent)
    with catalogue.connect() as conn:
        conn.execute("DELETE FROM wedbackup.media_copies WHERE partition = %s AND provider = 'vault'", (partition,))
        if not failed:
            conn.execute("DELETE FROM wedbackup.media_snapshots WHERE partition = %s", (partition,))
            conn.execute("DELETE FROM wedbackup.media_packs WHERE partition = %s", (partition,))
    return failed
