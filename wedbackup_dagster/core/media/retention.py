"""Retention of media: a partition's media snapshots kept or pruned by the tier's grandfather-father-son
rules (the rows' own planner, core/retention.plan_retention), then the packs no kept snapshot needs are
garbage-collected everywhere. A pack younger than GC_GRACE is never collected, and pruning holds the
partition's media lock, so a running media backup can never lose a pack it is about to reference.
`prune_all_media` is the sweep over every partition with media (the daily `retention_sweep` job and
`wedbackup media prune --all`)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from wedbackup_dagster.core.errors import WedbackupError
from wedbackup_dagster.core.keys.keyring import SecretKey
from wedbackup_dagster.core.catalogue.locks import partition_lock
from wedbackup_dagster.core.governance.retention import BackupPoint, plan_retention

from .repack import repack, sparse_packs
from .restore import LOCATIONS, load_snapshot
from .store import PACK, SNAPSHOT, VAULT, MediaStore, erase_media

# Longer than any media backup runs (and the 2 h run monitoring limit): a pack written by a backup that has
# not yet sealed its snapshot is this young, so it stays.
GC_GRACE = timedelta(hours=6)


@dataclass
class MediaPruneReport:
    partition: str
    dry_run: bool
    kept: dict[int, list[str]] = field(default_factory=dict)
    deleted_snapshots: dict[str, str] = field(default_factory=dict)  # sha256 -> why
    deleted_packs: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    failed: list[str] = field(default_factory=list)
    repacked: list[str] = field(default_factory=list)  # sparse packs rewritten (dry run: that would be)
    repacked_live_bytes: int = 0
    repack_freed_bytes: int = 0


def _delete_everywhere(store: MediaStore, partition: str, kind: str, sha256: str, report: MediaPruneReport) -> bool:
    ok = True
    for provider, copy in store.copies_of(sha256).items():
        try:
            if provider == VAULT:
                store.vault_path(partition, kind, sha256).unlink(missing_ok=True)
            else:
                store.replicas[provider].delete(copy["object_key"])
        except (WedbackupError, KeyError, OSError) as exc:
            report.failed.append(f"{provider}: {kind} {sha256}: {exc}")
            ok = False
            continue
        with store.catalogue.connect() as conn:
            conn.execute("DELETE FROM wedbackup.media_copies WHERE object_sha256 = %s AND provider = %s",
                         (sha256, provider))
    return ok


def _delete_pack(store: MediaStore, partition: str, sha256: str, report: MediaPruneReport) -> bool:
    if not _delete_everywhere(store, partition, PACK, sha256, report):
        return False
    with store.catalogue.connect() as conn:  # its chunk rows go with it (those still pointing to it)
        conn.execute("DELETE FROM wedbackup.media_packs WHERE pack_sha256 = %s", (sha256,))
    return True


def prune_media(store: MediaStore, partition: str, policy: Any, resolve_key: Callable[[str], SecretKey], *,
                wedding_date: Any = None, now: datetime | None = None, dry_run: bool = False,
                repack_below: float = 0.0) -> MediaPruneReport:
    """Prune one partition's media snapshots, collect the packs no kept snapshot needs, then repack the packs
    whose live fraction is under `repack_below` (0: never; core/media/repack.py)."""
    now = now or datetime.now(timezone.utc)
    report = MediaPruneReport(partition, dry_run)
    with partition_lock(store.catalogue, f"media:{partition}", purpose="media prune"):
        rows = store.snapshots(partition)
        if not rows:
            return report
        tier = "platform" if partition == "platform" else policy.tier(wedding_date, policy.today(now))
        points = [BackupPoint(r.id, partition, r.taken_at, r.verified_at is not None, tier) for r in rows]
        plan = plan_retention(points, now, policy.retention, tz=policy.zone())
        report.kept = plan.keep
        kept = [r for r in rows if r.id in plan.keep]
        needed: set[str] = set()
        live: set[str] = set()
        for row in kept:  # every chunk a kept snapshot needs, and so every pack that holds one
            snapshot = load_snapshot(store, row, resolve_key, LOCATIONS)
            live |= snapshot.chunk_ids()
            needed |= store.packs_holding(row.key_id, snapshot.chunk_ids())[0]
        with store.catalogue.connect() as conn:
            packs = conn.execute("SELECT pack_sha256, size, created_at FROM wedbackup.media_packs WHERE partition = %s",
                                 (partition,)).fetchall()
        unneeded = [p for p in packs if p["pack_sha256"] not in needed and p["created_at"] < now - GC_GRACE]
        for row in rows:
            if row.id in plan.delete:
                report.deleted_snapshots[row.sha256] = plan.delete[row.id]
        report.deleted_packs = [p["pack_sha256"] for p in unneeded]
        report.freed_bytes = sum(p["size"] for p in unneeded)
        sparse = [p for p in sparse_packs(store, partition, live, repack_below, now - GC_GRACE)
                  if p["pack_sha256"] not in report.deleted_packs]
        if dry_run:
            report.repacked = [p["pack_sha256"] for p in sparse]
            report.repacked_live_bytes = sum(p["live_bytes"] for p in sparse)
            return report
        for row in rows:  # snapshots first: a pack is never gone while a catalogued snapshot names it
            if row.id in plan.delete and _delete_everywhere(store, partition, SNAPSHOT, row.sha256, report):
                with store.catalogue.connect() as conn:
                    conn.execute("DELETE FROM wedbackup.media_snapshots WHERE id = %s", (row.id,))
        for pack in unneeded:
            _delete_pack(store, partition, pack["pack_sha256"], report)
        done = repack(store, partition, resolve_key, sparse, lambda sha: _delete_pack(store, partition, sha, report))
        report.repacked, report.repacked_live_bytes = done.rewritten, done.live_bytes
        report.repack_freed_bytes = done.freed_bytes
        report.failed += done.failed
        store.catalogue.audit("media-prune", partition, {"snapshots": len(report.deleted_snapshots),
                                                         "packs": len(report.deleted_packs),
                                                         "bytes": report.freed_bytes, "repacked": len(report.repacked),
                                                         "repack_freed_bytes": report.repack_freed_bytes,
                                                         "failed": report.failed[:20]})
    return report


@dataclass
class MediaSweep:
    """What a sweep over many partitions' media did: one report per partition, and the partitions that failed."""

    dry_run: bool
    reports: list[MediaPruneReport] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # partition -> why its media could not be pruned
    erased: list[str] = field(default_factory=list)  # erased weddings whose leftover media was deleted now

    @property
    def failed(self) -> list[str]:
        return [f"{p}: {e}" for p, e in self.errors.items()] + [f"{r.partition}: {f}" for r in self.reports
                                                                 for f in r.failed]

    def summary(self) -> dict[str, int]:
        return {"media_partitions": len(self.reports),
                "media_snapshots_kept": sum(len(r.kept) for r in self.reports),
                "media_snapshots_deleted": sum(len(r.deleted_snapshots) for r in self.reports),
                "media_packs_deleted": sum(len(r.deleted_packs) for r in self.reports),
                "media_bytes_freed": sum(r.freed_bytes + r.repack_freed_bytes for r in self.reports),
                "media_packs_repacked": sum(len(r.repacked) for r in self.reports),
                "media_failed": len(self.failed)}


def prune_all_media(store: MediaStore, policy: Any, resolve_key: Callable[[str], SecretKey], *,
                    wedding_dates: Mapping[str, Any], erased: set[str] | frozenset[str] = frozenset(),
                    partition: str | None = None, now: datetime | None = None, dry_run: bool = False,
                    repack_below: float = 0.0) -> MediaSweep:
    """prune_media for every partition with a media snapshot (or only `partition`), each with its tier's rules
    (`wedding_dates`: partition -> wedding date, as the catalogue knows it). A partition that fails is named and
    the others are pruned. An erased wedding whose media erasure left something behind (a provider was down)
    has it deleted now, as the rows' sweep deletes what is left of an erased wedding."""
    sweep = MediaSweep(dry_run)
    partitions = store.partitions()
    if partition is not None:
        partitions = [p for p in partitions if p == partition]
    for p in partitions:
        if p in erased:
            if not dry_run:
                failed = erase_media(store.catalogue, store.root.parent, store.replicas, p)
                if failed:
                    sweep.errors[p] = "erased wedding: media left at a provider: " + "; ".join(failed[:3])
                sweep.erased.append(p)
            continue
        try:
            sweep.reports.append(prune_media(store, p, policy, resolve_key, wedding_date=wedding_dates.get(p),
                                             now=now, dry_run=dry_run, repack_below=repack_below))
        except WedbackupError as exc:
            sweep.errors[p] = str(exc)
    return sweep


def sweep_engine_media(engine: Any, replicas: Mapping[str, Any], policy: Any, *, partition: str | None = None,
                       dry_run: bool = False) -> MediaSweep:
    """The retention sweep's media part for an Engine (the daily `retention_sweep` and `wedbackup prune`):
    media snapshots by the same rules, then every pack no kept snapshot needs (past the grace period), then
    the packs mostly garbage repacked (WEDBACKUP_MEDIA_REPACK_BELOW)."""
    from wedbackup_dagster.core.media.repack import repack_threshold
    from wedbackup_dagster.core.media.store import MediaStore

    store = MediaStore(engine.settings.vault_dir, engine.catalogue, dict(replicas))
    return prune_all_media(store, policy, engine.resolve_key, wedding_dates=engine.catalogue.live_partitions(),
                           erased=engine.catalogue.erased_partitions(), partition=partition, dry_run=dry_run,
                           repack_below=repack_threshold())
