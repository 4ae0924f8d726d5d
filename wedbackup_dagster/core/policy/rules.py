"""The rules every wedding's backup must keep — 3-2-1 over its copies, freshness against its tier's RPO,
a sealed vault archive that authenticates end to end, replicas the providers still vouch for, no sharp drop
in rows against the previous verified backup (shrinkage) — as plain functions, plus the read-only catalogue
queries that feed them (many weddings per query)."""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from psycopg import sql

from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.errors import ArchiveError
from wedbackup_dagster.core.keys.keyring import SecretKey

DEFAULT_RPO = timedelta(hours=24)
CRITICAL = "critical"


def default_rpo(partition: str) -> timedelta:
    """Until core.policy.backup_policy decides per tier and season: one day for every wedding."""
    return DEFAULT_RPO


def tier_from_date(wedding_date: date | None, today: date) -> str:
    """The design's tiers by days to the wedding: wedding week is critical, ≤30 days high, later normal."""
    if wedding_date is None:
        return "normal"
    days = (wedding_date - today).days
    if days < 0:
        return "past"
    if days <= 7:
        return CRITICAL
    return "high" if days <= 30 else "normal"


# ------------------------------------------------------------------------------------------ 3-2-1


@dataclass(frozen=True)
class CopyEvidence:
    """One copy of a wedding's newest backup and the evidence that it is good.

    A copy is *verified* when it is present and either (a) its checksum was confirmed when it was stored —
    a replica row is only recorded after the provider reported our checksum back, and the vault file is
    hashed as it is sealed and renamed into place atomically — or (b) a restore from it succeeded
    (`restored_at`). `verified_when` is the most recent of the two."""

    provider: str
    uri: str
    media: str
    offsite: bool
    size: int
    confirmed_at: datetime | None
    restored_at: datetime | None
    present: bool = True

    @property
    def verified(self) -> bool:
        return self.present and (self.confirmed_at is not None or self.restored_at is not None)

    @property
    def verified_when(self) -> datetime | None:
        stamps = [t for t in (self.confirmed_at, self.restored_at) if t is not None]
        return max(stamps) if stamps and self.present else None


@dataclass(frozen=True)
class ThreeTwoOne:
    passed: bool
    verified_copies: int
    media_kinds: tuple[str, ...]
    offsite_copies: int
    has_vault: bool
    problems: tuple[str, ...]
    copies: tuple[CopyEvidence, ...]

    @property
    def summary(self) -> str:
        head = (f"{self.verified_copies} verified copies, {len(self.media_kinds)} media kind(s) "
                f"({', '.join(self.media_kinds) or 'none'}), {self.offsite_copies} offsite")
        return head if self.passed else f"{head}: " + "; ".join(self.problems)


KEY_ONLY_IN_CATALOGUE = ("its wedding key is in no key-store backup at the vault and a provider yet, so no copy "
                         "counts: losing the catalogue would make every one unreadable (`wedbackup keys backup`)")


def three_two_one(copies: Iterable[CopyEvidence], *, min_copies: int = 3, min_media: int = 2,
                  min_offsite: int = 1, key_backed_up: bool = True) -> ThreeTwoOne:
    """At least 3 verified copies (the vault among them), on at least 2 kinds of media, at least 1 offsite.
    Only verified copies count towards any of the three numbers, and none while the key that opens them
    lives only in the catalogue (`key_backed_up` False: in no key-store backup at the vault and a provider)."""
    copies = tuple(sorted(copies, key=lambda c: c.provider))
    good = [c for c in copies if c.verified and key_backed_up]
    media = tuple(sorted({c.media for c in good}))
    offsite = sum(1 for c in good if c.offsite)
    has_vault = any(c.provider == "vault" for c in good)
    problems = [] if key_backed_up else [KEY_ONLY_IN_CATALOGUE]
    if len(good) < min_copies:
        problems.append(f"only {len(good)} verified copies, need {min_copies}")
    if not has_vault:
        problems.append("no verified vault copy")
    if len(media) < min_media:
        problems.append(f"only {len(media)} kind(s) of media, need {min_media}")
    if offsite < min_offsite:
        problems.append(f"only {offsite} offsite copies, need {min_offsite}")
    unverified = [c.provider for c in copies if not c.verified]
    if unverified:
        problems.append(f"not verified: {', '.join(unverified)}")
    passed = len(good) >= min_copies and has_vault and len(media) >= min_media and offsite >= min_offsite
    return ThreeTwoOne(passed, len(good), media, offsite, has_vault, tuple(problems), copies)


# -------------------------------------------------------------------------------------- freshness


@dataclass(frozen=True)
class Freshness:
    partition: str
    passed: bool
    tier: str
    rpo: timedelta
    newest_verified: datetime | None
    age: timedelta | None

    @property
    def critical(self) -> bool:
        return self.tier == CRITICAL

    @property
    def summary(self) -> str:
        rpo = _hours(self.rpo)
        if self.newest_verified is None:
            return f"wedding {self.partition} ({self.tier}): no verified backup yet (RPO {rpo})"
        state = "within" if self.passed else "beyond"
        return (f"wedding {self.partition} ({self.tier}): newest verified backup is {_hours(self.age)} old, "
                f"{state} the RPO of {rpo}")


def freshness(partition: str, newest_verified: datetime | None, *, now: datetime, rpo: timedelta,
              tier: str) -> Freshness:
    """The newest verified backup (its snapshot time) must be younger than the tier's RPO."""
    age = now - newest_verified if newest_verified is not None else None
    passed = age is not None and age <= rpo
    return Freshness(partition, passed, tier, rpo, newest_verified, age)


def _hours(delta: timedelta | None) -> str:
    if delta is None:
        return "?"
    hours = delta.total_seconds() / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


# ------------------------------------------------------------------------------ vault integrity


@dataclass(frozen=True)
class IntegrityReport:
    archive: str
    sha256: str
    sealed_bytes: int
    plaintext_bytes: int
    chunks: int
    key_id: str
    seconds: float


class _HashingReader:
    """Hashes the sealed bytes as the archive reader pulls them, so one pass proves both the catalogue's
    SHA-256 and every chunk's authentication tag."""

    def __init__(self, raw: Any):
        self._raw = raw
        self.sha = hashlib.sha256()
        self.count = 0

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer)
        if n:
            self.sha.update(memoryview(buffer)[:n])
            self.count += n
        return n

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.sha.update(data)
        self.count += len(data)
        return data


def verify_sealed_archive(path: Path, *, name: str, expected_sha256: str, expected_size: int,
                          resolve_key: Callable[[str], SecretKey]) -> IntegrityReport:
    """Open a sealed archive with its wedding key and read it through: header, every chunk's tag, the
    final-chunk flag and the zstd stream. Raises ArchiveError naming the archive on any failure."""
    from wedbackup_dagster.core.formats.archive import open_archive

    started = time.perf_counter()
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise ArchiveError(name, f"cannot be opened: {exc.strerror or exc}") from None
    with fh:
        hashing = _HashingReader(fh)
        reader = open_archive(hashing, name=name, resolve_key=resolve_key)
        plaintext = 0
        for piece in reader:
            plaintext += len(piece)
        # Bytes after the final chunk are not read by the reader; count them in.
        while hashing.read(1 << 20):
            pass
    if hashing.count != expected_size:
        raise ArchiveError(name, f"has {hashing.count} bytes, the catalogue recorded {expected_size}")
    if hashing.sha.hexdigest() != expected_sha256:
        raise ArchiveError(name, f"its SHA-256 {hashing.sha.hexdigest()[:16]}… is not the catalogue's "
                                 f"{expected_sha256[:16]}…")
    return IntegrityReport(name, expected_sha256, hashing.count, plaintext, reader.chunks, reader.header.key_id,
                           time.perf_counter() - started)


# ----------------------------------------------------------------------------- replica checksum


@dataclass(frozen=True)
class ReplicaComparison:
    provider: str
    passed: bool
    problem: str
    key: str | None
    recorded_checksum: str | None
    provider_checksum: str | None
    recorded_size: int | None
    provider_size: int | None


def compare_replica(provider: str, partition: str, archive_sha256: str, copy: Any | None,
                    head: Any | None) -> ReplicaComparison:
    """The provider's stored checksum, size and our sha256 stamp must equal what the catalogue recorded
    at upload. `copy` is the catalogue's CopyRecord (None: never recorded); `head` is Replica.head()."""
    if copy is None:
        return ReplicaComparison(provider, False, f"wedding {partition}: no {provider} copy of the newest backup "
                                 "is recorded in the catalogue", None, None, None, None, None)
    if head is None:
        return ReplicaComparison(provider, False, f"wedding {partition}: {provider} object {copy.object_key} is "
                                 "missing", copy.object_key, copy.checksum, None, copy.size, None)
    problems = []
    if head.provider_checksum != copy.checksum:
        problems.append(f"provider checksum {head.provider_checksum or '(none)'} != recorded {copy.checksum}")
    if head.size != copy.size:
        problems.append(f"size {head.size} != recorded {copy.size}")
    if head.sha256 and head.sha256 != archive_sha256:
        problems.append(f"object is stamped sha256 {head.sha256[:16]}…, expected {archive_sha256[:16]}…")
    problem = (f"wedding {partition}: {provider} object {copy.object_key}: " + "; ".join(problems)) if problems else ""
    return ReplicaComparison(provider, not problems, problem, copy.object_key, copy.checksum,
                             head.provider_checksum, copy.size, head.size)


# --------------------------------------------------------------------------- catalogue queries


@dataclass
class WeddingEvidence:
    """What the catalogue knows about one wedding's newest backup, gathered for the checks."""

    partition: str
    backup_id: int | None = None
    archive_sha256: str | None = None
    size: int | None = None
    key_id: str | None = None
    snapshot_time: datetime | None = None
    copies: list[dict[str, Any]] = field(default_factory=list)
    latest_restore: dict[str, Any] | None = None
    newest_verified: datetime | None = None
    wedding_date: date | None = None


class CheckQueries:
    """Read-only questions to the catalogue, each answered for a batch of weddings in a few queries."""

    def __init__(self, catalogue: Catalogue):
        self.catalogue = catalogue

    def evidence(self, partitions: list[str]) -> dict[str, WeddingEvidence]:
        out = {p: WeddingEvidence(p) for p in partitions}
        with self.catalogue.connect() as conn:
            newest = conn.execute(
                "SELECT DISTINCT ON (partition) id, partition, archive_sha256, size, key_id, snapshot_time "
                "FROM wedbackup.backups WHERE partition = ANY(%s) "
                "ORDER BY partition, snapshot_time DESC, id DESC", (partitions,)).fetchall()
            by_id = {}
            for row in newest:
                ev = out[row["partition"]]
                ev.backup_id, ev.archive_sha256, ev.size = row["id"], row["archive_sha256"], row["size"]
                ev.key_id, ev.snapshot_time = row["key_id"], row["snapshot_time"]
                by_id[row["id"]] = ev
            ids = list(by_id)
            for row in conn.execute(
                    "SELECT backup_id, provider, uri, object_key, version_id, size, checksum, storage_class, "
                    "region, media, offsite, stored_at, verified_at FROM wedbackup.copies "
                    "WHERE backup_id = ANY(%s) ORDER BY backup_id, provider", (ids,)).fetchall():
                by_id[row["backup_id"]].copies.append(row)
            for row in conn.execute(
                    "SELECT DISTINCT ON (backup_id) backup_id, provider, ok, seconds, detail, at "
                    "FROM wedbackup.restores WHERE backup_id = ANY(%s) ORDER BY backup_id, at DESC, id DESC",
                    (ids,)).fetchall():
                by_id[row["backup_id"]].latest_restore = row
            for row in conn.execute(
                    "SELECT b.partition, max(b.snapshot_time) AS newest FROM wedbackup.backups b "
                    "WHERE b.partition = ANY(%s) AND EXISTS (SELECT 1 FROM wedbackup.restores r "
                    "WHERE r.backup_id = b.id AND r.ok) GROUP BY b.partition", (partitions,)).fetchall():
                out[row["partition"]].newest_verified = row["newest"]
            for row in conn.execute(
                    "SELECT partition, wedding_date FROM wedbackup.partitions WHERE partition = ANY(%s)",
                    (partitions,)).fetchall():
                out[row["partition"]].wedding_date = row["wedding_date"]
        return out

    def last_verified(self, partitions: list[str] | None = None) -> dict[str, datetime | None]:
        """Per partition with a backup: when its newest backup last restored successfully (None: never)."""
        with self.catalogue.connect() as conn:
            rows = conn.execute(
                "SELECT n.partition, (SELECT max(r.at) FROM wedbackup.restores r WHERE r.backup_id = n.id "
                "AND r.ok) AS verified FROM (SELECT DISTINCT ON (partition) id, partition FROM wedbackup.backups "
                "WHERE %(all)s OR partition = ANY(%(parts)s) ORDER BY partition, snapshot_time DESC, id DESC) n",
                {"all": partitions is None, "parts": partitions or []}).fetchall()
        return {r["partition"]: r["verified"] for r in rows}


def copy_evidence(ev: WeddingEvidence, vault_present: Callable[[str, str], int | None]) -> list[CopyEvidence]:
    """The copies of a wedding's newest backup as evidence for 3-2-1. `vault_present(partition, sha256)`
    returns the vault file's size (None: missing): a vault copy whose file is gone or resized is absent."""
    out = []
    for c in ev.copies:
        present = True
        if c["provider"] == "vault":
            size = vault_present(ev.partition, ev.archive_sha256 or "")
            present = size is not None and size == c["size"]
        out.append(CopyEvidence(provider=c["provider"], uri=c["uri"], media=c["media"], offsite=bool(c["offsite"]),
                                size=int(c["size"]), confirmed_at=c["stored_at"], restored_at=c["verified_at"],
                                present=present))
    return out


def freshness_of(evidence: Mapping[str, WeddingEvidence], *, now: datetime | None = None,
                 rpo_for_partition: Callable[[str], timedelta] = default_rpo,
                 tier_for_partition: Callable[[str], str] | None = None) -> dict[str, Freshness]:
    """Freshness of many weddings. Tiers default to the wedding date the catalogue holds for each."""
    now = now or datetime.now(timezone.utc)
    out = {}
    for partition, ev in evidence.items():
        tier = tier_for_partition(partition) if tier_for_partition else tier_from_date(ev.wedding_date, now.date())
        out[partition] = freshness(partition, ev.newest_verified, now=now, rpo=rpo_for_partition(partition),
                                   tier=tier)
    return out


# ------------------------------------------------------------------------------------- shrinkage


@dataclass(frozen=True)
class TableDrop:
    """One table's rows in the baseline backup and in the new one (`after` None: the table is gone)."""

    table: str
    before: int
    after: int | None
    level: str = ""  # "error" | "warn" | "" (not flagged)

    @property
    def lost(self) -> int:
        return max(self.before - (self.after or 0), 0)

    @property
    def fraction(self) -> float:
        return self.lost / self.before if self.before else 0.0

    @property
    def text(self) -> str:
        if self.after is None:
            return f"{self.table} {self.before} → gone"
        if self.after == 0 and self.before:
            return f"{self.table} {self.before} → 0 (emptied)"
        return f"{self.table} {self.before} → {self.after} (-{self.fraction:.0%})"


@dataclass(frozen=True)
class Shrinkage:
    """The shrinkage verdict of one backup against its wedding's previous verified backup (the baseline)."""

    partition: str
    level: str  # "error" | "warn" | "ok"
    tables: tuple[TableDrop, ...]  # every table of the baseline, in name order
    total: TableDrop
    new_tables: tuple[str, ...] = ()
    backup_id: int | None = None
    baseline_id: int | None = None  # None: no earlier verified backup, nothing to compare
    previous_id: int | None = None  # the newest backup taken before this one (verified or not)
    baseline_time: datetime | None = None
    snapshot_time: datetime | None = None  # of the backup judged

    @property
    def passed(self) -> bool:
        return self.level == "ok"

    @property
    def flagged(self) -> tuple[TableDrop, ...]:
        return tuple(t for t in self.tables if t.level)

    @property
    def summary(self) -> str:
        if self.baseline_id is None and self.backup_id is not None:
            return f"wedding {self.partition}: no earlier verified backup to compare backup #{self.backup_id} with"
        since = f"backup #{self.backup_id} against verified backup #{self.baseline_id}"
        if self.passed:
            return (f"wedding {self.partition}: no sharp drop in rows ({since}; total "
                    f"{self.total.before} → {self.total.after})")
        drops = ", ".join(t.text for t in self.flagged) or "no single table"
        return f"wedding {self.partition}: rows dropped sharply ({since}): {drops}; {self.total.text}"


def shrinkage(partition: str, current: Mapping[str, int], baseline: Mapping[str, int] | None, *,
              warn: float, error: float, min_rows: int, backup_id: int | None = None,
              baseline_id: int | None = None, previous_id: int | None = None,
              baseline_time: datetime | None = None, snapshot_time: datetime | None = None) -> Shrinkage:
    """Per-table row counts of a new backup (`current`, table -> rows) against the baseline's.

    A table of the baseline is judged when it held at least `min_rows` rows there; it lost the fraction
    (before - after) / before (a table emptied, or gone from the new backup, lost 1.0; growth loses 0).
    It is flagged ERROR when that fraction is ≥ `error`, WARN when ≥ `warn`. The wedding's total (every
    table of each backup) is judged the same way. Tables new since the baseline are listed, never flagged;
    tables below `min_rows`, including zero-row ones, are never judged. No baseline: nothing to compare."""

    def level_of(before: int, after: int | None) -> str:
        if before < min_rows:
            return ""
        lost = max(before - (after or 0), 0) / before
        return "error" if lost >= error else "warn" if lost >= warn else ""

    if baseline is None:
        total = sum(current.values())
        return Shrinkage(partition, "ok", (), TableDrop("total", total, total), tuple(sorted(current)),
                         backup_id, None, previous_id, None, snapshot_time)
    tables = tuple(TableDrop(t, before, current.get(t), level_of(before, current.get(t)))
                   for t, before in sorted(baseline.items()))
    before, after = sum(baseline.values()), sum(current.values())
    total = TableDrop("total", before, after, level_of(before, after))
    levels = {t.level for t in (*tables, total)}
    level = "error" if "error" in levels else "warn" if "warn" in levels else "ok"
    return Shrinkage(partition, level, tables, total, tuple(sorted(set(current) - set(baseline))), backup_id,
                     baseline_id, previous_id, baseline_time, snapshot_time)


def shrinkage_flag(s: Shrinkage) -> dict[str, Any]:
    """A flagged verdict as the catalogue records it (`Catalogue.record_shrinkage`)."""
    return {"backup_id": s.backup_id, "partition": s.partition, "snapshot_time": s.snapshot_time,
            "baseline_id": s.baseline_id,
            "previous_id": s.previous_id, "level": s.level, "summary": s.summary,
            "detail": {"tables": [{"table": t.table, "before": t.before, "after": t.after, "level": t.level}
                                  for t in s.flagged],
                       "total": {"before": s.total.before, "after": s.total.after, "level": s.total.level}}}


@dataclass(frozen=True)
class CountedBackup:
    id: int
    snapshot_time: datetime
    verified: bool  # restored successfully at least once
    counts: dict[str, int]  # table -> rows, from its manifest


def counted_backups(catalogue: Catalogue, partitions: list[str], *, newest_only: bool
                    ) -> dict[str, list[CountedBackup]]:
    """Each partition's backups (oldest first) with their per-table row counts from the manifests; with
    `newest_only`, just those shrinkage needs for the newest one: it, its baseline and the one before it."""
    where = "b.partition = ANY(%(parts)s) AND b.deleting_since IS NULL"
    if newest_only:
        where += """ AND b.id IN (
            SELECT x.id FROM (SELECT DISTINCT ON (partition) id, partition, snapshot_time FROM wedbackup.backups
                              WHERE partition = ANY(%(parts)s) ORDER BY partition, snapshot_time DESC, id DESC) n,
            LATERAL (SELECT n.id UNION ALL
                     (SELECT o.id FROM wedbackup.backups o WHERE o.partition = n.partition
                      AND (o.snapshot_time, o.id) < (n.snapshot_time, n.id) ORDER BY o.snapshot_time DESC,
                      o.id DESC LIMIT 1) UNION ALL
                     (SELECT o.id FROM wedbackup.backups o WHERE o.partition = n.partition
                      AND (o.snapshot_time, o.id) < (n.snapshot_time, n.id)
                      AND EXISTS (SELECT FROM wedbackup.restores r WHERE r.backup_id = o.id AND r.ok)
                      ORDER BY o.snapshot_time DESC, o.id DESC LIMIT 1)) x)"""
    query = sql.SQL("""SELECT b.id, b.partition, b.snapshot_time,
                   EXISTS (SELECT FROM wedbackup.restores r WHERE r.backup_id = b.id AND r.ok) AS verified,
                   (SELECT coalesce(jsonb_object_agg((t->>'schema') || '.' || (t->>'name'), (t->>'rows')::bigint),
                                    '{{}}') FROM jsonb_array_elements(b.manifest->'tables') t) AS counts
                FROM wedbackup.backups b WHERE {where} ORDER BY b.partition, b.snapshot_time, b.id""").format(
        where=sql.SQL(where))
    out: dict[str, list[CountedBackup]] = {p: [] for p in partitions}
    with catalogue.connect() as conn:
        for r in conn.execute(query, {"parts": partitions}).fetchall():
            out[r["partition"]].append(CountedBackup(r["id"], r["snapshot_time"], r["verified"],
                                                     {k: int(v) for k, v in r["counts"].items()}))
    return out


def find_shrinkage(catalogue: Catalogue, partitions: list[str], *, warn: float, error: float, min_rows: int,
                   history: bool = False) -> dict[str, list[Shrinkage]]:
    """Shrinkage of each partition's newest backup (history: of every backup) against the newest verified
    backup taken before it. A partition without backups maps to []."""
    out: dict[str, list[Shrinkage]] = {}
    for partition, backups in counted_backups(catalogue, partitions, newest_only=not history).items():
        verdicts = []
        for i in range(0 if history else max(len(backups) - 1, 0), len(backups)):
            b = backups[i]
            base = next((o for o in reversed(backups[:i]) if o.verified), None)
            verdicts.append(shrinkage(
                partition, b.counts, base.counts if base else None, warn=warn, error=error, min_rows=min_rows,
                backup_id=b.id, baseline_id=base.id if base else None,
                previous_id=backups[i - 1].id if i else None, baseline_time=base.snapshot_time if base else None,
                snapshot_time=b.snapshot_time))
        out[partition] = verdicts
    return out


def covering_flags(s: Shrinkage, flags: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The recorded flags (`Catalogue.shrinkage_flags` rows) that are this verdict's drop already: of its
    wedding, on a backup taken after its baseline and no later than it. Once the flagged backup is pruned,
    a later backup compared with the same (or an older) baseline spans the same drop: it is not flagged
    again, and an acknowledgement of the first flag covers it."""
    if s.baseline_time is None or s.snapshot_time is None:
        return []
    return [f for f in flags if f["partition"] == s.partition
            and (f["backup_id"] == s.backup_id or s.baseline_time < f["snapshot_time"] <= s.snapshot_time)]


def new_shrinkage_flags(verdicts: Iterable[Shrinkage], flags: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The flagged verdicts no recorded flag covers yet, as rows for `Catalogue.record_shrinkage`."""
    known = list(flags)
    out: list[dict[str, Any]] = []
    for v in verdicts:
        if not v.passed and not covering_flags(v, known):
            row = shrinkage_flag(v)
            out.append(row)
            known.append(row)  # a later backup of the same history spanning this drop is that drop
    return out
