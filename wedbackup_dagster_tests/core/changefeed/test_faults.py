"""Faults of the change feed on the real stack: a drain killed between sealing and advancing, the slot dropped
by someone, a long transaction open across a snapshot, a wedding erased while its changes wait in the slot,
TRUNCATE and a parent row moving between weddings (barriers replay never crosses)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import psycopg
import pytest

from wedbackup_dagster.core.changefeed.errors import ReplayRefused, SlotLost
from wedbackup_dagster.core.postgres.restore_wedding import RecoveryRequest, recover

from .conftest import digest


def _now(dsn: str):
    with psycopg.connect(dsn, autocommit=True) as conn:
        (now,) = conn.execute("SELECT clock_timestamp()").fetchone()
    time.sleep(0.01)
    return now


def _write(dsn: str, statements: list[tuple[str, tuple]]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for q, p in statements:
            conn.execute(q, p)


def _back_up(engine, *weddings: str) -> None:
    with engine.snapshot_session() as session:
        for w in weddings:
            engine.back_up(w, session)


def _restore(engine, wedding: str, at, target: str):
    return recover(engine, RecoveryRequest(partition=wedding, mode="target", as_of=at, include_unverified=True), {},
                   target_dsn=target)


def _assert_restores_after(feed_env, wedding: str, statement: str, target: str) -> None:
    """Run `statement`, note the moment and the wedding's digest, drain, restore as of then into `target`:
    equal."""
    source = feed_env["source"]
    _write(source, [(statement, ())])
    at = _now(source)
    expected = digest(source, wedding)
    feed_env["feed"].drain()
    _restore(feed_env["engine"], wedding, at, target)
    assert digest(target, wedding) == expected


def _sealed_transactions(engine) -> tuple[int, int]:
    """(transactions recorded in segments, distinct (wedding, xid, end LSN)) — read from the vault's segments."""
    from wedbackup_dagster.core.changefeed.segments import read_segment, segment_vault

    vault = segment_vault(engine.settings.vault_dir)
    with engine.catalogue.connect() as conn:
        rows = conn.execute("SELECT partition, sha256 FROM wedbackup.changefeed_segments").fetchall()
    total, seen = 0, set()
    for r in rows:
        with open(vault.path_for(r["partition"], r["sha256"]), "rb") as fh:
            seg = read_segment(fh, name=r["sha256"], resolve_key=engine.resolve_key)
        for t in seg.transactions:
            total += 1
            seen.add((r["partition"], t["xid"], t["end_lsn"]))
    return total, len(seen)


KILLED_DRAIN = textwrap.dedent("""
    import os, signal
    from wedbackup_dagster.core.changefeed.drain import ChangeFeed
    from wedbackup_dagster.core.engine import Engine

    def die(self, conn, lsn):  # the catalogue has the segments; the slot has not advanced
        os.kill(os.getpid(), signal.SIGKILL)

    ChangeFeed._advance = die
    engine = Engine.from_env()
    ChangeFeed.from_settings(engine.settings, engine.keyring, engine.catalogue, slot=os.environ["SLOT"]).drain()
""")


def test_a_drain_killed_between_sealing_and_advancing_loses_nothing_and_applies_nothing_twice(feed_env, make_database):
    engine, feed, source = feed_env["engine"], feed_env["feed"], feed_env["source"]
    _back_up(engine, "4")
    _write(source, [("INSERT INTO guests (wedding_id, first_name, last_name) VALUES (4, 'K', %s)", (f"n{i}",))
                    for i in range(20)] + [("DELETE FROM guest_dietary WHERE guest_id IN (SELECT id FROM guests WHERE "
                                            "wedding_id = 4)", ())])
    at = _now(source)
    expected = digest(source, "4")
    env = {**os.environ, "SLOT": feed.slot, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-c", KILLED_DRAIN], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    with psycopg.connect(source, autocommit=True) as conn:  # the slot did not move
        (confirmed,) = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                                    (feed.slot,)).fetchone()
    assert feed.store.live_feed(feed.slot)["persisted_lsn"] > int(confirmed.split("/")[0], 16) << 32 | int(
        confirmed.split("/")[1], 16)
    again = feed.drain()  # re-reads what the killed drain sealed: recognised, skipped, then the slot advances
    assert again.already_persisted >= 21 and again.transactions == 0 and not again.segments
    total, distinct = _sealed_transactions(engine)
    assert total == distinct > 0
    target = make_database()
    _restore(engine, "4", at, target)
    assert digest(target, "4") == expected


def test_a_dropped_slot_is_named_the_gap_is_refused_and_a_new_feed_with_fresh_snapshots_restores_again(
        feed_env, make_database):
    engine, feed, source = feed_env["engine"], feed_env["feed"], feed_env["source"]
    _back_up(engine, "6")
    _write(source, [("UPDATE weddings SET venue = 'before the loss' WHERE id = 6", ())])
    feed.drain()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (feed.slot,))
    _write(source, [("UPDATE weddings SET venue = 'lost' WHERE id = 6", ())])
    with pytest.raises(SlotLost, match=f"replication slot '{feed.slot}' is gone.*fresh snapshot"):
        feed.drain()
    lost_at = _now(source)
    with pytest.raises(ReplayRefused, match="where the feed was lost"):
        _restore(engine, "6", lost_at, make_database())
    feed.recover()  # a new slot and feed; the old snapshot cannot reach past the gap
    _write(source, [("UPDATE weddings SET venue = 'after' WHERE id = 6", ())])
    feed.drain()
    with pytest.raises(ReplayRefused):
        _restore(engine, "6", _now(source), make_database())
    _back_up(engine, "6")  # the fresh snapshot
    with psycopg.connect(engine.settings.catalogue_dsn) as conn:
        (fresh,) = conn.execute("SELECT max(snapshot_time) FROM wedbackup.backups WHERE partition = '6'").fetchone()
    # A second inside the gap: refused, naming both sides — the old snapshot's range up to the loss, and the
    # fresh snapshot after it.
    with pytest.raises(ReplayRefused, match=f"where the feed was lost.*nearest restorable points.*next snapshot, of "
                                            f"{fresh.isoformat().replace('+', '.')}"):
        _restore(engine, "6", lost_at, make_database())
    _assert_restores_after(feed_env, "6", "UPDATE weddings SET venue = 'after the fresh snapshot' WHERE id = 6",
                           make_database())


def test_a_transaction_open_across_the_snapshot_is_replayed_exactly_once(feed_env, make_database):
    engine, feed, source = feed_env["engine"], feed_env["feed"], feed_env["source"]
    with psycopg.connect(source) as long_tx:  # begins before the snapshot, commits after it
        long_tx.execute("INSERT INTO guests (wedding_id, first_name, last_name) VALUES (7, 'Long', 'Open')")
        long_tx.execute("UPDATE weddings SET venue = 'long transaction' WHERE id = 7")
        _write(source, [("INSERT INTO guests (wedding_id, first_name, last_name) VALUES (7, 'Short', 'Before')", ())])
        _back_up(engine, "7")  # sees 'Short', not the open transaction
        before_commit = _now(source)
        expected_before = digest(source, "7")
        long_tx.commit()
    at = _now(source)
    expected = digest(source, "7")
    assert expected != expected_before
    feed.drain()
    target = make_database()
    _restore(engine, "7", at, target)
    assert digest(target, "7") == expected
    target = make_database()
    _restore(engine, "7", before_commit, target)
    assert digest(target, "7") == expected_before


def test_a_wedding_erased_while_its_changes_wait_in_the_slot_gets_nothing_sealed(feed_env):
    engine, feed, source = feed_env["engine"], feed_env["feed"], feed_env["source"]
    _write(source, [("UPDATE weddings SET venue = 'before' WHERE id IN (8, 9)", ())])
    assert {"8", "9"} <= set(feed.drain().segments)  # the drain now holds both weddings' keys
    _write(source, [("UPDATE guests SET meal_choice = 'soup' WHERE wedding_id IN (8, 9)", ()),
                    ("UPDATE guests SET meal_choice = 'soup' WHERE wedding_id = 3", ())])
    for w in ("8", "9"):
        engine.catalogue.begin_erasure(w, w, "test")
    engine.catalogue.shred_wedding_key("8")  # 9's shredding has not run yet: it is erased all the same
    result = feed.drain()
    assert sorted(result.erased) == ["8", "9"] and "3" in result.segments
    assert not {"8", "9"} & set(result.segments)
    with engine.catalogue.connect() as conn:
        assert conn.execute("SELECT count(*) AS n FROM wedbackup.changefeed_segments WHERE partition IN ('8', '9')"
                            ).fetchone()["n"] == 2  # the two sealed before the erasure only


def test_truncate_and_a_parent_moving_between_weddings_are_barriers_replay_never_crosses(feed_env, make_database):
    engine, feed, source = feed_env["engine"], feed_env["feed"], feed_env["source"]
    _back_up(engine, "1", "2", "10")
    fine = _now(source)
    _write(source, [("UPDATE guests SET wedding_id = 2 WHERE id = (SELECT min(id) FROM guests WHERE wedding_id = 1)",
                     ())])
    _write(source, [("TRUNCATE vendor_reviews", ())])
    after = _now(source)
    result = feed.drain()
    reasons = " | ".join(b["reason"] for b in result.barriers)
    assert "TRUNCATE of public.vendor_reviews" in reasons
    assert "public.guests (a parent of other tables) moved" in reasons
    _restore(engine, "10", fine, make_database())  # before the barriers: fine
    for w in ("1", "2", "10"):
        with pytest.raises(ReplayRefused, match="would cross a barrier"):
            _restore(engine, w, after, make_database())
    _back_up(engine, "1")  # a fresh snapshot restores continuity
    _assert_restores_after(feed_env, "1", "UPDATE weddings SET venue = 'later' WHERE id = 1", make_database())


def test_a_slot_the_server_invalidates_past_max_slot_wal_keep_size_is_named_and_recovered(feed_env, make_database):
    """The server itself invalidates the slot (its retained WAL passed `max_slot_wal_keep_size`, as when a feed
    stops draining for too long): the drain names it, the feed recovers with a new slot, and a wedding backed
    up again restores to a second after the loss. The setting is restored for the rest of the session."""
    engine, feed, source = feed_env["engine"], feed_env["feed"], feed_env["source"]
    _back_up(engine, "6")
    feed.drain()
    with psycopg.connect(source, autocommit=True) as conn:
        (before,) = conn.execute("SHOW max_slot_wal_keep_size").fetchone()
        conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        conn.execute("SELECT pg_reload_conf()")
        try:
            deadline = time.monotonic() + 120
            status = None
            while status != "lost":
                assert time.monotonic() < deadline, f"the server did not invalidate the slot (wal_status {status})"
                # WAL the slot holds back: writes, a segment switch, and a checkpoint that removes old segments.
                conn.execute("UPDATE weddings SET venue = md5(random()::text) WHERE id = 6")
                conn.execute("SELECT pg_switch_wal()")
                conn.execute("CHECKPOINT")
                (status,) = conn.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                                         (feed.slot,)).fetchone()
        finally:
            conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            conn.execute("SELECT pg_reload_conf()")
        assert conn.execute("SHOW max_slot_wal_keep_size").fetchone()[0] == before
    with pytest.raises(SlotLost, match=f"replication slot '{feed.slot}' was invalidated by the server.*"
                                       "max_slot_wal_keep_size"):
        feed.drain()
    feed.recover()
    _back_up(engine, "6")  # the fresh snapshot after the loss
    _assert_restores_after(feed_env, "6", "UPDATE weddings SET venue = 'after the invalidation' WHERE id = 6",
                           make_database())
