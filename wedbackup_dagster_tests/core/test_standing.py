"""The rolling re-verification's choice per tick (pure): least recently verified first, the overdue always in,
the rest spread evenly so every wedding comes round within the window; and the overdue list the check names."""
from datetime import datetime, timedelta, timezone

import pytest

from wedbackup_dagster.core.standing import not_reverified, tick_share, ticks_per_window

NOW = datetime(2026, 12, 5, 2, 0, tzinfo=timezone.utc)
DAY, WEEK = timedelta(days=1), timedelta(days=7)


def test_a_fresh_fleet_is_spread_over_the_week_least_recently_verified_first():
    # 70 weddings verified 1..70 hours ago: none overdue; the tick takes 70/7 = 10, the oldest ones.
    verified = {str(i): NOW - timedelta(hours=i) for i in range(1, 71)}
    share = tick_share(verified, NOW, WEEK, DAY)
    assert share.share == 10 and share.overdue == [] and share.total == 70
    assert share.weddings == [str(i) for i in range(70, 60, -1)]


def test_never_verified_come_first_then_the_overdue_then_the_share():
    verified = {"5": None, "3": NOW - 8 * DAY, "4": NOW - timedelta(days=6, hours=1), "platform": None}
    verified.update({str(i): NOW - timedelta(hours=i) for i in range(10, 24)})  # 14 recent ones
    share = tick_share(verified, NOW, WEEK, DAY)
    # "4" was verified 6 days 1 hour ago: past the window before the next tick (in a day), so it is overdue.
    assert share.overdue == ["5", "platform", "3", "4"]
    assert share.share == 3  # ceil(18 / 7)
    assert share.weddings == ["5", "platform", "3", "4"]  # more overdue than the share: every overdue one
    del verified["4"]
    share = tick_share(verified, NOW, WEEK, DAY)  # 17 weddings: share ceil(17/7) = 3, three overdue
    assert share.weddings == ["5", "platform", "3"]
    verified.update({"4": NOW - 5 * DAY, "8": NOW - 5 * DAY - timedelta(hours=1)})
    share = tick_share(verified, NOW, WEEK, DAY)  # 19 weddings: share 3 takes the least recent one not overdue
    assert share.share == 3 and share.weddings == ["5", "platform", "3"]
    verified["3"] = NOW - timedelta(hours=1)
    share = tick_share(verified, NOW, WEEK, DAY)  # 2 overdue, share 3: the next least recent is in
    assert share.overdue == ["5", "platform"] and share.weddings == ["5", "platform", "8"]
    # more overdue than the share: every overdue one is in
    verified.update({"6": None, "7": NOW - 10 * DAY})
    share = tick_share(verified, NOW, WEEK, DAY)
    assert share.share == 3 and share.weddings == share.overdue == ["5", "6", "platform", "7"]


def test_every_wedding_comes_round_within_the_window_when_ticks_run_daily():
    verified = {str(i): None for i in range(1, 101)}
    now = NOW
    last_seen: dict[str, datetime] = {}
    for _ in range(28):  # four weeks of daily ticks, each re-verification succeeding
        share = tick_share(verified, now, WEEK, DAY)
        assert len(share.weddings) == (100 if now == NOW else 15)  # the new fleet at once, then ceil(100/7)
        for w in share.weddings:
            verified[w] = now
            last_seen[w] = now
        now += DAY
        assert not_reverified(verified, now, WEEK) == []  # nobody ever falls out of the window
    assert set(last_seen) == set(verified)


def test_hourly_ticks_take_a_smaller_share():
    assert ticks_per_window(WEEK, timedelta(hours=1)) == 168
    verified = {str(i): NOW - timedelta(minutes=i) for i in range(1, 1001)}
    assert len(tick_share(verified, NOW, WEEK, timedelta(hours=1)).weddings) == 6  # ceil(1000/168)


def test_not_reverified_names_the_overdue_oldest_first():
    verified = {"1": NOW - 3 * DAY, "2": None, "3": NOW - 9 * DAY, "4": NOW - 7 * DAY - timedelta(seconds=1)}
    assert not_reverified(verified, NOW, WEEK) == ["2", "3", "4"]
    assert not_reverified({}, NOW, WEEK) == []


def test_empty_and_bad_input():
    assert tick_share({}, NOW, WEEK, DAY).weddings == []
    with pytest.raises(ValueError):
        tick_share({"1": None}, NOW.replace(tzinfo=None), WEEK, DAY)
    with pytest.raises(ValueError):
        ticks_per_window(WEEK, timedelta(0))
