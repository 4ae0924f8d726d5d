"""Tiers by days to the wedding, RPOs tightened in wedding season, priorities, and a policy file whose
every bad value is an error naming the setting."""
import json
from datetime import date, datetime, timedelta, timezone

import pytest

from wedbackup_dagster.core.partitions import PLATFORM
from wedbackup_dagster.core.errors import ConfigError
from wedbackup_dagster.core.policy.backup_policy import ARCHIVED, CRITICAL, HIGH, NORMAL, RECENT, TIERS, Policy

IN_SEASON = datetime(2026, 6, 10, 12, 0, tzinfo=timezone.utc)
OFF_SEASON = datetime(2026, 1, 14, 12, 0, tzinfo=timezone.utc)


def days(n: int, now: datetime = IN_SEASON) -> date:
    return now.date() + timedelta(days=n)


@pytest.mark.parametrize("offset, tier", [
    (0, CRITICAL), (2, CRITICAL), (-2, CRITICAL), (3, HIGH), (30, HIGH), (31, NORMAL), (400, NORMAL),
    (-3, RECENT), (-90, RECENT), (-91, ARCHIVED),
])
def test_tier_by_days_to_the_wedding(offset, tier):
    p = Policy()
    assert p.tier(days(offset), IN_SEASON.date()) == tier


def test_platform_partition_has_its_own_tier():
    p = Policy()
    assert p.tier(None, IN_SEASON.date()) == PLATFORM
    assert p.rpo(None, IN_SEASON) == timedelta(hours=24)  # not a wedding: the season does not apply


def test_rpos_out_of_season():
    p = Policy()
    now = OFF_SEASON
    assert p.rpo(days(0, now), now) == timedelta(minutes=15)  # the wedding day itself
    assert p.rpo(days(1, now), now) == timedelta(hours=1)
    assert p.rpo(days(5, now), now) == timedelta(hours=4)
    assert p.rpo(days(60, now), now) == timedelta(hours=24)
    assert p.rpo(days(-10, now), now) == timedelta(hours=24)
    assert p.rpo(days(-200, now), now) == timedelta(days=7)


def test_season_halves_high_and_normal_only():
    p = Policy()
    assert p.rpo(days(5), IN_SEASON) == timedelta(hours=2)
    assert p.rpo(days(60), IN_SEASON) == timedelta(hours=12)
    assert p.rpo(days(1), IN_SEASON) == timedelta(hours=1)
    assert p.rpo(days(-10), IN_SEASON) == timedelta(hours=24)
    assert p.rpo(days(0), IN_SEASON) == timedelta(minutes=15)


def test_season_is_judged_in_the_policy_timezone():
    # 23:30 UTC on 30 April is already 1 May in London (BST), but still April in New York.
    edge = datetime(2026, 4, 30, 23, 30, tzinfo=timezone.utc)
    assert Policy().in_season(edge)
    assert not Policy(timezone="America/New_York").in_season(edge)
    assert Policy().today(edge) == date(2026, 5, 1)


def test_priorities_put_critical_first():
    p = Policy()
    order = sorted(TIERS, key=p.priority, reverse=True)
    assert order[0] == CRITICAL and order[1] == HIGH and order[-1] == ARCHIVED


def test_bands_assign_the_same_tier_and_rpo_as_the_rules():
    p = Policy()
    for now in (IN_SEASON, OFF_SEASON):
        bands = p.bands(now)
        for offset in range(-200, 200):
            d = days(offset, now)
            match = [b for b in bands if b.tier != PLATFORM and (b.lo is None or b.lo <= d)
                     and (b.hi is None or d <= b.hi)]
            assert len(match) == 1, (offset, match)
            assert match[0].tier == p.tier(d, p.today(now))
            assert match[0].rpo == p.rpo(d, now)
        assert [b.rpo for b in bands if b.tier == PLATFORM] == [timedelta(hours=24)]


def test_policy_file_overrides_defaults(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("tiers:\n  high: {rpo: 6h, priority: 60}\nseason:\n  months: [12]\ntimezone: Europe/Paris\n"
                    "cron: '*/10 * * * *'\n")
    p = Policy.from_env({"WEDBACKUP_POLICY_FILE": str(path)})
    assert p.tiers[HIGH].rpo == timedelta(hours=6) and p.priority(HIGH) == 60
    assert p.tiers[NORMAL].rpo == timedelta(hours=24)  # untouched settings keep their defaults
    assert p.season_months == {12} and p.timezone == "Europe/Paris" and p.cron == "*/10 * * * *"
    json_path = tmp_path / "policy.json"
    json_path.write_text(json.dumps({"wedding_day_rpo": 300, "season": {"factor": 0.25}}))
    q = Policy.from_file(json_path)
    assert q.wedding_day_rpo == timedelta(minutes=5) and q.rpo(days(60), IN_SEASON) == timedelta(hours=6)
    assert Policy.from_env({}) == Policy()


@pytest.mark.parametrize("data, field", [
    ({"tiers": {"high": {"rpo": "soon"}}}, "tiers.high.rpo"),
    ({"tiers": {"high": {"rpo": 0}}}, "tiers.high.rpo"),
    ({"tiers": {"urgent": {"rpo": "1h"}}}, "tiers.urgent"),
    ({"tiers": {"normal": {"priority": "high"}}}, "tiers.normal.priority"),
    ({"tiers": {"normal": {"max_run_size": 0}}}, "tiers.normal.max_run_size"),
    ({"season": {"months": [13]}}, "season.months"),
    ({"season": {"factor": 2}}, "season.factor"),
    ({"timezone": "Mars/Olympus"}, "timezone"),
    ({"cron": "every five minutes"}, "cron"),
    ({"high_days": 1}, "high_days"),
    ({"rpo": "1h"}, "rpo"),
    ({"tiers": ["high"]}, "tiers"),
    ({"timezone": 5}, "timezone"),
])
def test_invalid_setting_is_an_error_naming_it(data, field):
    with pytest.raises(ConfigError) as info:
        Policy.from_mapping(data, source="policy.yaml")
    assert info.value.variable == f"policy.yaml.{field}"


def test_unreadable_policy_file_names_the_variable(tmp_path):
    bad = tmp_path / "policy.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="WEDBACKUP_POLICY_FILE"):
        Policy.from_file(bad)
    with pytest.raises(ConfigError, match="WEDBACKUP_POLICY_FILE"):
        Policy.from_env({"WEDBACKUP_POLICY_FILE": str(tmp_path / "missing.yaml")})


def test_standing_verification_and_drill_settings_from_a_file(tmp_path):
    default = Policy()
    assert default.standing.reverify_window == timedelta(days=7) and default.standing.reverify_cron == "0 2 * * *"
    assert default.drill.cron == "0 4 * * 0" and default.drill.sample is None and default.drill.provider is None
    assert default.drill.rto_target == timedelta(hours=4)
    assert default.drill.critical_rto_target == timedelta(minutes=1)
    path = tmp_path / "policy.yaml"
    path.write_text("standing:\n  reverify_window: 3d\n  check_weddings_cron: '15 0 * * *'\n"
                    "drill:\n  cron: '0 3 * * 6'\n  timezone: America/New_York\n  sample: 50\n  provider: gcs\n"
                    "  catalogue_lost: always\n  rto_target: 2h\n  critical_rto_target: 30s\n  window: 3h\n"
                    "  jobs: 8\n")
    policy = Policy.from_file(path)
    assert policy.standing.reverify_window == timedelta(days=3)
    assert policy.standing.check_weddings_cron == "15 0 * * *" and policy.standing.reverify_cron == "0 2 * * *"
    d = policy.drill
    assert (d.cron, d.timezone, d.sample, d.provider, d.catalogue_lost, d.jobs) == (
        "0 3 * * 6", "America/New_York", 50, "gcs", "always", 8)
    assert (d.rto_target, d.critical_rto_target, d.window) == (timedelta(hours=2), timedelta(seconds=30),
                                                               timedelta(hours=3))
    assert Policy.from_mapping({"drill": {"sample": "all"}}).drill.sample is None


@pytest.mark.parametrize("data, field, says", [
    ({"drill": {"provider": "vault"}}, "drill.provider", "never restores from the vault"),
    ({"drill": {"catalogue_lost": "never"}}, "drill.catalogue_lost", "at least once a month"),
    ({"drill": {"sample": 0}}, "drill.sample", "whole number"),
    ({"drill": {"timezone": "Mars/Olympus"}}, "drill.timezone", "time zone"),
    ({"drill": {"cron": "weekly"}}, "drill.cron", "cron"),
    ({"drill": {"rto_target": "soon"}}, "drill.rto_target", "duration"),
    ({"drill": {"surprise": 1}}, "drill.surprise", "not a drill setting"),
    ({"drill": ["s3"]}, "drill", "mapping"),
    ({"standing": {"reverify_window": 0}}, "standing.reverify_window", "positive"),
    ({"standing": {"reverify_cron": "daily"}}, "standing.reverify_cron", "cron"),
])
def test_bad_drill_or_standing_setting_is_an_error_naming_it(data, field, says):
    with pytest.raises(ConfigError, match=says) as info:
        Policy.from_mapping(data, source="policy.yaml")
    assert info.value.variable == f"policy.yaml.{field}"


def test_dr_pack_settings_from_a_file(tmp_path):
    """The DR pack's schedule: daily at 03:00 London time and on unless the policy file says otherwise."""
    default = Policy().dr_pack
    assert (default.cron, default.timezone, default.enabled) == ("0 3 * * *", "Europe/London", True)
    path = tmp_path / "policy.yaml"
    path.write_text("dr_pack:\n  cron: '30 2 * * *'\n  timezone: America/New_York\n  enabled: false\n")
    rule = Policy.from_file(path).dr_pack
    assert (rule.cron, rule.timezone, rule.enabled) == ("30 2 * * *", "America/New_York", False)
    assert Policy.from_mapping({"dr_pack": {"enabled": False}}).dr_pack.cron == "0 3 * * *"  # the rest default
    assert Policy.from_mapping({"dr_pack": {}}).dr_pack == default


@pytest.mark.parametrize("data, field, says", [
    ({"dr_pack": {"cron": "nightly"}}, "dr_pack.cron", "five-field cron"),
    ({"dr_pack": {"cron": 3}}, "dr_pack.cron", "five-field cron"),
    ({"dr_pack": {"timezone": "Mars/Olympus"}}, "dr_pack.timezone", "time zone"),
    ({"dr_pack": {"timezone": 1}}, "dr_pack.timezone", "time zone"),
    ({"dr_pack": {"enabled": "yes"}}, "dr_pack.enabled", "true or false"),
    ({"dr_pack": {"enabled": 1}}, "dr_pack.enabled", "true or false"),
    ({"dr_pack": {"keep": 3}}, "dr_pack.keep", "not a DR pack setting"),
    ({"dr_pack": "daily"}, "dr_pack", "mapping"),
    ({"dr_packs": {}}, "dr_packs", "not a policy setting"),
])
def test_bad_dr_pack_setting_is_an_error_naming_it(data, field, says):
    with pytest.raises(ConfigError, match=says) as info:
        Policy.from_mapping(data, source="policy.yaml")
    assert info.value.variable == f"policy.yaml.{field}"
