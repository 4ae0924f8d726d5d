"""DR drills (the `dr_drill` job): the platform, or a sample with the critical weddings always in, restored
from a provider (never the vault) into a scratch database, checked, timed per phase and tier, and dropped;
at times the catalogue-lost scenario in full, from a catalogue rebuilt from that provider alone."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any


from wedbackup_dagster.core.partitions import PLATFORM
from wedbackup_dagster.core.errors import WedbackupError
from wedbackup_dagster.core.postgres.load_snapshot import (scratch_database)

Progress = Callable[[str], None]
from .plans import PROVIDER_LOCATIONS
from .restore_all import (PlatformReport, RestoreAllOptions, copy_order, partition_order, planned_partitions, quiet,
                          restore_all)

# --- drills -------------------------------------------------------------------------------------------

DRILL_LABEL = "dr-drill"
RTO_TARGET_SECONDS = 4 * 3600.0  # the seeds: the whole system back within 4 hours
PARTITION_TARGET_SECONDS = 60.0  # … and each (critical) wedding within a minute


def drill_sample(weddings: Iterable[str], dates: Mapping[str, Any], policy: Any, size: int | None,
                 now: datetime) -> frozenset[str] | None:
    """Which of `weddings` a drill restores (the platform partition always comes too): every one (None) when
    `size` is None, else `size` of them — every critical wedding (by its date in `dates`) always in, the rest
    drawn at random with the ISO week as the seed, so each week's drill proves different weddings and a rerun
    the same ones."""
    if size is None:
        return None
    import random

    today = policy.today(now)
    weddings = sorted((p for p in weddings if p != PLATFORM), key=partition_order)
    critical = [p for p in weddings if dates.get(p) is not None and policy.tier(dates[p], today) == "critical"]
    others = [p for p in weddings if p not in set(critical)]
    year, week, _ = now.isocalendar()
    drawn = random.Random(f"{year}-{week}").sample(others, max(0, min(len(others), size - len(critical))))
    return frozenset(critical) | frozenset(drawn)


def tier_outcomes(report: PlatformReport, tiers: Mapping[str, str], started_at: datetime) -> dict[str, dict]:
    """Per tier, from this run's timeline: partitions restored, the achieved RTO (seconds from the start until
    the tier's last partition was committed), the slowest partition's own seconds, and the achieved RPO
    (the drill's start minus the tier's oldest recovery point)."""
    out: dict[str, dict[str, Any]] = {}
    for partition, (finished, seconds, point) in report.timeline.items():
        tier = tiers.get(partition, PLATFORM if partition == PLATFORM else "unknown")
        t = out.setdefault(tier, {"partitions": 0, "rto_seconds": 0.0, "slowest_seconds": 0.0,
                                  "slowest_partition": "", "rpo_seconds": 0.0})
        t["partitions"] += 1
        t["rto_seconds"] = max(t["rto_seconds"], finished)
        if seconds >= t["slowest_seconds"]:
            t["slowest_seconds"], t["slowest_partition"] = round(seconds, 3), partition
        if point:
            t["rpo_seconds"] = max(t["rpo_seconds"],
                                   round((started_at - datetime.fromisoformat(point)).total_seconds(), 1))
    for partition in report.failed:
        tier = tiers.get(partition, PLATFORM if partition == PLATFORM else "unknown")
        out.setdefault(tier, {"partitions": 0, "rto_seconds": 0.0, "slowest_seconds": 0.0,
                              "slowest_partition": "", "rpo_seconds": 0.0}).setdefault("failed", 0)
        out[tier]["failed"] += 1
    return dict(sorted(out.items()))


@dataclass
class DrillReport:
    provider: str
    started_at: str
    restore: PlatformReport
    rto_seconds: float  # the whole restore, scratch database made to checks done
    rpo_seconds: float  # from the oldest recovery point used to the drill's start
    throughput: dict[str, float]  # bytes per second of partition restore time, per copy location
    earlier: list[dict[str, Any]] = field(default_factory=list)  # the previous drills, newest first
    catalogue_rebuilt: dict[str, Any] = field(default_factory=dict)  # the catalogue-lost variant: what came back
    tiers: dict[str, dict[str, Any]] = field(default_factory=dict)  # per tier: partitions, RTO, RPO, slowest
    sampled: int | None = None  # weddings sampled (None: every wedding)

    @property
    def complete(self) -> bool:
        return self.restore.complete

    def critical_over(self, target_seconds: float) -> list[str]:
        """Critical weddings whose own restore took longer than `target_seconds`."""
        return [p for p, (_, seconds, _) in sorted(self.restore.timeline.items())
                if self.tier_of.get(p) == "critical" and seconds > target_seconds]

    tier_of: dict[str, str] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("tier_of")
        d["restore"] = self.restore.to_dict()
        d["complete"] = self.complete
        return d

    def markdown(self, rto_target: float = RTO_TARGET_SECONDS) -> str:
        r = self.restore
        out = [f"# DR drill from {self.provider} ({self.started_at})", "",
               f"**{'Complete' if self.complete else 'INCOMPLETE'}**: {r.restored_now} of {r.partitions_total} "
               f"partition(s) restored into a scratch database and checked against their manifests, "
               f"{r.rows:,} rows, {r.bytes:,} archive bytes.", "",
               f"- achieved RTO: **{self.rto_seconds:.1f} s** (target {rto_target:.0f} s)",
               f"- achieved RPO: oldest recovery point {r.oldest_point or '-'} ({self.rpo_seconds / 3600:.1f} h "
               f"before the drill), newest {r.newest_point or '-'}",
               f"- slowest partition: {r.slowest.get('partition', '-')} ({r.slowest.get('seconds', 0)} s)",
               "- DR pack: " + (f"{r.pack}, {r.from_pack} wedding(s) read from it (each checked against the "
                                 f"catalogue's SHA-256), the others from their own objects" if r.pack else
                                 "none at the provider: every wedding read from its own object"),
               f"- weddings: {'every wedding' if self.sampled is None else f'a sample of {self.sampled}'}"
               f" plus the platform partition"]
        if self.catalogue_rebuilt:
            c = self.catalogue_rebuilt
            out.append(f"- catalogue-lost scenario: a scratch catalogue rebuilt from {c['provider']} in "
                       f"{c['seconds']} s: {c['backups']} backup(s), {c['wedding_keys']} wedding key(s) from the "
                       f"key-store backup ({len(c['skipped'])} archive(s) skipped)")
        out += ["", "| phase | seconds (summed over workers) |", "|---|---|"]
        out += [f"| {k} | {v:.2f} |" for k, v in r.phases.items()]
        if self.tiers:
            out += ["", "| tier | partitions | RTO s (committed by) | slowest s | RPO h (oldest point) |",
                    "|---|---|---|---|---|"]
            out += [f"| {k} | {v['partitions']}{' (' + str(v['failed']) + ' failed)' if v.get('failed') else ''} | "
                    f"{v['rto_seconds']:.1f} | {v['slowest_seconds']:.2f} ({v['slowest_partition'] or '-'}) | "
                    f"{v['rpo_seconds'] / 3600:.1f} |" for k, v in self.tiers.items()]
        out += ["", "| copy | partitions | bytes/s |", "|---|---|---|"]
        out += [f"| {k} | {r.copies_used.get(k, 0)} | {v:,.0f} |" for k, v in self.throughput.items()]
        if self.earlier:
            last = self.earlier[0].get("rto_seconds")
            if isinstance(last, (int, float)) and last > 0:
                change = (self.rto_seconds - last) / last * 100
                out += ["", f"Trend: RTO {self.rto_seconds:.1f} s against {last:.1f} s at the previous drill "
                            f"({change:+.0f}%)."]
            out += ["", "| earlier drill | provider | partitions | RTO s | RPO h | complete |",
                    "|---|---|---|---|---|---|"]
            out += [f"| {d.get('started_at', '?')} | {d.get('provider', '?')} | {d.get('partitions', '?')} | "
                    f"{d.get('rto_seconds', '?')} | "
                    f"{round(d['rpo_seconds'] / 3600, 1) if isinstance(d.get('rpo_seconds'), (int, float)) else '?'}"
                    f" | {d.get('complete', '?')} |" for d in self.earlier[:8]]
        if r.stopped:
            out += ["", f"**Stopped**: {r.stopped}"]
        if r.failed or r.foreign_key_problems or r.fallbacks:
            out += ["", "Problems:"] + [f"- {line}" for line in r.lines()[6:]]
        return "\n".join(out)


def drill(engine: Any, replicas: Mapping[str, Any], provider: str, *, jobs: int = 4,
          window_seconds: float | None = None, catalogue_lost: bool = False, sample: int | None = None,
          policy: Any = None, progress: Progress = quiet) -> DrillReport:
    """The whole platform restored from `provider` (falling back to the other providers, never the vault)
    into a scratch database on the scratch server, checked (every table against its manifest while it loads,
    foreign keys and sequences at the end), timed per phase, and dropped. A drill past `window_seconds`
    starts no more weddings: it is reported incomplete (`restore.stopped`), its scratch dropped all the
    same. `catalogue_lost`: the catalogue-lost scenario in full — a scratch catalogue rebuilt from that
    provider alone (wedding keys from its key-store backup, opened with the master key), the restore driven
    by it; it proves the keys are recoverable without the live catalogue. Recorded in the live catalogue's
    audit trail (`dr-drill`) so the next drill shows the trend and `dr plan` its rates. `sample`: that many
    weddings (every critical one always in, drill_sample) plus the platform partition; `policy` (default: the
    policy file's) assigns the tiers of the per-tier RTO and RPO."""
    from wedbackup_dagster.core.policy.backup_policy import Policy

    if provider not in PROVIDER_LOCATIONS:
        raise WedbackupError(f"a drill restores from a provider ({', '.join(PROVIDER_LOCATIONS)}), never the vault; "
                             f"not {provider!r}")
    earlier = _earlier_drills(engine.catalogue)
    started_at = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    policy = policy or Policy.from_env()
    dates = engine.catalogue.live_partitions()
    today = policy.today(started_at)
    tier_of = {p: policy.tier(d, today) if p != PLATFORM else PLATFORM for p, d in dates.items()}
    only = drill_sample(planned_partitions(engine.catalogue)[0], dates, policy, sample, started_at)
    options = RestoreAllOptions(providers=copy_order(provider), jobs=jobs, window_seconds=window_seconds,
                                include_unverified=catalogue_lost, only=only)
    rebuilt: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        driver = engine
        if catalogue_lost:
            driver = stack.enter_context(_rebuilt_engine(engine, replicas[provider], rebuilt, progress))
        scratch = stack.enter_context(scratch_database(engine.settings.scratch_dsn, label=DRILL_LABEL))
        report = restore_all(driver, replicas, scratch, options, progress=progress)
    rto = round(time.perf_counter() - t0, 3)
    oldest = datetime.fromisoformat(report.oldest_point) if report.oldest_point else started_at
    throughput = {k: round(v["bytes"] / v["seconds"], 1) if v["seconds"] else 0.0
                  for k, v in report.per_copy.items()}
    result = DrillReport(provider, started_at.isoformat(), report, rto,
                         round((started_at - oldest).total_seconds(), 1), throughput, earlier, rebuilt,
                         tier_outcomes(report, tier_of, started_at), None if only is None else len(only), tier_of)
    engine.catalogue.audit("dr-drill", PLATFORM, {
        "tiers": result.tiers, "sampled": result.sampled,
        "provider": provider, "started_at": result.started_at, "rto_seconds": rto, "complete": result.complete,
        "rpo_seconds": result.rpo_seconds, "partitions": report.partitions_total, "phases": report.phases,
        "throughput": throughput, "failed": sorted(report.failed)[:50], "stopped": report.stopped,
        "dr_pack": report.pack or None, "from_pack": report.from_pack,
        "catalogue_rebuilt": rebuilt or None})
    return result


@contextlib.contextmanager
def _rebuilt_engine(engine: Any, replica: Any, rebuilt: dict[str, Any], progress: Progress) -> Iterator[Any]:
    """An engine over a scratch catalogue rebuilt from `replica` alone, dropped afterwards."""
    import dataclasses

    from wedbackup_dagster.core.catalogue.rebuild_from_storage import rebuild_from

    with scratch_database(engine.settings.scratch_dsn, label=DRILL_LABEL + "-catalogue") as catalogue_dsn:
        other = type(engine)(dataclasses.replace(engine.settings, catalogue_dsn=catalogue_dsn), engine.keyring)
        try:
            t0 = time.perf_counter()
            found = rebuild_from(replica, other.catalogue, other.keyring)
            rebuilt.update(provider=replica.provider, seconds=round(time.perf_counter() - t0, 3),
                           backups=found.backups_added, wedding_keys=found.keys_restored,
                           key_backup=found.key_backup, skipped=found.skipped[:20])
            progress(f"scratch catalogue rebuilt from {replica.provider}: {found.backups_added} backup(s), "
                     f"{found.keys_restored} wedding key(s) from the key-store backup, {len(found.skipped)} skipped")
            yield other
        finally:
            other.catalogue.close()


def _earlier_drills(catalogue: Any, limit: int = 8) -> list[dict[str, Any]]:
    with catalogue.connect() as conn:
        rows = conn.execute("SELECT detail FROM wedbackup.audit WHERE action = 'dr-drill' ORDER BY id DESC LIMIT %s",
                            (limit,)).fetchall()
    return [r["detail"] for r in rows]


CATALOGUE_LOST_MODES = ("monthly", "always", "never")


def drill_catalogue_lost(mode: str, now: datetime | None = None) -> bool:
    """Whether this drill runs the catalogue-lost scenario: `monthly` (the default) for the first drill of
    each month (a weekly drill in the month's first 7 days), `always`, or `never`."""
    if mode not in CATALOGUE_LOST_MODES:
        raise WedbackupError(f"catalogue_lost {mode!r} is not one of {', '.join(CATALOGUE_LOST_MODES)}")
    return mode == "always" or (mode == "monthly" and (now or datetime.now(timezone.utc)).day <= 7)


def drill_provider(now: datetime | None = None) -> str:
    """The provider of this week's drill: s3, gcs, azure in turn by ISO week, so every provider is proved."""
    week = (now or datetime.now(timezone.utc)).isocalendar()[1]
    return PROVIDER_LOCATIONS[week % len(PROVIDER_LOCATIONS)]
