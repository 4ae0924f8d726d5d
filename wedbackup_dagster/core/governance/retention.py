"""Retention: which backups to keep (grandfather-father-son per tier, `plan_retention`, pure) and the
executor that deletes the rest (`prune`): every copy on every provider and in the vault, then the
catalogue rows, each deletion in the audit trail; a copy under Object Lock stays and its lock is recorded.

"One per period" is the NEWEST backup whose snapshot falls in that period (calendar day, ISO week,
calendar month, on the policy's clock). A backup is kept when any of these holds:
- it is the newest backup of its wedding, or the newest verified one (restored successfully at least once);
- its snapshot is younger than `keep_all` (48 h);
- it is the newest of its day and younger than `daily_days` days (30);
- it is the newest of its ISO week and younger than `weekly_weeks` weeks (12);
- it is the newest of its month and younger than `monthly_months` calendar months (12);
- it is held by a shrinkage flag nobody acknowledged yet: the verified backup a sharp drop in rows was
  measured against, and the backup taken just before the drop (`hold_reasons`; flags are found and
  recorded by `prune` itself over every backup's history, so a drop the check never saw still holds).
Everything else is deleted, and so is whatever is left of an erased wedding (copies an Object Lock kept
through the erasure). The order of the executor makes a crash harmless: the backup is first marked
(`deleting_since`), then each copy is deleted at its provider and only then its row; the backup row goes
last, once no copy row is left. A re-run finishes the job (deleting an absent object is not an error)."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any

from wedbackup_dagster.core.errors import ReplicaLocked, WedbackupError
from wedbackup_dagster.core.partitions import PLATFORM
from wedbackup_dagster.core.policy.backup_policy import Policy, RetentionRule


ERASED = "wedding erased (GDPR): the key is destroyed; deleting what a lock kept"


@dataclass(frozen=True)
class BackupPoint:
    """What planning needs of one backup."""

    id: int
    partition: str
    snapshot_time: datetime
    verified: bool = False
    tier: str = "normal"
    hold: str = ""  # why a person must look before it may go (an unacknowledged shrinkage flag)


@dataclass
class RetentionPlan:
    keep: dict[int, list[str]] = field(default_factory=dict)  # backup id -> why it stays
    delete: dict[int, str] = field(default_factory=dict)  # backup id -> why it goes


def _months_before(moment: datetime, months: int) -> datetime:
    """The same wall-clock time `months` calendar months earlier (day clamped to the month's length)."""
    import calendar

    index = moment.year * 12 + (moment.month - 1) - months
    year, month = divmod(index, 12)
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


def _periods(local: datetime) -> dict[str, str]:
    iso = local.isocalendar()
    return {"daily": local.date().isoformat(), "weekly": f"{iso[0]}-W{iso[1]:02d}", "monthly": f"{local:%Y-%m}"}


def _rule_for(rules: RetentionRule | Mapping[str, RetentionRule], tier: str) -> RetentionRule:
    if isinstance(rules, RetentionRule):
        return rules
    if tier not in rules:
        raise WedbackupError(f"retention: no rule for tier {tier!r} (rules for {', '.join(sorted(rules))})")
    return rules[tier]


def plan_retention(backups: Iterable[BackupPoint], now: datetime,
                   rules: RetentionRule | Mapping[str, RetentionRule],
                   tz: tzinfo = timezone.utc) -> RetentionPlan:
    """Keep/delete for every backup given (see the module docstring), judged per wedding with its tier's
    rule; days, weeks and months are those of `tz`. `now` must be timezone-aware."""
    if now.tzinfo is None:
        raise ValueError("plan_retention: now must be timezone-aware")
    plan = RetentionPlan()
    by_partition: dict[str, list[BackupPoint]] = defaultdict(list)
    for b in backups:
        by_partition[b.partition].append(b)
    local_now = now.astimezone(tz)
    for points in by_partition.values():
        points.sort(key=lambda b: (b.snapshot_time, b.id))
        # Every wedding's backups follow its CURRENT tier: a wedding long past thins out as archived.
        rule = _rule_for(rules, points[-1].tier)
        horizons = {"daily": now - timedelta(days=rule.daily_days),
                    "weekly": now - timedelta(weeks=rule.weekly_weeks),
                    "monthly": _months_before(local_now, rule.monthly_months)}
        reasons: dict[int, list[str]] = defaultdict(list)
        reasons[points[-1].id].append("newest backup")
        verified = [b for b in points if b.verified]
        if verified:
            reasons[verified[-1].id].append("newest verified backup")
        newest_of: dict[tuple[str, str], BackupPoint] = {}
        for b in points:  # ascending: the last one seen in a period is its newest
            for level, period in _periods(b.snapshot_time.astimezone(tz)).items():
                newest_of[(level, period)] = b
        for (level, period), b in newest_of.items():
            if b.snapshot_time > horizons[level]:
                reasons[b.id].append(f"{level} {period}")
        for b in points:
            if b.snapshot_time > now - rule.keep_all:
                reasons[b.id].insert(0, f"younger than {_span(rule.keep_all)}")
            if b.hold:
                reasons[b.id].append(b.hold)
            if reasons.get(b.id):
                plan.keep[b.id] = reasons[b.id]
            else:
                plan.delete[b.id] = _why_not(b, tz, horizons, rule)
    return plan


def _span(d: timedelta) -> str:
    hours = d.total_seconds() / 3600
    return f"{hours:g} h"


def _why_not(b: BackupPoint, tz: tzinfo, horizons: dict[str, datetime], rule: RetentionRule) -> str:
    periods = _periods(b.snapshot_time.astimezone(tz))
    for level in ("daily", "weekly", "monthly"):
        if b.snapshot_time > horizons[level]:
            return f"not the newest backup of {level} period {periods[level]}"
    return (f"older than every window (newest per month kept for {rule.monthly_months} months; "
            f"snapshot {b.snapshot_time:%Y-%m-%d %H:%M})")


# ------------------------------------------------------------------------------------------ executor


@dataclass
class CopyDeletion:
    """What happened to the copies of one backup being deleted (prune or erasure)."""

    backup_id: int
    partition: str
    archive_sha256: str
    snapshot_time: datetime | None = None
    reason: str = ""
    deleted: list[str] = field(default_factory=list)  # providers whose copy is gone
    locked: dict[str, datetime | None] = field(default_factory=dict)  # provider -> locked until
    failed: dict[str, str] = field(default_factory=dict)  # provider -> error (provider down, ...)
    forgotten: bool = False  # the backup's catalogue row is gone (no copy left)

    def as_dict(self) -> dict[str, Any]:
        return {"backup_id": self.backup_id, "archive_sha256": self.archive_sha256,
                "snapshot_time": str(self.snapshot_time), "reason": self.reason, "deleted": self.deleted,
                "locked": {p: str(u) for p, u in self.locked.items()}, "failed": self.failed,
                "forgotten": self.forgotten}


def delete_backup_copies(catalogue: Any, vault: Any, replicas: Mapping[str, Any], row: Mapping[str, Any]
                         ) -> CopyDeletion:
    """Delete every copy of one backup (a row of `Catalogue.backups_with_copies`): storage first, then
    the copy's row; a locked copy keeps its row with the lock recorded; the backup row goes when no copy
    is left. Never raises for one provider's refusal or outage: the outcome says what stayed."""
    out = CopyDeletion(row["id"], row["partition"], row["archive_sha256"], row.get("snapshot_time"))
    for copy in row["copies"]:
        provider = copy["provider"]
        try:
            if provider == "vault":
                vault.remove(row["partition"], row["archive_sha256"])
            elif provider in replicas:
                replicas[provider].delete(copy["object_key"])
            else:
                out.failed[provider] = "no replica of this provider is configured here; the copy was left"
                continue
        except ReplicaLocked as exc:
            catalogue.record_lock(row["id"], provider, exc.locked_until, exc.mode)
            out.locked[provider] = exc.locked_until
            continue
        except (WedbackupError, OSError) as exc:
            out.failed[provider] = str(exc)[:300]
            continue
        catalogue.forget_copy(row["id"], provider)
        out.deleted.append(provider)
    out.forgotten = catalogue.forget_backup_if_uncopied(row["id"])
    return out


@dataclass
class PruneReport:
    dry_run: bool
    now: datetime
    kept: int  # backups kept, of the partitions that had more than one (or were erased)
    deletions: list[CopyDeletion]
    # Backups a shrinkage flag holds: partition, backup_id, snapshot_time, every reason it is kept.
    held: list[dict[str, Any]] = field(default_factory=list)
    segments: dict[str, Any] = field(default_factory=dict)  # change segments pruned (core/changefeed/retention.py)

    @property
    def locked(self) -> list[CopyDeletion]:
        return [d for d in self.deletions if d.locked]

    @property
    def failed(self) -> list[CopyDeletion]:
        return [d for d in self.deletions if d.failed]

    def summary(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "kept": self.kept, "deleted": len(self.deletions),
                "copies_deleted": sum(len(d.deleted) for d in self.deletions),
                "copies_locked": sum(len(d.locked) for d in self.deletions),
                "copies_failed": sum(len(d.failed) for d in self.deletions), "backups_held": len(self.held)}


def backup_points(rows: Iterable[Mapping[str, Any]], policy: Policy, now: datetime,
                  holds: Mapping[int, str] | None = None) -> list[BackupPoint]:
    """Catalogue rows as planning input, each wedding's tier judged today from its wedding date."""
    today = policy.today(now)
    holds = holds or {}
    return [BackupPoint(id=r["id"], partition=r["partition"], snapshot_time=r["snapshot_time"],
                        verified=bool(r["verified"]), hold=holds.get(r["id"], ""),
                        # No wedding date known (platform, or a wedding never discovered): the platform's rule.
                        tier=PLATFORM if r["partition"] == PLATFORM else policy.tier(r["wedding_date"], today))
            for r in rows]


def hold_reasons(flags: Iterable[Mapping[str, Any]]) -> dict[int, str]:
    """backup id -> why it is held, from open shrinkage flags (`Catalogue.shrinkage_flags` rows or
    `rules.shrinkage_flag` dicts): the baseline and the backup just before each flagged drop."""
    out: dict[int, str] = {}
    for f in flags:
        why = (f"held: rows dropped sharply in backup #{f['backup_id']} ({f['level'].upper()}), not yet "
               f"acknowledged — check, then `wedbackup ack --wedding {f['partition']}`")
        for backup_id in (f["baseline_id"], f.get("previous_id")):
            if backup_id is not None:
                out.setdefault(backup_id, why)
    return out


def shrinkage_holds(catalogue: Any, partitions: list[str], policy: Policy, *, record: bool) -> dict[int, str]:
    """Find sharp drops over every backup of `partitions` (rules.find_shrinkage), record the new ones
    (unless `record` is False: a dry run), and return what the unacknowledged flags hold."""
    from wedbackup_dagster.core.policy import rules

    rule = policy.shrinkage
    verdicts = rules.find_shrinkage(catalogue, partitions, warn=rule.warn, error=rule.error,
                                    min_rows=rule.min_rows, history=True)
    known = catalogue.shrinkage_flags(partitions)
    found = rules.new_shrinkage_flags((v for vs in verdicts.values() for v in vs), known)
    if record:
        catalogue.record_shrinkage(found)
        known = catalogue.shrinkage_flags(partitions)
    else:
        known = [*known, *found]
    return hold_reasons(f for f in known if f.get("acknowledged_at") is None)


PARTITIONS_PER_PASS = 500  # partitions read and judged at a time: memory stays bounded on a large fleet


def prune(catalogue: Any, vault: Any, replicas: Mapping[str, Any], policy: Policy, *,
          now: datetime | None = None, dry_run: bool = False, partition: str | None = None) -> PruneReport:
    """Apply the retention policy to the catalogue's backups (of one partition, or all), a few hundred
    partitions at a time."""
    now = now or datetime.now(timezone.utc)
    report = PruneReport(dry_run, now, 0, [])
    erased = catalogue.erased_partitions()
    partitions = [partition] if partition else catalogue.prunable_partitions()
    for start in range(0, len(partitions), PARTITIONS_PER_PASS):
        batch = partitions[start:start + PARTITIONS_PER_PASS]
        rows = catalogue.backups_with_copies(batch)
        holds = shrinkage_holds(catalogue, [p for p in batch if p not in erased], policy, record=not dry_run)
        # An erased wedding keeps nothing: what is left of it are copies a lock kept; they go once it ends.
        plan = plan_retention(backup_points([r for r in rows if r["partition"] not in erased], policy, now, holds),
                              now, policy.retention, tz=policy.zone())
        plan.delete.update({r["id"]: ERASED for r in rows if r["partition"] in erased})
        report.kept += len(plan.keep)
        report.held += [{"partition": r["partition"], "backup_id": r["id"], "snapshot_time": r["snapshot_time"],
                         "reason": "; ".join(plan.keep[r["id"]])}
                        for r in rows if r["id"] in holds and r["id"] in plan.keep]
        doomed = [r for r in rows if r["id"] in plan.delete]
        if dry_run:
            report.deletions += [CopyDeletion(r["id"], r["partition"], r["archive_sha256"], r["snapshot_time"],
                                              plan.delete[r["id"]]) for r in doomed]
            continue
        catalogue.mark_deleting([r["id"] for r in doomed])
        for row in doomed:
            outcome = delete_backup_copies(catalogue, vault, replicas, row)
            outcome.reason = plan.delete[row["id"]]
            catalogue.audit("prune", row["partition"], outcome.as_dict())
            report.deletions.append(outcome)
    from ..changefeed.retention import prune_segments  # segments live as long as the snapshots they extend

    report.segments = prune_segments(catalogue, vault, replicas, dry_run=dry_run, partition=partition)
    return report
