"""Which weddings exist in the source database right now (the partition keys to back up, with their
dates), and which of them changed since an updated_at watermark."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, timezone

import psycopg
from psycopg import sql

from wedbackup_dagster.core.postgres.snapshot import database_label, row_security_refusal
from wedbackup_dagster.core.postgres.tenancy import TableName, discover
from wedbackup_dagster.core.partitions import PLATFORM



@contextmanager
def _source(source_dsn: str, what: str, *, repeatable_read: bool = False) -> Iterator[psycopg.Connection]:
    """A connection to the source that reads with row_security off, as the snapshot does: a role that
    a row-level security policy would show fewer rows gets an error naming the table, instead of
    silently not finding weddings (or their changes)."""
    with psycopg.connect(source_dsn) as conn:
        if repeatable_read:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
        conn.execute("SET row_security = off")
        try:
            yield conn
        except psycopg.errors.InsufficientPrivilege as exc:
            refusal = row_security_refusal(exc, f"{what} in {database_label(source_dsn)}", conn.info.user)
            if refusal is None:
                raise
            raise refusal from None


def wedding_ids(source_dsn: str, root: TableName = TableName("public", "weddings"), key: str = "id") -> list[str]:
    """Every wedding id, as partition keys, in id order."""
    with _source(source_dsn, "listing weddings") as conn:
        # Alias the text form: `ORDER BY id` would otherwise sort the text (1, 10, 100, 2, …).
        rows = conn.execute(sql.SQL("SELECT {k}::text AS partition_key FROM {t} ORDER BY {k}").format(
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


def wedding_dates(source_dsn: str, root: TableName = TableName("public", "weddings"), key: str = "id",
                  date_column: str = "wedding_date") -> list[tuple[str, date]]:
    """Every wedding id (as a partition key) with its date, in id order: what discovery and tiers need."""
    with _source(source_dsn, "listing weddings") as conn:
        # Ordered by the table's own column: a bare `ORDER BY id` would sort the text output column.
        return conn.execute(sql.SQL("SELECT w.{k}::text, w.{d} FROM {t} AS w ORDER BY w.{k}").format(
            k=sql.Identifier(key), d=sql.Identifier(date_column), t=root.ident())).fetchall()


def digest(rows: Iterable[tuple[str, date | None]]) -> str:
    """A short fingerprint of the partition list: equal digests mean nothing to add, remove or re-date."""
    h = hashlib.sha256()
    for partition, wedding_date in rows:
        h.update(f"{partition}\t{wedding_date}\n".encode())
    return h.hexdigest()[:32]


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def changed_weddings(source_dsn: str, since: datetime | None, *, column: str = "updated_at",
                     root: TableName = TableName("public", "weddings"), weddings: bool = True
                     ) -> tuple[dict[str, datetime], datetime]:
    """Which weddings (and `platform`) have rows whose `column` is newer than `since`, with the newest
    such time each, and the new watermark (the newest time seen, else `since`). One snapshot across
    every table that has the column; tables without it are invisible here (see README, Automation).
    `weddings=False`: the platform's tables only (a change feed decides for the weddings)."""
    since = since or EPOCH
    changes: dict[str, datetime] = {}
    with _source(source_dsn, "looking for changed weddings", repeatable_read=True) as conn:
        plan = discover(conn, root)
        for table in plan.tenant_tables:
            if column not in table.columns or not weddings:
                continue
            # The same join chain as the snapshot's wedding filter, grouped by the wedding id it ends in.
            joined, id_columns = table._reach()
            wedding = sql.Identifier(f"t{len(joined) - 1}", id_columns[0])
            stamp = sql.Identifier("t0", column)
            query = sql.SQL("SELECT {w}::text, max({s}) FROM {chain} WHERE {s} > %s AND {w} IS NOT NULL "
                            "GROUP BY 1").format(w=wedding, s=stamp, chain=table._join_chain(joined, 0))
            for wedding_id, at in conn.execute(query, (since,)):
                if at > changes.get(wedding_id, EPOCH):
                    changes[wedding_id] = at
        for table in plan.platform_tables:
            if column not in table.columns:
                continue
            at = conn.execute(sql.SQL("SELECT max({c}) FROM {t} WHERE {c} > %s").format(
                c=sql.Identifier(column), t=table.table.ident()), (since,)).fetchone()[0]
            if at is not None and at > changes.get(PLATFORM, EPOCH):
                changes[PLATFORM] = at
    watermark = max([since, *changes.values()])
    return changes, watermark

