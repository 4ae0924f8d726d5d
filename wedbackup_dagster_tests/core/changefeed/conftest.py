"""Fixtures of the change-feed tests: a demo source with a running feed on its own slot, always dropped
afterwards (a forgotten slot pins WAL and keeps the test database from being dropped)."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from wedbackup_dagster.core.postgres import tenancy
from wedbackup_dagster.core.changefeed import slot as slots
from wedbackup_dagster.core.changefeed.drain import ChangeFeed
from wedbackup_dagster.core.engine import Engine


def drop_test_slots(dsn: str, names: list[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in names:
            slots.drop_slot(conn, name)


@pytest.fixture
def feed_env(demo_env) -> Iterator[dict[str, Any]]:
    """A 12-wedding demo source, its catalogue, an Engine and a started ChangeFeed on a unique slot."""
    env = demo_env(weddings=12, seed=5, document_bytes=64)
    engine = Engine.from_env()
    slot = f"wbt_{uuid.uuid4().hex[:10]}"
    feed = ChangeFeed.from_settings(engine.settings, engine.keyring, engine.catalogue, slot=slot)
    try:
        feed.start()
        yield {**env, "engine": engine, "feed": feed, "slot": slot}
    finally:
        drop_test_slots(env["source"], [slot])
        engine.catalogue.close()


def digest(dsn_or_conn, wedding: str) -> dict[str, tuple[int, str]]:
    """Per tenant table of `wedding`: (rows, md5 of the rows' text in C order), read by the tenancy plan's
    own SELECT: independent of the feed, the segments and the replay."""
    own = isinstance(dsn_or_conn, str)
    conn = psycopg.connect(dsn_or_conn, autocommit=True) if own else dsn_or_conn
    try:
        plan = tenancy.discover(conn)
        out = {}
        for t in plan.tenant_tables:
            q = sql.SQL("SELECT count(*), "
                        "md5(coalesce(string_agg(x::text, E'\\n' ORDER BY x::text COLLATE \"C\"), '')) "
                        "FROM ({}) AS x").format(t.wedding_select())
            out[str(t.table)] = tuple(conn.execute(q, {"wedding_id": wedding}).fetchone())
        return out
    finally:
        if own:
            conn.close()
