"""Which weddings exist in the source database right now: the partition keys to back up."""
from __future__ import annotations

import psycopg
from psycopg import sql

from .tenancy import TableName

PLATFORM = "platform"


def wedding_ids(source_dsn: str, root: TableName = TableName("public", "weddings"), key: str = "id") -> list[str]:
    """Every wedding id, as partition keys, in id order."""
    with psycopg.connect(source_dsn) as conn:
        rows = conn.execute(sql.SQL("SELECT {k}::text FROM {t} ORDER BY {k}").format(
            k=sql.Identifier(key), t=root.ident())).fetchall()
    return [r[0] for r in rows]


def contiguous_ranges(selected: list[str], ordered: list[str]) -> list[tuple[str, str]]:
    """Group `selected` keys into runs of neighbours in `ordered` (the partitions' insertion order):
    Dagster runs one partition range per run, so scattered weddings need several ranges."""
    wanted = set(selected)
    missing = wanted.difference(ordered)
    if missing:
        raise ValueError(f"unknown partition(s): {', '.join(sorted(missing)[:10])}")
    ranges: list[tuple[str, str]] = []
    start = prev = None
    for k in ordered:
        if k in wanted:
            if start is None:
                start = k
            prev = k
        elif start is not None:
            ranges.append((start, prev))
            start = None
    if start is not None:
        ranges.append((start, prev))
    return ranges
