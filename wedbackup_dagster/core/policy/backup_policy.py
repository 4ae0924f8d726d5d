"""Backup policy: which tier a wedding is in (by days to its date), each tier's RPO, queue priority and
batching, tightened in wedding season; retention; the shrinkage check's thresholds. One configuration
object, loadable from a JSON or YAML file."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from wedbackup_dagster.core.errors import ConfigError
from wedbackup_dagster.core.partitions import PLATFORM
from wedbackup_dagster.core.storage.providers import PROVIDERS

# and PLATFORM, its own tier
CRITICAL, HIGH, NORMAL, RECENT, ARCHIVED = "critical", "high", "normal", "recent", "archived"
TIERS = (CRITICAL, HIGH, NORMAL, RECENT, ARCHIVED, PLATFORM)
POLICY_FILE_VARIABLE = "WEDBACKUP_POLICY_FILE"

def _name(key: Any) -> str:
    """A key from the policy file as it may appear in an error: as written when it is a plain name,
    else escaped and bounded (a hostile file must not flood or forge the log)."""
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", key):
        return key
    text = repr(key)
    return text if len(text) <= 60 else text[:57] + "..."


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


@dataclass(frozen=True)
class TierRule:
    rpo: timedelta  # a wedding is due when its newest backup (or coverage check) is older than this
    priority: int  # `dagster/priority` of its runs: the queue starts higher numbers first
    # An unchanged wedding still gets a new archive once its newest one is this old (0: always a new
    # one): the updated_at fingerprint misses deletes of child rows, so trust it only so long.
    fresh_copy_every: timedelta
    max_run_size: int  # weddings per run (including the few not-due ones a range carries along)


def _default_tiers() -> dict[str, TierRule]:
    h, d = timedelta(hours=1), timedelta(days=1)
    return {
        CRITICAL: TierRule(rpo=1 * h, priority=100, fresh_copy_every=timedelta(0), max_run_size=25),
        HIGH: TierRule(rpo=4 * h, priority=50, fresh_copy_every=1 * d, max_run_size=100),
        # The platform partition (vendors, feature flags, platform audit) is shared by every wedding but
        # changes slowly: daily, ahead of the ordinary weddings in the queue.
        PLATFORM: TierRule(rpo=24 * h, priority=40, fresh_copy_every=1 * d, max_run_size=1),
        # Each run pays 3-4 s of process start-up (loading the code location): 1,000 weddings a run keeps
        # that near 3 ms a wedding (benchmarks/dagster_overhead.py), and a run still ends in about 10 min.
        NORMAL: TierRule(rpo=24 * h, priority=10, fresh_copy_every=7 * d, max_run_size=1000),
        RECENT: TierRule(rpo=24 * h, priority=0, fresh_copy_every=7 * d, max_run_size=1000),
        ARCHIVED: TierRule(rpo=7 * d, priority=-10, fresh_copy_every=28 * d, max_run_size=1000),
    }


@dataclass(frozen=True)
class RetentionRule:
    """Grandfather-father-son retention of one tier's backups (core/governance/retention.py applies it): everything
    younger than keep_all, then the newest backup of each day for `daily_days` days, of each ISO week for
    `weekly_weeks` weeks and of each calendar month for `monthly_months` months."""

    keep_all: timedelta = timedelta(hours=48)
    daily_days: int = 30
    weekly_weeks: int = 12
    monthly_months: int = 12


def _default_retention() -> dict[str, RetentionRule]:
    return {tier: RetentionRule() for tier in TIERS}


@dataclass(frozen=True)
class ShrinkageRule:
    """Thresholds of the shrinkage check (core/policy/rules.py `shrinkage`): a table, or the wedding's total, whose
    previous verified backup held at least `min_rows` rows and which lost at least `warn` (a fraction, 0-1) of
    them is flagged WARN; at least `error` of them, ERROR. A table emptied or gone is a loss of 1.0."""

    warn: float = 0.5
    error: float = 0.9
    min_rows: int = 20


@dataclass(frozen=True)
class StandingRule:
    """Standing verification (disaster/standing.py): a daily check_weddings over every wedding, a daily
    reconcile_inventory, and a rolling re-verification restoring every wedding's newest backup at least once
    per `reverify_window`, a share of the weddings on each tick of `reverify_cron`."""

    check_weddings_cron: str = "0 1 * * *"
    reconcile_inventory_cron: str = "30 1 * * *"
    reverify_cron: str = "0 2 * * *"
    reverify_window: timedelta = timedelta(days=7)


DRILL_PROVIDERS = PROVIDERS  # a drill restores from a provider, never the vault
DRILL_CATALOGUE_LOST = ("monthly", "always")


@dataclass(frozen=True)
class DrillRule:
    """The DR drill (disaster/drill.py): when it runs, what it restores (every wedding, or `sample` weddings plus
    the platform partition with every critical wedding always in), from where (a provider, rotating by week when
    unset; never the vault), how often the catalogue-lost scenario runs in full (at least monthly), the RTO
    targets and the window after which it is stopped."""

    cron: str = "0 4 * * 0"  # weekly, Sunday 04:00: off-peak, after the nightly retention sweep
    timezone: str = "Europe/London"
    sample: int | None = None  # None: every wedding
    provider: str | None = None  # None: s3, gcs, azure in turn by ISO week
    catalogue_lost: str = "monthly"  # the first drill of each month; or always
    rto_target: timedelta = timedelta(hours=4)  # the whole system (the seeds)
    critical_rto_target: timedelta = timedelta(minutes=1)  # each critical wedding (the seeds)
    window: timedelta = timedelta(hours=4)  # a drill still running after this is stopped
    jobs: int = 4


@dataclass(frozen=True)
class PackRule:
    """The DR pack (disaster/pack_job.py, core/disaster/packs.py): when `dr_pack_schedule` builds one, and whether
    the schedule is on. Daily off-peak by default: after the night's re-verification, before the weekly drill."""

    cron: str = "0 3 * * *"  # daily 03:00: after rolling_reverification (02:00), before Sunday's drill (04:00)
    timezone: str = "Europe/London"
    enabled: bool = True  # false: the schedule starts stopped (`wedbackup dr pack` and the job still work)


@dataclass(frozen=True)
class Band:
    """The weddings dated lo..hi (inclusive; None = open) and their tier and effective RPO today."""

    tier: str
    lo: date | None
    hi: date | None
    rule: TierRule
    rpo: timedelta


@dataclass(frozen=True)
class Policy:
    tiers: Mapping[str, TierRule] = field(default_factory=_default_tiers)
    critical_days: int = 2  # critical: the wedding is within ±this many days
    wedding_day_rpo: timedelta = timedelta(minutes=15)  # critical, on the day itself
    high_days: int = 30  # high: at most this many days ahead
    recent_days: int = 90  # recent: at most this many days past; older is archived
    season_months: frozenset[int] = frozenset(range(5, 11))  # May–October
    season_tiers: frozenset[str] = frozenset({HIGH, NORMAL})
    season_factor: float = 0.5  # in season, those tiers' RPO is multiplied by this
    timezone: str = "Europe/London"  # "today" and "in season" are judged on this clock
    cron: str = "*/5 * * * *"  # the backup schedule
    # A run over a range of weddings carries the not-due ones between due ones; at most this many per
    # gap: a wedding's backup (~0.15 s batched) is cheaper than a run (~2 s), but not for free.
    max_extra_per_gap: int = 4
    retention: Mapping[str, RetentionRule] = field(default_factory=_default_retention)
    shrinkage: ShrinkageRule = field(default_factory=ShrinkageRule)
    standing: StandingRule = field(default_factory=StandingRule)
    drill: DrillRule = field(default_factory=DrillRule)
    dr_pack: PackRule = field(default_factory=PackRule)

    def __post_init__(self) -> None:
        _validate(self)

    # ---- questions ---------------------------------------------------------------------------------
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def today(self, now: datetime) -> date:
        return _aware(now).astimezone(self.zone()).date()

    def in_season(self, now: datetime) -> bool:
        return self.today(now).month in self.season_months

    def tier(self, wedding_date: date | None, today: date) -> str:
        if wedding_date is None:
            return PLATFORM
        days = (wedding_date - today).days
        if abs(days) <= self.critical_days:
            return CRITICAL
        if days > 0:
            return HIGH if days <= self.high_days else NORMAL
        return RECENT if -days <= self.recent_days else ARCHIVED

    def rpo(self, wedding_date: date | None, now: datetime) -> timedelta:
        today = self.today(now)
        tier = self.tier(wedding_date, today)
        if tier == CRITICAL and wedding_date == today:
            return self.wedding_day_rpo
        return self._seasonal(tier, self.tiers[tier].rpo, now)

    def priority(self, tier: str) -> int:
        return self.tiers[tier].priority

    def bands(self, now: datetime) -> list[Band]:
        """The tiers as ranges of wedding dates on `now`'s day, so a database can assign them in one
        query; the platform partition (no date) is the band with lo = hi = None."""
        t = self.today(now)
        c, hd, rd = self.critical_days, self.high_days, self.recent_days
        one = timedelta(days=1)
        spans = [
            (CRITICAL, t, t),
            (CRITICAL, t - timedelta(days=c), t - one),
            (CRITICAL, t + one, t + timedelta(days=c)),
            (HIGH, t + timedelta(days=c + 1), t + timedelta(days=hd)),
            (NORMAL, t + timedelta(days=max(hd, c) + 1), None),
            (RECENT, t - timedelta(days=rd), t - timedelta(days=c + 1)),
            (ARCHIVED, None, t - timedelta(days=max(rd, c) + 1)),
        ]
        out = []
        for tier, lo, hi in spans:
            if lo is not None and hi is not None and lo > hi:
                continue  # e.g. high_days <= critical_days: no high band at all
            rpo = self.wedding_day_rpo if (tier == CRITICAL and lo == hi == t) else \
                self._seasonal(tier, self.tiers[tier].rpo, now)
            out.append(Band(tier, lo, hi, self.tiers[tier], rpo))
        out.append(Band(PLATFORM, None, None, self.tiers[PLATFORM], self._seasonal(PLATFORM, self.tiers[PLATFORM].rpo,
                                                                                    now)))
        return out

    def _seasonal(self, tier: str, rpo: timedelta, now: datetime) -> timedelta:
        if tier in self.season_tiers and self.in_season(now):
            return rpo * self.season_factor
        return rpo

    # ---- loading -----------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "policy") -> Policy:
        """Defaults overlaid with `data` (every key optional); a bad value is a ConfigError naming it."""
        if not isinstance(data, Mapping):
            raise ConfigError(source, "must be a mapping of policy settings")
        known = {"tiers", "critical_days", "wedding_day_rpo", "high_days", "recent_days", "season", "timezone",
                 "cron", "max_extra_per_gap", "retention", "shrinkage", "standing", "drill", "dr_pack"}
        unknown = sorted(set(data) - known, key=repr)  # YAML keys may be numbers or null, not only text
        if unknown:
            raise ConfigError(f"{source}.{_name(unknown[0])}",
                              f"is not a policy setting (known: {', '.join(sorted(known))})")
        base = cls()
        tiers = dict(base.tiers)
        overrides = data.get("tiers") or {}
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"{source}.tiers", "must be a mapping of tier name to settings")
        for tier, rule in overrides.items():
            where = f"{source}.tiers.{_name(tier)}"
            if tier not in TIERS:
                raise ConfigError(where, f"is not a tier (tiers: {', '.join(TIERS)})")
            if not isinstance(rule, Mapping):
                raise ConfigError(where, "must be a mapping")
            extra = sorted(set(rule) - {"rpo", "priority", "fresh_copy_every", "max_run_size"}, key=repr)
            if extra:
                raise ConfigError(f"{where}.{_name(extra[0])}", "is not a tier setting")
            current = tiers[tier]
            tiers[tier] = TierRule(
                rpo=_duration(rule.get("rpo", current.rpo), f"{where}.rpo"),
                priority=_int(rule.get("priority", current.priority), f"{where}.priority", lo=-1000, hi=1000),
                fresh_copy_every=_duration(rule.get("fresh_copy_every", current.fresh_copy_every),
                                           f"{where}.fresh_copy_every", allow_zero=True),
                max_run_size=_int(rule.get("max_run_size", current.max_run_size), f"{where}.max_run_size",
                                  lo=1, hi=100_000))
        season = data.get("season") or {}
        if not isinstance(season, Mapping):
            raise ConfigError(f"{source}.season", "must be a mapping (months, tiers, factor)")
        bad = sorted(set(season) - {"months", "tiers", "factor"}, key=repr)
        if bad:
            raise ConfigError(f"{source}.season.{_name(bad[0])}", "is not a season setting")
        kwargs: dict[str, Any] = {"tiers": tiers}
        for name in ("critical_days", "high_days", "recent_days"):
            if name in data:
                kwargs[name] = _int(data[name], f"{source}.{name}", lo=0, hi=3650)
        if "max_extra_per_gap" in data:
            kwargs["max_extra_per_gap"] = _int(data["max_extra_per_gap"], f"{source}.max_extra_per_gap", lo=0, hi=1000)
        if "wedding_day_rpo" in data:
            kwargs["wedding_day_rpo"] = _duration(data["wedding_day_rpo"], f"{source}.wedding_day_rpo")
        if "timezone" in data:
            kwargs["timezone"] = data["timezone"]
        if "cron" in data:
            kwargs["cron"] = data["cron"]
        if "months" in season:
            months = season["months"]
            if not isinstance(months, list) or not all(isinstance(m, int) and 1 <= m <= 12 for m in months):
                raise ConfigError(f"{source}.season.months", "must be a list of month numbers 1-12")
            kwargs["season_months"] = frozenset(months)
        if "tiers" in season:
            names = season["tiers"]
            if not isinstance(names, list) or not all(n in TIERS for n in names):
                raise ConfigError(f"{source}.season.tiers", f"must be a list of tiers ({', '.join(TIERS)})")
            kwargs["season_tiers"] = frozenset(names)
        if "factor" in season:
            factor = season["factor"]
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
                raise ConfigError(f"{source}.season.factor", "must be a number in (0, 1]")
            kwargs["season_factor"] = float(factor)
        if "retention" in data:
            kwargs["retention"] = _retention(data["retention"], f"{source}.retention")
        if "shrinkage" in data:
            kwargs["shrinkage"] = _shrinkage(data["shrinkage"], f"{source}.shrinkage")
        if "standing" in data:
            kwargs["standing"] = _standing(data["standing"], f"{source}.standing")
        if "drill" in data:
            kwargs["drill"] = _drill(data["drill"], f"{source}.drill")
        if "dr_pack" in data:
            kwargs["dr_pack"] = _dr_pack(data["dr_pack"], f"{source}.dr_pack")
        try:
            return replace(base, **kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}.{exc.variable}", str(exc).split(": ", 1)[1]) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Policy:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(POLICY_FILE_VARIABLE, f"cannot read policy file {p.name}: {exc.strerror}") from None
        try:
            if p.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - any parse error means the same thing to the user
            raise ConfigError(POLICY_FILE_VARIABLE, f"policy file {p.name} does not parse: {exc}") from None
        return cls.from_mapping(data, source=p.name)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Policy:
        env = os.environ if environ is None else environ
        path = env.get(POLICY_FILE_VARIABLE, "")
        return cls.from_file(path) if path else cls()


def _validate(p: Policy) -> None:
    missing = [t for t in TIERS if t not in p.tiers]
    if missing:
        raise ConfigError(f"tiers.{missing[0]}", "is missing")
    for tier, rule in p.tiers.items():
        if rule.rpo <= timedelta(0):
            raise ConfigError(f"tiers.{tier}.rpo", "must be positive")
        if rule.fresh_copy_every < timedelta(0):
            raise ConfigError(f"tiers.{tier}.fresh_copy_every", "must not be negative")
        if rule.max_run_size < 1:
            raise ConfigError(f"tiers.{tier}.max_run_size", "must be at least 1")
    missing = [t for t in TIERS if t not in p.retention]
    if missing:
        raise ConfigError(f"retention.tiers.{missing[0]}", "is missing")
    if p.wedding_day_rpo <= timedelta(0):
        raise ConfigError("wedding_day_rpo", "must be positive")
    if not p.critical_days < p.high_days:
        raise ConfigError("high_days", "must be greater than critical_days")
    if not p.critical_days < p.recent_days:
        raise ConfigError("recent_days", "must be greater than critical_days")
    if not p.season_months <= frozenset(range(1, 13)):
        raise ConfigError("season.months", "must be month numbers 1-12")
    if not 0 < p.season_factor <= 1:
        raise ConfigError("season.factor", "must be a number in (0, 1]")
    if not isinstance(p.timezone, str):
        raise ConfigError("timezone", "must be an IANA time zone name such as Europe/London")
    try:
        ZoneInfo(p.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError("timezone", "is not a known IANA time zone (e.g. Europe/London)") from None
    if not isinstance(p.cron, str) or len(p.cron.split()) != 5:
        raise ConfigError("cron", "must be a five-field cron expression such as '*/5 * * * *'")


_RETENTION_KEYS = ("keep_all", "daily_days", "weekly_weeks", "monthly_months")


def _retention_rule(data: Any, where: str, base: RetentionRule) -> RetentionRule:
    if not isinstance(data, Mapping):
        raise ConfigError(where, f"must be a mapping ({', '.join(_RETENTION_KEYS)})")
    extra = sorted(set(data) - set(_RETENTION_KEYS))
    if extra:
        raise ConfigError(f"{where}.{extra[0]}", f"is not a retention setting (known: {', '.join(_RETENTION_KEYS)})")
    return RetentionRule(
        keep_all=_duration(data.get("keep_all", base.keep_all), f"{where}.keep_all", allow_zero=True),
        daily_days=_int(data.get("daily_days", base.daily_days), f"{where}.daily_days", lo=0, hi=3650),
        weekly_weeks=_int(data.get("weekly_weeks", base.weekly_weeks), f"{where}.weekly_weeks", lo=0, hi=520),
        monthly_months=_int(data.get("monthly_months", base.monthly_months), f"{where}.monthly_months", lo=0,
                            hi=1200))


def _retention(data: Any, where: str) -> dict[str, RetentionRule]:
    """`retention: {keep_all: 48h, daily_days: 30, ..., tiers: {archived: {daily_days: 7}}}`: the top-level
    values apply to every tier, a tier's own values override them."""
    if not isinstance(data, Mapping):
        raise ConfigError(where, "must be a mapping of retention settings (and `tiers`)")
    overall = _retention_rule({k: v for k, v in data.items() if k != "tiers"}, where, RetentionRule())
    per_tier = data.get("tiers") or {}
    if not isinstance(per_tier, Mapping):
        raise ConfigError(f"{where}.tiers", "must be a mapping of tier name to retention settings")
    out = {tier: overall for tier in TIERS}
    for tier, rule in per_tier.items():
        if tier not in TIERS:
            raise ConfigError(f"{where}.tiers.{tier}", f"is not a tier (tiers: {', '.join(TIERS)})")
        out[tier] = _retention_rule(rule, f"{where}.tiers.{tier}", overall)
    return out


_SHRINKAGE_KEYS = ("warn", "error", "min_rows")


def _shrinkage(data: Any, where: str) -> ShrinkageRule:
    """`shrinkage: {warn: 0.5, error: 0.9, min_rows: 20}` (every key optional)."""
    if not isinstance(data, Mapping):
        raise ConfigError(where, f"must be a mapping ({', '.join(_SHRINKAGE_KEYS)})")
    extra = sorted(set(data) - set(_SHRINKAGE_KEYS), key=repr)
    if extra:
        raise ConfigError(f"{where}.{_name(extra[0])}",
                          f"is not a shrinkage setting (known: {', '.join(_SHRINKAGE_KEYS)})")
    base = ShrinkageRule()
    fractions = {}
    for name in ("warn", "error"):
        value = data.get(name, getattr(base, name))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ConfigError(f"{where}.{name}", "must be a fraction of rows lost, a number in (0, 1] such as 0.5")
        fractions[name] = float(value)
    if fractions["warn"] > fractions["error"]:
        raise ConfigError(f"{where}.warn", f"must not exceed error ({fractions['error']:g})")
    min_rows = _int(data.get("min_rows", base.min_rows), f"{where}.min_rows", lo=1, hi=1_000_000_000)
    return ShrinkageRule(warn=fractions["warn"], error=fractions["error"], min_rows=min_rows)


def _cron(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value.split()) != 5:
        raise ConfigError(where, "must be a five-field cron expression such as '0 2 * * *'")
    return value


def _settings(data: Any, where: str, known: tuple[str, ...], what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(where, f"must be a mapping ({', '.join(known)})")
    extra = sorted(set(data) - set(known), key=repr)
    if extra:
        raise ConfigError(f"{where}.{_name(extra[0])}", f"is not a {what} setting (known: {', '.join(known)})")
    return data


_STANDING_KEYS = ("check_weddings_cron", "reconcile_inventory_cron", "reverify_cron", "reverify_window")


def _standing(data: Any, where: str) -> StandingRule:
    """`standing: {check_weddings_cron: '0 1 * * *', reconcile_inventory_cron: …, reverify_cron: '0 2 * * *',
    reverify_window: 7d}` (every key optional)."""
    data = _settings(data, where, _STANDING_KEYS, "standing verification")
    base = StandingRule()
    return StandingRule(
        check_weddings_cron=_cron(data.get("check_weddings_cron", base.check_weddings_cron),
                                  f"{where}.check_weddings_cron"),
        reconcile_inventory_cron=_cron(data.get("reconcile_inventory_cron", base.reconcile_inventory_cron),
                                       f"{where}.reconcile_inventory_cron"),
        reverify_cron=_cron(data.get("reverify_cron", base.reverify_cron), f"{where}.reverify_cron"),
        reverify_window=_duration(data.get("reverify_window", base.reverify_window), f"{where}.reverify_window"))


def _zone(value: Any, where: str) -> str:
    """An IANA time zone name, or a ConfigError naming `where`."""
    try:
        ZoneInfo(value if isinstance(value, str) else "")
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(where, "is not a known IANA time zone (e.g. Europe/London)") from None
    return value


_DRILL_KEYS = ("cron", "timezone", "sample", "provider", "catalogue_lost", "rto_target", "critical_rto_target",
               "window", "jobs")


def _drill(data: Any, where: str) -> DrillRule:
    """`drill: {cron: '0 4 * * 0', timezone: Europe/London, sample: all | N, provider: s3 | gcs | azure,
    catalogue_lost: monthly | always, rto_target: 4h, critical_rto_target: 1m, window: 4h, jobs: 4}`."""
    data = _settings(data, where, _DRILL_KEYS, "drill")
    base = DrillRule()
    zone = _zone(data.get("timezone", base.timezone), f"{where}.timezone")
    sample = data.get("sample", "all")
    sample = None if sample in ("all", None) else _int(sample, f"{where}.sample", lo=1, hi=10_000_000)
    provider = data.get("provider", base.provider)
    if provider is not None and provider not in DRILL_PROVIDERS:
        raise ConfigError(f"{where}.provider", f"must be one of {', '.join(DRILL_PROVIDERS)} (a drill never "
                                               f"restores from the vault), or unset to rotate by week")
    lost = data.get("catalogue_lost", base.catalogue_lost)
    if lost not in DRILL_CATALOGUE_LOST:
        raise ConfigError(f"{where}.catalogue_lost", f"must be one of {', '.join(DRILL_CATALOGUE_LOST)} (the "
                                                     f"catalogue-lost scenario runs at least once a month)")
    return DrillRule(
        cron=_cron(data.get("cron", base.cron), f"{where}.cron"), timezone=zone, sample=sample, provider=provider,
        catalogue_lost=lost, rto_target=_duration(data.get("rto_target", base.rto_target), f"{where}.rto_target"),
        critical_rto_target=_duration(data.get("critical_rto_target", base.critical_rto_target),
                                      f"{where}.critical_rto_target"),
        window=_duration(data.get("window", base.window), f"{where}.window"),
        jobs=_int(data.get("jobs", base.jobs), f"{where}.jobs", lo=1, hi=256))


_PACK_KEYS = ("cron", "timezone", "enabled")


def _dr_pack(data: Any, where: str) -> PackRule:
    """`dr_pack: {cron: '0 3 * * *', timezone: Europe/London, enabled: true}` (every key optional)."""
    data = _settings(data, where, _PACK_KEYS, "DR pack")
    base = PackRule()
    zone = _zone(data.get("timezone", base.timezone), f"{where}.timezone")
    enabled = data.get("enabled", base.enabled)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}.enabled", "must be true or false (whether dr_pack_schedule starts running)")
    return PackRule(cron=_cron(data.get("cron", base.cron), f"{where}.cron"), timezone=zone, enabled=enabled)


def _duration(value: Any, where: str, *, allow_zero: bool = False) -> timedelta:
    """`90`, `"90s"`, `"15m"`, `"4h"`, `"1d"`, `"1w"` (a bare number is seconds)."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ConfigError(where, "must be a duration such as 900, '15m', '4h' or '7d'")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ConfigError(where, "must be a positive duration")
    return timedelta(seconds=seconds)


def _int(value: Any, where: str, *, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(where, f"must be a whole number from {lo} to {hi}")
    return value


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("policy times must be timezone-aware")
    return now
