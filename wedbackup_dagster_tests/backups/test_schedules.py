"""The backup schedule on a real catalogue and Dagster instance: which weddings are due at a given tick
(in and out of wedding season), what an unchanged wedding gets instead of a backup, and the exact runs,
tags and priorities requested."""
from __future__ import annotations

import datetime as dt

import dagster as dg
import psycopg

from benchmarks.tick import seed_catalogue
from wedbackup_dagster.backups.list_pipeline import list_run_config
from wedbackup_dagster.backups.schedules import backup_schedule
from wedbackup_dagster.shared.resources import WedbackupEngineResource

JUNE = dt.datetime(2026, 6, 10, 12, 0, tzinfo=dt.timezone.utc)  # wedding season
JANUARY = dt.datetime(2026, 1, 14, 12, 0, tzinfo=dt.timezone.utc)
H = dt.timedelta(hours=1)


def tick(instance, when: dt.datetime):
    with dg.build_schedule_context(instance=instance, scheduled_execution_time=when,
                                   resources={"wedbackup": WedbackupEngineResource()}) as context:
        return backup_schedule.evaluate_tick(context)


def register(instance, keys: list[str]) -> None:
    instance.add_dynamic_partitions("weddings", keys)


def expected_request(run_key: str, tier: str, priority: int, weddings: list[str]) -> dg.RunRequest:
    return dg.RunRequest(run_key=run_key, run_config=list_run_config(weddings), tags={
        "dagster/priority": str(priority), "wedbackup/tier": tier, "wedbackup/trigger": "schedule",
        "wedbackup/due_weddings": str(len(weddings)), "wedbackup/first_wedding": weddings[0],
        "wedbackup/last_wedding": weddings[-1], "dagster/schedule_name": "backup_schedule"})


def partition_row(catalogue, partition: str) -> dict:
    with catalogue.connect() as conn:
        return conn.execute("SELECT * FROM wedbackup.partitions WHERE partition = %s", (partition,)).fetchone()


def fleet_at(now: dt.datetime) -> list[tuple]:
    """platform backed up an hour ago; wedding 7 five days ahead (high tier), backed up 3 h ago and changed
    since: due when its RPO is 2 h (season), not when it is 4 h."""
    return [("platform", None, now - H, now - 2 * H),
            ("7", now.date() + dt.timedelta(days=5), now - 3 * H, now - H)]


def test_a_wedding_this_week_is_due_in_season(catalogue, instance):
    seed_catalogue(catalogue.dsn, fleet_at(JUNE))
    register(instance, ["platform", "7"])
    data = tick(instance, JUNE)
    assert data.skip_message is None
    assert data.run_requests == [expected_request("20260610T1200-high-0", "high", 50, ["7"])]
    assert partition_row(catalogue, "7")["requested_at"] == JUNE
    # Five minutes later the run may still be queued: it is not asked for again.
    later = tick(instance, JUNE + dt.timedelta(minutes=5))
    assert later.run_requests == [] and "within its tier's RPO" in later.skip_message


def test_the_same_wedding_off_season_is_not_due(catalogue, instance):
    seed_catalogue(catalogue.dsn, fleet_at(JANUARY))
    register(instance, ["platform", "7"])
    data = tick(instance, JANUARY)
    assert data.run_requests == []
    assert data.skip_message == "no backup due: every wedding's newest backup is within its tier's RPO"
    assert partition_row(catalogue, "7")["requested_at"] is None
    # Two more hours and the 4 h RPO is passed too.
    assert [r.run_key for r in tick(instance, JANUARY + 2 * H).run_requests] == ["20260114T1400-high-0"]


def test_unchanged_wedding_is_recorded_as_covered_not_backed_up(catalogue, instance):
    seed_catalogue(catalogue.dsn, [
        ("platform", None, JANUARY - H, JANUARY - 2 * H),
        # normal tier, 30 h since its backup (RPO 24 h off season), no change since: still covered.
        ("11", JANUARY.date() + dt.timedelta(days=100), JANUARY - 30 * H, JANUARY - 40 * H),
    ])
    register(instance, ["platform", "11"])
    data = tick(instance, JANUARY)
    assert data.run_requests == []
    assert data.skip_message == ("no backup due: 1 due wedding(s) unchanged since their newest backup were "
                                 "recorded as still covered")
    assert partition_row(catalogue, "11")["covered_at"] == JANUARY
    with catalogue.connect() as conn:
        audit = conn.execute("SELECT at, partition, detail FROM wedbackup.audit WHERE action = 'covered'").fetchall()
    assert [(a["at"], a["partition"], a["detail"]["partitions"], a["detail"]["sample"]) for a in audit] == \
        [(JANUARY, None, 1, ["11"])]
    # Covered counts as fresh: the next tick has nothing to do, and no new archive was ever made.
    assert tick(instance, JANUARY + dt.timedelta(minutes=5)).skip_message.endswith("within its tier's RPO")
    with catalogue.connect() as conn:
        assert conn.execute("SELECT count(*) AS n FROM wedbackup.backups WHERE partition = '11'").fetchone()["n"] == 1


def test_critical_wedding_gets_a_fresh_copy_even_unchanged(catalogue, instance):
    seed_catalogue(catalogue.dsn, [
        ("platform", None, JANUARY - H, JANUARY - 2 * H),
        ("3", JANUARY.date() + dt.timedelta(days=1), JANUARY - 2 * H, JANUARY - 5 * H),  # critical, unchanged
    ])
    register(instance, ["platform", "3"])
    assert tick(instance, JANUARY).run_requests == [expected_request("20260114T1200-critical-0", "critical", 100,
                                                                     ["3"])]


def test_due_weddings_are_batched_per_tier_most_urgent_first(catalogue, instance, tmp_path, monkeypatch):
    policy = tmp_path / "policy.json"
    policy.write_text('{"tiers": {"normal": {"max_run_size": 2}}}')
    monkeypatch.setenv("WEDBACKUP_POLICY_FILE", str(policy))
    never = None
    day = dt.timedelta(days=1)
    seed_catalogue(catalogue.dsn, [
        ("platform", None, never, never),  # never backed up: due at once
        ("1", JANUARY.date() + 200 * day, never, never),  # normal
        ("2", JANUARY.date() + 10 * day, JANUARY - 20 * H, JANUARY - H),  # high, changed
        ("3", JANUARY.date() + 300 * day, never, never),  # normal
        ("4", JANUARY.date() - 400 * day, JANUARY - 8 * 24 * H, never),  # archived, weekly, never fingerprinted
        ("5", JANUARY.date() + 250 * day, never, never),  # normal
        ("6", JANUARY.date(), JANUARY - 20 * 60 * dt.timedelta(seconds=1), never),  # the wedding day (15 min)
        ("8", JANUARY.date() + 90 * day, JANUARY - H, JANUARY - 2 * H),  # normal, fresh: not due
    ])
    register(instance, ["platform", "1", "2", "3", "4", "5", "6", "8", "9"])
    got = tick(instance, JANUARY).run_requests
    assert got == [
        expected_request("20260114T1200-critical-0", "critical", 100, ["6"]),
        expected_request("20260114T1200-high-0", "high", 50, ["2"]),
        expected_request("20260114T1200-platform-0", "platform", 40, ["platform"]),
        expected_request("20260114T1200-normal-0", "normal", 10, ["1", "3"]),
        expected_request("20260114T1200-normal-1", "normal", 10, ["5"]),
        expected_request("20260114T1200-archived-0", "archived", -10, ["4"]),
    ]


def test_due_wedding_not_yet_a_partition_is_left_for_discovery(catalogue, instance):
    seed_catalogue(catalogue.dsn, [("21", JANUARY.date() + dt.timedelta(days=3), None, None)])
    data = tick(instance, JANUARY)
    assert data.run_requests == []
    assert data.skip_message == "no backup requested: 1 due partition(s) are not registered in Dagster yet"
    with psycopg.connect(catalogue.dsn) as conn:
        assert conn.execute("SELECT requested_at FROM wedbackup.partitions").fetchone()[0] is None
