"""The demo generator builds the wedding-platform schema, fills it realistically and deterministically,
keeps triggers and sequences usable, and makes 2,000 weddings fast enough for demos and tests."""
from __future__ import annotations

import datetime as dt
import uuid

import psycopg
import pytest
from psycopg import sql

from wedbackup_dagster.dev import demo_data
from wedbackup_dagster.core.errors import StackError

pytestmark = pytest.mark.stack

TODAY = dt.date(2025, 6, 14)  # fixed, so determinism is checked on identical inputs


def _checksums(dsn: str) -> dict[str, str]:
    """Per table, an md5 over every row's text in a fixed order: equal only if the contents are equal."""
    out = {}
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        for table in demo_data.TABLES:
            out[table] = conn.execute(sql.SQL(
                "SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {} t"
            ).format(sql.Identifier("public", table))).fetchone()[0]
    return out


@pytest.fixture(scope="module")
def platform_200(stack):
    """One 200-wedding database shared by the read-only checks (generating it costs ~1-2 s)."""
    name = f"t_demo_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = stack.dsn(name)
    try:
        summary = demo_data.generate(dsn, weddings=200, seed=11, today=TODAY)
        yield dsn, summary
    finally:
        with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_summary_matches_the_database(platform_200):
    dsn, summary = platform_200
    assert summary["weddings"] == 200 and summary["weddings_added"] == 200
    assert set(summary["rows"]) == set(demo_data.TABLES)
    with psycopg.connect(dsn) as conn:
        for table in demo_data.TABLES:
            ident = sql.Identifier("public", table)
            count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()[0]
            assert summary["rows"][table] == count > 0, table
        size = conn.execute("SELECT sum(pg_total_relation_size(format('public.%%I', t)::regclass)) "
                            "FROM unnest(%s::text[]) t", (list(demo_data.TABLES),)).fetchone()[0]
    assert summary["total_bytes"] == size > 1_000_000
    assert summary["seconds"] > 0


def test_row_counts_are_realistic(platform_200):
    dsn, summary = platform_200
    rows = summary["rows"]
    assert 20 * 200 <= rows["guests"] <= 400 * 200  # small weddings plus a couple of 1,000+ ones
    assert rows["households"] < rows["guests"]
    assert rows["couple_members"] >= 2 * 200
    assert rows["contracts"] <= rows["wedding_vendors"]
    with psycopg.connect(dsn) as conn:
        sizes = [r[0] for r in conn.execute("SELECT count(*) FROM guests GROUP BY wedding_id")]
        assert len(sizes) == 200
        small = [s for s in sizes if 20 <= s <= 150]
        assert len(small) >= 0.95 * len(sizes)
        assert min(sizes) >= 20
        big = [s for s in sizes if s >= 1000]
        assert 1 <= len(big) <= 5
        # every generated wedding has at least something in each of its own tables
        for table in ("couple_members", "households", "wedding_vendors", "documents", "timeline_events",
                      "payments"):
            n = conn.execute(sql.SQL("SELECT count(DISTINCT wedding_id) FROM {}").format(
                sql.Identifier("public", table))).fetchone()[0]
            assert n >= 190, table


def test_wedding_dates_are_relative_to_today(platform_200):
    dsn, _ = platform_200
    with psycopg.connect(dsn) as conn:
        lo, hi = conn.execute("SELECT min(wedding_date), max(wedding_date) FROM weddings").fetchone()
        this_week = conn.execute("SELECT count(*) FROM weddings WHERE wedding_date BETWEEN %s AND %s",
                                 (TODAY - dt.timedelta(days=3), TODAY + dt.timedelta(days=3))).fetchone()[0]
        past, future = conn.execute("SELECT count(*) FILTER (WHERE wedding_date < %s), "
                                    "count(*) FILTER (WHERE wedding_date > %s) FROM weddings",
                                    (TODAY, TODAY)).fetchone()
        anchor = dt.datetime.combine(TODAY, dt.time(0), tzinfo=dt.timezone.utc)
        for table, column in (("weddings", "created_at"), ("weddings", "updated_at"), ("guests", "updated_at"),
                              ("payments", "paid_at"), ("contracts", "signed_at"), ("documents", "uploaded_at")):
            latest = conn.execute(sql.SQL("SELECT max({}) FROM {}").format(
                sql.Identifier(column), sql.Identifier("public", table))).fetchone()[0]
            assert latest <= anchor, f"{table}.{column} is after 'now' of the demo"
    assert TODAY - dt.timedelta(days=365) <= lo < TODAY < hi <= TODAY + dt.timedelta(days=548)
    assert this_week >= 3
    assert past > 40 and future > 80


def test_both_tenancy_paths_and_nullable_links_are_exercised(platform_200):
    dsn, _ = platform_200
    with psycopg.connect(dsn) as conn:
        q = conn.execute
        # guests reach weddings directly and through households, and the two always agree
        assert q("SELECT count(*) FROM guests g JOIN households h ON h.id = g.household_id "
                 "WHERE h.wedding_id <> g.wedding_id").fetchone()[0] == 0
        assert q("SELECT count(*) FROM guests WHERE household_id IS NULL").fetchone()[0] > 0
        assert q("SELECT count(*) FROM payments p JOIN wedding_vendors wv ON wv.id = p.wedding_vendor_id "
                 "WHERE wv.wedding_id <> p.wedding_id").fetchone()[0] == 0
        assert q("SELECT count(*) FROM payments WHERE wedding_vendor_id IS NULL").fetchone()[0] > 0
        assert q("SELECT count(*) FROM timeline_events c JOIN timeline_events p ON p.id = c.parent_event_id "
                 "WHERE p.wedding_id <> c.wedding_id").fetchone()[0] == 0
        assert q("SELECT count(*) FROM timeline_events WHERE parent_event_id IS NOT NULL").fetchone()[0] > 0
        platform_reviews, wedding_reviews = q(
            "SELECT count(*) FILTER (WHERE wedding_id IS NULL), count(*) FILTER (WHERE wedding_id IS NOT NULL) "
            "FROM vendor_reviews").fetchone()
        assert platform_reviews > 0 and wedding_reviews > 0
        # the types the schema promises are really used
        assert set(r[0] for r in q("SELECT DISTINCT rsvp::text FROM guests")) == {"pending", "accepted", "declined",
                                                                                     "maybe"}
        assert set(r[0] for r in q("SELECT DISTINCT status::text FROM payments")) == {"scheduled", "paid",
                                                                                        "refunded", "failed"}
        assert q("SELECT pg_typeof(currency)::text FROM payments LIMIT 1").fetchone()[0] == "currency_code"
        with pytest.raises(psycopg.errors.CheckViolation):
            q("SELECT 'eur'::currency_code")


def test_every_foreign_key_is_declared_and_indexed(platform_200):
    dsn, _ = platform_200
    with psycopg.connect(dsn) as conn:
        fks = set(conn.execute("""
            SELECT c.conrelid::regclass::text, a.attname, c.confrelid::regclass::text
            FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
            WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace""").fetchall())
        indexed = set(conn.execute("""
            SELECT i.indrelid::regclass::text, a.attname
            FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]""").fetchall())
    expected = {(t, c, p) for t, c, p, _ in demo_data.FOREIGN_KEYS}
    assert fks == expected
    assert ("guest_dietary", "guest_id", "guests") in fks  # reaches weddings only through guests
    for table, column, _ in fks:
        assert (table, column) in indexed, f"{table}.{column} has no index"


def test_same_seed_and_today_give_identical_tables(make_database):
    first, second, other_seed, other_day = (make_database() for _ in range(4))
    demo_data.generate(first, weddings=40, seed=5, today=TODAY, document_bytes=512)
    demo_data.generate(second, weddings=40, seed=5, today=TODAY, document_bytes=512, batch_weddings=7)
    demo_data.generate(other_seed, weddings=40, seed=6, today=TODAY, document_bytes=512)
    demo_data.generate(other_day, weddings=40, seed=5, today=TODAY + dt.timedelta(days=1), document_bytes=512)
    a = _checksums(first)
    assert a == _checksums(second)  # batch size does not change the contents either
    b, c = _checksums(other_seed), _checksums(other_day)
    assert a["weddings"] != b["weddings"] and a["guests"] != b["guests"]
    assert a["weddings"] != c["weddings"]
    with psycopg.connect(first) as c1, psycopg.connect(other_day) as c2:
        d1 = [r[0] for r in c1.execute("SELECT wedding_date FROM weddings ORDER BY id")]
        d2 = [r[0] for r in c2.execute("SELECT wedding_date FROM weddings ORDER BY id")]
    assert [d + dt.timedelta(days=1) for d in d1] == d2  # the whole calendar moves with today


def test_updated_at_trigger_on_every_table_that_has_it(make_database):
    dsn = make_database()
    demo_data.generate(dsn, weddings=3, seed=1, today=TODAY, document_bytes=64)
    tables = [t for t, cols in demo_data.TABLE_COLUMNS.items() if "updated_at" in cols]
    assert {"weddings", "guests", "households", "payments", "timeline_events"} <= set(tables)
    with psycopg.connect(dsn) as conn:
        for table in tables:
            ident = sql.Identifier("public", table)
            row_id, before = conn.execute(sql.SQL("SELECT id, updated_at FROM {} ORDER BY id LIMIT 1").format(
                ident)).fetchone()
            # an update that leaves updated_at alone must still move it to the transaction's now()
            after, now = conn.execute(sql.SQL("UPDATE {} SET id = id WHERE id = %s RETURNING updated_at, now()")
                                      .format(ident), (row_id,)).fetchone()
            assert after == now and after > before, table


def test_sequences_continue_after_generated_ids(make_database):
    dsn = make_database()
    demo_data.generate(dsn, weddings=5, seed=2, today=TODAY, document_bytes=64)
    with psycopg.connect(dsn) as conn:
        for table in demo_data.TABLES:
            ident = sql.Identifier("public", table)
            top = conn.execute(sql.SQL("SELECT max(id) FROM {}").format(ident)).fetchone()[0]
            nxt = conn.execute("SELECT nextval(pg_get_serial_sequence(%s, 'id'))",
                               (ident.as_string(conn),)).fetchone()[0]
            assert nxt > top, table
        wid = conn.execute("INSERT INTO weddings (title, wedding_date) VALUES ('New', %s) RETURNING id",
                           (TODAY,)).fetchone()[0]
        conn.execute("INSERT INTO guests (wedding_id, first_name, last_name) VALUES (%s, 'A', 'B')", (wid,))
        assert conn.execute("SELECT full_name FROM guests WHERE wedding_id = %s", (wid,)).fetchone()[0] == "A B"


def test_reset_replaces_and_append_adds(make_database):
    dsn = make_database()
    demo_data.generate(dsn, weddings=10, seed=3, today=TODAY, document_bytes=64)
    with psycopg.connect(dsn) as conn:
        first_ten = conn.execute("SELECT md5(string_agg(w::text, '|' ORDER BY id)) FROM weddings w").fetchone()[0]
    appended = demo_data.generate(dsn, weddings=4, seed=3, today=TODAY, document_bytes=64, reset=False)
    assert appended["weddings"] == 14 and appended["weddings_added"] == 4
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT md5(string_agg(w::text, '|' ORDER BY id)) FROM weddings w "
                            "WHERE id <= 10").fetchone()[0] == first_ten
        ids = [r[0] for r in conn.execute("SELECT id FROM weddings ORDER BY id")]
        assert ids == list(range(1, 15))
        # the appended weddings are new weddings, not copies of the first ones
        assert conn.execute("SELECT count(DISTINCT (title, wedding_date, venue)) FROM weddings").fetchone()[0] > 10
    replaced = demo_data.generate(dsn, weddings=2, seed=3, today=TODAY, document_bytes=64)
    assert replaced["weddings"] == 2
    assert replaced["rows"]["vendors"] == 40


def test_document_sizes_follow_document_bytes(make_database):
    dsn = make_database()
    demo_data.generate(dsn, weddings=20, seed=4, today=TODAY, document_bytes=2000)
    with psycopg.connect(dsn) as conn:
        avg_contract, compressible = conn.execute(
            "SELECT avg(octet_length(document)), avg(pg_column_size(document)::float / octet_length(document)) "
            "FROM contracts").fetchone()
        avg_doc = conn.execute("SELECT avg(octet_length(content)) FROM documents").fetchone()[0]
    assert 1700 <= avg_contract <= 2300
    assert 1000 <= avg_doc <= 2300
    assert compressible < 1.0  # some of it is text that compresses


def test_unreachable_database_names_it_without_password(stack):
    dsn = f"postgresql://wedbackup:sekret-pw@127.0.0.1:{_closed_port()}/nowhere?connect_timeout=2"
    with pytest.raises(StackError) as info:
        demo_data.generate(dsn, weddings=1, seed=1)
    assert "nowhere" in str(info.value) and "sekret-pw" not in str(info.value)


@pytest.mark.parametrize("weddings", [0, 1])
def test_tiny_platforms_still_work(make_database, weddings):
    dsn = make_database()
    summary = demo_data.generate(dsn, weddings=weddings, seed=9, today=TODAY, document_bytes=16)
    assert summary["weddings"] == weddings
    assert summary["rows"]["guests"] >= 20 * weddings
    with psycopg.connect(dsn) as conn:
        dates = [r[0] for r in conn.execute("SELECT wedding_date FROM weddings")]
    assert all(abs((d - TODAY).days) <= 3 for d in dates)  # the first few weddings are this week's


def test_rejects_negative_counts():
    with pytest.raises(ValueError):
        demo_data.generate("postgresql://unused/none", weddings=-1, seed=1)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
