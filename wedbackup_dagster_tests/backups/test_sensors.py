"""Wedding discovery and change capture on a real source database, catalogue and Dagster instance: new
weddings become partitions in one batch, erased ones leave, and a change to a high-tier wedding asks for a
backup within one sensor tick — exact requests and cursors."""
from __future__ import annotations

import datetime as dt

import dagster as dg
import psycopg

from wedbackup_dagster.backups.list_pipeline import list_run_config
from wedbackup_dagster.backups.sensors import wedding_change_capture, wedding_discovery
from wedbackup_dagster.core.postgres.discovery import digest
from wedbackup_dagster.shared.resources import WedbackupEngineResource
from wedbackup_dagster_tests.core.changefeed.conftest import feed_env  # noqa: F401  (a fixture)

RESOURCES = {"wedbackup": WedbackupEngineResource()}  # read from the environment when a tick starts


def discover(instance, cursor=None):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=RESOURCES) as context:
        return wedding_discovery.evaluate_tick(context)


def capture(instance, cursor=None):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=RESOURCES) as context:
        return wedding_change_capture.evaluate_tick(context)


def add_weddings(dsn: str, first: int, count: int, start: dt.date) -> list[tuple[str, dt.date]]:
    rows = [(i, start + dt.timedelta(days=i % 700)) for i in range(first, first + count)]
    with psycopg.connect(dsn) as conn:
        with conn.cursor().copy("COPY weddings (id, wedding_date) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    return [(str(i), d) for i, d in rows]


def apply(instance, data) -> None:
    """What the sensor daemon does with the partition requests of a tick."""
    for request in data.dynamic_partitions_requests:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)


def test_a_thousand_new_weddings_are_added_in_one_request(source, catalogue, instance):
    weddings = add_weddings(source, 1, 1000, dt.date(2026, 1, 1))
    data = discover(instance)
    keys = ["platform", *(k for k, _ in weddings)]
    assert data.dynamic_partitions_requests == [dg.AddDynamicPartitionsRequest("weddings", keys)]
    assert data.run_requests == []
    assert data.cursor == digest([("platform", None), *weddings])
    assert catalogue.live_partitions() == {"platform": None, **dict(weddings)}

    apply(instance, data)
    assert instance.get_dynamic_partitions("weddings") == keys
    again = discover(instance, data.cursor)
    assert again.skip_message == "no wedding added, removed or re-dated since the last tick"
    assert again.dynamic_partitions_requests in (None, []) and again.cursor in (None, data.cursor)


def test_an_erased_wedding_is_removed(source, catalogue, instance):
    weddings = add_weddings(source, 1, 5, dt.date(2026, 3, 1))
    first = discover(instance)
    apply(instance, first)
    with psycopg.connect(source) as conn:
        conn.execute("DELETE FROM weddings WHERE id = 3")
    data = discover(instance, first.cursor)
    assert data.dynamic_partitions_requests == [dg.DeleteDynamicPartitionsRequest("weddings", ["3"])]
    assert data.cursor == digest([("platform", None), *(w for w in weddings if w[0] != "3")])
    assert "3" not in catalogue.live_partitions()
    with catalogue.connect() as conn:
        row = conn.execute("SELECT removed_at FROM wedbackup.partitions WHERE partition = '3'").fetchone()
        audit = conn.execute("SELECT partition FROM wedbackup.audit WHERE action = 'partition-removed'").fetchall()
    assert row["removed_at"] is not None and [a["partition"] for a in audit] == ["3"]
    apply(instance, data)
    assert instance.get_dynamic_partitions("weddings") == ["platform", "1", "2", "4", "5"]


def test_a_re_dated_wedding_updates_the_catalogue_only(source, catalogue, instance):
    add_weddings(source, 1, 3, dt.date(2026, 3, 1))
    first = discover(instance)
    apply(instance, first)
    with psycopg.connect(source) as conn:
        conn.execute("UPDATE weddings SET wedding_date = '2027-02-02' WHERE id = 2")
    data = discover(instance, first.cursor)
    assert data.dynamic_partitions_requests in (None, []) and data.cursor != first.cursor
    assert data.skip_message == "partitions unchanged; 1 catalogue row(s) re-dated or restored"
    assert catalogue.live_partitions()["2"] == dt.date(2027, 2, 2)


def test_a_change_to_a_high_tier_wedding_requests_a_backup(source, catalogue, instance):
    today = dt.datetime.now(dt.timezone.utc).date()
    with psycopg.connect(source) as conn:
        conn.execute("INSERT INTO weddings (id, wedding_date) VALUES (5, %s), (6, %s)",
                     (today + dt.timedelta(days=10), today + dt.timedelta(days=200)))
        conn.execute("INSERT INTO guests (wedding_id, name) VALUES (5, 'Ada'), (6, 'Bea')")
        conn.execute("INSERT INTO vendors (id, name) VALUES (1, 'Florist')")
    apply(instance, discover(instance))
    # Both weddings were backed up just now, after every row above was written.
    with psycopg.connect(catalogue.dsn) as conn:
        conn.execute("INSERT INTO wedbackup.backups (partition, archive_sha256, size, key_id, snapshot_time, rows, "
                     "raw_bytes, manifest) SELECT p, md5(p), 1, p || '.k', now(), 0, 0, '{}' "
                     "FROM unnest(ARRAY['5', '6', 'platform']) p")
    first = capture(instance)  # no cursor yet: everything is "changed", but already backed up
    assert first.run_requests == []
    with psycopg.connect(source) as conn:
        start = conn.execute("SELECT max(updated_at) FROM (SELECT updated_at FROM guests UNION ALL SELECT updated_at "
                             "FROM weddings UNION ALL SELECT updated_at FROM vendors) x").fetchone()[0]
    assert dt.datetime.fromisoformat(first.cursor) == start

    with psycopg.connect(source) as conn:
        conn.execute("UPDATE guests SET name = 'Ada L.', updated_at = now() WHERE wedding_id = 5")
        conn.execute("UPDATE guests SET name = 'Bea K.', updated_at = now() WHERE wedding_id = 6")
        changed_at = conn.execute("SELECT max(updated_at) FROM guests").fetchone()[0]
    data = capture(instance, first.cursor)
    watermark = dt.datetime.fromisoformat(data.cursor)
    assert watermark == changed_at
    assert data.run_requests == [dg.RunRequest(
        run_key=f"change-{watermark.astimezone(dt.timezone.utc):%Y%m%dT%H%M%S%f}-high-0",
        run_config=list_run_config(["5"]),
        tags={"dagster/priority": "50", "wedbackup/tier": "high", "wedbackup/trigger": "change",
              "wedbackup/due_weddings": "1", "wedbackup/first_wedding": "5", "wedbackup/last_wedding": "5",
              "dagster/sensor_name": "wedding_change_capture"})]
    # The normal-tier wedding's change is recorded for the schedule (its fingerprint), not run at once.
    with catalogue.connect() as conn:
        rows = {r["partition"]: r for r in conn.execute(
            "SELECT partition, source_updated_at, requested_at FROM wedbackup.partitions").fetchall()}
    assert rows["6"]["source_updated_at"] == changed_at and rows["6"]["requested_at"] is None
    assert rows["5"]["requested_at"] is not None

    # The next tick looks two minutes behind its watermark (late commits), so it sees these changes (and the
    # platform's vendor row) again, but does not ask twice.
    again = capture(instance, data.cursor)
    assert again.run_requests == [] and again.cursor == data.cursor
    assert again.skip_message == "3 partition(s) changed, none critical or high tier with an unrequested change"


def test_no_change_keeps_the_watermark(source, catalogue, instance):
    stamp = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc).isoformat()
    data = capture(instance, stamp)
    assert data.run_requests == [] and data.cursor == stamp
    assert data.skip_message == f"no change since {stamp} (updated_at)"


def test_with_a_change_feed_running_the_feed_decides_a_deleted_child_row_without_updated_at_included(
        feed_env, monkeypatch):  # noqa: F811
    """The feed, not updated_at, decides which weddings changed: a delete of a guest_dietary row (no
    updated_at, no wedding column) asks for a backup of its critical wedding; updated_at alone never sees it."""
    from wedbackup_dagster.core.changefeed.slot import SLOT_SETTING

    monkeypatch.setenv(SLOT_SETTING, feed_env["slot"])
    engine, feed, source = feed_env["engine"], feed_env["feed"], feed_env["source"]
    today = dt.datetime.now(dt.timezone.utc).date()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("UPDATE weddings SET wedding_date = %s WHERE id = 4", (today,))  # the wedding day
        rows = conn.execute("SELECT id::text, wedding_date FROM weddings").fetchall()
    engine.catalogue.sync_partitions([("platform", None), *rows])
    with engine.snapshot_session() as session:
        for w, _ in rows:
            engine.back_up(w, session)
    feed.drain()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("weddings", ["platform", *(w for w, _ in rows)])
        first = capture(instance)
        assert first.run_requests == []
        with psycopg.connect(source, autocommit=True) as conn:
            (stamp,) = conn.execute("SELECT clock_timestamp()").fetchone()
            conn.execute("DELETE FROM guest_dietary WHERE id = (SELECT min(d.id) FROM guest_dietary d JOIN guests g "
                         "ON g.id = d.guest_id WHERE g.wedding_id = 4)")
        from wedbackup_dagster.core.postgres.discovery import changed_weddings

        assert "4" not in changed_weddings(source, stamp)[0]  # invisible to updated_at
        feed.drain()
        data = capture(instance, first.cursor)
        assert [r.tags["wedbackup/first_wedding"] for r in data.run_requests] == ["4"]
        assert data.run_requests[0].tags["wedbackup/tier"] == "critical"
        assert dt.datetime.fromisoformat(data.cursor) == feed.store.live_feed(feed.slot)["covered_until"]
        # Without a live feed (stopped), updated_at decides again and cannot see such a delete.
        feed.stop()
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("DELETE FROM guest_dietary WHERE id = (SELECT min(d.id) FROM guest_dietary d JOIN guests g "
                         "ON g.id = d.guest_id WHERE g.wedding_id = 4)")
        assert capture(instance, data.cursor).run_requests == []
