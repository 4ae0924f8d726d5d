"""Recovery on the real stack: a wedding backed up at three points and restored as of each (in place, into
another database, into a schema); an in-place restore while a concurrent writer keeps writing to other
weddings; dry-run counts; schema mismatch; rows outside the wedding; unknown weddings and times."""
from __future__ import annotations

import io
import json
import re
import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from wedbackup_dagster.dev import demo_data
from wedbackup_dagster.core.postgres import restore_wedding as recovery
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.errors import RestoreError, SchemaMismatchError, VerificationError, WedbackupError
from wedbackup_dagster.core.postgres.restore_wedding import (NoRecoveryPointError, RecoveryPoint, RecoveryRequest,
                                                             choose_point, parse_as_of, recover, recovery_points,
                                                             restricted_differences)
from wedbackup_dagster.core.postgres.snapshot import take_snapshot
from wedbackup_dagster_tests.core.postgres.test_adversarial_schemas import login_role, role_dsn  # noqa: F401 (a fixture)

pytestmark = pytest.mark.stack

WEDDING = "2"

# Each wedding's rows, written by hand rather than taken from the tenancy plan under test.
FILTERS = {
    "weddings": "id = %(w)s",
    "couple_members": "wedding_id = %(w)s",
    "households": "wedding_id = %(w)s",
    "guests": "wedding_id = %(w)s",
    "guest_dietary": "guest_id IN (SELECT id FROM public.guests WHERE wedding_id = %(w)s)",
    "wedding_vendors": "wedding_id = %(w)s",
    "contracts": "wedding_vendor_id IN (SELECT id FROM public.wedding_vendors WHERE wedding_id = %(w)s)",
    "documents": "wedding_id = %(w)s",
    "timeline_events": "wedding_id = %(w)s",
    "payments": "wedding_id = %(w)s",
    "vendor_reviews": "wedding_id = %(w)s",
}


def rows_of(dsn: str, wedding: str, *, schema: str = "public", others: bool = False) -> dict[str, list[str]]:
    """Every row (its full text, generated columns included) per table, in id order: the wedding's rows,
    or with `others` every row that is NOT the wedding's (platform tables whole)."""
    out = {}
    with psycopg.connect(dsn) as conn:
        for table in demo_data.TABLES:
            if table in FILTERS:
                cond = sql.SQL(FILTERS[table] if not others else f"NOT coalesce(({FILTERS[table]}), false)")
            elif others:
                cond = sql.SQL("true")
            else:
                continue
            query = sql.SQL("SELECT t::text FROM {} AS t WHERE {} ORDER BY t.id").format(
                sql.Identifier(schema, table), cond)
            out[table] = [r[0] for r in conn.execute(query, {"w": int(wedding)})]
    return out


@pytest.fixture
def env(stack, make_database, tmp_path, monkeypatch):
    source = make_database()
    values = {"WEDBACKUP_SOURCE_DSN": source, "WEDBACKUP_CATALOGUE_DSN": make_database(),
              "WEDBACKUP_VAULT_DIR": str(tmp_path / "vault")}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    demo_data.generate(source, weddings=4, seed=11, document_bytes=64)
    import os

    return dict(os.environ)


@pytest.fixture
def engine(env) -> Engine:
    e = Engine.from_env(env)
    yield e
    e.catalogue.close()


def back_up(engine: Engine, partition: str = WEDDING, *, verify: bool = True):
    with engine.snapshot_session() as session:
        outcome = engine.back_up(partition, session)
    if verify:
        engine.verify(partition, {})  # restores the vault copy into a scratch database: a verified point
    return outcome


def run(engine: Engine, mode: str = "in_place", *, partition: str = WEDDING, as_of=None, **kw):
    progress = kw.pop("progress", None) or (lambda m: None)
    target_dsn = kw.pop("target_dsn", None)
    return recover(engine, RecoveryRequest(partition=partition, mode=mode, as_of=as_of, **kw), {},
                   target_dsn=target_dsn, progress=progress)


def source(engine: Engine):
    return psycopg.connect(engine.settings.source_dsn, autocommit=True)


def sequence_value(conn, table: str) -> int:
    return conn.execute(sql.SQL("SELECT last_value FROM {}").format(sql.Identifier(
        "public", f"{table}_id_seq"))).fetchone()[0]


# --- three recovery points ----------------------------------------------------------------------

def test_restored_as_of_each_of_three_points_equals_the_source_as_it_was_then(engine, make_database):
    src = engine.settings.source_dsn
    states, times = [], []
    back_up(engine)
    states.append(rows_of(src, WEDDING))
    with source(engine) as conn:  # point 2: a guest added, one changed, a dietary row and a document removed
        conn.execute("INSERT INTO guests (wedding_id, first_name, last_name, email) "
                     "VALUES (2, 'Ada', 'Lovelace', 'ada@example.org')")
        conn.execute("UPDATE guests SET rsvp = 'declined', meal_choice = 'vegan' "
                     "WHERE id = (SELECT min(id) FROM guests WHERE wedding_id = 2)")
        conn.execute("DELETE FROM guest_dietary WHERE id = (SELECT min(d.id) FROM guest_dietary d "
                     "JOIN guests g ON g.id = d.guest_id WHERE g.wedding_id = 2)")
        conn.execute("DELETE FROM documents WHERE id = (SELECT min(id) FROM documents WHERE wedding_id = 2)")
    back_up(engine)
    states.append(rows_of(src, WEDDING))
    with source(engine) as conn:  # point 3: a guest (and their dietary rows) gone, the wedding renamed
        conn.execute("DELETE FROM guests WHERE id = (SELECT max(id) FROM guests WHERE wedding_id = 2 "
                     "AND first_name <> 'Ada')")
        conn.execute("UPDATE weddings SET title = 'Renamed', tags = '{moved}' WHERE id = 2")
        conn.execute("INSERT INTO timeline_events (wedding_id, starts_at, title) VALUES (2, now(), 'Afterparty')")
    back_up(engine)
    states.append(rows_of(src, WEDDING))
    assert states[0] != states[1] != states[2]
    points = recovery_points(engine.catalogue, WEDDING)
    assert len(points) == 3 and all(p.verified for p in points)
    times = [p.snapshot_time for p in reversed(points)]  # oldest first, like states
    others_before = rows_of(src, WEDDING, others=True)

    # The live wedding changes once more (rows no point has): each restore must replace them too.
    with source(engine) as conn:
        conn.execute("INSERT INTO guests (wedding_id, first_name, last_name) VALUES (2, 'Late', 'Arrival')")
        guests_seq = sequence_value(conn, "guests")
    for i in (0, 2, 1):  # out of order: every direction of change
        report = run(engine, as_of=times[i] + timedelta(milliseconds=1))
        assert report.snapshot_time == times[i].isoformat() and not report.dry_run
        assert rows_of(src, WEDDING) == states[i], f"in-place restore as of point {i + 1}"
        assert rows_of(src, WEDDING, others=True) == others_before
    with source(engine) as conn:
        assert sequence_value(conn, "guests") >= guests_seq  # never backwards
        conn.execute("INSERT INTO guests (wedding_id, first_name, last_name) VALUES (2, 'Still', 'Works')")

    # Into another database (platform first, then the wedding) and into a schema for inspection.
    target = make_database()
    back_up(engine, "platform")
    run(engine, "target", partition="platform", target_dsn=target)
    run(engine, "target", as_of=times[0], target_dsn=target)
    assert rows_of(target, WEDDING) == states[0]
    report = run(engine, "schema", as_of=times[1], schema="inspect_point_2")
    assert report.target.endswith("schema inspect_point_2")
    assert rows_of(src, WEDDING, schema="inspect_point_2") == states[1]
    with pytest.raises(RestoreError, match="inspect_point_2 already exists"):
        run(engine, "schema", as_of=times[1], schema="inspect_point_2")
    # The inspection schema lives next to the platform's tables without upsetting an in-place restore,
    # nor does an archive taken while it existed, once it is gone.
    run(engine, as_of=times[2])
    assert rows_of(src, WEDDING) == states[2]
    back_up(engine)
    with source(engine) as conn:
        conn.execute("DROP SCHEMA inspect_point_2 CASCADE")
        conn.execute("DELETE FROM guests WHERE id = (SELECT max(id) FROM guests WHERE wedding_id = 2)")
    run(engine)
    assert rows_of(src, WEDDING) == states[2]

    # Dry runs against another database and into a schema write nothing; the platform restores into a schema.
    dry = run(engine, "target", as_of=times[2], target_dsn=target, dry_run=True)
    assert rows_of(target, WEDDING) == states[0]
    guests = {t.table: t for t in dry.tables}["public.guests"]
    assert (guests.archive_rows, guests.live_rows) == (len(states[2]["guests"]), len(states[0]["guests"]))
    assert guests.add + guests.remove + guests.change > 0
    dry = run(engine, "schema", schema="never_made", dry_run=True)
    assert dry.dry_run and dry.totals["add"] == sum(map(len, states[2].values()))
    run(engine, "schema", partition="platform", schema="platform_then")
    with source(engine) as conn:
        assert not conn.execute("SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = 'never_made')").fetchone()[0]
        vendors = "SELECT t::text FROM {}.vendors t ORDER BY id"
        restored = conn.execute(vendors.format("platform_then")).fetchall()
        assert restored and restored == conn.execute(vendors.format("public")).fetchall()


# --- concurrency --------------------------------------------------------------------------------

class Writer(threading.Thread):
    """The application, writing to other weddings as fast as it can: each statement its own transaction,
    every value explicit (no now(), ids returned), so the same log replayed elsewhere gives the same rows.
    Only tables without an updated_at trigger are updated, for the same reason."""

    def __init__(self, dsn: str, weddings: list[int]):
        super().__init__(daemon=True)
        self.dsn, self.weddings = dsn, weddings
        self.log: list[tuple[str, tuple]] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.count = 0

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute("SET lock_timeout = '5s'")  # blocked by the restore would be a failure
                members = {w: conn.execute("SELECT id FROM couple_members WHERE wedding_id = %s ORDER BY id",
                                           (w,)).fetchall() for w in self.weddings}
                contracts = {w: conn.execute("SELECT c.id FROM contracts c JOIN wedding_vendors v "
                                             "ON v.id = c.wedding_vendor_id WHERE v.wedding_id = %s ORDER BY c.id",
                                             (w,)).fetchall() for w in self.weddings}
                i = 0
                while not self.stop.is_set():
                    w = self.weddings[i % len(self.weddings)]
                    at = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=i)
                    gid = conn.execute(
                        "INSERT INTO guests (wedding_id, first_name, last_name, created_at, updated_at) "
                        "VALUES (%s, %s, %s, %s, %s) RETURNING id", (w, f"Guest{i}", "Writer", at, at)).fetchone()[0]
                    self.log.append(("INSERT INTO guests (id, wedding_id, first_name, last_name, created_at, "
                                     "updated_at) VALUES (%s, %s, %s, %s, %s, %s)", (gid, w, f"Guest{i}", "Writer",
                                                                                     at, at)))
                    did = conn.execute("INSERT INTO guest_dietary (guest_id, requirement, severity) "
                                       "VALUES (%s, 'vegan', 2) RETURNING id", (gid,)).fetchone()[0]
                    self.log.append(("INSERT INTO guest_dietary (id, guest_id, requirement, severity) "
                                     "VALUES (%s, %s, 'vegan', 2)", (did, gid)))
                    for stmt, ids in (("UPDATE couple_members SET name = %s WHERE id = %s", members[w]),
                                      ("UPDATE contracts SET notes = %s WHERE id = %s", contracts[w])):
                        if ids:
                            args = (f"edit {i}", ids[i % len(ids)][0])
                            conn.execute(stmt, args)
                            self.log.append((stmt, args))
                    i += 1
                    self.count = i
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def wait_for(self, more: int, timeout: float = 30) -> None:
        goal = self.count + more
        deadline = time.monotonic() + timeout
        while self.count < goal and not self.errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self.errors, self.errors
        assert self.count >= goal, f"the writer did only {self.count} of {goal} rounds"


def test_in_place_restore_leaves_other_weddings_as_a_concurrent_writer_made_them(engine, make_database):
    src = engine.settings.source_dsn
    back_up(engine)
    archived = rows_of(src, WEDDING)
    with source(engine) as conn:  # the wedding drifts from its archive
        conn.execute("DELETE FROM guests WHERE wedding_id = 2 AND id IN (SELECT id FROM guests WHERE wedding_id = 2 "
                     "ORDER BY id LIMIT 3)")
        conn.execute("INSERT INTO guests (wedding_id, first_name, last_name) VALUES (2, 'New', 'Guest')")
        conn.execute("UPDATE weddings SET venue = 'Elsewhere' WHERE id = 2")
    # What every other wedding looks like before the writer starts: a copy of the whole database.
    expected = make_database(template=conninfo_to_dict(src)["dbname"])

    writer = Writer(src, [1, 3, 4])
    seen_blocked: list[str] = []

    def progress(message: str) -> None:
        # Inside the restore's transaction, with the wedding's rows locked: the writer must go on, and a
        # write to the restored wedding must wait.
        if message.endswith("rows deleted") and not seen_blocked:
            writer.wait_for(15)
            with psycopg.connect(src, autocommit=True) as other:
                other.execute("SET lock_timeout = '300ms'")
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    other.execute("INSERT INTO guests (wedding_id, first_name, last_name) VALUES (2, 'Blocked', 'X')")
                seen_blocked.append(message)

    writer.start()
    try:
        writer.wait_for(10)
        report = run(engine, progress=progress)
        writer.wait_for(10)
    finally:
        writer.stop.set()
        writer.join(30)
    assert not writer.errors, writer.errors
    assert seen_blocked
    assert {t.table: (t.add, t.remove) for t in report.tables}["public.guests"] == (3, 1)

    assert rows_of(src, WEDDING) == archived
    with psycopg.connect(expected, autocommit=True) as conn:
        for stmt, args in writer.log:
            conn.execute(stmt, args)
    assert rows_of(src, WEDDING, others=True) == rows_of(expected, WEDDING, others=True)
    assert len(writer.log) > 40


# --- dry run ------------------------------------------------------------------------------------

def test_dry_run_counts_rows_to_add_remove_and_change_and_writes_nothing(engine):
    src = engine.settings.source_dsn
    back_up(engine)
    with source(engine) as conn:
        conn.execute("INSERT INTO guests (wedding_id, first_name, last_name) VALUES (2, 'A', 'One'), (2, 'B', 'Two')")
        conn.execute("UPDATE guests SET meal_choice = 'fish-' || id WHERE id IN (SELECT id FROM guests "
                     "WHERE wedding_id = 2 ORDER BY id LIMIT 3)")
        conn.execute("DELETE FROM guests WHERE id = (SELECT max(g.id) FROM guests g WHERE g.wedding_id = 2 AND "
                     "g.first_name NOT IN ('A', 'B') AND NOT EXISTS (SELECT FROM guest_dietary d "
                     "WHERE d.guest_id = g.id))")
        conn.execute("UPDATE weddings SET title = 'Changed' WHERE id = 2")
        seq = sequence_value(conn, "guests")
    before = rows_of(src, WEDDING)
    others = rows_of(src, WEDDING, others=True)

    report = run(engine, dry_run=True)
    counts = {t.table: (t.add, t.remove, t.change) for t in report.tables}
    assert counts.pop("public.guests") == (1, 2, 3)
    assert counts.pop("public.weddings") == (0, 0, 1)
    assert set(counts.values()) == {(0, 0, 0)}
    assert report.dry_run and "would add 1, remove 2, change 4" in "\n".join(report.lines())
    assert rows_of(src, WEDDING) == before and rows_of(src, WEDDING, others=True) == others
    with source(engine) as conn:
        assert sequence_value(conn, "guests") == seq
    # The real restore does what the dry run said.
    real = run(engine)
    assert {t.table: (t.add, t.remove, t.change) for t in real.tables} == \
        {t.table: (t.add, t.remove, t.change) for t in report.tables}
    assert run(engine, dry_run=True).totals == {**real.totals, "add": 0, "remove": 0, "change": 0,
                                                "live_rows": real.totals["archive_rows"]}


# --- refusals -----------------------------------------------------------------------------------

def test_a_schema_that_differs_stops_before_writing_with_a_report(engine):
    src = engine.settings.source_dsn
    back_up(engine)
    with source(engine) as conn:
        conn.execute("ALTER TABLE guests ADD COLUMN nickname text")
        conn.execute("ALTER TABLE households ALTER COLUMN name TYPE varchar(200)")
    before = rows_of(src, WEDDING)
    for dry_run in (True, False):
        with pytest.raises(SchemaMismatchError) as caught:
            run(engine, dry_run=dry_run)
        text = str(caught.value)
        assert "wedding 2" in text and "nothing was written" in text
        assert "public.guests.nickname" in text and "public.households.name" in text
    with pytest.raises(SchemaMismatchError, match="public.guests.nickname"):
        run(engine, "schema", schema="inspect_mismatch")
    assert rows_of(src, WEDDING) == before
    with source(engine) as conn:
        query = "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = 'inspect_mismatch')"
        assert not conn.execute(query).fetchone()[0]


def test_rows_of_another_wedding_pointing_into_the_wedding_stop_an_in_place_restore(engine):
    src = engine.settings.source_dsn
    back_up(engine)
    with source(engine) as conn:  # wedding 3's payment points at one of wedding 2's vendor bookings
        conn.execute("UPDATE payments SET wedding_vendor_id = "
                     "(SELECT min(id) FROM wedding_vendors WHERE wedding_id = 2)"
                     " WHERE id = (SELECT min(id) FROM payments WHERE wedding_id = 3)")
        conn.execute("DELETE FROM documents WHERE wedding_id = 2")
    before, others = rows_of(src, WEDDING), rows_of(src, WEDDING, others=True)
    for dry_run in (True, False):
        refused = r"outside the wedding.*public\.payments.*payments_wedding_vendor_id_fkey"
        with pytest.raises(RestoreError, match=refused):
            run(engine, dry_run=dry_run)
    assert rows_of(src, WEDDING) == before and rows_of(src, WEDDING, others=True) == others


def test_a_wedding_row_held_by_the_application_times_out_cleanly(engine):
    src = engine.settings.source_dsn
    back_up(engine)
    with source(engine) as conn:
        conn.execute("DELETE FROM documents WHERE wedding_id = 2")
    before = rows_of(src, WEDDING)
    with psycopg.connect(src) as app:  # an open transaction holding one of the wedding's guests
        app.execute("UPDATE guests SET meal_choice = 'fish' "
                    "WHERE id = (SELECT min(id) FROM guests WHERE wedding_id = 2)")
        started = time.monotonic()
        with pytest.raises(RestoreError, match="held by another session for more than 0.5 s; nothing was written"):
            run(engine, lock_timeout=0.5)
        assert time.monotonic() - started < 20
        app.rollback()
    assert rows_of(src, WEDDING) == before


def test_unknown_wedding_and_no_point_before_the_time_are_clear_errors(engine):
    back_up(engine)
    with pytest.raises(NoRecoveryPointError, match="wedding 999: has no backup in the catalogue"):
        run(engine, partition="999")
    first = recovery_points(engine.catalogue, WEDDING)[0].snapshot_time
    early = first - timedelta(hours=1)
    expected = f"wedding 2: has no backup at or before {early.isoformat()}"
    with pytest.raises(NoRecoveryPointError, match=re.escape(expected)):
        run(engine, as_of=early)
    back_up(engine, verify=False)
    later = recovery_points(engine.catalogue, WEDDING)[0]
    assert not later.verified
    # The newest verified point is the older one; the unverified one only when asked for.
    assert run(engine, dry_run=True).archive_sha256 != later.archive_sha256
    assert run(engine, dry_run=True, include_unverified=True).archive_sha256 == later.archive_sha256
    with pytest.raises(WedbackupError, match="platform partition is shared"):
        recovery.restore_in_place([], engine.settings.source_dsn, "platform", name="x")


def test_a_deleted_wedding_comes_back_in_place(engine):
    src = engine.settings.source_dsn
    back_up(engine)
    archived, others = rows_of(src, WEDDING), rows_of(src, WEDDING, others=True)
    with source(engine) as conn:
        # Deleting a wedding cascades to its children; its reviews would only lose their wedding_id (and
        # become platform rows, which an in-place restore must not take over), so they go first.
        conn.execute("DELETE FROM vendor_reviews WHERE wedding_id = 2")
        conn.execute("DELETE FROM weddings WHERE id = 2")
    assert rows_of(src, WEDDING)["guests"] == []
    engine.catalogue.sync_partitions([(WEDDING, None)])
    run(engine)
    assert rows_of(src, WEDDING) == archived and rows_of(src, WEDDING, others=True) == others
    # The restore changed the live rows without touching updated_at: the schedule is told, and audited.
    with engine.catalogue.connect() as conn:
        changed = conn.execute("SELECT source_updated_at FROM wedbackup.partitions WHERE partition = '2'").fetchone()
        audit = conn.execute("SELECT detail FROM wedbackup.audit WHERE action = 'restore' "
                             "AND partition = '2'").fetchone()
    assert changed["source_updated_at"] is not None
    assert audit["detail"]["mode"] == "in_place"
    assert audit["detail"]["totals"]["add"] == sum(map(len, archived.values()))


# --- pure parts ---------------------------------------------------------------------------------

def _point(i: int, hours: int, verified: bool) -> RecoveryPoint:
    t = datetime(2026, 11, 30, 12, tzinfo=timezone.utc) + timedelta(hours=hours)
    return RecoveryPoint(i, "7", t, f"{i:064x}", 100, 10, ("vault",), t if verified else None)


def test_choose_point_takes_the_newest_verified_at_or_before_the_time():
    points = [_point(3, 2, False), _point(2, 1, True), _point(1, 0, True)]  # newest first
    at = datetime(2026, 11, 30, 13, tzinfo=timezone.utc)
    assert choose_point(points, "7", at).backup_id == 2  # exactly at its time
    assert choose_point(points, "7", at + timedelta(hours=5)).backup_id == 2  # point 3 is not verified
    assert choose_point(points, "7", at + timedelta(hours=5), include_unverified=True).backup_id == 3
    assert choose_point(points, "7", at - timedelta(seconds=1)).backup_id == 1
    with pytest.raises(NoRecoveryPointError, match="wedding 7: has no backup at or before"):
        choose_point(points, "7", at - timedelta(hours=2))
    with pytest.raises(NoRecoveryPointError, match="no verified backup at or before .* 1 unverified"):
        choose_point([_point(3, 2, False)], "7", at + timedelta(hours=5))


def test_parse_as_of_needs_a_timezone():
    assert parse_as_of("2026-11-30T18:00:00Z") == datetime(2026, 11, 30, 18, tzinfo=timezone.utc)
    assert parse_as_of("2026-11-30T19:00:00+01:00") == datetime(2026, 11, 30, 18, tzinfo=timezone.utc)
    assert parse_as_of(None).tzinfo is not None
    with pytest.raises(WedbackupError, match="has no timezone"):
        parse_as_of("2026-11-30T18:00:00")
    with pytest.raises(WedbackupError, match="not an ISO 8601 time"):
        parse_as_of("yesterday")


def test_restricted_differences_ignore_schemas_the_archive_does_not_know():
    archive = [["schema", "public", ""], ["column", "public.guests.id", "ord 1 bigint"]]
    target = archive + [["schema", "inspect", ""], ["relation", "inspect.guests", "r p"],
                        ["column", '"odd.name".t.c', "ord 1 text"], ["schema", '"odd.name"', ""]]
    assert restricted_differences(archive, target) == []
    assert restricted_differences(target, archive, ["public"]) == []  # an inspection schema in the archive
    assert restricted_differences(target, archive) == [
        'column "odd.name".t.c (ord 1 text) is in the archive but not in the target',
        "relation inspect.guests (r p) is in the archive but not in the target",
        'schema "odd.name" () is in the archive but not in the target',
        "schema inspect () is in the archive but not in the target"]
    changed = [["schema", "public", ""], ["column", "public.guests.id", "ord 1 integer"]]
    assert restricted_differences(archive, changed) == [
        "column public.guests.id differs: archive has 'ord 1 bigint', target has 'ord 1 integer'"]


def test_an_in_place_restore_waits_for_a_backup_of_the_same_wedding(env):
    """core/catalogue/locks.py: while another process (a backup, say) holds the wedding's lock, an in-place restore
    does not start; past WEDBACKUP_LOCK_TIMEOUT it fails naming the holder and writes nothing."""
    from wedbackup_dagster.core.errors import PartitionBusyError
    from wedbackup_dagster.core.catalogue.locks import partition_lock

    restorer = Engine.from_env({**env, "WEDBACKUP_LOCK_TIMEOUT": "0.5"})
    other = Engine.from_env(env)
    try:
        back_up(restorer)
        with source(restorer) as conn:
            conn.execute("UPDATE weddings SET venue = 'Elsewhere' WHERE id = %s", (int(WEDDING),))
        before = rows_of(restorer.settings.source_dsn, WEDDING)
        with partition_lock(other.catalogue, WEDDING, purpose="backup"):
            with pytest.raises(PartitionBusyError, match=f"wedding {WEDDING}.*backup"):
                run(restorer)
            assert rows_of(restorer.settings.source_dsn, WEDDING) == before  # nothing written
            assert run(restorer, dry_run=True).dry_run  # a dry run writes nothing and takes no lock
        run(restorer)  # the lock is free again: the restore goes ahead
        assert rows_of(restorer.settings.source_dsn, WEDDING) != before
    finally:
        restorer.catalogue.close()
        other.catalogue.close()


def test_junk_after_the_manifest_stops_a_recovery_and_writes_nothing(engine):
    """The fuzzer's finding for restore_snapshot holds for recovery's loads too (one copy_table_in, one
    read_to_end): a stream with a record after its manifest is refused before anything is committed."""
    from wedbackup_dagster.core.formats.archive import open_archive
    from wedbackup_dagster.core.errors import SnapshotFormatError
    from wedbackup_dagster.core.formats.snapshot_stream import MANIFEST

    outcome = back_up(engine, verify=False)
    entry = engine.vault.get(WEDDING, outcome.backup.archive_sha256)
    with open(entry.path, "rb") as fh:
        stream = b"".join(open_archive(fh, name="vault copy", resolve_key=engine.resolve_key))
    junk = MANIFEST + (0).to_bytes(8, "big")
    src = engine.settings.source_dsn
    with source(engine) as conn:  # the live wedding drifts from the archive: a restore would show
        conn.execute("UPDATE weddings SET venue = 'Elsewhere' WHERE id = %s", (int(WEDDING),))
    before = rows_of(src, WEDDING)
    with pytest.raises(SnapshotFormatError, match="after the manifest|cannot follow manifest"):
        recovery.restore_into_schema([stream, junk], src, "wedding_then", name="junk")
    with pytest.raises(SnapshotFormatError, match="after the manifest|cannot follow manifest"):
        recovery.restore_in_place([stream, junk], src, WEDDING, name="junk")
    with source(engine) as conn:
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'wedding_then'").fetchone()[0] == 0
    assert rows_of(src, WEDDING) == before


# --- issue 14: exactly the wedding's rows, whatever the schema and the role ------------------------

TINY = """
CREATE TABLE public.weddings (id integer PRIMARY KEY, couple text NOT NULL);
CREATE TABLE public.notes (id integer PRIMARY KEY, wedding_id integer NOT NULL REFERENCES public.weddings,
                           body text NOT NULL);
INSERT INTO public.weddings VALUES (1, 'Ada & Bo'), (2, 'Cy & Di'), (3, 'Ed & Flo');
INSERT INTO public.notes VALUES (1, 1, 'one'), (2, 1, 'two'), (3, 2, 'three'), (4, 3, 'four');
"""


def tiny_source(make_database, extra: str = "") -> str:
    dsn = make_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TINY + extra)
    return dsn


def snapshot_of(dsn: str, wedding: str = "1") -> bytes:
    out = io.BytesIO()
    take_snapshot(dsn, partition=wedding, sink=out)
    return out.getvalue()


def table_text(dsn: str, query: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(query)]


def test_in_place_restore_leaves_other_weddings_rows_in_an_inheritance_child(make_database):
    """Defect 3: the DELETE without ONLY also reached the legacy INHERITS child, whose rows of weddings 2
    and 3 share their ids with wedding 1's notes; the checksum step (ONLY) did not notice."""
    src = tiny_source(make_database, """
CREATE TABLE public.notes_archive (archived_on date NOT NULL DEFAULT '2025-01-01') INHERITS (public.notes);
INSERT INTO public.notes_archive (id, wedding_id, body) VALUES (1, 2, 'archived note of 2'), (2, 3, 'of 3');
""")
    data = snapshot_of(src)
    archive_rows = "SELECT t::text FROM public.notes_archive t ORDER BY id"
    kept = table_text(src, archive_rows)
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute("UPDATE ONLY public.notes SET body = 'changed' WHERE wedding_id = 1")
    report = recovery.restore_in_place([data], src, "1", name="test archive")
    assert report.totals["change"] == 2
    assert table_text(src, archive_rows) == kept
    assert table_text(src, "SELECT body FROM ONLY public.notes WHERE wedding_id = 1 ORDER BY id") == ["one", "two"]


def test_in_place_restore_of_generated_always_identity_rows_advances_the_sequence(make_database):
    """Defect 4: COPY (verification) takes identity values, a plain INSERT (in place) refused them."""
    src = tiny_source(make_database, """
CREATE TABLE public.seats (id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                           wedding_id integer NOT NULL REFERENCES public.weddings, label text NOT NULL);
INSERT INTO public.seats (wedding_id, label) SELECT 1 + g % 3, 'seat ' || g FROM generate_series(1, 9) g;
""")
    data = snapshot_of(src)
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute("DELETE FROM public.seats WHERE wedding_id = 1")
        conn.execute("ALTER TABLE public.seats ALTER COLUMN id RESTART WITH 1")
    dry = recovery.restore_in_place([data], src, "1", name="test archive", dry_run=True)
    assert (dry.totals["add"], dry.totals["remove"]) == (3, 0)
    recovery.restore_in_place([data], src, "1", name="test archive")
    assert table_text(src, "SELECT id::text FROM public.seats WHERE wedding_id = 1 ORDER BY id") == ["3", "6", "9"]
    with psycopg.connect(src, autocommit=True) as conn:
        new = conn.execute("INSERT INTO public.seats (wedding_id, label) VALUES (1, 'new') RETURNING id").fetchone()[0]
    assert new == 10


def _limited(dsn: str, login_role, *, rls: bool = True) -> str:
    """`dsn` as a role that may read and write every table but has no BYPASSRLS, and notes with a policy
    that hides half of them from it."""
    name, password = login_role
    with psycopg.connect(dsn, autocommit=True) as conn:
        ident = sql.Identifier(name)
        conn.execute(sql.SQL("GRANT ALL ON ALL TABLES IN SCHEMA public TO {}").format(ident))
        conn.execute(sql.SQL("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {}").format(ident))
        if rls:
            conn.execute("ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY")
            conn.execute("CREATE POLICY odd_only ON public.notes USING (id % 2 = 1)")
    return role_dsn(dsn, name, password)


def test_in_place_restore_and_dry_run_refuse_a_table_whose_policy_hides_rows(login_role, make_database):
    """Defect 1 (restore side): with row security on, the role's DELETE and diff saw only the rows the
    policy shows; now row_security is off and the refusal names the table and what the role needs."""
    src = tiny_source(make_database)
    limited = _limited(src, login_role)
    data = snapshot_of(src)  # as the superuser: every note
    before = table_text(src, "SELECT t::text FROM public.notes t ORDER BY id")
    for dry_run in (True, False):
        with pytest.raises(RestoreError, match=r'wedding 1 .*row-level security policy for table "notes".*BYPASSRLS'):
            recovery.restore_in_place([data], limited, "1", name="test archive", dry_run=dry_run)
    assert table_text(src, "SELECT t::text FROM public.notes t ORDER BY id") == before
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} BYPASSRLS").format(sql.Identifier(login_role[0])))
    report = recovery.restore_in_place([data], limited, "1", name="test archive", dry_run=True)
    assert report.totals == {"archive_rows": 3, "live_rows": 3, "add": 0, "remove": 0, "change": 0}


def crafted(data: bytes, pid: int, params: dict | None = None) -> bytes:
    """The stream with every table record's and the manifest's select_sql replaced by one that reads the
    whole table and, as it does, terminates the session `pid` (and with `params` replaced, if given)."""
    from wedbackup_dagster.core.formats import snapshot_stream
    from wedbackup_dagster.core.formats.snapshot_stream import read_snapshot

    out = [snapshot_stream.MAGIC]
    for r in read_snapshot([data]):
        payload = r.payload
        if r.kind in (snapshot_stream.TABLE_BEGIN, snapshot_stream.MANIFEST):
            d = json.loads(payload)
            for t in d.get("tables", [d]):
                t["select_sql"] = (f'SELECT * FROM "{t["schema"]}"."{t["name"]}" '
                                   f"WHERE pg_catalog.pg_terminate_backend({pid})")
                if params is not None:
                    t["params"] = params
            payload = json.dumps(d).encode()
        out.append(r.kind + len(payload).to_bytes(8, "big") + payload)
    return b"".join(out)


def test_in_place_restore_never_runs_the_archives_select_sql(make_database):
    """Defect 10: the diff and the checksum ran the table record's select_sql; a crafted archive's SQL
    (here: terminating another session) ran with the restore's rights."""
    src = tiny_source(make_database)
    data = snapshot_of(src)
    with psycopg.connect(src, autocommit=True) as victim:
        pid = victim.info.backend_pid
        archive = crafted(data, pid, {"wedding_id": "2"})
        with psycopg.connect(src, autocommit=True) as conn:
            conn.execute("UPDATE public.notes SET body = 'changed' WHERE id = 1")
        dry = recovery.restore_in_place([archive], src, "1", name="crafted archive", dry_run=True)
        report = recovery.restore_in_place([archive], src, "1", name="crafted archive")
        assert victim.execute("SELECT 1").fetchone() == (1,)  # still connected: nothing of the archive ran
    assert dry.totals["change"] == report.totals["change"] == 1  # wedding 1's rows, whatever params said
    assert table_text(src, "SELECT body FROM public.notes ORDER BY id") == ["one", "two", "three", "four"]


def test_in_place_restore_refuses_an_archive_without_all_of_the_weddings_tables(make_database):
    """An archive (crafted, or from a writer that skipped a table) that leaves out one of the wedding's
    tables was restored for the tables it has: here a bare foreign-key error from the driver, and with no
    key between the tables a commit that left the missing one as it was. Now it is refused up front."""
    from wedbackup_dagster.core.formats import snapshot_stream
    from wedbackup_dagster.core.formats.snapshot_stream import read_snapshot

    src = tiny_source(make_database)
    data = snapshot_of(src)
    out, skipping = [snapshot_stream.MAGIC], False
    for r in read_snapshot([data]):
        payload = r.payload
        if r.kind == snapshot_stream.TABLE_BEGIN:
            skipping = json.loads(payload)["name"] == "notes"
        if r.kind == snapshot_stream.MANIFEST:
            d = json.loads(payload)
            d["tables"] = [t for t in d["tables"] if t["name"] != "notes"]
            payload = json.dumps(d).encode()
        if not (skipping and r.kind in (snapshot_stream.TABLE_BEGIN, snapshot_stream.DATA, snapshot_stream.TABLE_END)):
            out.append(r.kind + len(payload).to_bytes(8, "big") + payload)
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute("UPDATE public.weddings SET couple = 'changed' WHERE id = 1")
    with pytest.raises(SchemaMismatchError, match="table public.notes of wedding 1 is not in the archive"):
        recovery.restore_in_place([b"".join(out)], src, "1", name="crafted archive")
    assert table_text(src, "SELECT couple FROM public.weddings WHERE id = 1") == ["changed"]


def test_dry_runs_of_the_platform_partition_compare_by_the_rebuilt_platform_selects(make_database):
    """The platform's rows in a dry run are read by its SELECTs rebuilt from the target's plan (platform
    tables whole, a tenant table's rows that reach no wedding), never by the archive's text."""
    from wedbackup_dagster_tests.core.postgres.test_snapshot import make_platform_db

    src = make_platform_db(make_database)
    data = snapshot_of(src, "platform")
    same = recovery.restore_to_database([data], src, name="platform archive", dry_run=True)
    assert {t.table for t in same.tables} >= {"public.vendors", "public.audit_log", "public.documents"}
    assert same.totals["archive_rows"] == same.totals["live_rows"] > 0
    assert (same.totals["add"], same.totals["remove"], same.totals["change"]) == (0, 0, 0)
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute("UPDATE public.documents SET title = 'changed' WHERE wedding_id IS NULL")
        conn.execute("UPDATE public.documents SET title = 'a wedding''s, not the platform''s' WHERE wedding_id = 1")
    changed = recovery.restore_to_database([data], src, name="platform archive", dry_run=True)
    assert {t.table: t.change for t in changed.tables}["public.documents"] == 1


def test_a_trigger_that_rewrites_restored_rows_rolls_an_in_place_restore_back(make_database):
    """README: triggers fire as for any insert; one that changes the inserted rows fails the checksum
    step (rebuilt from the plan) and nothing is committed."""
    src = tiny_source(make_database, """
CREATE FUNCTION public.shout() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.body := NEW.body || '!'; RETURN NEW; END $$;
""")
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute("CREATE TRIGGER shout BEFORE INSERT ON public.notes FOR EACH ROW EXECUTE FUNCTION public.shout()")
    data = snapshot_of(src)
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute("UPDATE public.notes SET body = 'changed' WHERE id = 1")
    with pytest.raises(VerificationError, match="table public.notes does not match the manifest after loading"):
        recovery.restore_in_place([data], src, "1", name="test archive")
    assert table_text(src, "SELECT body FROM public.notes ORDER BY id") == ["changed", "two", "three", "four"]


@pytest.mark.parametrize("field,value", [("plan", ["not", "an", "object"]), ("plan", {"tenant_tables": [1]}),
                                         ("schema_fingerprint", None)])
def test_a_garbled_archive_header_is_a_format_error_in_every_restore_mode(make_database, field, value):
    """The header of an archive (authenticated, but written by a broken or hostile writer) is checked field
    by field before anything is read from it: it used to end in AttributeError or KeyError."""
    from wedbackup_dagster.core.formats import snapshot_stream
    from wedbackup_dagster.core.errors import SnapshotFormatError
    from wedbackup_dagster.core.formats.snapshot_stream import read_snapshot

    src = tiny_source(make_database)
    out = [snapshot_stream.MAGIC]
    for r in read_snapshot([snapshot_of(src)]):
        payload = r.payload
        if r.kind == snapshot_stream.HEADER:
            d = json.loads(payload)
            d[field] = value
            payload = json.dumps(d).encode()
        out.append(r.kind + len(payload).to_bytes(8, "big") + payload)
    archive = b"".join(out)
    for restore in (lambda: recovery.restore_in_place([archive], src, "1", name="garbled archive"),
                    lambda: recovery.restore_in_place([archive], src, "1", name="garbled archive", dry_run=True),
                    lambda: recovery.restore_into_schema([archive], src, "never_made", name="garbled archive"),
                    lambda: recovery.restore_to_database([archive], src, name="garbled archive", dry_run=True)):
        with pytest.raises(SnapshotFormatError, match="garbled archive"):
            restore()
