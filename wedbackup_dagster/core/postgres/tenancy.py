"""Which rows belong to which wedding: tenant tables are found from the foreign-key graph rooted at
`weddings`, and each is filtered along its shortest FK path; everything no path reaches is platform.

INTERFACE (stable; other modules depend on these names): TableName, Hop, TenantTable, PlatformTable,
TenancyPlan, discover().

The partitions are exact: for every table, the rows of all weddings' `wedding_select()` plus its
`platform_select()` are all its rows, each exactly once. A row belongs to the wedding its FK path
reaches; a row whose path stops short (a NULL anywhere along it, or an orphan: under a NOT VALID
foreign key, or under a validated one that session_replication_role = replica or disabled triggers let
rows break) belongs to the platform, so the partitions together always hold the whole database. Every
referenced key is unique, so no row reaches two weddings.

Routing rules:
- The shortest FK path to the root wins. Self-references never route. Two or more shortest paths
  through different foreign keys (different parents, or different FKs to one parent) are ambiguous:
  `discover` raises TenancyError naming the table and its candidate paths.
- A declaratively partitioned table is one table (its parent); its partitions are not listed. FKs
  declared directly on, or pointing directly at, a single partition are not used for routing.
- Legacy inheritance parents are read with ONLY, so their children's rows are not counted twice; every
  statement that reads, locks or deletes one table's rows addresses exactly that table (`exact()`),
  never its INHERITS children (another wedding's rows may sit there with colliding keys). A
  declaratively partitioned table is addressed without ONLY: its partitions are its rows.

Overrides: a mapping from "schema.table" (unquoted, as `str(TableName)` prints it) to either
- "platform": the table's rows all go to the platform partition, and no other table routes through it;
- a list/tuple of FK constraint names, child-most first (or the same list as {"via": [...]}): the
  path to follow. The first constraint is on the table itself, each next one on the table the
  previous one points at. The list may stop before the root: the rest is that table's own path.
An unknown table or constraint, a broken chain, or a path that never reaches a wedding raises
TenancyError naming it.
"""
from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from psycopg import sql

from wedbackup_dagster.core.errors import TenancyError
from wedbackup_dagster.core.partitions import PLATFORM


# Collation-independent ordering, so a checksum taken on the source and on a restore in a database
# with another default collation sees the rows in the same order.
_C_COLLATION = sql.Identifier("C")


@dataclass(frozen=True, order=True)
class TableName:
    schema: str
    name: str

    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    def __str__(self) -> str:  # for people and manifests: schema.name, unquoted
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class Hop:
    """One foreign key followed from `child` to `parent` (columns matched pairwise)."""

    child: TableName
    child_columns: tuple[str, ...]
    parent: TableName
    parent_columns: tuple[str, ...]
    nullable: bool  # True when any child column may be NULL (the row may then belong to no wedding)
    constraint: str = ""  # the FK constraint's name, as overrides and error messages spell it
    validated: bool = True  # False for a NOT VALID FK: rows may point at parents that do not exist


@dataclass(frozen=True)
class TenantTable:
    """A table whose rows belong to weddings, reached from the root by `path` (empty for the root)."""

    table: TableName
    columns: tuple[str, ...]  # stored (non-generated) columns in attnum order: what COPY moves
    order_by: tuple[str, ...]  # primary key, else every column: a deterministic order for checksums
    path: tuple[Hop, ...]
    root_key: tuple[str, ...] = ("id",)  # the root's key the wedding_id parameter is compared with
    collatable: frozenset[str] = frozenset()  # columns of collatable types: ordered with COLLATE "C"
    keyed: bool = True  # order_by is the primary key; else rows are ordered by every column's text
    only: frozenset[TableName] = frozenset()  # tables with inheritance children: read with ONLY

    def wedding_select(self) -> sql.Composed:
        """SELECT of this table's rows for one wedding; one parameter `%(wedding_id)s`."""
        joined, last_filter_cols = self._reach()
        alias = _alias(len(joined) - 1)
        where = sql.SQL(" AND ").join(
            sql.SQL("{} = %(wedding_id)s").format(sql.Identifier(alias, c)) for c in last_filter_cols)
        return sql.SQL("SELECT {cols} FROM {from_} WHERE {where} ORDER BY {order}").format(
            cols=_select_list(self.columns), from_=self._join_chain(joined, 0), where=where,
            order=_order_list(self.order_by, self.collatable, self.keyed))

    def wedding_batch_select(self) -> sql.Composed:
        """SELECT of this table's rows for many weddings at once; one parameter `%(wedding_ids)s`, an
        array of wedding ids. Each row is prefixed with the wedding-filter column, and rows come grouped
        by it; within a wedding, rows, their order and their text are exactly `wedding_select()`'s."""
        joined, last_filter_cols = self._reach()
        if len(last_filter_cols) != 1:
            raise TenancyError(f"{self.table}: a batch SELECT needs a single wedding-filter column, "
                               f"has {list(last_filter_cols)}")
        wedding = sql.Identifier(_alias(len(joined) - 1), last_filter_cols[0])
        return sql.SQL("SELECT {wedding}, {cols} FROM {from_} WHERE {wedding} = ANY(%(wedding_ids)s) "
                       "ORDER BY {wedding}, {order}").format(
            wedding=wedding, cols=_select_list(self.columns), from_=self._join_chain(joined, 0),
            order=_order_list(self.order_by, self.collatable, self.keyed))

    def platform_select(self) -> sql.Composed | None:
        """SELECT of this table's rows that reach no wedding, None for the root: a NULL along the path, or
        a parent that does not exist (an orphan under a NOT VALID foreign key, or under a validated one
        broken by session_replication_role = replica or disabled triggers). The whole chain up to the
        root is joined, so a row is here exactly when no existing wedding's `wedding_select()` holds it."""
        if not self.path:
            return None
        tables = [self.table] + [h.parent for h in self.path]
        first = self.path[0]
        cond = sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(sql.Identifier(_alias(1), p), sql.Identifier(_alias(0), c))
            for c, p in zip(first.child_columns, first.parent_columns))
        where = sql.SQL("NOT EXISTS (SELECT FROM {chain} WHERE {cond})").format(
            chain=self._join_chain(tables, 1), cond=cond)
        return sql.SQL("SELECT {cols} FROM {table} WHERE {where} ORDER BY {order}").format(
            cols=_select_list(self.columns), table=_from_item(self.table, 0, self.only), where=where,
            order=_order_list(self.order_by, self.collatable, self.keyed))

    def wedding_rows(self, expressions: Sequence[sql.Composable], *, lock: bool = False) -> sql.Composed:
        """SELECT of `expressions` (over alias t0, this table) for one wedding's rows, unordered; one
        parameter `%(wedding_id)s`. `lock` adds FOR UPDATE OF t0: the rows of this table only, never
        the parents the path joins through. What restoring a wedding in place locks and deletes by."""
        joined, last_filter_cols = self._reach()
        alias = _alias(len(joined) - 1)
        where = sql.SQL(" AND ").join(
            sql.SQL("{} = %(wedding_id)s").format(sql.Identifier(alias, c)) for c in last_filter_cols)
        return sql.SQL("SELECT {exprs} FROM {from_} WHERE {where}{lock}").format(
            exprs=sql.SQL(", ").join(expressions), from_=self._join_chain(joined, 0), where=where,
            lock=sql.SQL(" FOR UPDATE OF {}").format(sql.Identifier(_alias(0))) if lock else sql.SQL(""))

    def owners(self, expressions: Sequence[sql.Composable]) -> sql.Composed:
        """SELECT of `expressions` (over alias t0, this table) and, as `wb_wedding` (text), the wedding each row
        belongs to, for every row that reaches a wedding: who owns a key now (an in-place restore's check
        that it would take no row from another wedding)."""
        joined, last_filter_cols = self._reach()
        alias = _alias(len(joined) - 1)
        wedding = (sql.SQL("{}::text").format(sql.Identifier(alias, last_filter_cols[0])) if len(last_filter_cols) == 1
                   else sql.SQL("ROW({})::text").format(
                       sql.SQL(", ").join(sql.Identifier(alias, c) for c in last_filter_cols)))
        return sql.SQL("SELECT {exprs}, {wedding} AS wb_wedding FROM {from_}").format(
            exprs=sql.SQL(", ").join(expressions), wedding=wedding, from_=self._join_chain(joined, 0))

    def exact(self) -> sql.Composable:
        """This table in a FROM, DELETE, UPDATE or LOCK: with ONLY when it has inheritance children."""
        return _exact(self.table, self.only)

    def _reach(self) -> tuple[list[TableName], tuple[str, ...]]:
        """Tables to join (this one first) and the columns of the last one that equal the wedding_id.

        The root itself is left out when the last FK is validated and points at the root key: the
        FK column then holds the wedding_id, and the index on it serves the filter directly."""
        tables = [self.table] + [h.parent for h in self.path]
        if self.path:
            last = self.path[-1]
            if last.validated and last.parent_columns == self.root_key:
                return tables[:-1], last.child_columns
        return tables, self.root_key

    def _join_chain(self, tables: list[TableName], start: int) -> sql.Composable:
        """`tables[start:]` joined hop by hop along the path (aliases t<i> follow the path index)."""
        parts: list[sql.Composable] = [_from_item(tables[start], start, self.only)]
        for i in range(start + 1, len(tables)):
            hop = self.path[i - 1]
            on = sql.SQL(" AND ").join(
                sql.SQL("{} = {}").format(sql.Identifier(_alias(i), p), sql.Identifier(_alias(i - 1), c))
                for c, p in zip(hop.child_columns, hop.parent_columns))
            parts.append(sql.SQL("JOIN {} ON {}").format(_from_item(tables[i], i, self.only), on))
        return sql.SQL(" ").join(parts)


@dataclass(frozen=True)
class PlatformTable:
    """A table no FK path links to a wedding: all its rows belong to the platform partition."""

    table: TableName
    columns: tuple[str, ...]
    order_by: tuple[str, ...]
    collatable: frozenset[str] = frozenset()
    keyed: bool = True
    only: bool = False  # the table has inheritance children: read its own rows only

    def exact(self) -> sql.Composable:
        """This table in a FROM, DELETE, UPDATE or LOCK: with ONLY when it has inheritance children."""
        return _exact(self.table, frozenset({self.table}) if self.only else frozenset())

    def platform_select(self) -> sql.Composed:
        only = frozenset({self.table}) if self.only else frozenset()
        return sql.SQL("SELECT {cols} FROM {table} ORDER BY {order}").format(
            cols=_select_list(self.columns), table=_from_item(self.table, 0, only),
            order=_order_list(self.order_by, self.collatable, self.keyed))


@dataclass(frozen=True)
class TenancyPlan:
    root: TableName
    root_key: tuple[str, ...]  # the root's primary key columns, e.g. ("id",)
    tenant_tables: tuple[TenantTable, ...]  # parents before children (FK-topological), root first
    platform_tables: tuple[PlatformTable, ...]
    fingerprint: str = field(default="")  # hash of the FK graph and columns the plan was built from

    def find(self, table: TableName) -> TenantTable | PlatformTable | None:
        for t in (*self.tenant_tables, *self.platform_tables):
            if t.table == table:
                return t
        return None

    def exact(self, table: TableName) -> sql.Composable:
        """Any table addressed exactly: as the plan knows it, else (a single partition, which plans leave
        out) with ONLY, which for an ordinary table is the table itself."""
        found = self.find(table)
        return found.exact() if found is not None else sql.SQL("ONLY {}").format(table.ident())


# --- SQL pieces -------------------------------------------------------------------------------------

def _alias(i: int) -> str:
    return f"t{i}"


def _exact(table: TableName, only: frozenset[TableName]) -> sql.Composable:
    return sql.SQL("ONLY {}").format(table.ident()) if table in only else table.ident()


def _from_item(table: TableName, i: int, only: frozenset[TableName]) -> sql.Composable:
    return sql.SQL("{} AS {}").format(_exact(table, only), sql.Identifier(_alias(i)))


def _select_list(columns: Sequence[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(_alias(0), c) for c in columns)


def _order_list(order_by: Sequence[str], collatable: frozenset[str], keyed: bool) -> sql.Composable:
    items = []
    for c in order_by:
        col = sql.Identifier(_alias(0), c)
        if not keyed:
            # Without a key, rows are ordered by their text form: every type has one (json, point and
            # xml have no ordering), and rows with equal text are identical in COPY output anyway.
            items.append(sql.SQL("({}::text) COLLATE {}").format(col, _C_COLLATION))
        elif c in collatable:
            items.append(sql.SQL("{} COLLATE {}").format(col, _C_COLLATION))
        else:
            items.append(col)
    if not items:  # a table without columns: every row is the same empty line
        return sql.SQL("1")
    return sql.SQL(", ").join(items)


# --- catalogue --------------------------------------------------------------------------------------

# System schemas (pg_catalog, pg_toast, pg_temp_N, ...) all start with pg_; partitions are skipped
# because COPY from the partitioned parent already covers them.
_TABLES_SQL = """
SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text, c.relhassubclass,
       a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attgenerated::text,
       a.attcollation <> 0
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
ORDER BY c.oid, a.attnum
"""

# conparentid = 0 keeps the constraint declared on a partitioned parent and drops the copies
# PostgreSQL clones onto each partition.
_CONSTRAINTS_SQL = """
SELECT con.conname::text, con.contype::text, con.conrelid, con.confrelid, con.convalidated,
       ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum ORDER BY k.ord),
       ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum ORDER BY k.ord)
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE con.contype IN ('p', 'f') AND con.conparentid = 0
  AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
ORDER BY con.conrelid, con.conname
"""


@dataclass
class _Table:
    name: TableName
    relkind: str
    has_children: bool
    columns: list[tuple[str, str, bool, str, bool]] = field(default_factory=list)  # name,type,notnull,gen,coll
    primary_key: tuple[str, ...] = ()

    @property
    def stored_columns(self) -> tuple[str, ...]:
        return tuple(c[0] for c in self.columns if not c[3])

    @property
    def collatable(self) -> frozenset[str]:
        return frozenset(c[0] for c in self.columns if c[4])

    @property
    def order_by(self) -> tuple[str, ...]:
        return self.primary_key or self.stored_columns

    def not_null(self, column: str) -> bool:
        return next(c[2] for c in self.columns if c[0] == column)


# The comment `restore --into-schema` puts on the schema it makes (core/postgres/restore_wedding.py), followed by the
# partition: a copy for inspection, in no partition (so in no platform backup); erasure drops it.
INSPECTION_MARKER = "wedbackup:inspection-schema:"


def _read_catalogue(conn) -> tuple[dict[TableName, _Table], list[Hop]]:
    with conn.cursor() as cur:
        inspection = {r[0] for r in cur.execute(
            "SELECT nspname::text FROM pg_catalog.pg_namespace WHERE pg_catalog.starts_with(coalesce("
            "pg_catalog.obj_description(oid, 'pg_namespace'), ''), %s)", (INSPECTION_MARKER,))}
        by_oid: dict[int, _Table] = {}
        for oid, schema, name, relkind, has_children, att, typ, notnull, generated, coll in \
                cur.execute(_TABLES_SQL):
            if schema in inspection:
                continue  # its foreign keys then point at no known table and are skipped below too
            t = by_oid.get(oid)
            if t is None:
                t = by_oid[oid] = _Table(TableName(schema, name), relkind, bool(has_children))
            if att is not None:
                t.columns.append((att, typ, bool(notnull), generated or "", bool(coll)))
        fks: list[Hop] = []
        for conname, contype, conrelid, confrelid, validated, cols, fcols in cur.execute(_CONSTRAINTS_SQL):
            child = by_oid.get(conrelid)
            if child is None:
                continue
            if contype == "p":
                child.primary_key = tuple(cols)
                continue
            parent = by_oid.get(confrelid)
            if parent is None:  # points at a single partition (or a system table): not a routing edge
                continue
            fks.append(Hop(child.name, tuple(cols), parent.name, tuple(fcols),
                           nullable=not all(child.not_null(c) for c in cols),
                           constraint=conname, validated=bool(validated)))
    return {t.name: t for t in by_oid.values()}, fks


# --- overrides --------------------------------------------------------------------------------------

def _parse_overrides(overrides: Mapping[str, object] | None, tables: dict[TableName, _Table],
                     fks: list[Hop], root: TableName) -> tuple[set[TableName], dict[TableName, tuple[Hop, ...]]]:
    forced_platform: set[TableName] = set()
    via: dict[TableName, tuple[Hop, ...]] = {}
    if not overrides:
        return forced_platform, via
    by_text = {str(t): t for t in tables}
    fk_by_name = {(h.child, h.constraint): h for h in fks}
    for key, value in overrides.items():
        table = by_text.get(key) if isinstance(key, str) else None
        if table is None:
            hint = f' (did you mean "public.{key}"?)' if f"public.{key}" in by_text else ""
            raise TenancyError(f"tenancy override for unknown table {key!r}: overrides name tables as "
                               f'"schema.table"{hint}')
        if table == root:
            raise TenancyError(f"tenancy override for {table}: it is the tenant root and cannot be overridden")
        if value == PLATFORM:
            forced_platform.add(table)
            continue
        if isinstance(value, Mapping) and set(value) == {"via"}:
            value = value["via"]
        if isinstance(value, str) or not isinstance(value, Sequence) or not value \
                or not all(isinstance(v, str) for v in value):
            raise TenancyError(f"tenancy override for {table}: expected \"platform\" or a list of foreign key "
                               f"constraint names (child-most first), got {value!r}")
        hops: list[Hop] = []
        here = table
        for name in value:
            if here == root:
                raise TenancyError(f"tenancy override for {table}: the path already reached the root "
                                   f"{root} before {name!r}")
            hop = fk_by_name.get((here, name))
            if hop is None:
                raise TenancyError(f"tenancy override for {table}: {here} has no foreign key named {name!r}")
            if hop.parent == table or any(h.parent == hop.parent for h in hops) or hop.parent == here:
                raise TenancyError(f"tenancy override for {table}: foreign key {name!r} leads back to "
                                   f"{hop.parent}, already on the path")
            hops.append(hop)
            here = hop.parent
        via[table] = tuple(hops)
    for table, hops in via.items():
        for hop in hops:
            if hop.parent in forced_platform:
                raise TenancyError(f"tenancy override for {table}: its path goes through {hop.parent}, "
                                   f"which is overridden to platform")
    return forced_platform, via


# --- routing ----------------------------------------------------------------------------------------

def _render_path(hops: Sequence[Hop]) -> str:
    if not hops:
        return "(root)"
    return " -> ".join([f"{hops[0].child}"] + [f"[{h.constraint}] {h.parent}" for h in hops])


def _dedupe(candidates: list[Hop]) -> list[Hop]:
    """Duplicate FKs (same columns, same parent key) route rows identically: keep one of each."""
    seen: dict[tuple, Hop] = {}
    for h in sorted(candidates, key=lambda h: h.constraint):
        seen.setdefault((h.child_columns, h.parent, h.parent_columns), h)
    return list(seen.values())


def _route(tables: dict[TableName, _Table], fks: list[Hop], root: TableName,
           forced_platform: set[TableName], via: dict[TableName, tuple[Hop, ...]]) -> dict[TableName, tuple[Hop, ...]]:
    """Shortest path to the root for every table that has one (root → empty path)."""
    # Each table's ways up: (parent it continues from, length, hops). An override replaces them all.
    ways: dict[TableName, list[tuple[TableName, int, tuple[Hop, ...]]]] = {t: [] for t in tables}
    for h in fks:
        if h.child in via or h.child in forced_platform or h.child == root or h.parent in forced_platform \
                or h.child == h.parent:  # a self-reference never leads anywhere new
            continue
        ways[h.child].append((h.parent, 1, (h,)))
    for t, hops in via.items():
        ways[t] = [(hops[-1].parent, len(hops), hops)]

    uphill: dict[TableName, list[TableName]] = {}
    for t, ws in ways.items():
        for parent, _, _ in ws:
            uphill.setdefault(parent, []).append(t)
    dist = {root: 0}
    heap = [(0, root)]
    while heap:
        d, t = heapq.heappop(heap)
        if d > dist[t]:
            continue
        for child in uphill.get(t, ()):
            for parent, length, _ in ways[child]:
                if parent == t and d + length < dist.get(child, 1 << 60):
                    dist[child] = d + length
                    heapq.heappush(heap, (d + length, child))

    for t, hops in via.items():
        if t not in dist:
            raise TenancyError(f"tenancy override for {t}: its path ends at {hops[-1].parent}, "
                               f"which reaches no wedding")

    paths: dict[TableName, tuple[Hop, ...]] = {root: ()}
    ambiguous: list[str] = []
    for t in sorted(dist, key=lambda t: (dist[t], t)):
        if t == root:
            continue
        if t in via:
            hops = via[t]
            paths[t] = hops + paths[hops[-1].parent]
            continue
        best = _dedupe([hops[0] for parent, length, hops in ways[t]
                        if parent in dist and dist[parent] + length == dist[t]])
        if len(best) > 1:
            candidates = "; ".join(_render_path((h,) + paths[h.parent]) for h in best)
            ambiguous.append(f"{t} has {len(best)} equally short paths to {root}: {candidates}")
        paths[t] = (best[0],) + paths[best[0].parent]
    if ambiguous:
        raise TenancyError("ambiguous tenancy: " + " | ".join(ambiguous) +
                           ' — add an override naming the path to follow, e.g. {"schema.table": '
                           '["fk_constraint_name", ...]}, or "platform"')
    return paths


def _topological(tenants: dict[TableName, tuple[Hop, ...]], fks: list[Hop], root: TableName) -> list[TableName]:
    """Parents before children over every FK among tenant tables; a cycle is broken at the table
    nearest the root, so the root comes first and each table's path parents come before it."""
    rank = {t: (len(p), t) for t, p in tenants.items()}
    parents: dict[TableName, set[TableName]] = {t: set() for t in tenants}
    children: dict[TableName, set[TableName]] = {t: set() for t in tenants}
    for h in fks:
        if h.child in tenants and h.parent in tenants and h.child != h.parent:
            parents[h.child].add(h.parent)
            children[h.parent].add(h.child)
    order: list[TableName] = [root]
    done = {root}
    for c in children[root]:
        parents[c].discard(root)
    while len(order) < len(tenants):
        ready = [t for t in tenants if t not in done and not parents[t]]
        if not ready:  # an FK cycle: the nearest table's path parents are nearer still, so already out
            ready = [t for t in tenants if t not in done]
        t = min(ready, key=rank.__getitem__)
        order.append(t)
        done.add(t)
        for c in children[t]:
            parents[c].discard(t)
    return order


def _fingerprint(root: TableName, tables: dict[TableName, _Table], fks: list[Hop],
                 paths: dict[TableName, tuple[Hop, ...]]) -> str:
    description = {
        "root": str(root),
        "tables": [{
            "table": [t.name.schema, t.name.name],
            "kind": t.relkind,
            "columns": [list(c[:4]) for c in t.columns],
            "primary_key": list(t.primary_key),
            "path": [h.constraint for h in paths[t.name]] if t.name in paths else None,
        } for t in sorted(tables.values(), key=lambda t: t.name)],
        "foreign_keys": sorted([[str(h.child), h.constraint, list(h.child_columns), str(h.parent),
                                 list(h.parent_columns), h.validated] for h in fks]),
    }
    canonical = json.dumps(description, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def discover(conn, root: TableName = TableName("public", "weddings"),
             overrides: Mapping[str, object] | None = None) -> TenancyPlan:
    """Read the FK graph from pg_catalog (two queries, in the caller's transaction, so a snapshot's
    plan matches its data) and split every table into tenant or platform."""
    tables, fks = _read_catalogue(conn)
    if root not in tables:
        raise TenancyError(f"tenant root table {root} not found (or not an ordinary or partitioned table)")
    root_key = tables[root].primary_key
    if len(root_key) != 1:
        raise TenancyError(f"tenant root table {root} needs a single-column primary key to hold the "
                           f"wedding_id, has {list(root_key) or 'none'}")
    forced_platform, via = _parse_overrides(overrides, tables, fks, root)
    paths = _route(tables, fks, root, forced_platform, via)

    only = frozenset(t.name for t in tables.values() if t.relkind == "r" and t.has_children)
    tenant_tables = tuple(
        TenantTable(table=name, columns=tables[name].stored_columns, order_by=tables[name].order_by,
                    path=paths[name], root_key=root_key, collatable=tables[name].collatable,
                    keyed=bool(tables[name].primary_key),
                    only=frozenset(t for t in (name, *(h.parent for h in paths[name])) if t in only))
        for name in _topological(paths, fks, root))
    platform_tables = tuple(
        PlatformTable(table=t.name, columns=t.stored_columns, order_by=t.order_by, collatable=t.collatable,
                      keyed=bool(t.primary_key), only=t.name in only)
        for t in sorted(tables.values(), key=lambda t: t.name) if t.name not in paths)
    return TenancyPlan(root=root, root_key=root_key, tenant_tables=tenant_tables,
                       platform_tables=platform_tables, fingerprint=_fingerprint(root, tables, fks, paths))
