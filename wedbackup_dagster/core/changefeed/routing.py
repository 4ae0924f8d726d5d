"""Each decoded change to the wedding its row belongs to, by the same tenancy plan as snapshots.

A row with the wedding column is routed by it; a child row without one by its foreign key to a parent,
whose wedding comes from the feed's (table, key columns, key) → wedding map. The map is seeded from one
snapshot when the feed starts and kept by the feed itself (every insert and update of a table other tables
point at records where its key now belongs). A DELETE carries only the replica identity (the primary key),
so it is routed by the deleted row's own map entry, or by its whole old row under REPLICA IDENTITY FULL.

A row whose wedding changes is a delete in the old wedding and an insert in the new one. A row that other
tables point at (a guest with dietary rows) moving between weddings takes its children along without them
appearing in the feed: that is a barrier for both weddings (a fresh snapshot restores continuity).

The platform partition is one more partition here, as in snapshots: a change of a published platform table,
and of a tenant row that reaches no wedding (a NULL along its path, or a parent the map does not hold), goes
to it."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from wedbackup_dagster.core.partitions import PLATFORM
from wedbackup_dagster.core.postgres import tenancy

from .decode import UNCHANGED, Change, Relation

RouteKey = tuple[str, str, str]  # (table, key columns joined by ",", key values as JSON)


def route_key(table: str, cols: Iterable[str], values: Iterable[Any]) -> RouteKey:
    return table, ",".join(cols), json.dumps(list(values), separators=(",", ":"))


@dataclass
class Routed:
    """One change as a wedding's segment records it: op I (insert a whole row), U (update the row with key
    `key` to `row`, UNCHANGED columns left out) or D (delete the row with key `key`)."""

    partition: str
    op: str
    table: str
    row: dict[str, Any] | None
    key: dict[str, Any] | None


class Router:
    def __init__(self, plan: tenancy.TenancyPlan, lookup: Callable[[list[RouteKey]], dict[RouteKey, str]]):
        self.plan = plan
        self._lookup = lookup
        self.tables = {str(t.table): t for t in plan.tenant_tables}
        # Platform tables the publication holds (slot.published_tables: those with a primary key).
        self.platform_tables = {str(t.table): t for t in plan.platform_tables if t.keyed}
        self.root = str(plan.root)
        # Column sets other tables point at, per table: what the map must know of its rows.
        self.referenced: dict[str, set[tuple[str, ...]]] = {name: set() for name in self.tables}
        for t in plan.tenant_tables:
            if t.path:
                self.referenced[str(t.path[0].parent)].add(t.path[0].parent_columns)
        for name, t in self.tables.items():
            if t.keyed:
                self.referenced[name].add(t.order_by)
        self.cache: dict[RouteKey, str | None] = {}
        self.changed: dict[RouteKey, str | None] = {}  # what this batch changed in the map (None: removed)
        self.unrouted = 0  # changes of tables the plan does not know (not published: none expected)

    # ---- the map -----------------------------------------------------------------------------------
    def _get(self, key: RouteKey) -> str | None:
        if key not in self.cache:
            self.cache.update(self._lookup([key]))
            self.cache.setdefault(key, None)
        return self.cache[key]

    def _set(self, key: RouteKey, partition: str | None) -> None:
        self.cache[key] = partition
        self.changed[key] = partition

    def prefetch(self, changes: Iterable[Change]) -> None:
        """One lookup for every map entry a batch may read (fewer round trips than one per change)."""
        wanted: set[RouteKey] = set()
        for ch in changes:
            name = ch.relation.table
            t = self.tables.get(name)
            if t is None:
                continue
            for values in (ch.new, ch.old):
                if values is None:
                    continue
                row = dict(zip(ch.relation.column_names, values))
                if t.path:
                    hop = t.path[0]
                    vals = [row.get(c) for c in hop.child_columns]
                    if all(v is not None and v is not UNCHANGED for v in vals):
                        wanted.add(route_key(str(hop.parent), hop.parent_columns, vals))
                if t.keyed and all(row.get(c) is not None for c in t.order_by):
                    wanted.add(route_key(name, t.order_by, [row[c] for c in t.order_by]))
        missing = [k for k in wanted if k not in self.cache]
        if missing:
            found = self._lookup(missing)
            for k in missing:
                self.cache[k] = found.get(k)

    # ---- routing -----------------------------------------------------------------------------------
    def is_tenant(self, relation: Relation) -> bool:
        return relation.table in self.tables

    def is_platform(self, relation: Relation) -> bool:
        return relation.table in self.platform_tables

    def _route_platform(self, ch: Change) -> list[Routed]:
        """A change of a platform table: to the platform partition, by its primary key."""
        name = ch.relation.table
        t = self.platform_tables[name]
        cols = ch.relation.column_names
        new = dict(zip(cols, ch.new)) if ch.new is not None else None
        old = dict(zip(cols, ch.old)) if ch.old is not None else None
        if ch.op == "I":
            return [Routed(PLATFORM, "I", name, new, None)]
        key_row = old if old is not None else new
        key = {c: key_row.get(c) for c in t.order_by}
        if ch.op == "D":
            return [Routed(PLATFORM, "D", name, None, key)]
        return [Routed(PLATFORM, "U", name, {c: v for c, v in new.items() if v is not UNCHANGED}, key)]

    def wedding_of_row(self, t: tenancy.TenantTable, row: dict[str, Any]) -> str | None:
        """The wedding of a whole row, by its own columns: the root's key, else its parent's map entry."""
        if not t.path:
            vals = [row.get(c) for c in self.plan.root_key]
            return None if any(v is None for v in vals) else ",".join(vals)
        hop = t.path[0]
        vals = [row.get(c) for c in hop.child_columns]
        if any(v is None or v is UNCHANGED for v in vals):
            return None  # a NULL along the path: the row is the platform's
        return self._get(route_key(str(hop.parent), hop.parent_columns, vals))

    def wedding_of_key(self, t: tenancy.TenantTable, key: dict[str, Any]) -> str | None:
        if not t.path:
            return self.wedding_of_row(t, key)
        if not t.keyed:
            return None
        return self._get(route_key(str(t.table), t.order_by, [key.get(c) for c in t.order_by]))

    def _remember(self, t: tenancy.TenantTable, row: dict[str, Any], partition: str | None) -> None:
        name = str(t.table)
        for cols in self.referenced[name]:
            vals = [row.get(c) for c in cols]
            if any(v is None or v is UNCHANGED for v in vals):
                continue
            self._set(route_key(name, cols, vals), partition)

    def _forget(self, t: tenancy.TenantTable, row: dict[str, Any]) -> None:
        self._remember(t, row, None)

    def route(self, ch: Change) -> tuple[list[Routed], list[tuple[str, str]]]:
        """The segment entries of one change, and barriers as (wedding, reason)."""
        name = ch.relation.table
        if name in self.platform_tables:
            return self._route_platform(ch), []
        t = self.tables.get(name)
        if t is None:
            self.unrouted += 1
            return [], []
        cols = ch.relation.column_names
        key_cols = t.order_by if t.keyed else cols
        new = dict(zip(cols, ch.new)) if ch.new is not None else None
        old = dict(zip(cols, ch.old)) if ch.old is not None else None
        if ch.op == "I":
            wedding = self.wedding_of_row(t, new)
            self._remember(t, new, wedding)
            return [Routed(wedding or PLATFORM, "I", name, new, None)], []
        if ch.op == "D":
            wedding = (self.wedding_of_row(t, old) if ch.old_kind == "O" and t.path else None) or \
                self.wedding_of_key(t, old)
            if t.keyed:
                self._forget(t, {c: old.get(c) for c in t.order_by})
            return [Routed(wedding or PLATFORM, "D", name, None, {c: old.get(c) for c in key_cols})], []
        # UPDATE: the old key is in `old` when the key changed (or under FULL), else it is the new row's.
        old_key_row = old if old is not None else new
        if ch.old_kind == "O" and t.path:
            before = self.wedding_of_row(t, old)
        else:
            before = self.wedding_of_key(t, {c: old_key_row.get(c) for c in key_cols})
        merged = dict(new)
        if ch.old_kind == "O":  # REPLICA IDENTITY FULL: unchanged TOASTed values are in the old row
            merged.update({c: old[c] for c, v in new.items() if v is UNCHANGED})
        after = self.wedding_of_row(t, merged)
        if t.keyed and old is not None:
            self._forget(t, {c: old.get(c) for c in t.order_by})
        self._remember(t, merged, after)
        key = {c: old_key_row.get(c) for c in key_cols}
        # The map holds weddings only: a row of none is the platform's, a partition like the others from here on.
        before, after = before or PLATFORM, after or PLATFORM
        if before == after:
            row = {c: v for c, v in merged.items() if v is not UNCHANGED}
            return [Routed(after, "U", name, row, key)], []
        out: list[Routed] = []
        barriers: list[tuple[str, str]] = []
        out.append(Routed(before, "D", name, None, key))
        if any(v is UNCHANGED for v in merged.values()):
            barriers.append((after, f"a row of {name} moved in from {_label(before)} with an unchanged TOASTed "
                                    f"value the feed did not carry (REPLICA IDENTITY FULL on {name} carries it)"))
        else:
            out.append(Routed(after, "I", name, merged, None))
        if self.is_parent(name):
            for w in (before, after):
                barriers.append((w, f"a row of {name} (a parent of other tables) moved from {_label(before)} to "
                                    f"{_label(after)}: its child rows moved with it without a change of their own"))
        return out, barriers

    def is_parent(self, name: str) -> bool:
        return any(t.path and str(t.path[0].parent) == name for t in self.plan.tenant_tables)


def _label(partition: str) -> str:
    return "the platform partition" if partition == PLATFORM else f"wedding {partition}"


def seed_routes(conn, plan: tenancy.TenancyPlan) -> list[RouteKey | tuple[str, str, str, str]]:
    """Every (table, key columns, key) → wedding entry the map needs, read from `conn`'s current snapshot
    (the caller opens it REPEATABLE READ and records its pg_current_snapshot()). Parents first, so each
    table's rows are routed along its own path, as `wedding_select` does."""
    router = Router(plan, lambda keys: {})
    out = []
    for t in plan.tenant_tables:
        name = str(t.table)
        wanted = sorted(router.referenced[name])
        if not wanted:
            continue
        tables = [t.table] + [h.parent for h in t.path]
        alias = [sql.Identifier(f"s{i}") for i in range(len(tables))]
        joins = [sql.SQL("{} AS {}").format(t.exact(), alias[0])]
        for i, hop in enumerate(t.path, start=1):
            on = sql.SQL(" AND ").join(sql.SQL("{}.{} = {}.{}").format(alias[i], sql.Identifier(p), alias[i - 1],
                                                                       sql.Identifier(c))
                                       for c, p in zip(hop.child_columns, hop.parent_columns))
            joins.append(sql.SQL("JOIN {} AS {} ON {}").format(hop.parent.ident(), alias[i], on))
        wedding = sql.SQL(" || ',' || ").join(sql.SQL("{}.{}::text").format(alias[-1], sql.Identifier(c))
                                              for c in plan.root_key)
        flat = sorted({c for cols in wanted for c in cols})
        query = sql.SQL("SELECT {w}, {cols} FROM {joins}").format(
            w=wedding,
            cols=sql.SQL(", ").join(sql.SQL("{}.{}::text").format(alias[0], sql.Identifier(c)) for c in flat),
            joins=sql.SQL(" ").join(joins))
        for row in conn.execute(query):
            values = dict(zip(flat, row[1:]))
            for cols in wanted:
                vals = [values[c] for c in cols]
                if all(v is not None for v in vals):
                    out.append((*route_key(name, cols, vals), row[0]))
    return out
