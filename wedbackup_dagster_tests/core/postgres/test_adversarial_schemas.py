"""A catalogue of adversarial wedding schemas (issue 14, "Go further"), each built on the real PostgreSQL
with three weddings: row-level security (read by a BYPASSRLS role, and by the table's owner), legacy
inheritance with colliding keys, identity columns (ALWAYS and BY DEFAULT), generated columns, exclusion
constraints, deferred constraints, triggers that rewrite rows, a partitioned table with a default
partition, composite and multi-path foreign keys, reserved-word and unicode identifiers, very wide rows
and TOASTed values. Each is backed up through the engine (snapshot, seal, vault), verified in a scratch
database, and restored in every mode README offers — `--target-dsn` into an empty database and into one
with the schema, `--into-schema`, `--in-place`, each after its `--dry-run` — and the wedding's rows must
come back exactly (per-table ordered checksums) while every other wedding's rows stay untouched."""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.postgres.restore_wedding import RecoveryRequest, recover

pytestmark = pytest.mark.stack

WEDDING = "1"

BASE = """
CREATE TABLE public.weddings (id integer PRIMARY KEY, couple text NOT NULL);
"""
BASE_DATA = "INSERT INTO public.weddings VALUES (1, 'Ada & Bo'), (2, 'Cy & Di'), (3, 'Ed & Flo');"


@dataclass(frozen=True)
class Table:
    """One table as the test reads it, by hand (not through the tenancy plan under test)."""

    schema: str
    name: str
    wedding_filter: str  # SQL over alias t with %(w)s: the wedding's rows
    only: bool = False  # an INHERITS parent: its own rows only

    def source(self, schema: str | None = None) -> sql.Composable:
        ident = sql.Identifier(schema or self.schema, self.name)
        return sql.SQL("ONLY {}").format(ident) if self.only else ident


@dataclass(frozen=True)
class Feature:
    ddl: str  # after BASE
    data: str  # rows of weddings 1..3 (and platform rows)
    tables: tuple[Table, ...]  # the wedding's tables besides weddings
    mutate: str  # changes to wedding 1 after its backup, which an in-place restore must undo
    role: str | None = None  # "bypassrls" or "owner": the engine's source DSN is a role of that kind
    after: str = ""  # must succeed in a restored database (e.g. inserts drawing on identity sequences)
    inspect_names: dict[str, str] = field(default_factory=dict)  # "schema.table" -> table name in --into-schema


def _wedding_table(name: str, filt: str = "t.wedding_id = %(w)s", schema: str = "public", **kw) -> Table:
    return Table(schema, name, filt, **kw)


FEATURES: dict[str, Feature] = {
    "rls_bypassrls_role": Feature(
        ddl="""
CREATE TABLE public.private_notes (id integer PRIMARY KEY, wedding_id integer NOT NULL REFERENCES public.weddings,
                                   body text NOT NULL, secret boolean NOT NULL DEFAULT false);
ALTER TABLE public.private_notes ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.private_notes FORCE ROW LEVEL SECURITY;
CREATE POLICY hide_secrets ON public.private_notes USING (NOT secret);
""",
        data="INSERT INTO public.private_notes SELECT i, 1 + i % 3, 'note ' || i, i % 2 = 0 "
             "FROM generate_series(1, 12) i;",
        tables=(_wedding_table("private_notes"),),
        mutate="DELETE FROM public.private_notes WHERE wedding_id = 1 AND secret; "
               "UPDATE public.private_notes SET body = 'changed' WHERE wedding_id = 1",
        role="bypassrls"),
    "rls_table_owner": Feature(
        ddl="""
CREATE TABLE public.private_notes (id integer PRIMARY KEY, wedding_id integer NOT NULL REFERENCES public.weddings,
                                   body text NOT NULL, secret boolean NOT NULL DEFAULT false);
ALTER TABLE public.private_notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY hide_secrets ON public.private_notes USING (NOT secret);
""",
        data="INSERT INTO public.private_notes SELECT i, 1 + i % 3, 'note ' || i, i % 2 = 0 "
             "FROM generate_series(1, 12) i;",
        tables=(_wedding_table("private_notes"),),
        mutate="DELETE FROM public.private_notes WHERE wedding_id = 1 AND secret",
        role="owner"),
    "legacy_inheritance": Feature(
        ddl="""
CREATE TABLE public.notes (id integer PRIMARY KEY, wedding_id integer NOT NULL REFERENCES public.weddings, body text);
CREATE TABLE public.notes_archived (archived_on date NOT NULL DEFAULT '2026-01-01') INHERITS (public.notes);
ALTER TABLE public.notes_archived ADD PRIMARY KEY (id),
    ADD FOREIGN KEY (wedding_id) REFERENCES public.weddings;
""",
        # The archived notes 1 and 2 belong to weddings 2 and 3 and share their ids with wedding 1's notes.
        data="""
INSERT INTO public.notes VALUES (1, 1, 'one'), (2, 1, 'two'), (3, 2, 'three');
INSERT INTO public.notes_archived VALUES (1, 2, 'old note of 2', '2025-01-01'), (2, 3, 'old note of 3', '2025-02-01'),
                                         (5, 1, 'old note of 1', '2025-03-01');
""",
        tables=(_wedding_table("notes", only=True), _wedding_table("notes_archived")),
        mutate="DELETE FROM ONLY public.notes WHERE id = 2; UPDATE ONLY public.notes SET body = 'x' WHERE id = 1; "
               "UPDATE public.notes_archived SET body = 'y' WHERE id = 5"),
    "identity_columns": Feature(
        ddl="""
CREATE TABLE public.seating (id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                             wedding_id integer NOT NULL REFERENCES public.weddings, label text NOT NULL);
CREATE TABLE public.gifts (id bigint GENERATED BY DEFAULT AS IDENTITY (START WITH 100) PRIMARY KEY,
                           wedding_id integer NOT NULL REFERENCES public.weddings, item text NOT NULL);
""",
        data="""
INSERT INTO public.seating (wedding_id, label)
    SELECT w, 'table ' || g FROM generate_series(1, 3) w, generate_series(1, 4) g;
INSERT INTO public.gifts (wedding_id, item)
    SELECT w, 'gift ' || g FROM generate_series(1, 3) w, generate_series(1, 3) g;
INSERT INTO public.gifts (id, wedding_id, item) VALUES (5000, 1, 'given an id by hand');
""",
        tables=(_wedding_table("seating"), _wedding_table("gifts")),
        mutate="DELETE FROM public.seating WHERE wedding_id = 1 AND label = 'table 1'; "
               "UPDATE public.seating SET label = 'moved' WHERE wedding_id = 1 AND label = 'table 2'; "
               "DELETE FROM public.gifts WHERE id = 5000",
        after="INSERT INTO public.seating (wedding_id, label) VALUES (1, 'after'); "
              "INSERT INTO public.gifts (wedding_id, item) VALUES (1, 'after')"),
    "generated_columns": Feature(
        ddl="""
CREATE TABLE public.budget_items (id integer PRIMARY KEY, wedding_id integer NOT NULL REFERENCES public.weddings,
    net numeric(10, 2) NOT NULL, gross numeric(12, 2) GENERATED ALWAYS AS (net * 1.2) STORED,
    label text NOT NULL, label_length integer GENERATED ALWAYS AS (length(label)) STORED);
""",
        data="INSERT INTO public.budget_items (id, wedding_id, net, label) "
             "SELECT i, 1 + i % 3, i * 10.5, repeat('x', i) FROM generate_series(1, 15) i;",
        tables=(_wedding_table("budget_items"),),
        mutate="UPDATE public.budget_items SET net = 1, label = 'cheap' WHERE wedding_id = 1"),
    "exclusion_constraint": Feature(
        ddl="""
CREATE EXTENSION IF NOT EXISTS btree_gist;
CREATE TABLE public.room_bookings (id integer PRIMARY KEY, wedding_id integer NOT NULL REFERENCES public.weddings,
    room text NOT NULL, during tstzrange NOT NULL,
    CONSTRAINT no_double_booking EXCLUDE USING gist (room WITH =, during WITH &&));
""",
        data="""
INSERT INTO public.room_bookings SELECT i, 1 + i % 3, 'hall ' || (i % 2),
    tstzrange('2026-06-01'::timestamptz + i * interval '1 day',
              '2026-06-01'::timestamptz + (i * 24 + 5) * interval '1 hour')
FROM generate_series(1, 9) i;
""",
        tables=(_wedding_table("room_bookings"),),
        mutate="UPDATE public.room_bookings SET during = tstzrange('2027-01-01', '2027-01-02') "
               "WHERE id = (SELECT min(id) FROM public.room_bookings WHERE wedding_id = 1)"),
    "deferred_constraints": Feature(
        ddl="""
CREATE TABLE public.tasks (id integer PRIMARY KEY, wedding_id integer NOT NULL REFERENCES public.weddings,
    position integer NOT NULL, next_task integer,
    CONSTRAINT tasks_next FOREIGN KEY (next_task) REFERENCES public.tasks DEFERRABLE INITIALLY DEFERRED,
    CONSTRAINT tasks_position UNIQUE (wedding_id, position) DEFERRABLE INITIALLY DEFERRED);
""",
        # Each wedding's tasks form a cycle (1 -> 2 -> 3 -> 1): only deferred checking lets them in.
        data="""
BEGIN;
INSERT INTO public.tasks SELECT (w - 1) * 3 + i, w, i, (w - 1) * 3 + i % 3 + 1
FROM generate_series(1, 3) w, generate_series(1, 3) i;
COMMIT;
""",
        tables=(_wedding_table("tasks"),),
        mutate="BEGIN; UPDATE public.tasks SET position = 4 - position WHERE wedding_id = 1; "
               "UPDATE public.tasks SET next_task = NULL WHERE id = 1; COMMIT;"),
    "triggers_rewriting_rows": Feature(
        ddl="""
CREATE TABLE public.rsvps (id integer PRIMARY KEY, wedding_id integer NOT NULL REFERENCES public.weddings,
    email text NOT NULL, answer text NOT NULL, changes integer NOT NULL DEFAULT 0);
CREATE FUNCTION public.rsvps_normalise() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.email := lower(trim(NEW.email));
    NEW.answer := upper(NEW.answer);
    RETURN NEW;
END $$;
CREATE FUNCTION public.rsvps_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.changes := OLD.changes + 1;
    RETURN NEW;
END $$;
CREATE TRIGGER rsvps_normalise BEFORE INSERT OR UPDATE ON public.rsvps
    FOR EACH ROW EXECUTE FUNCTION public.rsvps_normalise();
CREATE TRIGGER rsvps_count BEFORE UPDATE ON public.rsvps FOR EACH ROW EXECUTE FUNCTION public.rsvps_count();
""",
        data="INSERT INTO public.rsvps (id, wedding_id, email, answer) "
             "SELECT i, 1 + i % 3, '  Guest' || i || '@Example.ORG ', 'yes' FROM generate_series(1, 12) i; "
             "UPDATE public.rsvps SET answer = 'no' WHERE id % 4 = 0;",
        tables=(_wedding_table("rsvps"),),
        mutate="UPDATE public.rsvps SET answer = 'maybe' WHERE wedding_id = 1"),
    "partitioned_with_default": Feature(
        ddl="""
CREATE TABLE public.payments (id integer NOT NULL, wedding_id integer NOT NULL REFERENCES public.weddings,
    kind text NOT NULL, amount numeric(10, 2) NOT NULL, PRIMARY KEY (id, kind)) PARTITION BY LIST (kind);
CREATE TABLE public.payments_deposit PARTITION OF public.payments FOR VALUES IN ('deposit');
CREATE TABLE public.payments_other PARTITION OF public.payments DEFAULT;
CREATE TABLE public.payment_notes (id integer PRIMARY KEY, payment_id integer NOT NULL, payment_kind text NOT NULL,
    note text, FOREIGN KEY (payment_id, payment_kind) REFERENCES public.payments);
""",
        data="""
INSERT INTO public.payments SELECT i, 1 + i % 3, CASE WHEN i % 2 = 0 THEN 'deposit' ELSE 'balance ' || i END, i * 100
FROM generate_series(1, 12) i;
INSERT INTO public.payment_notes
    SELECT p.id, p.id, p.kind, 'note on ' || p.id FROM public.payments p WHERE p.id % 3 <> 2;
""",
        tables=(_wedding_table("payments"),
                _wedding_table("payment_notes",
                               "t.payment_id IN (SELECT id FROM public.payments WHERE wedding_id = %(w)s)")),
        mutate="DELETE FROM public.payment_notes "
               "WHERE payment_id IN (SELECT id FROM public.payments WHERE wedding_id = 1); "
               "UPDATE public.payments SET amount = 0 WHERE wedding_id = 1; "
               "INSERT INTO public.payments VALUES (100, 1, 'refund', -5), (101, 1, 'deposit', 7)"),
    "composite_and_multi_path_fks": Feature(
        ddl="""
CREATE TABLE public.guests (id integer PRIMARY KEY, wedding_id integer NOT NULL REFERENCES public.weddings,
                            name text NOT NULL);
CREATE TABLE public.seat_tables (wedding_id integer NOT NULL REFERENCES public.weddings, table_no integer NOT NULL,
                                 PRIMARY KEY (wedding_id, table_no));
CREATE TABLE public.seats (id integer PRIMARY KEY, wedding_id integer NOT NULL REFERENCES public.weddings,
    table_no integer NOT NULL, guest_id integer NOT NULL REFERENCES public.guests,
    FOREIGN KEY (wedding_id, table_no) REFERENCES public.seat_tables);
CREATE TABLE public.guest_notes (id integer PRIMARY KEY, guest_id integer NOT NULL REFERENCES public.guests,
                                 note text);
-- Two ways up: a composite key to seat_tables (2 hops, the one taken) and a note's guest (3 hops).
CREATE TABLE public.seat_requests (id integer PRIMARY KEY, seat_wedding integer, seat_table integer,
    guest_note_id integer REFERENCES public.guest_notes,
    FOREIGN KEY (seat_wedding, seat_table) REFERENCES public.seat_tables);
""",
        data="""
INSERT INTO public.guests SELECT i, 1 + i % 3, 'guest ' || i FROM generate_series(1, 12) i;
INSERT INTO public.seat_tables SELECT w, n FROM generate_series(1, 3) w, generate_series(1, 2) n;
INSERT INTO public.seats SELECT g.id, g.wedding_id, 1 + g.id % 2, g.id FROM public.guests g;
INSERT INTO public.guest_notes SELECT g.id, g.id, 'likes ' || g.id FROM public.guests g;
INSERT INTO public.seat_requests SELECT g.id, g.wedding_id, 2, g.id FROM public.guests g WHERE g.id % 2 = 0;
""",
        tables=(_wedding_table("guests"), _wedding_table("seat_tables"), _wedding_table("seats"),
                _wedding_table("guest_notes", "t.guest_id IN (SELECT id FROM public.guests WHERE wedding_id = %(w)s)"),
                _wedding_table("seat_requests", "t.seat_wedding = %(w)s")),
        mutate="DELETE FROM public.seat_requests WHERE seat_wedding = 1; "
               "DELETE FROM public.seats WHERE wedding_id = 1; "
               "UPDATE public.guest_notes SET note = NULL WHERE guest_id % 3 = 0; "
               "UPDATE public.guests SET name = 'renamed' WHERE wedding_id = 1"),
    "reserved_and_unicode_identifiers": Feature(
        ddl="""
CREATE TABLE public."order" ("select" integer PRIMARY KEY, "Wedding" integer NOT NULL REFERENCES public.weddings,
                             "from" text, "Größe" text);
CREATE TABLE public."Gäste liste" ("ID" integer PRIMARY KEY, "wedding id" integer NOT NULL REFERENCES public.weddings,
                                  "Vor Name" text, "user" text);
CREATE TABLE public."MixedCase" ("Id" integer PRIMARY KEY, "WeddingId" integer NOT NULL REFERENCES public.weddings,
                                "Note" text, note text);
CREATE SCHEMA "Hochzeit Ü";
CREATE TABLE "Hochzeit Ü"."order" (id integer PRIMARY KEY, "Gast" integer NOT NULL REFERENCES public."Gäste liste",
                                   "Menü" text);
""",
        data="""
INSERT INTO public."order" SELECT i, 1 + i % 3, 'from ' || i, 'Größe ' || i FROM generate_series(1, 9) i;
INSERT INTO public."Gäste liste" SELECT i, 1 + i % 3, 'Jürgen ' || i, 'user' || i FROM generate_series(1, 9) i;
INSERT INTO public."MixedCase" SELECT i, 1 + i % 3, 'Upper ' || i, 'lower ' || i FROM generate_series(1, 9) i;
INSERT INTO "Hochzeit Ü"."order" SELECT i, i, 'Menü ' || i FROM generate_series(1, 9) i;
""",
        tables=(_wedding_table("order", 't."Wedding" = %(w)s'),
                _wedding_table("Gäste liste", 't."wedding id" = %(w)s'),
                _wedding_table("MixedCase", 't."WeddingId" = %(w)s'),
                _wedding_table("order",
                               't."Gast" IN (SELECT "ID" FROM public."Gäste liste" WHERE "wedding id" = %(w)s)',
                               schema="Hochzeit Ü")),
        mutate="""UPDATE public."order" SET "from" = NULL WHERE "Wedding" = 1;
DELETE FROM "Hochzeit Ü"."order" WHERE "Gast" IN (SELECT "ID" FROM public."Gäste liste" WHERE "wedding id" = 1);
UPDATE public."MixedCase" SET "Note" = 'changed' WHERE "WeddingId" = 1""",
        inspect_names={"Hochzeit Ü.order": "Hochzeit Ü_order"}),
    "wide_rows_and_toast": Feature(
        ddl="""
CREATE TABLE public.documents (id integer PRIMARY KEY, wedding_id integer NOT NULL REFERENCES public.weddings,
                               body text, blob bytea);
CREATE TABLE public.wide_forms (id integer PRIMARY KEY, wedding_id integer NOT NULL REFERENCES public.weddings,
""" + ",\n".join(f"    answer_{i:03d} text" for i in range(1, 301)) + ");",
        # Each document about 0.6 MB of text and 0.3 MB of bytes that do not compress: stored out of line.
        data="""
INSERT INTO public.documents SELECT d, 1 + d % 3,
    (SELECT string_agg(md5(d || '/' || i), '') FROM generate_series(1, 20000) i),
    (SELECT decode(string_agg(md5(i || '\\' || d), ''), 'hex') FROM generate_series(1, 20000) i)
FROM generate_series(1, 4) d;
INSERT INTO public.wide_forms SELECT f, 1 + f % 3,
    """ + ", ".join(f"repeat('{i % 10}', {i}) || f" for i in range(1, 301)) + """
FROM generate_series(1, 6) f;
""",
        tables=(_wedding_table("documents"), _wedding_table("wide_forms")),
        mutate="UPDATE public.documents SET body = 'short', blob = NULL WHERE wedding_id = 1; "
               "UPDATE public.wide_forms SET answer_150 = 'changed' WHERE wedding_id = 1"),
}

WEDDINGS = Table("public", "weddings", "t.id = %(w)s")


def checksums(dsn: str, feature: Feature, *, others: bool = False, schema: str | None = None,
              whole: bool = False) -> dict[str, tuple[int, str]]:
    """Per table: (rows, md5 of the rows' text in a fixed order) of wedding 1's rows; with `others` of every
    other row; `schema`/`whole`: the tables of an inspection schema, every row."""
    out = {}
    with psycopg.connect(dsn) as conn:
        for t in (WEDDINGS, *feature.tables):
            cond = sql.SQL("true" if whole else f"NOT coalesce(({t.wedding_filter}), false)" if others
                           else t.wedding_filter)
            source = t.source()
            if schema is not None:
                name = feature.inspect_names.get(f"{t.schema}.{t.name}", t.name)
                source = sql.Identifier(schema, name)
            query = sql.SQL("SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' "
                            "ORDER BY t::text COLLATE \"C\"), '')) FROM {} AS t WHERE {}").format(source, cond)
            out[f"{t.schema}.{t.name}"] = tuple(conn.execute(query, {"w": int(WEDDING)}).fetchone())
    return out


def role_dsn(dsn: str, role: str, password: str) -> str:
    """`dsn` with another role's name and password."""
    parts = conninfo_to_dict(dsn)
    parts.update(user=role, password=password)
    return make_conninfo(**parts)


@pytest.fixture
def login_role(stack):
    """(name, password) of a login role (no superuser, no BYPASSRLS) made for this test; dropped at its end,
    after its databases (request this fixture before make_database, so it is torn down last)."""
    name, password = f"wb_adv_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
    yield name, password
    with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def build(dsn: str, feature: Feature, *, data: bool = True) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(BASE + feature.ddl)
        if data:
            conn.execute(BASE_DATA)
            conn.execute(feature.data)
            conn.execute("ANALYZE")


def grant(dsn: str, feature: Feature, role: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        ident = sql.Identifier(role)
        dbname = conn.info.dbname
        conn.execute(sql.SQL("GRANT CREATE, TEMPORARY ON DATABASE {} TO {}").format(sql.Identifier(dbname), ident))
        for schema in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname !~ '^pg_' "
                                   "AND nspname <> 'information_schema'").fetchall():
            s = sql.Identifier(schema[0])
            conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA {} TO {}").format(s, ident))
            conn.execute(sql.SQL("GRANT ALL ON ALL TABLES IN SCHEMA {} TO {}").format(s, ident))
            conn.execute(sql.SQL("GRANT ALL ON ALL SEQUENCES IN SCHEMA {} TO {}").format(s, ident))
        if feature.role == "bypassrls":
            conn.execute(sql.SQL("ALTER ROLE {} BYPASSRLS").format(ident))
        else:
            conn.execute(sql.SQL("ALTER TABLE public.private_notes OWNER TO {}").format(ident))


def run(engine: Engine, mode: str, **kw):
    target_dsn = kw.pop("target_dsn", None)
    return recover(engine, RecoveryRequest(partition=WEDDING, mode=mode, **kw), {}, target_dsn=target_dsn)


def check_after(dsn: str, feature: Feature) -> None:
    """What the restored database must still allow (rolled back)."""
    if feature.after:
        with psycopg.connect(dsn) as conn:
            conn.execute(feature.after)
            conn.rollback()


@pytest.mark.parametrize("name", list(FEATURES))
def test_backed_up_verified_and_restored_exactly_in_every_mode(name, login_role, stack, make_database, tmp_path,
                                                               monkeypatch):
    feature = FEATURES[name]
    admin_source = make_database()
    build(admin_source, feature)
    source = admin_source
    if feature.role:
        grant(admin_source, feature, login_role[0])
        source = role_dsn(admin_source, *login_role)
    env = {"WEDBACKUP_SOURCE_DSN": source, "WEDBACKUP_CATALOGUE_DSN": make_database(),
           "WEDBACKUP_VAULT_DIR": str(tmp_path / "vault")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    engine = Engine.from_env(dict(os.environ))
    try:
        before = checksums(admin_source, feature)
        others = checksums(admin_source, feature, others=True)
        assert all(rows for rows, _ in before.values()), f"{name}: every table holds rows of wedding 1: {before}"

        with engine.snapshot_session() as session:
            outcome = engine.back_up(WEDDING, session)
        assert outcome is not None
        engine.verify(WEDDING, {})  # restored into a scratch database and checked: a verified point
        archive_rows = sum(before[t][0] for t in before)

        # --target-dsn, an empty database: it gets the archive's schema.
        empty = make_database()
        dry = run(engine, "target", target_dsn=empty, dry_run=True)
        assert dry.totals["add"] == dry.totals["archive_rows"] == archive_rows
        run(engine, "target", target_dsn=empty)
        assert checksums(empty, feature) == before
        check_after(empty, feature)

        # --target-dsn, a database with the schema and no rows.
        shaped = make_database()
        build(shaped, feature, data=False)
        dry = run(engine, "target", target_dsn=shaped, dry_run=True)
        assert (dry.totals["add"], dry.totals["live_rows"]) == (archive_rows, 0)
        run(engine, "target", target_dsn=shaped)
        assert checksums(shaped, feature) == before
        check_after(shaped, feature)

        # --into-schema, in the source database.
        dry = run(engine, "schema", schema="inspect wedding 1", dry_run=True)
        assert dry.totals["archive_rows"] == archive_rows
        run(engine, "schema", schema="inspect wedding 1")
        assert checksums(admin_source, feature, schema="inspect wedding 1", whole=True) == before
        with psycopg.connect(admin_source, autocommit=True) as conn:
            conn.execute('DROP SCHEMA "inspect wedding 1" CASCADE')

        # --in-place, after wedding 1 changed.
        with psycopg.connect(admin_source, autocommit=True) as conn:
            conn.execute(feature.mutate)
        changed = checksums(admin_source, feature)
        assert changed != before, f"{name}: the mutation changes wedding 1"
        dry = run(engine, "in_place", dry_run=True)
        assert dry.totals["add"] + dry.totals["remove"] + dry.totals["change"] > 0
        assert checksums(admin_source, feature) == changed  # a dry run writes nothing
        run(engine, "in_place")
        assert checksums(admin_source, feature) == before
        assert checksums(admin_source, feature, others=True) == others
        check_after(admin_source, feature)
    finally:
        engine.catalogue.close()
