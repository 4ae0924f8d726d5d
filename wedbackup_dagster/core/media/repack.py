"""Repacking: after retention, a pack whose chunks are mostly garbage (no kept snapshot needs them) has its
live chunks rewritten into new packs and is then deleted, so pruned media frees its bytes. Atomic by order:
the new pack is written to the vault, uploaded to every provider that holds the old one and recorded there;
only then do its chunks point to it (one transaction), and only then is the old pack deleted. A crash at any
step leaves either the old pack in use or a new pack nothing points to yet, which the next garbage collection
removes after the grace period. Runs under the partition's media lock (prune_media holds it)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from wedbackup_dagster.core.errors import ConfigError, WedbackupError
from wedbackup_dagster.core.keys.keyring import SecretKey

from .chunker import maybe_compress
from .packs import PACK_TARGET_BYTES, PackError, PackInfo, PackWriter
from .store import PACK, VAULT, MediaCopyError, MediaStore

MEDIA_REPACK_BELOW_ENV = "WEDBACKUP_MEDIA_REPACK_BELOW"
# Rewrite a pack when less than half of its bytes are live: each rewrite then frees at least as many bytes
# at every location as it uploads again, and a pack is not rewritten over and over as it slowly ages.
DEFAULT_REPACK_BELOW = 0.5


def repack_threshold(environ: Mapping[str, str] | None = None) -> float:
    """WEDBACKUP_MEDIA_REPACK_BELOW: the live fraction under which a pack is rewritten (0 turns it off)."""
    env = os.environ if environ is None else environ
    text = (env.get(MEDIA_REPACK_BELOW_ENV) or "").strip()
    if not text:
        return DEFAULT_REPACK_BELOW
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise ConfigError(MEDIA_REPACK_BELOW_ENV, "must be a fraction from 0 (never repack) to below 1, e.g. 0.5")
    return value


@dataclass
class RepackReport:
    rewritten: list[str] = field(default_factory=list)  # old packs, now deleted
    written: list[str] = field(default_factory=list)  # new packs
    live_bytes: int = 0  # plaintext bytes carried over
    freed_bytes: int = 0  # sealed bytes of the old packs minus those of the new, at every location
    failed: list[str] = field(default_factory=list)


def sparse_packs(store: MediaStore, partition: str, live: set[str], threshold: float, older_than: datetime
                 ) -> list[dict[str, Any]]:
    """The partition's packs (past the grace period) whose live plaintext is under `threshold` of their
    plaintext, but not none (a pack nothing needs is garbage collection's), each with its live chunks."""
    if threshold <= 0:
        return []
    with store.catalogue.connect() as conn:
        packs = conn.execute("SELECT pack_sha256, key_id, size, raw_bytes FROM wedbackup.media_packs "
                             "WHERE partition = %s AND created_at < %s", (partition, older_than)).fetchall()
        out = []
        for p in packs:
            chunks = conn.execute("SELECT chunk_id, raw_bytes FROM wedbackup.media_chunks WHERE pack_sha256 = %s",
                                  (p["pack_sha256"],)).fetchall()
            alive = [c for c in chunks if c["chunk_id"] in live]
            live_bytes = sum(c["raw_bytes"] for c in alive)
            if alive and live_bytes < threshold * max(p["raw_bytes"], 1):
                out.append({**p, "live": [c["chunk_id"] for c in alive], "live_bytes": live_bytes})
    return out


def repack(store: MediaStore, partition: str, resolve_key: Callable[[str], SecretKey], sparse: list[dict[str, Any]],
           delete_everywhere: Callable[[str], bool]) -> RepackReport:
    """Rewrite the live chunks of `sparse` packs (from sparse_packs) into new packs, then delete the old ones
    with `delete_everywhere(pack_sha256)` (retention's deleter: every copy, then its catalogue row)."""
    from .restore import LOCATIONS, PackSource  # restore imports store, not this module

    report = RepackReport()
    if not sparse:
        return report
    with tempfile.TemporaryDirectory(prefix="wedbackup-media-repack-") as tmp:
        source = PackSource(store, partition, resolve_key, LOCATIONS, Path(tmp))
        try:
            for key_id in sorted({p["key_id"] for p in sparse}):
                group = [p for p in sparse if p["key_id"] == key_id]
                try:
                    _repack_group(store, partition, resolve_key(key_id), source, group, report)
                except WedbackupError as exc:
                    report.failed.append(f"repacking {len(group)} pack(s): {exc}")
                    continue
                for p in group:
                    if delete_everywhere(p["pack_sha256"]):
                        report.rewritten.append(p["pack_sha256"])
        finally:
            source.close()
    return report


def _repack_group(store: MediaStore, partition: str, wedding_key: SecretKey, source: Any,
                  group: list[dict[str, Any]], report: RepackReport) -> None:
    """The live chunks of packs sealed with one wedding key into new packs, each made durable at every
    location its old packs were before any chunk points to it."""
    locations = set()
    for p in group:
        locations |= set(store.copies_of(p["pack_sha256"]))
    new_infos: list[PackInfo] = []
    ctx = None
    try:
        writer = None
        for p in group:
            try:
                reader = source.reader(p["pack_sha256"])
            except (MediaCopyError, PackError) as exc:
                raise WedbackupError(f"pack {p['pack_sha256']}: {exc}") from None
            for hexid in p["live"]:
                data = reader.read_chunk(bytes.fromhex(hexid))  # authenticated and checked against its id
                if writer is None:
                    ctx = store.incoming(partition)
                    fh, tmp = ctx.__enter__()
                    writer = PackWriter(fh, wedding_key)
                stored, compressed = maybe_compress(memoryview(data))
                writer.add(bytes.fromhex(hexid), stored, len(data), compressed)
                report.live_bytes += len(data)
                if writer.size >= PACK_TARGET_BYTES:
                    new_infos.append(_close(store, partition, writer, fh, tmp))
                    ctx.__exit__(None, None, None)
                    writer, ctx = None, None
        if writer is not None:
            new_infos.append(_close(store, partition, writer, fh, tmp))
            ctx.__exit__(None, None, None)
            ctx = None
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    # The new packs were recorded as they were closed (packs only: no chunk points to them yet, so a crash
    # leaves garbage that collection removes); now uploaded to every provider that held an old pack, and checked.
    for provider in sorted(locations - {VAULT}):
        if provider not in store.replicas:
            raise WedbackupError(f"{provider} holds the old packs but is not configured here: old packs kept")
        store.replicate(partition, store.replicas[provider])
    for info in new_infos:
        missing = locations - set(store.copies_of(info.sha256))
        if missing:
            raise WedbackupError(f"new pack {info.sha256} is not at {', '.join(sorted(missing))}: old packs kept")
    for info in new_infos:
        store.move_chunks(info)  # one transaction per pack: its chunks now point to it
        report.written.append(info.sha256)
    report.freed_bytes += sum(p["size"] for p in group) - sum(i.size for i in new_infos)


def _close(store: MediaStore, partition: str, writer: PackWriter, fh: Any, tmp: Path) -> PackInfo:
    """The new pack durable in the vault and recorded as a pack, without chunks: garbage until they move."""
    info = writer.close()
    store.commit(fh, tmp, partition, PACK, info.sha256, info.size)
    store.record_pack(partition, info, chunks=False)
    return info
