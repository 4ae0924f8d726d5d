"""A snapshot holds every row its wedding had, or fails naming what it could not read (issue 14): row-level
security, TRUNCATE and table-rewriting ALTER racing the snapshot (also in a shared multi-wedding
transaction), bounded lock waits and their retry, the independent count, rows in no partition.
Real PostgreSQL, a real role without BYPASSRLS, real concurrent sessions; no mocks."""
from __future__ import annotations

import io
import secrets
import threading
import time
import uuid

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from wedbackup_dagster.core.postgres import discovery
from wedbackup_dagster.core.formats import snapshot_stream
from wedbackup_dagster.core.postgres import snapshot as snap
from wedbackup_dagster.core.errors import SnapshotError, SnapshotIncomplete, SnapshotRetryable
from wedbackup_dagster.core.postgres.snapshot import SnapshotSession, take_snapshot

from wedbackup_dagster_tests.core.postgres.test_snapshot import make_platform_db

pytestmark = pytest.mark.stack

# Wedding 1's rows in guest_dietary (guests 1 and 2), wedding 2's (guest 4): see test_snapshot.DATA.
DIETARY = {"1": 2, "2": 1}


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    """Poll `predicate` (a fact read from pg_locks / pg_stat_activity) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def waiting_on_lock(dsn: str, pid: int) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT EXISTS (SELECT FROM pg_locks WHERE pid = %s AND NOT granted)", (pid,)).fetchone()[0]


def snapshot_pids(dsn: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = "
                                           "'wedbackup-snapshot' AND datname = current_database()")]


def snapshot_waits(dsn: str) -> bool:
    return any(waiting_on_lock(dsn, pid) for pid in snapshot_pids(dsn))


def warm_ddl_cache(dsn: str) -> None:
    """pg_dump runs once per schema fingerprint: after this, snapshots of the same schema do not run it
    (so a held lock meets the snapshot's own LOCK TABLE / COPY, not pg_dump's)."""
    take_snapshot(dsn, None, partition="1", sink=io.BytesIO())


def in_thread(work) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = work()
        except BaseException as e:  # handed to the test
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# --- 1. row-level security ----------------------------------------------------------------------------

@pytest.fixture
def rls_role(make_database):
    """A database with the test schema and a LOGIN role that may SELECT every table but lacks BYPASSRLS;
    yields (owner dsn, role dsn). The role is dropped afterwards."""
    dsn = make_platform_db(make_database)
    role = f"wb_rls_{uuid.uuid4().hex[:10]}"
    password = secrets.token_urlsafe(18)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOBYPASSRLS PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(password)))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {r}; GRANT SELECT ON ALL TABLES IN SCHEMA public "
                             "TO {r}; GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO {r}").format(
            r=sql.Identifier(role)))
    params = conninfo_to_dict(dsn)
    params.update(user=role, password=password)
    try:
        yield dsn, make_conninfo(**params), password
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_table_with_row_level_security_fails_the_snapshot_instead_of_copying_it_filtered(rls_role):
    dsn, role_dsn, password = rls_role
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE guests ENABLE ROW LEVEL SECURITY")
        conn.execute("CREATE POLICY only_yes ON guests FOR SELECT USING (rsvp = 'yes')")
    # Before: 1 of wedding 1's 4 guests was copied, and the archive verified.
    with pytest.raises(SnapshotError) as err:
        take_snapshot(role_dsn, None, partition="1", sink=io.BytesIO())
    message = str(err.value)
    assert "table guests" in message and "row-level security" in message and "BYPASSRLS" in message
    assert "FORCE ROW LEVEL SECURITY" in message and password not in message
    # The batch path too, and the session survives the error for a role that may read everything.
    with SnapshotSession(role_dsn) as session:
        with pytest.raises(SnapshotError, match="table guests has row-level security"):
            session.snapshot_many(["1", "2"], {"1": io.BytesIO(), "2": io.BytesIO()})
    # The owner (no FORCE ROW LEVEL SECURITY) reads every row.
    _, manifest = snapshot_bytes(dsn, "1")
    assert manifest.table("public.guests").rows == 4


def test_row_level_security_on_the_root_fails_discovery_instead_of_missing_weddings(rls_role):
    dsn, role_dsn, password = rls_role
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE weddings ENABLE ROW LEVEL SECURITY")
        conn.execute("CREATE POLICY dated ON weddings FOR SELECT USING (wedding_date IS NOT NULL)")
    # Before: wedding 3 (no date) was silently not discovered, so never backed up.
    for listing in (discovery.wedding_ids, discovery.wedding_dates):
        with pytest.raises(SnapshotError, match="table weddings has row-level security.*BYPASSRLS") as err:
            listing(role_dsn)
        assert password not in str(err.value) and "listing weddings" in str(err.value)
    with pytest.raises(SnapshotError, match="table weddings has row-level security"):
        discovery.changed_weddings(role_dsn, None)
    # A wedding the policy hides is not taken for an unknown wedding either: the refusal is named.
    with pytest.raises(SnapshotError, match="table weddings has row-level security"):
        take_snapshot(role_dsn, None, partition="3", sink=io.BytesIO())
    assert discovery.wedding_ids(dsn) == ["1", "2", "3"]


def snapshot_bytes(dsn: str, partition: str):
    out = io.BytesIO()
    manifest = take_snapshot(dsn, None, partition=partition, sink=out)
    return out.getvalue(), manifest


# --- 2. TRUNCATE and table-rewriting ALTER racing the snapshot --------------------------------------------

@pytest.mark.parametrize("ddl", ["ALTER TABLE guest_dietary ALTER COLUMN severity TYPE double precision",
                                 "TRUNCATE guest_dietary"])
@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_a_rewrite_committed_between_the_snapshot_and_its_lock_fails_the_snapshot(make_database, ddl, batch):
    """The window pg_dump leaves open: the DDL is in progress when the snapshot begins (so the snapshot
    cannot see it) and commits while the snapshot waits for the table. Before: the table was read from
    its new, empty file: an archive with 0 rows in guest_dietary that verified."""
    dsn = make_platform_db(make_database)
    warm_ddl_cache(dsn)
    with psycopg.connect(dsn) as migration:
        migration.execute(ddl)  # in a transaction: holds ACCESS EXCLUSIVE until the commit below
        sinks = {"1": io.BytesIO(), "2": io.BytesIO()}
        with SnapshotSession(dsn) as session:
            work = (lambda: session.snapshot_many(["1", "2"], sinks)) if batch else \
                (lambda: {"1": session.snapshot("1", sinks["1"])})
            thread, out = in_thread(work)
            wait_for(lambda: snapshot_waits(dsn), "the snapshot to wait for guest_dietary")
            migration.commit()
            thread.join(60)
            error = out.get("error")
            if error is None:  # before the fix: a short archive
                rows = {p: m.table("public.guest_dietary").rows for p, m in out["result"].items()}
                pytest.fail(f"the snapshot read guest_dietary short after a concurrent {ddl.split()[0]}: {rows}")
            assert isinstance(error, SnapshotRetryable), error
            assert "public.guest_dietary" in str(error) and "retry" in str(error)
            # The retry is a fresh snapshot, complete.
            manifest = session.snapshot("1", io.BytesIO())
    expected = 0 if ddl.startswith("TRUNCATE") else DIETARY["1"]
    assert manifest.table("public.guest_dietary").rows == expected


class _HookSink(io.BytesIO):
    """A sink that runs `hook` once, at the first bytes of the stream (the snapshot has begun and, with
    the fix, holds its locks)."""

    def __init__(self, hook):
        super().__init__()
        self._hook = hook

    def write(self, data) -> int:
        if self._hook is not None:
            hook, self._hook = self._hook, None
            hook()
        return super().write(data)


def start_truncate(dsn: str) -> tuple[threading.Thread, dict]:
    """TRUNCATE guest_dietary in another session; return once it has committed or is waiting for a lock."""
    conn = psycopg.connect(dsn, autocommit=True)
    pid = conn.info.backend_pid
    thread, out = in_thread(lambda: conn.execute("TRUNCATE guest_dietary"))
    wait_for(lambda: not thread.is_alive() or waiting_on_lock(dsn, pid), "the TRUNCATE to commit or wait")
    out["conn"] = conn
    return thread, out


def finish(thread: threading.Thread, out: dict) -> None:
    thread.join(60)
    out["conn"].close()
    assert "error" not in out, out.get("error")


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_a_truncate_during_the_snapshot_waits_for_it(make_database, batch):
    """Before: nothing held guest_dietary until its COPY, so a TRUNCATE committed mid-snapshot and the
    COPY read the new, empty file."""
    dsn = make_platform_db(make_database)
    started: dict = {}
    sinks = {"1": _HookSink(lambda: started.update(truncate=start_truncate(dsn))), "2": io.BytesIO()}
    with SnapshotSession(dsn) as session:
        if batch:
            manifests = session.snapshot_many(["1", "2"], sinks)
        else:
            manifests = {"1": session.snapshot("1", sinks["1"])}
    finish(*started["truncate"])
    for partition, manifest in manifests.items():
        assert manifest.table("public.guest_dietary").rows == DIETARY[partition]


def test_the_shared_transaction_holds_its_locks_for_every_wedding(make_database):
    """Weddings read from one shared snapshot (share_seconds) stay under the locks taken at its start:
    a TRUNCATE after the first wedding waits; before, the second wedding's guest_dietary was empty."""
    dsn = make_platform_db(make_database)
    with SnapshotSession(dsn, share_seconds=300) as session:
        first = session.snapshot("1", io.BytesIO())
        truncate = start_truncate(dsn)
        second = session.snapshot("2", io.BytesIO())
        assert second.snapshot == first.snapshot  # one shared transaction
    finish(*truncate)
    assert first.table("public.guest_dietary").rows == DIETARY["1"]
    assert second.table("public.guest_dietary").rows == DIETARY["2"]


@pytest.mark.parametrize("table, rows", [("wedding_vendors", 2), ("timeline_items", 3)])
def test_a_lock_not_granted_in_time_fails_the_snapshot_naming_table_and_holder(make_database, table, rows):
    """Before: the snapshot waited for ever. wedding_vendors is first waited for by the snapshot's LOCK
    TABLE; timeline_items (a default, an index) already by the schema fingerprint's catalogue functions."""
    dsn = make_platform_db(make_database)
    warm_ddl_cache(dsn)
    with psycopg.connect(dsn, application_name="nightly-migration") as migration:
        migration.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(table)))
        started = time.monotonic()
        with pytest.raises(SnapshotRetryable) as err, SnapshotSession(dsn, lock_timeout=0.3) as session:
            session.snapshot("1", io.BytesIO())
        assert time.monotonic() - started < 20
        message = str(err.value)
        assert f"public.{table}" in message and "WEDBACKUP_SNAPSHOT_LOCK_TIMEOUT" in message
        assert f"pid {migration.info.backend_pid}" in message and "nightly-migration" in message
        migration.rollback()
        # The same session takes the next snapshot normally.
        assert session.snapshot("1", io.BytesIO()).table(f"public.{table}").rows == rows


def test_the_snapshot_lock_timeout_setting(monkeypatch):
    from wedbackup_dagster.core.config import snapshot_lock_timeout_from

    assert snapshot_lock_timeout_from({}) == snap.DEFAULT_LOCK_TIMEOUT == 30.0
    assert snapshot_lock_timeout_from({"WEDBACKUP_SNAPSHOT_LOCK_TIMEOUT": "2.5"}) == 2.5


def test_the_backup_retries_a_snapshot_whose_lock_was_not_granted(demo_env):
    """Engine.back_up_each (what the Dagster step and the batch job call) takes a SnapshotRetryable
    snapshot again with a fresh transaction. Before: the step failed every wedding of the batch."""
    import os

    from wedbackup_dagster.core.engine import Engine
    from wedbackup_dagster.core.outcomes import BackupOutcome

    env = demo_env(weddings=3, seed=7, document_bytes=64, WEDBACKUP_SNAPSHOT_LOCK_TIMEOUT="0.3")
    engine = Engine.from_env(dict(os.environ))
    assert engine.settings.snapshot_lock_timeout == 0.3
    source = env["source"]
    weddings = discovery.wedding_ids(source)

    with psycopg.connect(source, application_name="nightly-migration") as migration:
        migration.execute("LOCK TABLE guest_dietary IN ACCESS EXCLUSIVE MODE")

        def release_after_first_timeout() -> None:
            wait_for(lambda: snapshot_waits(source), "the snapshot to wait for guest_dietary")
            wait_for(lambda: not snapshot_waits(source), "the first attempt to time out")
            migration.rollback()

        releaser, out = in_thread(release_after_first_timeout)
        with engine.snapshot_session() as session:
            outcomes = dict(engine.back_up_each(["platform", *weddings], session))
        releaser.join(30)
    assert "error" not in out, out.get("error")
    assert all(isinstance(o, BackupOutcome) for o in outcomes.values()), outcomes
    assert set(outcomes) == {"platform", *weddings}


# --- 3. the independent count --------------------------------------------------------------------------

def test_every_table_of_every_partition_records_an_independent_count(make_database):
    dsn = make_platform_db(make_database)
    with SnapshotSession(dsn) as session:
        batch = session.snapshot_many(["1", "2", "3"], {p: io.BytesIO() for p in "123"})
        platform = session.snapshot("platform", io.BytesIO())
        single = session.snapshot("2", io.BytesIO())
    for manifest in (*batch.values(), platform, single):
        assert manifest.tables and all(t.counted == t.rows for t in manifest.tables), manifest.partition
    assert batch["1"].table("public.guest_dietary").counted == DIETARY["1"]
    assert single.table("public.guest_dietary").counted == batch["2"].table("public.guest_dietary").counted == 1
    # The field is optional: a manifest written before it still reads, with nothing to compare.
    old = batch["1"].to_dict()
    for t in old["tables"]:
        del t["counted"]
    assert all(t.counted is None for t in snapshot_stream.Manifest.from_dict(old).tables)
    assert snap.count_mismatches(snapshot_stream.Manifest.from_dict(old), {}) == []


def drop_first_row(buf: bytearray) -> bytearray:
    return bytearray(buf[buf.index(b"\n") + 1:])


def test_a_copy_that_hands_over_fewer_rows_than_the_count_fails_the_wedding(make_database, monkeypatch):
    """A read path that loses a row (injected here into the COPY reader) no longer makes a short archive:
    before, the manifest recorded the rows the COPY handed over, and the restore 'verified' against it."""
    dsn = make_platform_db(make_database)
    real_copy_out = snap.copy_out
    lost = []

    def lossy_copy_out(conn, query, params, on_buffer):
        def handed(buf):
            if b"guest_dietary" in query and not lost:
                lost.append(buf[:buf.index(b"\n")])
                buf = drop_first_row(buf)
            on_buffer(buf)
        real_copy_out(conn, query, params, handed)

    monkeypatch.setattr(snap, "copy_out", lossy_copy_out)
    with pytest.raises(SnapshotIncomplete) as err:
        take_snapshot(dsn, None, partition="1", sink=io.BytesIO())
    assert lost and "wedding 1" in str(err.value) and "public.guest_dietary" in str(err.value)
    assert "handed over 1 rows but count(*)" in str(err.value) and "found 2" in str(err.value)


def test_the_batch_fails_only_the_wedding_whose_copy_came_short(make_database, monkeypatch):
    dsn = make_platform_db(make_database)
    state = {"table": None, "dropped": False}
    real_batch, real_emit = snap.copy_batch, snap.TableOut.emit

    def batch(conn, query, outs, table):
        state["table"] = table.name
        return real_batch(conn, query, outs, table)

    def emit(self, buf):
        if state["table"] == "guest_dietary" and not state["dropped"]:  # wedding 1's rows come first
            state["dropped"] = True
            buf = drop_first_row(buf)
        real_emit(self, buf)

    monkeypatch.setattr(snap, "copy_batch", batch)
    monkeypatch.setattr(snap.TableOut, "emit", emit)
    with SnapshotSession(dsn) as session:
        results = session.snapshot_many(["1", "2"], {"1": io.BytesIO(), "2": io.BytesIO()})
    assert isinstance(results["1"], SnapshotIncomplete) and "public.guest_dietary" in str(results["1"])
    assert results["2"].table("public.guest_dietary").rows == results["2"].table("public.guest_dietary").counted == 1


def test_verification_compares_restored_rows_with_the_independent_count(make_database):
    from wedbackup_dagster.core.postgres.load_snapshot import restore_snapshot, verify_restored

    dsn = make_platform_db(make_database)
    stream, manifest = snapshot_bytes(dsn, "1")
    target = make_database()
    restore_snapshot([stream], target, create_schema=True)
    report = verify_restored(target, manifest)
    report.raise_if_failed()
    restored = {t.table: t.rows for t in report.tables}
    assert snap.count_mismatches(manifest, restored) == []
    # A manifest whose rows agree with a short copy but not with its count is caught.
    manifest.table("public.guests").counted += 1
    assert snap.count_mismatches(manifest, restored) == [
        "table public.guests: 4 rows restored, 5 counted independently at snapshot time"]


# --- 4. rows in no partition ------------------------------------------------------------------------------

BREAK_FOREIGN_KEYS = """
SET session_replication_role = replica;  -- what a careless data fix does: no FK triggers fire
INSERT INTO guests (id, wedding_id, name) VALUES (900, 999, 'Lost guest');  -- wedding 999 does not exist
INSERT INTO guest_dietary (guest_id, requirement) VALUES (900, 'lost diet');  -- its guest exists, no wedding
INSERT INTO documents (wedding_id, title) VALUES (998, 'lost document');  -- nullable path, broken key
RESET session_replication_role;
"""


def test_rows_that_break_a_validated_foreign_key_are_carried_by_the_platform(make_database):
    """Before: those rows reached no wedding and were in no partition (the platform took only NULL keys),
    so no backup held them. Now the partitions together are the whole database again, the platform
    manifest names every broken key with its row count, and the platform archive restores and verifies."""
    from wedbackup_dagster.core.postgres.load_snapshot import restore_snapshot, verify_restored

    dsn = make_platform_db(make_database)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(BREAK_FOREIGN_KEYS)
        whole = {t: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("public", t))).fetchone()[0]
                 for t in ("weddings", "guests", "guest_dietary", "timeline_items", "wedding_vendors", "documents")}
    with SnapshotSession(dsn) as session:
        weddings = session.snapshot_many(["1", "2", "3"], {p: io.BytesIO() for p in "123"})
        platform_stream = io.BytesIO()
        platform = session.snapshot("platform", platform_stream)
    def rows(manifest, table: str) -> int:  # a table missing from a partition holds none of its rows
        return next((t.rows for t in manifest.tables if t.table == f"public.{table}"), 0)

    union = {t: sum(rows(m, t) for m in (*weddings.values(), platform)) for t in whole}
    assert union == whole  # before: guests 6 of 7, guest_dietary 4 of 5, documents 3 of 4
    assert platform.table("public.guests").rows == 1 and platform.table("public.guest_dietary").rows == 1
    assert platform.table("public.documents").rows == 2  # the template without a wedding, the lost one
    assert sorted((fk["table"], fk["constraint"], fk["rows"]) for fk in platform.broken_foreign_keys) == [
        ("documents", "documents_wedding_id_fkey", 1), ("guests", "guests_wedding_id_fkey", 1)]
    assert all(m.broken_foreign_keys is None for m in weddings.values())

    # The platform archive restores (those keys NOT VALID, as their rows need) and verifies, the orphans
    # counted where they are.
    target = make_database()
    report = restore_snapshot([platform_stream.getvalue()], target, create_schema=True)
    assert {"public.guests.guests_wedding_id_fkey", "public.documents.documents_wedding_id_fkey"} <= \
        set(report.unvalidated_foreign_keys)
    verified = verify_restored(target, platform)
    assert verified.ok, verified.problems
    assert {f.constraint: f.status for f in verified.foreign_keys}["guest_dietary_guest_id_fkey"] == "ok"
    assert snap.broken_key_names(platform) == {("public", "guests", "guests_wedding_id_fkey"),
                                               ("public", "documents", "documents_wedding_id_fkey")}


def test_the_platform_backup_with_broken_keys_verifies_and_reports_them(demo_env):
    """End to end through the engine and db_dump's metadata: the platform backup holds the rows, verifies,
    and says which keys are broken and how many rows (before: the rows were in no backup at all)."""
    import os

    from wedbackup_dagster.shared.metadata import dump_metadata
    from wedbackup_dagster.core.engine import Engine

    env = demo_env(weddings=3, seed=11, document_bytes=64)
    with psycopg.connect(env["source"], autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        lost = conn.execute("UPDATE guests SET wedding_id = 424242 WHERE id = (SELECT min(id) FROM guests) "
                            "RETURNING id").fetchone()[0]
        conn.execute("RESET session_replication_role")
    engine = Engine.from_env(dict(os.environ))
    with engine.snapshot_session() as session:
        outcome = engine.back_up("platform", session)
    guests = [t for t in outcome.manifest["tables"] if t["name"] == "guests"]
    assert guests and guests[0]["rows"] == guests[0]["counted"] == 1  # before: no guests in the platform
    broken = {fk["constraint"]: (fk["rows"], fk["source_rows"]) for fk in outcome.manifest["broken_foreign_keys"]}
    assert broken["guests_wedding_id_fkey"] == (1, 1)
    metadata = dump_metadata(outcome)
    assert metadata["rows_breaking_foreign_keys"].value == 1
    verified = engine.verify("platform", {})  # the vault copy: restored into a scratch database, checked
    assert {t["table"]: t["rows"] for t in verified.tables}["public.guests"] == 1 and lost
