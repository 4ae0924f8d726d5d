"""The shrinkage rule (core/policy/rules.py `shrinkage`) as a pure function: per-table and total fractions of rows
lost against the baseline, WARN/ERROR thresholds (inclusive), min_rows, tables new, emptied or gone,
zero-row baselines, no baseline; the policy file's `shrinkage` keys; the retention plan's hold."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from wedbackup_dagster.core.errors import ConfigError
from wedbackup_dagster.core.policy.backup_policy import Policy, RetentionRule, ShrinkageRule
from wedbackup_dagster.core.governance.retention import BackupPoint, hold_reasons, plan_retention
from wedbackup_dagster.core.policy.rules import shrinkage

T = {"warn": 0.5, "error": 0.9, "min_rows": 20}


def judge(current, baseline, **kw):
    return shrinkage("42", current, baseline, **{**T, **kw}, backup_id=8, baseline_id=7, previous_id=7)


def test_a_steady_or_growing_wedding_passes():
    v = judge({"public.guests": 130, "public.payments": 12}, {"public.guests": 120, "public.payments": 10})
    assert v.passed and v.level == "ok" and not v.flagged
    assert v.summary == "wedding 42: no sharp drop in rows (backup #8 against verified backup #7; total 130 → 142)"


@pytest.mark.parametrize("after, level", [(61, "ok"), (60, "warn"), (13, "warn"), (12, "error"), (0, "error")])
def test_thresholds_are_fractions_of_the_baseline_rows_inclusive(after, level):
    # 120 guests: losing 59 is < 50 %; 60 is exactly 50 % (WARN); 108 is exactly 90 % (ERROR).
    v = judge({"public.guests": after, "public.households": 200}, {"public.guests": 120, "public.households": 200})
    assert v.level == level
    assert [t.table for t in v.flagged] == ([] if level == "ok" else ["public.guests"])
    assert v.total.level == ""  # 320 → 200 + after: the total never lost half


def test_most_guests_gone_is_named_with_counts_and_the_total_is_judged_too():
    v = judge({"public.guests": 6, "public.guest_dietary": 0, "public.payments": 10},
              {"public.guests": 120, "public.guest_dietary": 40, "public.payments": 10})
    assert v.level == "error"
    assert {t.table: (t.before, t.after, t.level) for t in v.flagged} == {
        "public.guests": (120, 6, "error"), "public.guest_dietary": (40, 0, "error")}
    assert (v.total.before, v.total.after, v.total.level) == (170, 16, "error")
    assert "public.guests 120 → 6 (-95%)" in v.summary and "public.guest_dietary 40 → 0 (emptied)" in v.summary
    assert "total 170 → 16 (-91%)" in v.summary and "backup #8 against verified backup #7" in v.summary


def test_a_table_that_disappears_lost_every_row():
    v = judge({"public.guests": 120}, {"public.guests": 120, "public.payments": 25})
    gone = v.flagged[0]
    assert (gone.table, gone.after, gone.fraction, gone.level) == ("public.payments", None, 1.0, "error")
    assert "public.payments 25 → gone" in v.summary
    assert v.total.level == ""  # 145 → 120: a table gone is flagged even when the total barely moves


def test_new_tables_are_listed_never_flagged():
    v = judge({"public.guests": 120, "public.seating": 300}, {"public.guests": 120})
    assert v.passed and v.new_tables == ("public.seating",)


def test_zero_row_baselines_and_tables_below_min_rows_are_never_judged():
    v = judge({"public.guests": 0, "public.payments": 0, "public.contracts": 0},
              {"public.guests": 0, "public.payments": 19, "public.contracts": 20})
    assert [t.table for t in v.flagged] == ["public.contracts"]  # 20 ≥ min_rows; 19 and 0 are not
    assert judge({"public.payments": 0}, {"public.payments": 19}).passed  # emptied, but below min_rows
    assert judge({"public.payments": 0}, {"public.payments": 19}, min_rows=5).level == "error"
    assert judge({}, {}).passed  # an empty wedding stays empty: no division by zero


def test_the_total_alone_can_flag_when_each_table_is_below_min_rows():
    before = {f"public.t{i}": 15 for i in range(4)}  # 60 rows in total, each table below 20
    v = judge({t: 5 for t in before}, before)
    assert not v.flagged and v.total.level == "warn" and v.level == "warn"  # 60 → 20: 67 % lost


def test_without_a_verified_baseline_there_is_nothing_to_compare():
    v = shrinkage("42", {"public.guests": 3}, None, **T, backup_id=8)
    assert v.passed and v.baseline_id is None
    assert v.summary == "wedding 42: no earlier verified backup to compare backup #8 with"


def test_policy_file_sets_the_thresholds(tmp_path):
    assert Policy().shrinkage == ShrinkageRule(warn=0.5, error=0.9, min_rows=20)
    path = tmp_path / "policy.yaml"
    path.write_text("shrinkage: {warn: 0.3, error: 0.6, min_rows: 50}\n")
    assert Policy.from_file(path).shrinkage == ShrinkageRule(warn=0.3, error=0.6, min_rows=50)
    assert Policy.from_mapping({"shrinkage": {"error": 1}}).shrinkage == ShrinkageRule(0.5, 1.0, 20)


@pytest.mark.parametrize("data, field", [
    ({"warn": 0}, "policy.shrinkage.warn"), ({"error": 1.5}, "policy.shrinkage.error"),
    ({"warn": True}, "policy.shrinkage.warn"), ({"warn": 0.95}, "policy.shrinkage.warn"),
    ({"min_rows": 0}, "policy.shrinkage.min_rows"), ({"min_rows": "20"}, "policy.shrinkage.min_rows"),
    ({"typo": 1}, "policy.shrinkage.typo"), ("0.5", "policy.shrinkage"),
])
def test_a_bad_shrinkage_setting_is_an_error_naming_it(data, field):
    with pytest.raises(ConfigError) as err:
        Policy.from_mapping({"shrinkage": data})
    assert field in str(err.value)


def test_retention_keeps_what_a_flag_holds_and_says_why():
    now = datetime(2026, 6, 15, 10, tzinfo=timezone.utc)
    old = now - timedelta(days=900)  # older than every window: deleted unless held
    flags = [{"backup_id": 3, "partition": "42", "baseline_id": 1, "previous_id": 2, "level": "error"}]
    holds = hold_reasons(flags)
    assert set(holds) == {1, 2} and "rows dropped sharply in backup #3 (ERROR)" in holds[1]
    assert "wedbackup ack --wedding 42" in holds[1]
    points = [BackupPoint(1, "42", old, verified=True), BackupPoint(2, "42", old + timedelta(hours=1)),
              BackupPoint(3, "42", old + timedelta(hours=2)),
              BackupPoint(4, "42", now - timedelta(hours=1), verified=True)]
    unheld = plan_retention(points, now, RetentionRule())
    assert set(unheld.delete) == {1, 2, 3}
    held = plan_retention([BackupPoint(p.id, p.partition, p.snapshot_time, p.verified, hold=holds.get(p.id, ""))
                           for p in points], now, RetentionRule())
    assert set(held.delete) == {3} and held.keep[1] == [holds[1]] and held.keep[2] == [holds[2]]


def test_a_hostile_shrinkage_key_is_named_escaped_and_bounded():
    with pytest.raises(ConfigError) as err:
        Policy.from_mapping({"shrinkage": {"warn\n; DROP" * 500: 1, 3: 2}})
    message = str(err.value)
    assert message.startswith("configuration policy.shrinkage.") and len(message) < 400 and "\n" not in message
