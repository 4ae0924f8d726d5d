"""The logical snapshot of one wedding (or of the platform partition): one REPEATABLE READ transaction,
the schema DDL from pg_dump, and every table's rows as COPY text, framed into one stream with a manifest.

The inner stream format is documented in docs/SNAPSHOT.md; `restore.read_snapshot` parses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from wedbackup_dagster.core import tenancy
from wedbackup_dagster.core.errors import SnapshotError, UnknownWeddingError

PLATFORM = "platform"
FORMAT_NAME = "wedbackup-snapshot"
FORMAT_VERSION = 1
MAGIC = b"WBSNAP\r\n"  # 8 bytes; the CR LF catches a stream mangled by text-mode line-ending conversion

# Record types: one ASCII byte each, then an 8-byte big-endian payload length, then the payload.
HEADER = b"H"
PRE_DATA = b"P"
POST_DATA = b"Q"
TABLE_BEGIN = b"T"
DATA = b"D"
TABLE_END = b"E"
MANIFEST = b"M"
RECORD_TYPES = {HEADER: "header", PRE_DATA: "pre_data", POST_DATA: "post_data", TABLE_BEGIN: "table_begin",
                DATA: "data", TABLE_END: "table_end", MANIFEST: "manifest"}
FRAME_HEADER_SIZE = 9
_WEDDING_PLACEHOLDER = b"%(wedding_id)s"

# COPY hands over one row per block; rows are coalesced so framing and sink calls stay rare, and a
# single huge row is cut into pieces so a reader never needs more than MAX_DATA_RECORD at once.
DATA_RECORD_TARGET = 256 * 1024
MAX_DATA_RECORD = 1024 * 1024
MAX_META_RECORD = 256 * 1024 * 1024  # header, DDL, manifest: large schemas, still bounded


class Sink(Protocol):
    def write(self, data: bytes, /) -> Any: ...


# --- manifest ---------------------------------------------------------------------------------------

@dataclass
class TableManifest:
    """One table of a snapshot: what was copied, how much, its checksum, and the SELECT that chose it."""

    schema: str
    name: str
    columns: list[str]
    rows: int
    bytes: int
    sha256: str
    select_sql: str  # as rendered on the source; `%(wedding_id)s` is the only placeholder
    params: dict[str, str] | None
    order_by: list[str] = field(default_factory=list)
    path: str = ""  # how the table's rows reach a wedding, for people
    seconds: float = 0.0

    @property
    def table(self) -> str:
        return f"{self.schema}.{self.name}"

    def table_name(self) -> tenancy.TableName:
        return tenancy.TableName(self.schema, self.name)


@dataclass
class Manifest:
    """What a snapshot holds: enough to verify a restore and to rebuild every table's SELECT."""

    partition: str
    snapshot_time: str
    txid: int
    snapshot: str
    server_version: str
    schema_fingerprint: str
    tables: list[TableManifest]
    plan: dict[str, Any]
    format_version: int = FORMAT_VERSION
    seconds: float = 0.0

    @property
    def total_rows(self) -> int:
        return sum(t.rows for t in self.tables)

    @property
    def total_bytes(self) -> int:
        return sum(t.bytes for t in self.tables)

    @property
    def wedding_id(self) -> str | None:
        return None if self.partition == PLATFORM else self.partition

    def table(self, name: str) -> TableManifest:
        for t in self.tables:
            if t.table == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))  # shallow on purpose: asdict's deep copy costs more than the JSON itself
        d["tables"] = [dict(vars(t)) for t in self.tables]
        d["total_rows"] = self.total_rows
        d["total_bytes"] = self.total_bytes
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        # Keys this version does not know (added by a later writer, or the totals) are ignored.
        table_keys = set(TableManifest.__dataclass_fields__)
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["tables"] = [TableManifest(**{k: v for k, v in t.items() if k in table_keys}) for t in d["tables"]]
        return cls(**known)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        return cls.from_dict(json.loads(text))


# --- the schema: description, fingerprint, DDL ------------------------------------------------------

# One line per schema object, (kind, key, detail), read with search_path '' so every name is
# qualified. Only what survives pg_dump → restore unchanged goes in: no OIDs, owners, ACLs, attnums
# (dropped columns leave gaps), enum sort values, sequence positions or FK validation state.
_DESCRIBE_SQL = r"""
WITH ns AS (
    SELECT oid, nspname FROM pg_catalog.pg_namespace
    WHERE nspname <> 'information_schema' AND nspname !~ '^pg_'
), ext AS (
    SELECT classid, objid FROM pg_catalog.pg_depend WHERE deptype = 'e'
), rel AS (
    SELECT c.oid, c.relkind, c.relpersistence, c.relispartition, c.relrowsecurity, c.relpartbound,
           pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname) AS qname
    FROM pg_catalog.pg_class c JOIN ns n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S', 'c')
      AND NOT EXISTS (SELECT FROM ext WHERE ext.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                                          AND ext.objid = c.oid)
), typ AS (
    SELECT t.*, pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(t.typname) AS qname
    FROM pg_catalog.pg_type t JOIN ns n ON n.oid = t.typnamespace
    WHERE t.typtype IN ('e', 'd', 'r')
      AND NOT EXISTS (SELECT FROM ext WHERE ext.classid = 'pg_catalog.pg_type'::pg_catalog.regclass
                                          AND ext.objid = t.oid)
), lines AS (
    SELECT 'schema' AS kind, pg_catalog.quote_ident(nspname) AS key, '' AS detail FROM ns
    UNION ALL
    SELECT 'extension', pg_catalog.quote_ident(e.extname), e.extversion
    FROM pg_catalog.pg_extension e
    UNION ALL
    SELECT 'relation', rel.qname,
           rel.relkind::text || ' ' || rel.relpersistence::text
           || CASE WHEN rel.relkind = 'p' THEN ' partition by ' || pg_catalog.pg_get_partkeydef(rel.oid)
                   ELSE '' END
           || CASE WHEN rel.relispartition
                   THEN ' ' || pg_catalog.pg_get_expr(rel.relpartbound, rel.oid) ELSE '' END
           || coalesce(' inherits ' || (SELECT pg_catalog.string_agg(i.inhparent::pg_catalog.regclass::text, ','
                                                                     ORDER BY i.inhseqno)
                                        FROM pg_catalog.pg_inherits i WHERE i.inhrelid = rel.oid), '')
           || CASE WHEN rel.relrowsecurity THEN ' row security' ELSE '' END
           || CASE WHEN rel.relkind IN ('v', 'm') THEN ' ' || pg_catalog.md5(pg_catalog.pg_get_viewdef(rel.oid))
                   ELSE '' END
    FROM rel
    UNION ALL
    SELECT 'column', rel.qname || '.' || pg_catalog.quote_ident(a.attname),
           'ord ' || pg_catalog.row_number() OVER (PARTITION BY a.attrelid ORDER BY a.attnum)
           || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod)
           || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
           || CASE WHEN a.attidentity <> '' THEN ' identity ' || a.attidentity::text ELSE '' END
           || CASE WHEN a.attgenerated <> '' THEN ' generated ' || pg_catalog.pg_get_expr(d.adbin, d.adrelid)
                   WHEN d.adbin IS NOT NULL THEN ' default ' || pg_catalog.pg_get_expr(d.adbin, d.adrelid)
                   ELSE '' END
           || CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation
                   THEN ' collate ' || a.attcollation::pg_catalog.regcollation::text ELSE '' END
    FROM rel
    JOIN pg_catalog.pg_attribute a ON a.attrelid = rel.oid AND a.attnum > 0 AND NOT a.attisdropped
    JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
    LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE rel.relkind <> 'S'
    UNION ALL
    SELECT 'constraint', rel.qname || '.' || pg_catalog.quote_ident(con.conname),
           pg_catalog.regexp_replace(pg_catalog.pg_get_constraintdef(con.oid), ' NOT VALID$', '')
    FROM pg_catalog.pg_constraint con JOIN rel ON rel.oid = con.conrelid
    UNION ALL
    SELECT 'constraint', typ.qname || '.' || pg_catalog.quote_ident(con.conname),
           pg_catalog.regexp_replace(pg_catalog.pg_get_constraintdef(con.oid), ' NOT VALID$', '')
    FROM pg_catalog.pg_constraint con JOIN typ ON typ.oid = con.contypid
    UNION ALL
    SELECT 'index', rel.qname || '.' || pg_catalog.quote_ident(ic.relname),
           pg_catalog.pg_get_indexdef(i.indexrelid)
    FROM pg_catalog.pg_index i JOIN rel ON rel.oid = i.indrelid
    JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
    UNION ALL
    SELECT 'trigger', rel.qname || '.' || pg_catalog.quote_ident(tg.tgname),
           pg_catalog.pg_get_triggerdef(tg.oid) || ' enabled ' || tg.tgenabled::text
    FROM pg_catalog.pg_trigger tg JOIN rel ON rel.oid = tg.tgrelid
    WHERE NOT tg.tgisinternal
    UNION ALL
    SELECT 'policy', rel.qname || '.' || pg_catalog.quote_ident(pol.polname),
           pol.polcmd::text || CASE WHEN pol.polpermissive THEN ' permissive' ELSE ' restrictive' END
           || coalesce(' using ' || pg_catalog.pg_get_expr(pol.polqual, pol.polrelid), '')
           || coalesce(' check ' || pg_catalog.pg_get_expr(pol.polwithcheck, pol.polrelid), '')
    FROM pg_catalog.pg_policy pol JOIN rel ON rel.oid = pol.polrelid
    UNION ALL
    SELECT 'type', typ.qname,
           CASE typ.typtype
               WHEN 'e' THEN 'enum ' || coalesce((SELECT pg_catalog.string_agg(pg_catalog.quote_literal(e.enumlabel),
                                                                             ',' ORDER BY e.enumsortorder)
                                                  FROM pg_catalog.pg_enum e WHERE e.enumtypid = typ.oid), '')
               WHEN 'd' THEN 'domain ' || pg_catalog.format_type(typ.typbasetype, typ.typtypmod)
                             || CASE WHEN typ.typnotnull THEN ' not null' ELSE '' END
                             || coalesce(' default ' || typ.typdefault, '')
               ELSE 'range ' || coalesce((SELECT pg_catalog.format_type(r.rngsubtype, NULL)
                                          FROM pg_catalog.pg_range r WHERE r.rngtypid = typ.oid), '')
           END
    FROM typ
    UNION ALL
    SELECT 'function', p.oid::pg_catalog.regprocedure::text,
           p.prokind::text || ' ' || CASE WHEN p.prokind = 'a' THEN ''
                                          ELSE pg_catalog.md5(pg_catalog.pg_get_functiondef(p.oid)) END
    FROM pg_catalog.pg_proc p JOIN ns n ON n.oid = p.pronamespace
    WHERE NOT EXISTS (SELECT FROM ext WHERE ext.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                                          AND ext.objid = p.oid)
    UNION ALL
    SELECT 'sequence', rel.qname,
           pg_catalog.format_type(s.seqtypid, NULL) || ' start ' || s.seqstart || ' increment ' || s.seqincrement
           || ' min ' || s.seqmin || ' max ' || s.seqmax || ' cache ' || s.seqcache
           || CASE WHEN s.seqcycle THEN ' cycle' ELSE '' END
    FROM pg_catalog.pg_sequence s JOIN rel ON rel.oid = s.seqrelid
)
SELECT kind, key, coalesce(detail, '') AS detail FROM lines
"""

_FINGERPRINT_SQL = ("SELECT pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(coalesce(pg_catalog.string_agg("
                    "line, E'\\n' ORDER BY line COLLATE \"C\"), ''), 'UTF8')), 'hex') FROM ("
                    "SELECT kind || E'\\t' || key || E'\\t' || detail AS line FROM (" + _DESCRIBE_SQL + ") d) f")

_FOREIGN_KEYS_SQL = """
SELECT cn.nspname::text, c.relname::text, con.conname::text, pn.nspname::text, p.relname::text
FROM pg_catalog.pg_constraint con
JOIN pg_catalog.pg_class c ON c.oid = con.conrelid JOIN pg_catalog.pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_catalog.pg_class p ON p.oid = con.confrelid JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0
  AND cn.nspname <> 'information_schema' AND cn.nspname !~ '^pg_'
ORDER BY 1, 2, 3
"""


def use_qualified_names(conn) -> None:
    """search_path '' for the rest of the transaction: every name the catalogue prints is qualified,
    exactly as in a session that ran pg_dump's script, so source and target describe alike."""
    conn.execute("SELECT pg_catalog.set_config('search_path', '', true)")


def schema_fingerprint(conn) -> str:
    """SHA-256 of the whole schema's description, computed server-side (one round trip)."""
    # Prepared: planning this query costs more than running it, and sessions run it once per wedding.
    row = conn.execute(_FINGERPRINT_SQL, prepare=True).fetchone()
    return row[0]


def describe_schema(conn) -> list[list[str]]:
    """The schema, one [kind, key, detail] per object, sorted: what fingerprints are made of."""
    rows = conn.execute(_DESCRIBE_SQL).fetchall()
    return sorted([list(r) for r in rows])


def foreign_keys(conn) -> list[dict[str, str]]:
    return [{"schema": s, "table": t, "name": n, "ref_schema": rs, "ref_table": rt}
            for s, t, n, rs, rt in conn.execute(_FOREIGN_KEYS_SQL)]


def schema_is_empty(description: Iterable[list[str]]) -> bool:
    """Nothing of ours in it: only the public schema and extensions a new database comes with."""
    return all(kind == "extension" or (kind == "schema" and key == "public") for kind, key, _ in description)


@dataclass(frozen=True)
class SchemaDDL:
    """The DDL that recreates the schema (pg_dump pre-data and post-data) and the description it
    was dumped from; bound to a fingerprint taken inside the same snapshot."""

    fingerprint: str
    pre_data: str
    post_data: str
    description: tuple[tuple[str, str, str], ...]
    foreign_keys: tuple[dict[str, str], ...]


_DDL_CACHE: OrderedDict[tuple, SchemaDDL] = OrderedDict()
_DDL_CACHE_SIZE = 32
_DDL_LOCK = threading.Lock()
# pg_dump ≥ 15.14 brackets its script in psql meta-commands; nothing but psql understands them.
_PSQL_META = re.compile(r"^\\(?:un)?restrict\b.*$\n?", re.MULTILINE)


def database_label(dsn: str) -> str:
    """'database X on host:port' — for messages; never the password."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "database (unparseable connection string)"
    return f"database {parts.get('dbname', '?')} on {parts.get('host', 'localhost')}:{parts.get('port', '5432')}"


def pg_tool(tool: str, server_version_num: int) -> str:
    """The client tool matching the server's major version, else the newest installed one at least as
    new (pg_dump refuses older servers' dumps the other way round)."""
    major = server_version_num // 10000
    base = Path("/usr/lib/postgresql")
    exact = base / str(major) / "bin" / tool
    if exact.is_file():
        return str(exact)
    newer = sorted((int(p.parent.parent.name), p) for p in base.glob(f"*/bin/{tool}")
                   if p.parent.parent.name.isdigit() and int(p.parent.parent.name) >= major)
    if newer:
        return str(newer[0][1])
    found = shutil.which(tool)
    if found:
        return found
    raise SnapshotError(f"{tool} for PostgreSQL {major} not found: install postgresql-client-{major}")


def _run_pg_dump(dsn: str, server_version_num: int, section: str, snapshot_id: str) -> str:
    parts = conninfo_to_dict(dsn)
    env = dict(os.environ)
    password = parts.pop("password", None)
    if password is not None:
        env["PGPASSWORD"] = password
    argv = [pg_tool("pg_dump", server_version_num), "--schema-only", "--no-owner", "--no-privileges",
            "--no-publications", "--no-subscriptions", "--no-security-labels", "--no-tablespaces",
            f"--section={section}", f"--snapshot={snapshot_id}", "--dbname", make_conninfo(**parts)]
    proc = subprocess.run(argv, env=env, capture_output=True, timeout=600)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        if password:
            err = err.replace(password, "***")
        raise SnapshotError(f"pg_dump --section={section} of {database_label(dsn)} failed: {err[-2000:]}")
    return _PSQL_META.sub("", proc.stdout.decode())


def schema_ddl(conn, dsn: str, fingerprint: str) -> SchemaDDL:
    """The DDL for `fingerprint`, dumped once per server and schema: pg_dump imports this
    transaction's snapshot, so the DDL is exactly the schema the data is read under."""
    key = (conn.info.host, conn.info.port, conn.info.dbname, fingerprint)
    with _DDL_LOCK:
        hit = _DDL_CACHE.get(key)
        if hit is not None:
            _DDL_CACHE.move_to_end(key)
            return hit
    version = conn.info.server_version
    snapshot_id = conn.execute("SELECT pg_catalog.pg_export_snapshot()").fetchone()[0]
    pre = _run_pg_dump(dsn, version, "pre-data", snapshot_id)
    post = _run_pg_dump(dsn, version, "post-data", snapshot_id)
    ddl = SchemaDDL(fingerprint=fingerprint, pre_data=pre, post_data=post,
                    description=tuple(tuple(r) for r in describe_schema(conn)),
                    foreign_keys=tuple(foreign_keys(conn)))
    with _DDL_LOCK:
        _DDL_CACHE[key] = ddl
        while len(_DDL_CACHE) > _DDL_CACHE_SIZE:
            _DDL_CACHE.popitem(last=False)
    return ddl


# --- framing ----------------------------------------------------------------------------------------

def write_record(sink: Sink, kind: bytes, payload: bytes | bytearray) -> int:
    sink.write(kind + len(payload).to_bytes(8, "big"))
    if payload:
        sink.write(payload)
    return FRAME_HEADER_SIZE + len(payload)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def copy_out(conn, query: sql.Composable | bytes, params, on_buffer) -> None:
    """Run `COPY (...) TO STDOUT` and hand its text to `on_buffer` in pieces of ~DATA_RECORD_TARGET.

    Reads libpq directly: the server sends one message per row, and psycopg's per-row iterator
    costs twice the CPU of this loop, which is most of what a snapshot spends in Python."""
    if isinstance(query, bytes):
        text = query
    elif params:
        text = psycopg.ClientCursor(conn).mogrify(query, params).encode()
    else:
        text = query.as_bytes(conn)
    pgconn = conn.pgconn
    pgconn.send_query(text)
    while pgconn.flush():
        select.select([], [pgconn.socket], [])
    while True:  # the first result says COPY OUT (or why not)
        result = _next_result(pgconn)
        if result is None or result.status == pq.ExecStatus.COPY_OUT:
            break
        _raise_for(result, pgconn)
    get = pgconn.get_copy_data
    buf = bytearray()
    while True:
        nbytes, data = get(1)
        if nbytes > 0:
            buf += data
            if len(buf) >= DATA_RECORD_TARGET:
                on_buffer(buf)
                buf = bytearray()  # the consumer may keep the old one: never mutate what was handed over
        elif nbytes == 0:  # nothing buffered: wait for the socket without holding the GIL
            select.select([pgconn.socket], [], [])
            pgconn.consume_input()
        else:
            break
    if buf:
        on_buffer(buf)
    while (result := _next_result(pgconn)) is not None:
        _raise_for(result, pgconn)


def _next_result(pgconn):
    while pgconn.is_busy():
        select.select([pgconn.socket], [], [])
        pgconn.consume_input()
    return pgconn.get_result()


def _raise_for(result, pgconn) -> None:
    if result.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        return
    sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
    message = (result.error_message or pgconn.error_message or b"COPY failed").decode(errors="replace").strip()
    while _next_result(pgconn) is not None:  # leave the connection ready for the next command
        pass
    error_class = psycopg.errors.lookup(sqlstate.decode()) if sqlstate else psycopg.OperationalError
    raise error_class(message)


def _copy_table(conn, query: sql.Composable, params, sink: Sink) -> tuple[int, int, str]:
    """Stream one COPY into DATA records, hashing and counting rows as the text passes."""
    digest = hashlib.sha256()
    counts = [0, 0]

    def emit(buf: bytearray) -> None:
        digest.update(buf)
        counts[0] += buf.count(b"\n")  # COPY text escapes newlines inside values: one per row
        counts[1] += len(buf)
        _write_data(sink, buf)

    copy_out(conn, query, params, emit)
    return counts[0], counts[1], digest.hexdigest()


def _write_data(sink: Sink, buf: bytearray) -> None:
    if len(buf) <= MAX_DATA_RECORD:
        write_record(sink, DATA, buf)
        return
    view = memoryview(buf)
    for start in range(0, len(buf), MAX_DATA_RECORD):
        write_record(sink, DATA, view[start:start + MAX_DATA_RECORD].tobytes())


# --- taking snapshots -------------------------------------------------------------------------------

def _path_text(t: tenancy.TenantTable | tenancy.PlatformTable) -> str:
    path = getattr(t, "path", None)
    if path is None:
        return "platform"
    if not path:
        return "root"
    return " -> ".join(h.describe() if hasattr(h, "describe") else f"{h.child} -> {h.parent}" for h in path)


def plan_description(plan: tenancy.TenancyPlan) -> dict[str, Any]:
    return {"root": str(plan.root), "root_key": list(plan.root_key), "fingerprint": plan.fingerprint,
            "tenant_tables": {str(t.table): _path_text(t) for t in plan.tenant_tables},
            "platform_tables": [str(t.table) for t in plan.platform_tables]}


def partition_selects(plan: tenancy.TenancyPlan, partition: str
                      ) -> list[tuple[tenancy.TenantTable | tenancy.PlatformTable, sql.Composable]]:
    """The tables of a partition, parents first, each with the SELECT that picks its rows."""
    if partition == PLATFORM:
        out: list[tuple[Any, sql.Composable]] = [(t, t.platform_select()) for t in plan.platform_tables]
        for t in plan.tenant_tables:
            select = t.platform_select()
            if select is not None:
                out.append((t, select))
        return out
    return [(t, t.wedding_select()) for t in plan.tenant_tables]


class SnapshotSession:
    """One source connection reused for many snapshots in sequence; the tenancy plan and the DDL are
    reused while the schema fingerprint is unchanged.

    With `share_seconds` > 0, consecutive snapshots taken within that many seconds of the first share
    one REPEATABLE READ READ ONLY transaction: each wedding is still read from one consistent snapshot
    (the same one), and the per-transaction work (BEGIN, schema fingerprint) is paid once per batch
    instead of once per wedding. The window bounds how long the transaction may hold back vacuum."""

    def __init__(self, source_dsn: str, plan: tenancy.TenancyPlan | None = None, *,
                 root: tenancy.TableName = tenancy.TableName("public", "weddings"),
                 overrides: dict[str, object] | None = None, share_seconds: float = 0.0):
        self.source_dsn = source_dsn
        self.share_seconds = share_seconds
        self._shared: tuple[float, tuple[Any, ...]] | None = None  # (opened at, transaction facts)
        self._fixed_plan = plan
        self._root = root
        self._overrides = overrides
        self._plans: dict[str, tenancy.TenancyPlan] = {}
        self._rendered: dict[tuple[int, bool], tuple[tenancy.TenancyPlan, list]] = {}
        self._conn: psycopg.Connection | None = None

    def __enter__(self) -> SnapshotSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            if self._shared is not None and not self._conn.closed:
                try:
                    self._conn.execute("COMMIT")
                except psycopg.Error:
                    pass
            self._shared = None
            self._conn.close()
            self._conn = None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(self.source_dsn, autocommit=True, application_name="wedbackup-snapshot")
            except psycopg.OperationalError as e:
                raise SnapshotError(f"cannot connect to {database_label(self.source_dsn)}: "
                                    f"{_redact(str(e), self.source_dsn)}") from None
        return self._conn

    def _plan(self, conn, fingerprint: str) -> tenancy.TenancyPlan:
        if self._fixed_plan is not None:
            return self._fixed_plan
        plan = self._plans.get(fingerprint)
        if plan is None:
            plan = tenancy.discover(conn, self._root, self._overrides)
            self._plans = {fingerprint: plan}  # a schema change makes older plans useless
            self._rendered = {}
        return plan

    def snapshot(self, partition: str, sink: Sink) -> Manifest:
        """Write the framed snapshot of `partition` (a wedding id, or "platform") to `sink`."""
        partition = str(partition)
        conn = self._connection()
        started = time.monotonic()
        if self._shared is not None and started - self._shared[0] > self.share_seconds:
            self._shared = None
            conn.execute("COMMIT")
        try:
            manifest = self._snapshot_in_transaction(conn, partition, sink)
            if self.share_seconds <= 0:
                conn.execute("COMMIT")
        except BaseException:
            self._shared = None
            if not conn.closed:
                try:
                    conn.execute("ROLLBACK")
                except psycopg.Error:
                    conn.close()
            raise
        manifest.seconds = round(time.monotonic() - started, 6)
        return manifest

    def _snapshot_in_transaction(self, conn, partition: str, sink: Sink) -> Manifest:
        # The first query takes the transaction's snapshot: time, xmin and schema are all as of it.
        # One round trip (simple protocol): begin, qualified names (see use_qualified_names), and the
        # snapshot's identity.
        if self._shared is not None:
            snap_time, snapshot, xmin, server_version, fingerprint, ddl, plan = self._shared[1]
        else:
            opened = time.monotonic()
            cur = conn.execute(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;"
                " SELECT pg_catalog.set_config('search_path', '', true), pg_catalog.now(),"
                " pg_catalog.pg_current_snapshot()::text,"
                " pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text::bigint,"
                " pg_catalog.current_setting('server_version')")
            cur.nextset()
            _, snap_time, snapshot, xmin, server_version = cur.fetchone()
            fingerprint = schema_fingerprint(conn)
            ddl = schema_ddl(conn, self.source_dsn, fingerprint)
            plan = self._plan(conn, fingerprint)
            if self.share_seconds > 0:
                self._shared = (opened, (snap_time, snapshot, xmin, server_version, fingerprint, ddl, plan))
        params = None
        if partition != PLATFORM:
            self._check_wedding(conn, plan, partition)
            params = {"wedding_id": partition}

        header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "partition": partition,
                  "snapshot_time": snap_time.isoformat(), "txid": xmin, "snapshot": snapshot,
                  "server_version": server_version, "server_version_num": conn.info.server_version,
                  "schema_fingerprint": fingerprint, "schema": [list(r) for r in ddl.description],
                  "foreign_keys": list(ddl.foreign_keys), "plan": plan_description(plan)}
        sink.write(MAGIC)
        write_record(sink, HEADER, _json_bytes(header))
        write_record(sink, PRE_DATA, ddl.pre_data.encode())
        write_record(sink, POST_DATA, ddl.post_data.encode())

        tables: list[TableManifest] = []
        literal = sql.Literal(partition).as_bytes(conn) if params else b""
        for t, select_sql, parts in self._statements(conn, plan, partition == PLATFORM):
            t0 = time.monotonic()
            write_record(sink, TABLE_BEGIN, _json_bytes({
                "schema": t.table.schema, "name": t.table.name, "columns": list(t.columns),
                "select_sql": select_sql, "params": params, "order_by": list(t.order_by)}))
            rows, nbytes, sha = _copy_table(conn, literal.join(parts), None, sink)
            write_record(sink, TABLE_END, _json_bytes({"rows": rows, "bytes": nbytes, "sha256": sha}))
            tables.append(TableManifest(schema=t.table.schema, name=t.table.name, columns=list(t.columns),
                                        rows=rows, bytes=nbytes, sha256=sha, select_sql=select_sql,
                                        params=params, order_by=list(t.order_by), path=_path_text(t),
                                        seconds=round(time.monotonic() - t0, 6)))

        manifest = Manifest(partition=partition, snapshot_time=snap_time.isoformat(), txid=xmin,
                            snapshot=snapshot, server_version=server_version, schema_fingerprint=fingerprint,
                            tables=tables, plan=plan_description(plan))
        write_record(sink, MANIFEST, manifest.to_json().encode())
        return manifest

    def _statements(self, conn, plan: tenancy.TenancyPlan, platform: bool) -> list[tuple[Any, str, list[bytes]]]:
        """Each table's SELECT (as the manifest records it) and its COPY rendered once per plan, cut
        at the wedding_id placeholder: composing SQL costs more than a small wedding's COPY."""
        key = (id(plan), platform)
        cached = self._rendered.get(key)
        if cached is None or cached[0] is not plan:
            statements = []
            for t, select in partition_selects(plan, PLATFORM if platform else "0"):
                copy = sql.SQL("COPY ({}) TO STDOUT").format(select).as_bytes(conn)
                parts = copy.split(_WEDDING_PLACEHOLDER)
                if platform and len(parts) != 1 or b"%" in b"".join(parts):
                    raise SnapshotError(f"the SELECT of {t.table} holds an unexpected placeholder: {copy[:200]!r}")
                statements.append((t, select.as_string(conn), parts))
            cached = self._rendered[key] = (plan, statements)
        return cached[1]

    @staticmethod
    def _check_wedding(conn, plan: tenancy.TenancyPlan, wedding_id: str) -> None:
        if len(plan.root_key) != 1:
            raise SnapshotError(f"tenant root {plan.root} must have a single-column key, has {list(plan.root_key)}")
        query = sql.SQL("SELECT EXISTS (SELECT FROM {} WHERE {} = %s)").format(
            plan.root.ident(), sql.Identifier(plan.root_key[0]))
        try:
            found = conn.execute(query, (wedding_id,)).fetchone()[0]
        except (psycopg.DataError, psycopg.ProgrammingError):
            raise UnknownWeddingError(wedding_id, f"not a valid key for {plan.root}.{plan.root_key[0]}") from None
        if not found:
            raise UnknownWeddingError(wedding_id, f"no such wedding in {plan.root} of the source database")


def take_snapshot(source_dsn: str, plan_or_none: tenancy.TenancyPlan | None = None, *, partition: str,
                  sink: Sink) -> Manifest:
    """Snapshot one partition (a wedding id, or "platform") of the source database into `sink`."""
    with SnapshotSession(source_dsn, plan_or_none) as session:
        return session.snapshot(partition, sink)


def _redact(text: str, dsn: str) -> str:
    try:
        password = conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        password = None
    if password:
        text = text.replace(password, "***")
    return re.sub(r"(postgres(?:ql)?://[^:/@\s]+:)[^@\s]+@", r"\1***@", text)
