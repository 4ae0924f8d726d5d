"""plan_retention, the pure part of retention: a synthetic history of 400 days (a backup every 6 hours)
keeps exactly what the policy says; per-tier rules and the policy file; the newest (verified) backup."""
from __future__ import annotations

import calendar
from datetime import date, datetime, time, timedelta, timezone

import pytest

from wedbackup_dagster.core.errors import ConfigError
from wedbackup_dagster.core.policy.backup_policy import Policy, RetentionRule
from wedbackup_dagster.core.governance.retention import BackupPoint, plan_retention

UTC = timezone.utc
NOW = datetime(2026, 6, 15, 10, 0, tzinfo=UTC)  # a Monday
START = NOW - timedelta(days=400)


def history(partition: str = "42", tier: str = "archived",
            verified_before: datetime | None = None) -> list[BackupPoint]:
    """A backup at 00, 06, 12 and 18 UTC of every day for 400 days up to NOW."""
    first = datetime.combine(START.date(), time(0), UTC)
    out, t, i = [], first, 0
    while t <= NOW:
        out.append(BackupPoint(id=i, partition=partition, snapshot_time=t, tier=tier,
                               verified=verified_before is not None and t <= verified_before))
        t += timedelta(hours=6)
        i += 1
    return out


def at(d: date, hour: int) -> datetime:
    return datetime.combine(d, time(hour), UTC)


def expected_times() -> set[datetime]:
    """The kept set, spelled out day by day (not with the planner's own grouping)."""
    newest = at(NOW.date(), 6)
    keep: set[datetime] = set()
    # Everything younger than 48 h: 2026-06-13 12:00 onwards.
    t = at(NOW.date() - timedelta(days=2), 12)
    while t <= NOW:
        keep.add(t)
        t += timedelta(hours=6)
    # Dailies: the 18:00 backup of each of the 30 previous days (today's newest is 06:00).
    keep |= {at(NOW.date() - timedelta(days=i), 18) for i in range(1, 31)}
    # Weeklies: each Sunday's 18:00 backup younger than 12 weeks (this week's newest is `newest`).
    day = NOW.date()
    while day > (NOW - timedelta(weeks=12)).date() - timedelta(days=1):
        if day.weekday() == 6 and at(day, 18) > NOW - timedelta(weeks=12):
            keep.add(at(day, 18))
        day -= timedelta(days=1)
    # Monthlies: the last day's 18:00 backup of each of the 12 previous months (June 2025 .. May 2026).
    for year, month in [(2025, m) for m in range(6, 13)] + [(2026, m) for m in range(1, 6)]:
        keep.add(at(date(year, month, calendar.monthrange(year, month)[1]), 18))
    keep.add(newest)
    return keep


def test_a_400_day_history_keeps_exactly_the_policy():
    backups = history()
    assert len(backups) == 4 * 400 + 2  # 00:00 and 06:00 of today
    plan = plan_retention(backups, NOW, RetentionRule())
    kept = {b.snapshot_time for b in backups if b.id in plan.keep}
    assert kept == expected_times()
    assert set(plan.keep) | set(plan.delete) == {b.id for b in backups}
    assert not set(plan.keep) & set(plan.delete)
    # 48 h: 8 backups (13 June 12:00 .. 15 June 06:00). Dailies: 30 (14 June .. 16 May, 18:00), 2 of them
    # in the 48 h. Weeklies: 12 Sundays (14 June .. 29 March), 5 of them dailies. Monthlies: 12 month ends
    # (June 2025 .. May 2026), 31 May a daily. The current day, week and month: today's 06:00, the newest.
    assert len(kept) == 8 + 28 + 7 + 11
    reasons = {b.snapshot_time: plan.keep[b.id] for b in backups if b.id in plan.keep}
    assert reasons[at(date(2025, 6, 30), 18)] == ["monthly 2025-06"]
    assert reasons[at(NOW.date(), 6)][:2] == ["younger than 48 h", "newest backup"]
    deleted = {b.snapshot_time: plan.delete[b.id] for b in backups if b.id in plan.delete}
    assert deleted[at(date(2025, 5, 31), 18)].startswith("older than every window")
    assert deleted[at(date(2026, 6, 1), 12)] == "not the newest backup of daily period 2026-06-01"


def test_the_newest_verified_backup_is_never_deleted():
    verified_until = datetime(2025, 9, 10, 7, tzinfo=UTC)  # a Wednesday: no window keeps its 06:00 backup
    backups = history(verified_before=verified_until)
    plan = plan_retention(backups, NOW, RetentionRule())
    kept = {b.snapshot_time for b in backups if b.id in plan.keep}
    assert kept == expected_times() | {datetime(2025, 9, 10, 6, tzinfo=UTC)}
    newest_verified = next(b for b in backups if b.snapshot_time == datetime(2025, 9, 10, 6, tzinfo=UTC))
    assert plan.keep[newest_verified.id] == ["newest verified backup"]


def test_the_newest_backup_stays_even_when_every_window_is_past():
    old = [BackupPoint(1, "7", NOW - timedelta(days=900)), BackupPoint(2, "7", NOW - timedelta(days=800))]
    plan = plan_retention(old, NOW, RetentionRule())
    assert plan.keep == {2: ["newest backup"]} and set(plan.delete) == {1}


def test_rules_follow_each_weddings_tier_and_weddings_are_judged_apart():
    rules = {tier: RetentionRule() for tier in ("critical", "high", "normal", "recent", "archived", "platform")}
    rules["archived"] = RetentionRule(keep_all=timedelta(0), daily_days=0, weekly_weeks=0, monthly_months=0)
    backups = history("1", tier="archived") + [
        BackupPoint(b.id + 10_000, "2", b.snapshot_time, tier="normal") for b in history()]
    plan = plan_retention(backups, NOW, rules)
    assert [i for i in plan.keep if i < 10_000] == [len(history()) - 1]  # archived: only the newest
    assert {b.snapshot_time for b in backups if b.id in plan.keep and b.id >= 10_000} == expected_times()


def test_retention_comes_from_the_policy_file_per_tier():
    policy = Policy.from_mapping({"retention": {"daily_days": 7, "tiers": {"archived": {"monthly_months": 24,
                                                                                     "keep_all": "12h"}}}})
    assert policy.retention["normal"] == RetentionRule(daily_days=7)
    assert policy.retention["archived"] == RetentionRule(keep_all=timedelta(hours=12), daily_days=7,
                                                         monthly_months=24)
    assert Policy().retention["critical"] == RetentionRule()
    with pytest.raises(ConfigError, match="retention.tiers.gold"):
        Policy.from_mapping({"retention": {"tiers": {"gold": {}}}})
    with pytest.raises(ConfigError, match="retention.weekly"):
        Policy.from_mapping({"retention": {"weekly": 3}})
    with pytest.raises(ConfigError, match="retention.daily_days"):
        Policy.from_mapping({"retention": {"daily_days": -1}})


def test_periods_are_those_of_the_policy_clock():
    # 23:30 UTC on 31 May is already 1 June in Europe/Berlin: the two backups share a Berlin day.
    from zoneinfo import ZoneInfo

    a = BackupPoint(1, "9", datetime(2026, 5, 31, 23, 30, tzinfo=UTC))
    b = BackupPoint(2, "9", datetime(2026, 6, 1, 8, 0, tzinfo=UTC))
    c = BackupPoint(3, "9", datetime(2026, 6, 20, 8, 0, tzinfo=UTC))
    rule = RetentionRule(keep_all=timedelta(0), weekly_weeks=0, monthly_months=0)
    now = datetime(2026, 6, 21, tzinfo=UTC)
    assert set(plan_retention([a, b, c], now, rule, tz=ZoneInfo("Europe/Berlin")).delete) == {1}
    assert set(plan_retention([a, b, c], now, rule, tz=UTC).delete) == set()
