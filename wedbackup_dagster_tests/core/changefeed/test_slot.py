"""The source check: what a source lacks is named (settings rows of servers we do not run, and the real stack)."""
from __future__ import annotations

import psycopg
import pytest

from wedbackup_dagster.core import tenancy
from wedbackup_dagster.core.changefeed import slot as slots
from wedbackup_dagster.core.changefeed.errors import ChangeFeedError

GOOD = {"wal_level": "logical", "max_replication_slots": "10", "max_wal_senders": "10",
        "max_slot_wal_keep_size": "2048"}
ADMIN = {"name": "app", "superuser": True, "replication": True, "read_all_stats": True}


def test_a_source_with_wal_level_replica_is_named_and_told_how_to_fix_it():
    # A settings row as a wal_level = replica server reports it (no such server is run here: restarting the
    # shared stack's server to another wal_level would break every other test on it).
    check = slots.check_settings({**GOOD, "wal_level": "replica"}, role=ADMIN, slots_used=0)
    assert not check.ok
    assert "wal_level is 'replica': the change feed needs wal_level = logical" in check.problems[0]
    assert "snapshots work without it" in check.problems[0]


def test_missing_slots_role_rights_and_an_unbounded_wal_keep_are_each_named():
    check = slots.check_settings({**GOOD, "max_replication_slots": "2", "max_slot_wal_keep_size": "-1"},
                                 role={"name": "app", "superuser": False, "replication": False,
                                       "read_all_stats": False}, slots_used=2)
    text = " | ".join(check.problems + check.warnings)
    for part in ("max_replication_slots is 2 and 2 in use", "neither REPLICATION nor SUPERUSER",
                 "max_slot_wal_keep_size is -1", "pg_read_all_stats", "session_replication_role"):
        assert part in text
    assert slots.check_settings(GOOD, role=ADMIN, slots_used=0).to_dict() == {
        "ok": True, "problems": [], "warnings": [], "tables": []}


def test_the_stack_passes_and_a_table_without_replica_identity_is_named(stack, make_database):
    dsn = make_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE weddings (id bigint PRIMARY KEY); CREATE TABLE notes (wedding_id bigint "
                     "REFERENCES weddings, body text); CREATE TABLE guests (id bigint PRIMARY KEY, wedding_id bigint "
                     "REFERENCES weddings)")
        plan = tenancy.discover(conn)
        check = slots.check_source(conn, plan)
        assert [p for p in check.problems if "wal_level" in p] == []
        [notes] = [t for t in check.tables if t["table"] == "public.notes"]
        assert "public.notes has no primary key" in notes["needs"] and "REPLICA IDENTITY FULL" in notes["needs"]
        assert check.problems == [notes["needs"]]
        conn.execute("ALTER TABLE notes REPLICA IDENTITY FULL")
        assert slots.check_source(conn, plan).ok


def test_a_missing_slot_is_named(stack, make_database):
    with psycopg.connect(make_database(), autocommit=True) as conn:
        with pytest.raises(ChangeFeedError, match="replication slot 'nobody' is gone"):
            slots.require_slot(conn, "nobody")
