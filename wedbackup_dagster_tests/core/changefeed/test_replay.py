"""Replay in every restore mode, on the real stack: dry runs (into an empty database, a non-empty one, in
place, into a schema) report the wedding as of T; an in-place restore whose wedding had a row that another
wedding holds now refuses naming the row and that wedding, or with skip_moved_rows restores the rest, and the
other wedding stays untouched either way; an unchanged TOASTed value survives an UPDATE of another column."""
from __future__ import annotations

import time

import psycopg
import pytest
from psycopg import sql

from wedbackup_dagster.core.changefeed.segments import read_segment, segment_vault
from wedbackup_dagster.core.errors import RestoreError
from wedbackup_dagster.core.postgres.restore_wedding import RecoveryRequest, recover

from .conftest import digest


def _now(dsn: str):
    with psycopg.connect(dsn, autocommit=True) as conn:
        (now,) = conn.execute("SELECT clock_timestamp()").fetchone()
    time.sleep(0.01)
    return now


def _write(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for q in statements:
            conn.execute(q)


def _drain_past(feed, at) -> None:
    """Drain until the feed's coverage reaches `at` (a pass stops at the start of a write transaction still
    open on the server, anyone's)."""
    deadline = time.monotonic() + 30
    while True:
        feed.drain()
        if feed.store.live_feed(feed.slot)["covered_until"] >= at or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def _back_up(engine, *weddings: str) -> None:
    with engine.snapshot_session() as session:
        for w in weddings:
            engine.back_up(w, session)


def _request(wedding: str, mode: str, at, **kw) -> RecoveryRequest:
    return RecoveryRequest(partition=wedding, mode=mode, as_of=at, include_unverified=True, **kw)


def _schema_digest(dsn: str, schema: str, expected: dict) -> dict:
    """The same digest as conftest.digest, read from an inspection schema's copies (one wedding each)."""
    out = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in expected:
            _, table = name.split(".", 1)
            cols = [r[0] for r in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
                "AND attgenerated = '' ORDER BY attnum", (f'"{schema}"."{table}"',)).fetchall()]
            q = sql.SQL("SELECT count(*), md5(coalesce(string_agg(x::text, E'\\n' ORDER BY x::text COLLATE \"C\"), "
                        "'')) FROM (SELECT {} FROM {}) AS x").format(
                sql.SQL(", ").join(map(sql.Identifier, cols)), sql.Identifier(schema, table))
            out[name] = tuple(conn.execute(q).fetchone())
    return out


def test_dry_runs_and_the_inspection_schema_replay_to_the_second(feed_env, make_database):
    engine, feed, source = feed_env["engine"], feed_env["feed"], feed_env["source"]
    _back_up(engine, "3")
    _write(source, "INSERT INTO guests (wedding_id, first_name, last_name) VALUES (3, 'Dry', 'Run')",
           "DELETE FROM guest_dietary WHERE guest_id IN (SELECT id FROM guests WHERE wedding_id = 3)",
           "UPDATE weddings SET venue = 'as of T' WHERE id = 3")
    at = _now(source)
    expected = digest(source, "3")
    _write(source, "DELETE FROM guests WHERE wedding_id = 3 AND id % 3 = 0",
           "UPDATE weddings SET venue = 'after T' WHERE id = 3")
    _drain_past(feed, at)
    rows_at = {name: rows for name, (rows, _) in expected.items()}

    # In place, dry: the stage is the wedding at T; the diff against the live rows is the damage done after T.
    dry = recover(engine, _request("3", "in_place", at, dry_run=True), {})
    assert dry.dry_run and dry.replay["changes"] > 0
    assert {t.table: t.archive_rows for t in dry.tables} == rows_at
    assert dry.totals["add"] > 0 and dry.totals["change"] >= 1  # the deleted guests, the venue
    assert digest(source, "3") != expected  # nothing written
    # As of now (all captured), the stage equals the live rows: nothing to add, remove or change.
    now = recover(engine, _request("3", "in_place", feed.store.live_feed(feed.slot)["covered_until"],
                                   dry_run=True), {})
    assert (now.totals["add"], now.totals["remove"], now.totals["change"]) == (0, 0, 0)

    # Into an empty database, dry: the counts at T, from the snapshot's and the segments' counts.
    empty = make_database()
    dry = recover(engine, _request("3", "target", at, dry_run=True), {}, target_dsn=empty)
    assert {t.table: t.archive_rows for t in dry.tables} == rows_at and dry.replay["changes"] > 0
    # Into a database holding the wedding as of T already: the dry run finds nothing to change.
    recover(engine, _request("3", "target", at), {}, target_dsn=empty)
    assert digest(empty, "3") == expected
    dry = recover(engine, _request("3", "target", at, dry_run=True), {}, target_dsn=empty)
    assert (dry.totals["add"], dry.totals["remove"], dry.totals["change"]) == (0, 0, 0)
    assert dry.totals["archive_rows"] == sum(rows_at.values())

    # Into a schema: dry writes nothing; for real, every copy equals the source's digest at T.
    recover(engine, _request("3", "schema", at, dry_run=True, schema="w3_dry"), {})
    with psycopg.connect(source, autocommit=True) as conn:
        assert not conn.execute("SELECT FROM pg_namespace WHERE nspname = 'w3_dry'").fetchall()
    report = recover(engine, _request("3", "schema", at, schema="w3_then"), {})
    assert report.replay["changes"] > 0
    assert _schema_digest(source, "w3_then", expected) == expected


def test_in_place_with_a_row_now_held_by_another_wedding_refuses_or_skips_it_and_never_touches_that_wedding(
        feed_env, tmp_path, monkeypatch, capsys):
    engine, feed, source = feed_env["engine"], feed_env["feed"], feed_env["source"]
    _back_up(engine, "2", "3")
    with psycopg.connect(source, autocommit=True) as conn:
        (away,) = conn.execute("SELECT min(id) FROM timeline_events e WHERE wedding_id = 2 AND parent_event_id IS NULL "
                               "AND NOT EXISTS (SELECT FROM timeline_events c WHERE c.parent_event_id = e.id)"
                               ).fetchone()
        (into,) = conn.execute("SELECT min(id) FROM timeline_events e WHERE wedding_id = 3 AND parent_event_id IS NULL "
                               "AND NOT EXISTS (SELECT FROM timeline_events c WHERE c.parent_event_id = e.id)"
                               ).fetchone()
        (diet,) = conn.execute("SELECT min(d.id) FROM guest_dietary d JOIN guests g ON g.id = d.guest_id "
                               "WHERE g.wedding_id = 2").fetchone()
        (guest3,) = conn.execute("SELECT min(id) FROM guests WHERE wedding_id = 3").fetchone()
    # Before T (inside the replay): one event leaves wedding 2, another comes in from 3.
    _write(source, f"UPDATE timeline_events SET wedding_id = 3 WHERE id = {away}",
           f"UPDATE timeline_events SET wedding_id = 2 WHERE id = {into}",
           "UPDATE weddings SET venue = 'at T' WHERE id = 2")
    at = _now(source)
    expected = digest(source, "2")
    # After T: a dietary row of wedding 2 (no wedding column, no updated_at) moves to wedding 3's guest.
    _write(source, f"UPDATE guest_dietary SET guest_id = {guest3} WHERE id = {diet}",
           "UPDATE weddings SET venue = 'damaged' WHERE id = 2", "DELETE FROM guests WHERE wedding_id = 2 AND id % 2 = 0")
    _drain_past(feed, at)
    before_3, before_2 = digest(source, "3"), digest(source, "2")

    dry = recover(engine, _request("2", "in_place", at, dry_run=True), {})
    assert [(m["table"], m["key"], m["owner"], m["skipped"]) for m in dry.moved_rows] == [
        ("public.guest_dietary", f"(id)=({diet})", "wedding 3", False)]
    assert any(f"(id)=({diet}) now belongs to wedding 3: refused" in line for line in dry.lines())
    with pytest.raises(RestoreError, match=rf"public\.guest_dietary \(id\)=\({diet}\) \(now wedding 3\).*nothing was "
                                           r"written.*--skip-moved-rows"):
        recover(engine, _request("2", "in_place", at), {})
    assert digest(source, "2") == before_2 and digest(source, "3") == before_3

    # Through the command line and the restore_wedding job: --skip-moved-rows restores the rest and says so.
    from wedbackup_dagster.cli.app import main

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    capsys.readouterr()
    assert main(["restore", "--wedding", "2", "--in-place", "--as-of", at.isoformat(), "--include-unverified",
                 "--skip-moved-rows"]) == 0
    assert f"row public.guest_dietary (id)=({diet}) now belongs to wedding 3: left there" in capsys.readouterr().out
    assert digest(source, "3") == before_3  # the other wedding: untouched, the moved row still its own
    got = digest(source, "2")
    assert {k: v for k, v in got.items() if k != "public.guest_dietary"} == {
        k: v for k, v in expected.items() if k != "public.guest_dietary"}
    assert got["public.guest_dietary"][0] == expected["public.guest_dietary"][0] - 1  # all but the moved row
    with psycopg.connect(source, autocommit=True) as conn:
        assert conn.execute("SELECT wedding_id FROM timeline_events WHERE id = %s", (into,)).fetchone() == (2,)
        assert conn.execute("SELECT wedding_id FROM timeline_events WHERE id = %s", (away,)).fetchone() == (3,)


def test_an_unchanged_toasted_value_keeps_its_value_through_replay(feed_env, make_database):
    engine, feed, source = feed_env["engine"], feed_env["feed"], feed_env["source"]
    with psycopg.connect(source, autocommit=True) as conn:
        (doc,) = conn.execute("SELECT min(id) FROM documents WHERE wedding_id = 5").fetchone()
        # 32 kB of random bytes: incompressible, so stored out of line (TOASTed), not inline.
        conn.execute("UPDATE documents SET content = (SELECT decode(string_agg(md5(random()::text), ''), 'hex') "
                     "FROM generate_series(1, 2048)) WHERE id = %s", (doc,))
        (external,) = conn.execute("SELECT pg_column_size(content) > 8000 FROM documents WHERE id = %s",
                                   (doc,)).fetchone()
    assert external
    _back_up(engine, "5")  # the snapshot holds the large value
    _write(source, f"UPDATE documents SET filename = 'renamed.pdf' WHERE id = {doc}")  # content unchanged
    at = _now(source)
    expected = digest(source, "5")
    _write(source, f"UPDATE documents SET mime = 'text/plain' WHERE id = {doc}")
    _drain_past(feed, at)
    # The feed carried the UPDATE without the value (the unchanged-TOAST marker), so replay had to keep it.
    vault = segment_vault(engine.settings.vault_dir)
    rows = []
    for seg in feed.store.segments("5"):
        with open(vault.path_for("5", seg["sha256"]), "rb") as fh:
            opened = read_segment(fh, name=seg["sha256"], resolve_key=engine.resolve_key)
        rows += [row for t in opened.transactions for op, name, row, _ in t["changes"]
                 if name == "public.documents" and op == "U"]
    assert "content" in rows[0]  # the UPDATE that set it, before the snapshot
    assert [r["filename"] for r in rows[1:]] == ["renamed.pdf"] * 2 and all("content" not in r for r in rows[1:])

    target = make_database()
    recover(engine, _request("5", "target", at), {}, target_dsn=target)
    assert digest(target, "5") == expected
    report = recover(engine, _request("5", "schema", at, schema="w5_then"), {})
    assert report.replay["changes"] >= 1 and _schema_digest(source, "w5_then", expected) == expected
    recover(engine, _request("5", "in_place", at), {})
    assert digest(source, "5") == expected


def test_an_as_of_before_the_first_snapshot_is_refused_naming_the_oldest_point(feed_env, make_database):
    from wedbackup_dagster.core.errors import WedbackupError

    engine, feed, source = feed_env["engine"], feed_env["feed"], feed_env["source"]
    before = _now(source)
    _back_up(engine, "8")
    _write(source, "UPDATE weddings SET venue = 'after the snapshot' WHERE id = 8")
    _drain_past(feed, _now(source))
    with psycopg.connect(engine.settings.catalogue_dsn) as conn:
        (first,) = conn.execute("SELECT min(snapshot_time) FROM wedbackup.backups WHERE partition = '8'").fetchone()
    for mode, kw in (("target", {"target_dsn": make_database()}), ("in_place", {})):
        with pytest.raises(WedbackupError, match=rf"wedding 8.* has no backup at or before "
                                                 rf"{before.isoformat().replace('+', '.')}: its oldest is from "
                                                 rf"{first.isoformat().replace('+', '.')}"):
            recover(engine, _request("8", mode, before), {}, **kw)


def _platform_digest(dsn: str) -> dict:
    """Per table of the platform partition: (rows, md5 of the rows' text), by the snapshot's own SELECTs."""
    from wedbackup_dagster.core.postgres import tenancy
    from wedbackup_dagster.core.postgres.snapshot import partition_selects

    with psycopg.connect(dsn, autocommit=True) as conn:
        plan = tenancy.discover(conn)
        return {str(t.table): tuple(conn.execute(sql.SQL(
            "SELECT count(*), md5(coalesce(string_agg(x::text, E'\\n' ORDER BY x::text COLLATE \"C\"), '')) "
            "FROM ({}) AS x").format(select)).fetchone()) for t, select in partition_selects(plan, "platform")}


def test_the_platform_partition_replays_to_the_second(feed_env, make_database):
    engine, feed, source = feed_env["engine"], feed_env["feed"], feed_env["source"]
    _back_up(engine, "platform")
    _write(source, "UPDATE vendors SET city = 'Replayed' WHERE id = (SELECT min(id) FROM vendors)",
           "INSERT INTO feature_flags (key, enabled, rollout_percent) VALUES ('feed-test', true, 40)",
           "DELETE FROM platform_audit WHERE id = (SELECT min(id) FROM platform_audit)")
    at = _now(source)
    expected = _platform_digest(source)
    _write(source, "UPDATE vendors SET city = 'after T'", "DELETE FROM feature_flags WHERE key = 'feed-test'")
    _drain_past(feed, _now(source))
    assert "platform" in {s["partition"] for s in feed.store.segments("platform")}

    target = make_database()
    report = recover(engine, _request("platform", "target", at), {}, target_dsn=target)
    assert report.replay["changes"] >= 3
    assert _platform_digest(target) == expected
    dry = recover(engine, _request("platform", "target", at, dry_run=True), {}, target_dsn=make_database())
    assert {t.table: t.archive_rows for t in dry.tables} == {k: v[0] for k, v in expected.items()}
    dry = recover(engine, _request("platform", "target", at, dry_run=True), {}, target_dsn=target)
    assert (dry.totals["add"], dry.totals["remove"], dry.totals["change"]) == (0, 0, 0)
    # Without --as-of: the newest snapshot, as before the feed (the platform replays to an explicit second only).
    plain = recover(engine, _request("platform", "target", None), {}, target_dsn=make_database())
    assert plain.replay is None
    report = recover(engine, _request("platform", "schema", at, schema="platform_then"), {})
    assert report.replay["changes"] >= 3 and _schema_digest(source, "platform_then", expected) == expected
