"""Restores of snapshot streams into real PostgreSQL databases: round trips (one wedding; platform then
every wedding), schema mismatch, damaged streams, all-or-nothing, verification, scratch databases."""
from __future__ import annotations

import io
import uuid

import psycopg
import pytest
from psycopg import sql

from wedbackup_dagster.core.formats import snapshot_stream
from wedbackup_dagster.core.postgres import snapshot as snap
from wedbackup_dagster.core.postgres import tenancy
from wedbackup_dagster.core.errors import (RestoreError, SchemaMismatchError, SnapshotFormatError,
                                           VerificationError)
from wedbackup_dagster.core.formats.snapshot_stream import Record, read_manifest, read_snapshot
from wedbackup_dagster.core.postgres.load_snapshot import (SCRATCH_PREFIX, restore_snapshot, scratch_database,
                                                           verify_restored)
from wedbackup_dagster.core.postgres.snapshot import SnapshotSession, describe_schema
from wedbackup_dagster_tests.core.postgres.test_adversarial_schemas import login_role, role_dsn  # noqa: F401 (a fixture)
from wedbackup_dagster_tests.core.postgres.test_snapshot import (WEDDING_TABLES, make_platform_db, make_schema_db,
                                                                 snapshot_bytes)

pytestmark = pytest.mark.stack

ALL_TABLES = WEDDING_TABLES + ["public.vendors", "public.audit_log"]

# Each wedding's rows, written by hand rather than taken from the tenancy plan under test.
WEDDING_FILTERS = {
    "public.weddings": "id = %(w)s",
    "public.guests": "wedding_id = %(w)s",
    "public.guest_dietary": "guest_id IN (SELECT id FROM public.guests WHERE wedding_id = %(w)s)",
    "public.timeline_items": "wedding_id = %(w)s",
    "public.wedding_vendors": "wedding_id = %(w)s",
    "public.documents": "wedding_id = %(w)s",
}


def checksums(dsn: str, tables, wedding: int | None = None) -> dict[str, tuple[int, str]]:
    """(row count, md5 of every row's text in a fixed order) per table: generated columns included."""
    out = {}
    with psycopg.connect(dsn) as conn:
        for table in tables:
            schema, name = table.split(".")
            where = sql.SQL(WEDDING_FILTERS[table] if wedding is not None else "true")
            query = sql.SQL("SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text COLLATE \"C\"), ''))"
                            " FROM {} AS t WHERE {}").format(sql.Identifier(schema, name), where)
            out[table] = tuple(conn.execute(query, {"w": wedding} if wedding is not None else None).fetchone())
    return out


def frame(records) -> bytes:
    return snapshot_stream.MAGIC + b"".join(r.kind + len(r.payload).to_bytes(8, "big") + r.payload for r in records)


def chunked(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def copy_vendors(src: str, dst: str) -> None:
    with psycopg.connect(src) as s, psycopg.connect(dst) as d:
        rows = s.execute("SELECT id, name, category FROM vendors ORDER BY id").fetchall()
        d.cursor().executemany("INSERT INTO vendors (id, name, category) VALUES (%s, %s, %s)", rows)


def test_wedding_restore_into_existing_schema_is_row_for_row_equal(make_database):
    src = make_platform_db(make_database)
    data, manifest = snapshot_bytes(src, "1")
    dst = make_schema_db(make_database)
    copy_vendors(src, dst)  # the platform's rows the wedding points at are already there

    report = restore_snapshot(chunked(data, 1000), dst, create_schema="auto")
    assert not report.created_schema and report.schema_matches and report.partition == "1"
    assert [t.table for t in report.tables] == [t.table for t in manifest.tables]
    assert report.total_rows == manifest.total_rows == 13 and report.total_bytes == manifest.total_bytes
    assert report.table_rows()[0]["table"] == "public.weddings"
    assert checksums(dst, WEDDING_FILTERS) == checksums(src, WEDDING_FILTERS, wedding=1)
    # The trigger neither rewrote updated_at nor wrote to audit_log, and is enabled again.
    assert report.triggers_held == ["public.weddings: weddings_touch"]
    with psycopg.connect(dst) as conn:
        assert conn.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 0
        assert conn.execute("SELECT tgenabled FROM pg_trigger WHERE tgname = 'weddings_touch'").fetchone()[0] == "O"
        # Sequences are past every restored id: serial, bigserial and both identity kinds.
        conn.execute("INSERT INTO weddings (couple) VALUES ('New couple')")
        new_guest = conn.execute("INSERT INTO guests (wedding_id, name) VALUES (1, 'n') RETURNING id").fetchone()[0]
        conn.execute("INSERT INTO guest_dietary (guest_id, requirement) VALUES (%s, 'none')", (new_guest,))
        conn.execute("INSERT INTO timeline_items (wedding_id, title) VALUES (1, 'new')")
        assert new_guest > 6
        conn.rollback()
    assert {s["sequence"] for s in report.sequences} >= {"public.guests_id_seq", "public.weddings_id_seq",
                                                        "public.guest_dietary_id_seq", "public.timeline_items_id_seq"}

    verified = verify_restored(dst, manifest)
    assert verified.ok, verified.problems
    assert [t.rows for t in verified.tables] == [t.rows for t in manifest.tables]
    statuses = {f.constraint: f.status for f in verified.foreign_keys}
    assert statuses["wedding_vendors_vendor_id_fkey"] == "ok"  # vendors is outside, but its rows are here
    assert statuses["guests_plus_one_of_fkey"] == "ok" and statuses["guest_dietary_guest_id_fkey"] == "ok"

    # Restoring the same wedding again collides with itself: refused, named, and nothing changes.
    before = checksums(dst, WEDDING_FILTERS)
    with pytest.raises(RestoreError, match="table public.weddings refused its rows"):
        restore_snapshot([data], dst)
    assert checksums(dst, WEDDING_FILTERS) == before


def test_platform_into_empty_database_then_every_wedding_rebuilds_the_source(make_database):
    src = make_platform_db(make_database)
    streams = {}
    with SnapshotSession(src) as session:
        for partition in (snap.PLATFORM, "1", "2", "3"):
            out = io.BytesIO()
            streams[partition] = (out.getvalue, session.snapshot(partition, out))
    dst = make_database()

    platform = restore_snapshot([streams[snap.PLATFORM][0]()], dst)
    assert platform.created_schema and platform.schema_matches and not platform.unvalidated_foreign_keys
    assert describe_schema_of(dst) == describe_schema_of(src)
    for wedding in ("1", "2", "3"):
        report = restore_snapshot(chunked(streams[wedding][0](), 4096), dst)
        assert not report.created_schema and report.schema_matches

    assert checksums(dst, ALL_TABLES) == checksums(src, ALL_TABLES)
    for _, manifest in streams.values():
        assert verify_restored(dst, manifest).ok
    with psycopg.connect(dst) as conn, psycopg.connect(src) as source:
        for seq in ("vendors_id_seq", "audit_log_id_seq", "guests_id_seq", "documents_id_seq"):
            restored = conn.execute(sql.SQL("SELECT last_value FROM {}").format(sql.Identifier(seq))).fetchone()[0]
            original = source.execute(sql.SQL("SELECT last_value FROM {}").format(sql.Identifier(seq))).fetchone()[0]
            assert restored == original, seq
        # The trigger came with the schema and works for new rows.
        conn.execute("INSERT INTO weddings (couple) VALUES ('After restore')")
        assert conn.execute("SELECT count(*) FROM audit_log WHERE what LIKE 'touched wedding 4'").fetchone()[0] == 1


def test_platform_with_its_post_data_deferred_then_built_equals_the_whole_restore(make_database):
    """restore --all's way (defer_post_data): the platform's primary keys and unique constraints come with the
    schema (a row loaded twice is still refused), its secondary indexes, foreign keys and triggers wait until
    apply_deferred; then the target's schema is exactly the source's, and the rows too."""
    from wedbackup_dagster.core.postgres.load_snapshot import apply_deferred, deferred_post_data_of

    src = make_platform_db(make_database)
    streams = {}
    with SnapshotSession(src) as session:
        for partition in (snap.PLATFORM, "1", "2"):
            out = io.BytesIO()
            session.snapshot(partition, out)
            streams[partition] = out.getvalue()
    dst = make_database()
    platform = restore_snapshot([streams[snap.PLATFORM]], dst, defer_post_data=True)
    assert platform.created_schema and not platform.schema_matches
    assert "FOREIGN KEY" in platform.deferred_post_data and "CREATE TRIGGER" in platform.deferred_post_data
    assert "PRIMARY KEY" not in platform.deferred_post_data
    # The same script again from the archive alone (a resumed restore --all), with the archive's fingerprint.
    again, fingerprint = deferred_post_data_of([streams[snap.PLATFORM]], "platform archive")
    assert again == platform.deferred_post_data and fingerprint == platform.schema_fingerprint
    with psycopg.connect(dst) as conn:
        kinds = {r[0] for r in conn.execute("SELECT contype FROM pg_constraint c JOIN pg_namespace n "
                                            "ON n.oid = c.connamespace WHERE n.nspname = 'public'")}
        assert "p" in kinds and "f" not in kinds
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal").fetchone()[0] == 0
    with psycopg.connect(dst) as conn:  # the weddings' rows, as restore --all's batches load them
        snap.use_qualified_names(conn)
        for partition in ("1", "2"):
            records = read_snapshot([streams[partition]], name=partition)
            next(records), next(records), next(records)
            for record in records:
                if record.kind == snapshot_stream.MANIFEST:
                    break
                schema, name, columns = snapshot_stream.table_begin_of(record)
                with conn.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN").format(
                        sql.Identifier(schema, name), sql.SQL(", ").join(map(sql.Identifier, columns)))) as copy:
                    snapshot_stream.read_table_data(records, copy.write)
        conn.commit()
        with pytest.raises(psycopg.errors.UniqueViolation):  # primary keys held while the rest waited
            conn.execute("INSERT INTO weddings SELECT * FROM weddings WHERE id = 1")
        conn.rollback()
        apply_deferred(conn, platform.deferred_post_data, "the platform", "dst")
    assert describe_schema_of(dst) == describe_schema_of(src)
    with psycopg.connect(dst) as conn:
        snap.use_qualified_names(conn)
        assert snap.schema_fingerprint(conn) == platform.schema_fingerprint
    wanted = [t for t in ALL_TABLES if t != "public.audit_log"]  # weddings 3's rows are not loaded here
    got, want = checksums(dst, wanted), checksums(src, wanted)
    assert got["public.vendors"] == want["public.vendors"]
    assert got["public.guests"][0] == sum(checksums(src, ["public.guests"], w)["public.guests"][0] for w in (1, 2))


def test_split_post_data_keeps_what_refuses_duplicates():
    from wedbackup_dagster.core.postgres.load_snapshot import relax_foreign_keys, split_post_data

    def entry(name, typ, body):
        return f"--\n-- Name: {name}; Type: {typ}; Schema: public; Owner: -\n--\n\n{body}\n\n"

    script = ("SET statement_timeout = 0;\n\n"
              + entry("guests guests_pkey", "CONSTRAINT", "ALTER TABLE ONLY public.guests ADD CONSTRAINT guests_pkey "
                                                          "PRIMARY KEY (id);")
              + entry("guests_email_key", "INDEX", "CREATE UNIQUE INDEX guests_email_key ON public.guests (email);")
              + entry("guests_wedding_idx", "INDEX", "CREATE INDEX guests_wedding_idx ON public.guests (wedding_id);")
              + entry("p1_wedding_idx", "INDEX", "CREATE INDEX p1_wedding_idx ON public.p1 (wedding_id);")
              + entry("p1_wedding_idx", "INDEX ATTACH", "ALTER INDEX public.p_wedding_idx ATTACH PARTITION "
                                                         "public.p1_wedding_idx;")
              + entry("p1_pkey", "INDEX ATTACH", "ALTER INDEX public.p_pkey ATTACH PARTITION public.p1_pkey;")
              + entry("guests shout", "TRIGGER", "CREATE TRIGGER shout BEFORE INSERT ON public.guests FOR EACH ROW "
                                                 "EXECUTE FUNCTION public.shout();")
              + entry("guests guests_wedding_id_fkey", "FK CONSTRAINT",
                      "ALTER TABLE ONLY public.guests\n    ADD CONSTRAINT guests_wedding_id_fkey FOREIGN KEY "
                      "(wedding_id) REFERENCES public.weddings(id);"))
    now, later = split_post_data(script)
    assert now.startswith("SET statement_timeout") and later.startswith("SET statement_timeout")
    for kept in ("guests_pkey PRIMARY KEY", "UNIQUE INDEX guests_email_key", "ATTACH PARTITION public.p1_pkey"):
        assert kept in now and kept not in later
    for waits in ("INDEX guests_wedding_idx", "ATTACH PARTITION public.p1_wedding_idx", "CREATE TRIGGER shout",
                  "guests_wedding_id_fkey FOREIGN KEY"):
        assert waits in later and waits not in now
    assert split_post_data(now) == (now, "")  # nothing left to wait for: no script at all
    assert "REFERENCES public.weddings(id) NOT VALID;" in relax_foreign_keys(later)

    from wedbackup_dagster.core.disaster.restore_all import inserting_triggers
    assert inserting_triggers(later) == ["public.guests: shout"]
    assert inserting_triggers(later.replace("BEFORE INSERT", "BEFORE UPDATE OF email")) == []


def describe_schema_of(dsn: str):
    with psycopg.connect(dsn) as conn:
        snap.use_qualified_names(conn)
        return describe_schema(conn)


def test_one_wedding_into_a_scratch_database(make_database, stack):
    src = make_platform_db(make_database)
    data, manifest = snapshot_bytes(src, "1")
    with scratch_database(stack.dsn("postgres"), label="verify wedding 1") as dsn:
        assert psycopg.conninfo.conninfo_to_dict(dsn)["dbname"].startswith(SCRATCH_PREFIX + "verify_wedding_1_")
        report = restore_snapshot([data], dsn)
        assert report.created_schema
        # vendors' rows live in the platform partition: that FK exists but cannot be validated here.
        assert report.unvalidated_foreign_keys == ["public.wedding_vendors.wedding_vendors_vendor_id_fkey"]
        assert checksums(dsn, WEDDING_FILTERS) == checksums(src, WEDDING_FILTERS, wedding=1)
        verified = verify_restored(dsn, manifest)
        assert verified.ok
        statuses = {f.constraint: f.status for f in verified.foreign_keys}
        assert statuses["wedding_vendors_vendor_id_fkey"] == "external, not checked"
        assert statuses["guests_wedding_id_fkey"] == "ok"
        with psycopg.connect(dsn) as conn:  # every other constraint was validated when created
            assert conn.execute("SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND NOT convalidated"
                                ).fetchone()[0] == 1


def test_schema_changed_since_the_backup_is_refused_with_a_report(make_database):
    src = make_platform_db(make_database)
    data, _ = snapshot_bytes(src, "2")
    dst = make_schema_db(make_database)
    with psycopg.connect(dst, autocommit=True) as conn:
        conn.execute("ALTER TABLE guests ADD COLUMN seat text")
        conn.execute("ALTER TABLE timeline_items ALTER COLUMN title TYPE varchar(80)")
    with pytest.raises(SchemaMismatchError) as e:
        restore_snapshot([data], dst, create_schema=False)
    message = str(e.value)
    assert "column public.guests.seat" in message and "in the target but not in the archive" in message
    assert "column public.timeline_items.title differs" in message and "character varying(80)" in message
    assert "wedding 2" in message
    with psycopg.connect(dst) as conn:
        assert conn.execute("SELECT count(*) FROM weddings").fetchone()[0] == 0


def test_truncated_or_garbled_streams_are_named_clearly(make_database):
    src = make_platform_db(make_database)
    data, _ = snapshot_bytes(src, "1")
    whole = list(read_snapshot([data]))
    assert list(read_snapshot(chunked(data, 7))) == whole  # records spanning chunk boundaries
    assert read_manifest(chunked(data, 65536)).total_rows == 13

    for cut in (0, 5, len(snapshot_stream.MAGIC) + 4, len(data) // 2, len(data) - 1):
        with pytest.raises(SnapshotFormatError, match="truncated|empty") as e:
            list(read_snapshot(chunked(data[:cut], 100), name="vault/wedding-1.wbk"))
        assert "vault/wedding-1.wbk" in str(e.value)
    with pytest.raises(SnapshotFormatError, match="bad magic"):
        list(read_snapshot([b"PGDMP" + data[5:]]))
    garbled = bytearray(data)
    garbled[len(snapshot_stream.MAGIC)] = ord("Z")  # the header record's type byte
    with pytest.raises(SnapshotFormatError, match="unknown record type .* garbled"):
        list(read_snapshot([bytes(garbled)]))
    huge = bytearray(data)
    huge[len(snapshot_stream.MAGIC) + 1:len(snapshot_stream.MAGIC) + 9] = (1 << 62).to_bytes(8, "big")
    with pytest.raises(SnapshotFormatError, match="more than the limit"):
        list(read_snapshot([bytes(huge)]))
    with pytest.raises(SnapshotFormatError, match="cannot follow"):
        list(read_snapshot([frame([whole[0], whole[3]])]))
    with pytest.raises(SnapshotFormatError, match="after the manifest"):
        list(read_snapshot([data + b"\x00"]))
    with pytest.raises(SnapshotFormatError, match="header record at offset 8 is not valid JSON"):
        Record(snapshot_stream.HEADER, b"{nope", 8).json()

    # A restore of a cut stream commits nothing, not even the schema it started to create.
    dst = make_database()
    with pytest.raises(SnapshotFormatError, match="truncated"):
        restore_snapshot(chunked(data[:len(data) - 200], 512), dst)
    with psycopg.connect(dst) as conn:
        snap.use_qualified_names(conn)
        assert snap.schema_is_empty(describe_schema(conn))


def test_tampered_rows_fail_verification_and_nothing_is_committed(make_database):
    src = make_platform_db(make_database)
    data, _ = snapshot_bytes(src, "1")
    records = list(read_snapshot([data]))
    table = None
    for i, r in enumerate(records):
        if r.kind == snapshot_stream.TABLE_BEGIN:
            table = r.json()["name"]
        elif r.kind == snapshot_stream.DATA and table == "guests":
            assert b"aunt@example.com" in r.payload
            records[i] = Record(r.kind, r.payload.replace(b"aunt@example.com", b"bunt@example.com"), r.offset)
    dst = make_schema_db(make_database)
    copy_vendors(src, dst)
    with pytest.raises(VerificationError, match="table public.guests does not match"):
        restore_snapshot([frame(records)], dst)
    with psycopg.connect(dst) as conn:  # weddings came first in the same transaction: rolled back too
        assert conn.execute("SELECT count(*) FROM weddings").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM guests").fetchone()[0] == 0

    # A manifest that disagrees with otherwise consistent records is caught as well.
    records = list(read_snapshot([data]))
    manifest = snapshot_stream.Manifest.from_json(records[-1].payload)
    manifest.table("public.timeline_items").rows += 1
    records[-1] = Record(snapshot_stream.MANIFEST, manifest.to_json().encode(), records[-1].offset)
    with pytest.raises(VerificationError, match="table public.timeline_items does not match the manifest"):
        restore_snapshot([frame(records)], dst)
    with psycopg.connect(dst) as conn:
        assert conn.execute("SELECT count(*) FROM weddings").fetchone()[0] == 0


def test_verify_finds_changed_rows_and_orphans(make_database):
    src = make_platform_db(make_database)
    data, manifest = snapshot_bytes(src, "1")
    dst = make_schema_db(make_database)
    copy_vendors(src, dst)
    restore_snapshot([data], dst)
    with psycopg.connect(src) as conn:
        plan = tenancy.discover(conn)
    assert verify_restored(dst, manifest, plan).ok
    with psycopg.connect(dst, autocommit=True) as conn:
        conn.execute("UPDATE timeline_items SET title = 'Changed' WHERE title = 'Ceremony'")
        conn.execute("SET session_replication_role = replica")  # lets an orphan in past its FK
        conn.execute("INSERT INTO guest_dietary (guest_id, requirement) OVERRIDING SYSTEM VALUE VALUES (999, 'x')")
    report = verify_restored(dst, manifest)
    assert not report.ok
    assert any(p.startswith("table public.timeline_items: sha256") for p in report.problems)
    assert any("guest_dietary_guest_id_fkey on public.guest_dietary: 1 row(s) without a parent in public.guests" in p
               for p in report.problems)
    with pytest.raises(VerificationError, match="public.timeline_items"):
        report.raise_if_failed()
    assert report.to_dict()["ok"] is False


def test_scratch_database_is_dropped_even_when_the_body_fails(stack):
    admin = stack.dsn("postgres")
    with pytest.raises(RuntimeError, match="boom"):
        with scratch_database(admin, label="Wedding #42'; DROP TABLE x; --") as dsn:
            name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
            assert name.startswith(SCRATCH_PREFIX + "wedding_42_drop_table_x_")
            lingering = psycopg.connect(dsn)  # a session left open does not keep it alive
            raise RuntimeError("boom")
    with psycopg.connect(admin) as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,)).fetchone()[0] == 0
    with pytest.raises(psycopg.OperationalError):
        lingering.execute("SELECT 1")  # its session was terminated by DROP ... WITH (FORCE)
    lingering.close()


def test_abandoned_scratch_databases_are_dropped_but_live_ones_kept(stack, monkeypatch):
    from wedbackup_dagster.core.postgres import load_snapshot as restore_module

    prefix = f"{SCRATCH_PREFIX}sweep{uuid.uuid4().hex[:6]}_"
    monkeypatch.setattr(restore_module, "SCRATCH_PREFIX", prefix)
    admin = stack.dsn("postgres")
    abandoned = f"{prefix}left_behind"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(abandoned)))
    with scratch_database(admin, label="live") as dsn:
        live = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        assert restore_module.drop_abandoned_scratch_databases(admin) == [abandoned]
        with psycopg.connect(dsn) as conn:  # the live one is untouched
            assert conn.execute("SELECT 1").fetchone() == (1,)
    with psycopg.connect(admin) as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,)).fetchall()
    assert left == [] and live.startswith(prefix)


# --- issue 14: verification rebuilds its SQL and reads with row security off -------------------------

def test_verify_never_runs_the_manifests_select_sql(make_database):
    """Defect 10: verification ran each table's select_sql from the manifest (the catalogue's copy, or
    an archive's); a crafted one (here: terminating another session) ran with the verifier's rights."""
    src = make_platform_db(make_database)
    data, manifest = snapshot_bytes(src, "1")
    dst = make_database()
    restore_snapshot([data], dst, create_schema=True)
    with psycopg.connect(dst, autocommit=True) as victim:
        for t in manifest.tables:
            t.select_sql = (f'SELECT * FROM "{t.schema}"."{t.name}" '
                            f"WHERE pg_catalog.pg_terminate_backend({victim.info.backend_pid})")
            t.params = {"wedding_id": "2"}
        report = verify_restored(dst, manifest)
        assert victim.execute("SELECT 1").fetchone() == (1,)  # still connected: nothing of the manifest ran
    assert report.ok, report.problems
    # Selects given as text are refused too: only composed SQL (or a plan) is run.
    with pytest.raises(TypeError, match="not SQL text"):
        verify_restored(dst, manifest, {t.table: t.select_sql for t in manifest.tables})


def test_verify_names_a_table_whose_policy_the_role_cannot_bypass(login_role, make_database):
    """Defect 1 (verification side): with row security on, a role without BYPASSRLS counted only the
    rows a policy showed it; now the table is reported with what the role needs."""
    src = make_platform_db(make_database)
    data, manifest = snapshot_bytes(src, "1")
    dst = make_database()
    restore_snapshot([data], dst, create_schema=True)
    name, password = login_role
    with psycopg.connect(dst, autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(sql.Identifier(name)))
        conn.execute("ALTER TABLE public.guests ENABLE ROW LEVEL SECURITY")
        conn.execute("CREATE POLICY only_yes ON public.guests USING (rsvp = 'yes')")
    report = verify_restored(role_dsn(dst, name, password), manifest)
    assert not report.ok
    # guests, and guest_dietary whose rows are reached through guests.
    problems = [p for p in report.problems if p.startswith("table ")]
    assert [p.split(":")[0] for p in problems] == ["table public.guests", "table public.guest_dietary"]
    for problem in problems:
        assert ': cannot be read on the target: ' in problem and "BYPASSRLS" in problem
        assert 'query would be affected by row-level security policy for table "guests"' in problem
    # The foreign keys into and out of guests cannot be checked either, and say so (no crash).
    assert {p.split(":")[0] for p in report.problems if "cannot be checked" in p} == {
        "foreign key guest_dietary_guest_id_fkey on public.guest_dietary",
        "foreign key guests_plus_one_of_fkey on public.guests", "foreign key guests_wedding_id_fkey on public.guests"}
    with psycopg.connect(dst, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} BYPASSRLS").format(sql.Identifier(name)))
    assert verify_restored(role_dsn(dst, name, password), manifest).ok
