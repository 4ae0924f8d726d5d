"""Whole-database comparison for tests, drills by hand and benchmarks: every user table's row count and an
ordered checksum of its rows, so two databases compare equal only when every table holds the same rows."""
from __future__ import annotations

import psycopg
from psycopg import sql


def table_sums(dsn: str) -> dict[str, tuple[int, str]]:
    """Per user table (`schema.table`): row count and the MD5 of its rows in a fixed order."""
    out = {}
    with psycopg.connect(dsn) as conn:
        tables = conn.execute("SELECT table_schema, table_name FROM information_schema.tables "
                              "WHERE table_type = 'BASE TABLE' AND table_schema NOT IN "
                              "('pg_catalog', 'information_schema') ORDER BY 1, 2").fetchall()
        for schema, name in tables:
            count, digest = conn.execute(sql.SQL(
                "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {} t").format(
                sql.Identifier(schema, name))).fetchone()
            out[f"{schema}.{name}"] = (count, digest)
    return out
