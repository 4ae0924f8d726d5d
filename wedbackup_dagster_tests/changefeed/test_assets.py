"""The change_feed asset, its checks and its sensor, run in Dagster against the real stack."""
from __future__ import annotations

import dagster as dg
import psycopg

from wedbackup_dagster.changefeed.assets import CHANGE_FEED, change_feed_sensor, slot_check
from wedbackup_dagster.definitions import defs
from wedbackup_dagster_tests.core.changefeed.conftest import feed_env  # noqa: F401  (a fixture)


def _run(instance):
    result = defs.resolve_job_def("change_feed_drain").execute_in_process(instance=instance, raise_on_error=False)
    [mat] = [e.event_specific_data.materialization for e in result.all_events if e.event_type_value ==
             "ASSET_MATERIALIZATION"]
    checks = {e.event_specific_data.check_name: e.event_specific_data for e in result.all_events
              if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    return result, mat, checks


def test_a_drain_run_shows_changes_lag_and_each_wedding_and_recovers_a_dropped_slot(
        feed_env, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WEDBACKUP_CHANGEFEED_SLOT", feed_env["slot"])
    with psycopg.connect(feed_env["source"], autocommit=True) as conn:
        conn.execute("UPDATE guests SET meal_choice = 'dagster' WHERE wedding_id IN (2, 3)")
    instance = dg.DagsterInstance.ephemeral()
    result, mat, checks = _run(instance)
    assert result.success and mat.asset_key == CHANGE_FEED
    md = mat.metadata
    assert md["changes"].value > 0 and md["segments"].value == 2
    assert {r.data["wedding"] for r in md["weddings"].value.records} == {"2", "3"}
    assert md["copies"].value["s3"]["uploaded"] == 2
    assert checks["slot_health"].passed and checks["feed_lag_within_rpo"].passed
    with psycopg.connect(feed_env["source"], autocommit=True) as conn:  # someone drops the slot
        conn.execute("SELECT pg_drop_replication_slot(%s)", (feed_env["slot"],))
    result, mat, checks = _run(instance)
    assert not checks["slot_health"].passed and "slot lost and recovered" in checks["slot_health"].description
    assert "a gap in the continuous range of every wedding from " in checks["slot_health"].description
    feed = feed_env["feed"]
    assert len(feed.store.feeds()) == 2 and feed.store.live_feed(feed.slot)["id"] == 2
    with psycopg.connect(feed_env["source"], autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                            (feed_env["slot"],)).fetchone()[0] == 1


def test_slot_health_turns_error_before_the_server_would_invalidate_the_slot():
    assert slot_check({"wal_status": "reserved", "safe_wal_size": 900, "retained_bytes": 100})[0]
    ok, why = slot_check({"wal_status": "extended", "safe_wal_size": 100, "retained_bytes": 900})
    assert not ok and "10% of max_slot_wal_keep_size" in why
    assert not slot_check({"wal_status": "lost", "safe_wal_size": None, "retained_bytes": 0})[0]


def test_the_sensor_requests_a_drain_when_none_is_running():
    with dg.instance_for_test() as instance:
        out = change_feed_sensor(dg.build_sensor_context(instance=instance))
        assert isinstance(out, dg.RunRequest)
