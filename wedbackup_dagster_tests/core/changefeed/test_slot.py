"""The source check: what a source lacks is named (settings rows of servers we do not run, and the real stack)."""
from __future__ import annotations

import psycopg
import pytest

from wedbackup_dagster.core.postgres import tenancy
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


@pytest.fixture(scope="module")
def replica_level_server():
    """A throwaway PostgreSQL cluster started with wal_level = replica (a few seconds: initdb and start),
    trust-authenticated on 127.0.0.1 only, stopped and removed afterwards. Yields a DSN of its `postgres`."""
    import glob
    import os
    import shutil
    import socket
    import subprocess
    import tempfile

    def as_postgres(argv):
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if not binaries:
        pytest.skip("PostgreSQL server binaries not found")
    root = tempfile.mkdtemp(prefix="wbt-replica-level-", dir="/tmp")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data = os.path.join(root, "data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    try:
        subprocess.run(as_postgres([f"{binaries[0]}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E",
                                    "UTF8", "--locale=C.UTF-8"]), check=True, capture_output=True)
        opts = (f"-p {free_port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c wal_level=replica "
                "-c fsync=off")
        subprocess.run(as_postgres([f"{binaries[0]}/pg_ctl", "-D", data, "-o", opts, "-l", os.path.join(root, "log"),
                                    "-w", "-t", "60", "start"]), check=True, capture_output=True)
        yield f"host=127.0.0.1 port={free_port} user=postgres dbname=postgres"
    finally:
        subprocess.run(as_postgres([f"{binaries[0]}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_a_real_wal_level_replica_server_is_named_and_its_snapshots_still_work(replica_level_server):
    import io

    from wedbackup_dagster.core.postgres.snapshot import SnapshotSession

    with psycopg.connect(replica_level_server, autocommit=True) as conn:
        conn.execute("CREATE TABLE weddings (id bigint PRIMARY KEY, title text); INSERT INTO weddings VALUES (1, 'a')")
        check = slots.check_source(conn, tenancy.discover(conn))
        assert not check.ok and "wal_level is 'replica'" in check.problems[0]
        with pytest.raises(ChangeFeedError, match="the source cannot feed changes: wal_level is 'replica'"):
            slots.create_slot(conn, "never_made")
        assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0
    sink = io.BytesIO()
    with SnapshotSession(replica_level_server) as session:
        manifest = session.snapshot("1", sink)
    assert manifest.table("public.weddings").rows == 1 and manifest.snapshot
