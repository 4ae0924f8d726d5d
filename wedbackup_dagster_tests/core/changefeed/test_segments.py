"""Segments are sealed with the wedding's key (erasure shreds them too), copied to S3, GCS and Azure under a
content address with the provider's checksum, and a restore to a second works from a provider alone."""
from __future__ import annotations

import time

import psycopg
import pytest

from wedbackup_dagster.core.storage.providers import replica_for
from wedbackup_dagster.core.changefeed.segments import read_segment
from wedbackup_dagster.core.errors import ArchiveError, WedbackupError
from wedbackup_dagster.core.postgres.restore_wedding import RecoveryRequest, recover

from .conftest import digest


def test_segments_reach_every_provider_and_a_restore_works_without_the_vault(feed_env, make_database):
    engine, feed, source = feed_env["engine"], feed_env["feed"], feed_env["source"]
    with engine.snapshot_session() as session:
        engine.back_up("5", session)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("UPDATE guests SET meal_choice = 'from the provider' WHERE wedding_id = 5")
        conn.execute("DELETE FROM guest_dietary WHERE guest_id IN (SELECT id FROM guests WHERE wedding_id = 5)")
        (at,) = conn.execute("SELECT clock_timestamp()").fetchone()
        expected = digest(conn, "5")
    time.sleep(0.01)
    feed.drain()
    replicas = {p: replica_for(p, engine.settings) for p in ("s3", "gcs", "azure")}
    for replica in replicas.values():
        assert feed.replicate(replica)["uploaded"] >= 1
        assert feed.replicate(replica)["uploaded"] == 0  # a re-run is a no-op
    [seg] = feed.store.segments("5")
    copies = {c["provider"]: c for c in feed.store.segment_copies(seg["id"])}
    assert set(copies) == {"vault", "s3", "gcs", "azure"}
    assert all(f"/changes/5/{seg['sha256']}.wbk" in copies[p]["object_key"] for p in ("s3", "gcs", "azure"))
    assert all(copies[p]["checksum"] for p in ("s3", "gcs", "azure"))
    for entry in list(feed.vault.entries("5")):  # the segments' vault copy is lost (the snapshot's stays)
        entry.path.unlink()
    target = make_database()
    report = recover(engine, RecoveryRequest(partition="5", mode="target", as_of=at, include_unverified=True),
                     {"gcs": replicas["gcs"]}, target_dsn=target)
    assert report.replay["changes"] > 0
    assert digest(target, "5") == expected


def test_a_segment_is_sealed_with_the_wedding_key_and_erasure_makes_it_unreadable(feed_env):
    engine, feed, source = feed_env["engine"], feed_env["feed"], feed_env["source"]
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("UPDATE weddings SET venue = 'sealed' WHERE id = 12")
    feed.drain()
    [entry] = list(feed.vault.entries("12"))
    raw = entry.path.read_bytes()
    assert b"sealed" not in raw and b"venue" not in raw
    with open(entry.path, "rb") as fh:
        opened = read_segment(fh, name="s", resolve_key=engine.resolve_key)
    assert opened.transactions[0]["changes"][0][2]["venue"] == "sealed"
    engine.catalogue.begin_erasure("12", "12", "test")
    engine.catalogue.shred_wedding_key("12")
    with open(entry.path, "rb") as fh, pytest.raises((ArchiveError, WedbackupError)):
        read_segment(fh, name="s", resolve_key=engine.resolve_key)


def test_sequences_move_past_replayed_rows_in_the_target(feed_env, make_database):
    engine, feed, source = feed_env["engine"], feed_env["feed"], feed_env["source"]
    with engine.snapshot_session() as session:
        engine.back_up("6", session)
    with psycopg.connect(source, autocommit=True) as conn:
        (new_id,) = conn.execute("INSERT INTO guests (wedding_id, first_name, last_name) VALUES (6, 'New', 'Id') "
                                 "RETURNING id").fetchone()
        (at,) = conn.execute("SELECT clock_timestamp()").fetchone()
    time.sleep(0.01)
    feed.drain()
    target = make_database()
    recover(engine, RecoveryRequest(partition="6", mode="target", as_of=at, include_unverified=True), {},
            target_dsn=target)
    with psycopg.connect(target, autocommit=True) as conn:  # the next guest in the target gets a fresh id
        (next_id,) = conn.execute("INSERT INTO guests (wedding_id, first_name, last_name) VALUES (6, 'Next', 'Id') "
                                  "RETURNING id").fetchone()
    assert next_id > new_id


def test_into_a_schema_the_changes_are_replayed_too(feed_env):
    engine, feed, source = feed_env["engine"], feed_env["feed"], feed_env["source"]
    with engine.snapshot_session() as session:
        engine.back_up("10", session)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("DELETE FROM guest_dietary WHERE guest_id IN (SELECT id FROM guests WHERE wedding_id = 10)")
        conn.execute("UPDATE guests SET meal_choice = 'in the schema' WHERE wedding_id = 10")
        conn.execute("INSERT INTO guests (wedding_id, first_name, last_name) VALUES (10, 'In', 'Schema')")
        (at,) = conn.execute("SELECT clock_timestamp()").fetchone()
        expected = conn.execute("SELECT count(*), md5(string_agg(g::text, '|' ORDER BY g.id)) FROM guests g "
                                "WHERE wedding_id = 10").fetchone()
        time.sleep(0.01)
        conn.execute("UPDATE guests SET meal_choice = 'later' WHERE wedding_id = 10")
    feed.drain()
    report = recover(engine, RecoveryRequest(partition="10", mode="schema", schema="w10_then", as_of=at,
                                             include_unverified=True), {})
    assert report.replay["changes"] > 0
    with psycopg.connect(source, autocommit=True) as conn:
        assert conn.execute("SELECT count(*), md5(string_agg(g::text, '|' ORDER BY g.id)) FROM w10_then.guests g"
                            ).fetchone() == expected
        assert conn.execute("SELECT count(*) FROM w10_then.guest_dietary").fetchone()[0] == 0
        conn.execute("DROP SCHEMA w10_then CASCADE")
