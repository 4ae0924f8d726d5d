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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from wedbackup_dagster.core import tenancy
from wedbackup_dagster.core.errors import SnapshotError, UnknownWeddingError, WedbackupError

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
_WEDDINGS_PLACEHOLDER = b"%(wedding_ids)s"  # a batch's array of wedding ids
_T = TypeVar("_T")

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


class TableTotals:
    """Totals over `self.tables` (each with `rows` and `bytes`): shared by manifests and restore reports."""

    @property
    def total_rows(self) -> int:
        return sum(t.rows for t in self.tables)

    @property
    def total_bytes(self) -> int:
        return sum(t.bytes for t in self.tables)

    def table_rows(self) -> list[dict[str, Any]]:
        """One dict per table, for a UI table or a DataFrame."""
        return [asdict(t) for t in self.tables]


@dataclass
class Manifest(TableTotals):
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

# `restore --all`'s bookkeeping in its target (core/disaster.py); never part of the data it restores.
RESTORE_PROGRESS_SCHEMA = "wedbackup_restore"
# One line per schema object, (kind, key, detail), read with search_path '' so every name is
# qualified. Only what survives pg_dump → restore unchanged goes in: no OIDs, owners, ACLs, attnums
# (dropped columns leave gaps), enum sort values, sequence positions or FK validation state.
_DESCRIBE_SQL = r"""
WITH ns AS (
    SELECT oid, nspname FROM pg_catalog.pg_namespace
    WHERE nspname <> 'information_schema' AND nspname !~ '^pg_' AND nspname <> 'wedbackup_restore'
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
    pgconn = _start_copy(conn, text)
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
    _finish_copy(pgconn)


def _start_copy(conn, text: bytes):
    """Send a COPY ... TO STDOUT and wait until the server starts sending rows (or says why not)."""
    pgconn = conn.pgconn
    pgconn.send_query(text)
    while pgconn.flush():
        select.select([], [pgconn.socket], [])
    while True:  # the first result says COPY OUT (or why not)
        result = _next_result(pgconn)
        if result is None or result.status == pq.ExecStatus.COPY_OUT:
            break
        _raise_for(result, pgconn)
    return pgconn


def _finish_copy(pgconn) -> None:
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

    def start_after(self, moment: float) -> None:
        """The next snapshot begins after `moment` (a time.monotonic() value): a shared transaction opened
        before it is ended. The engine calls this once it holds a partition's lock, so a backup that waited
        for a restore of the same wedding reads what the restore committed, not an older shared snapshot."""
        if self._shared is not None and self._shared[0] <= moment:
            self._shared = None
            if self._conn is not None and not self._conn.closed:
                self._conn.execute("COMMIT")

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
        started = time.monotonic()
        manifest = self._in_transaction(lambda conn: self._write_partition(conn, self._begin(conn), partition, sink))
        manifest.seconds = round(time.monotonic() - started, 6)
        return manifest

    def snapshot_many(self, partitions: Sequence[str], sinks: Mapping[str, Sink]
                      ) -> dict[str, Manifest | WedbackupError]:
        """Snapshot many weddings from one consistent snapshot, each into its own sink (`sinks[wedding_id]`),
        with one COPY per table for the whole batch instead of one per wedding and table.

        Each wedding's stream is byte for byte what `snapshot()` writes in the same transaction (only
        the manifest's `seconds` differ: a batch's time is shared out evenly). Returns each wedding's
        Manifest, or the error that kept it out (UnknownWeddingError; a sink that failed, wrapped in
        SnapshotError unless it already was a WedbackupError) while the others go on. An error of the
        source database fails the whole batch and is raised. The platform partition goes through
        `snapshot()`."""
        weddings = list(dict.fromkeys(str(p) for p in partitions))
        if PLATFORM in weddings:
            raise SnapshotError("snapshot_many takes weddings only: snapshot the platform partition with snapshot()")
        missing = [p for p in weddings if p not in sinks]
        if missing:
            raise SnapshotError(f"snapshot_many: no sink for wedding(s) {', '.join(missing[:10])}")
        if not weddings:
            return {}
        started = time.monotonic()
        results = self._in_transaction(lambda conn: self._write_many(conn, self._begin(conn), weddings, sinks))
        share = round((time.monotonic() - started) / len(weddings), 6)
        for result in results.values():
            if isinstance(result, Manifest):
                result.seconds = share
        return results

    def _in_transaction(self, work: Callable[[psycopg.Connection], _T]) -> _T:
        """Run `work` inside the session's snapshot transaction (shared within `share_seconds`); any
        error rolls it back, so the next call starts a fresh one."""
        conn = self._connection()
        if self._shared is not None and time.monotonic() - self._shared[0] > self.share_seconds:
            self._shared = None
            conn.execute("COMMIT")
        try:
            result = work(conn)
            if self.share_seconds <= 0:
                conn.execute("COMMIT")
        except BaseException as exc:
            self._shared = None
            if not conn.closed:
                try:
                    conn.execute("ROLLBACK")
                except psycopg.Error:
                    conn.close()
            if isinstance(exc, psycopg.OperationalError):
                # The source went away mid-snapshot: say which database, not just the driver's words.
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise SnapshotError(f"snapshot of {database_label(self.source_dsn)} failed: the connection was "
                                    f"lost ({_redact(first, self.source_dsn)})") from None
            raise
        return result

    def _begin(self, conn) -> tuple[Any, ...]:
        """The transaction's facts (time, snapshot, xmin, server version, fingerprint, DDL, plan): the
        shared transaction's, else those of a new one begun here."""
        if self._shared is not None:
            return self._shared[1]
        # The first query takes the transaction's snapshot: time, xmin and schema are all as of it.
        # One round trip (simple protocol): begin, qualified names (see use_qualified_names), and the
        # snapshot's identity.
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
        facts = (snap_time, snapshot, xmin, server_version, fingerprint, ddl, plan)
        if self.share_seconds > 0:
            self._shared = (opened, facts)
        return facts

    def _write_head(self, conn, facts: tuple[Any, ...], partition: str, sink: Sink) -> None:
        """Magic, header, pre-data and post-data: everything before the first table."""
        snap_time, snapshot, xmin, server_version, fingerprint, ddl, plan = facts
        header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "partition": partition,
                  "snapshot_time": snap_time.isoformat(), "txid": xmin, "snapshot": snapshot,
                  "server_version": server_version, "server_version_num": conn.info.server_version,
                  "schema_fingerprint": fingerprint, "schema": [list(r) for r in ddl.description],
                  "foreign_keys": list(ddl.foreign_keys), "plan": plan_description(plan)}
        sink.write(MAGIC)
        write_record(sink, HEADER, _json_bytes(header))
        write_record(sink, PRE_DATA, ddl.pre_data.encode())
        write_record(sink, POST_DATA, ddl.post_data.encode())

    @staticmethod
    def _finish(facts: tuple[Any, ...], partition: str, tables: list[TableManifest], sink: Sink) -> Manifest:
        snap_time, snapshot, xmin, server_version, fingerprint, _, plan = facts
        manifest = Manifest(partition=partition, snapshot_time=snap_time.isoformat(), txid=xmin,
                            snapshot=snapshot, server_version=server_version, schema_fingerprint=fingerprint,
                            tables=tables, plan=plan_description(plan))
        write_record(sink, MANIFEST, manifest.to_json().encode())
        return manifest

    def _write_partition(self, conn, facts: tuple[Any, ...], partition: str, sink: Sink) -> Manifest:
        plan = facts[6]
        params = None
        if partition != PLATFORM:
            self._check_wedding(conn, plan, partition)
            params = {"wedding_id": partition}
        self._write_head(conn, facts, partition, sink)
        tables: list[TableManifest] = []
        literal = sql.Literal(partition).as_bytes(conn) if params else b""
        for t, select_sql, parts in self._statements(conn, plan, partition == PLATFORM):
            t0 = time.monotonic()
            write_record(sink, TABLE_BEGIN, _table_begin(t, select_sql, params))
            rows, nbytes, sha = _copy_table(conn, literal.join(parts), None, sink)
            write_record(sink, TABLE_END, _json_bytes({"rows": rows, "bytes": nbytes, "sha256": sha}))
            tables.append(_table_manifest(t, select_sql, params, rows, nbytes, sha, time.monotonic() - t0))
        return self._finish(facts, partition, tables, sink)

    def _write_many(self, conn, facts: tuple[Any, ...], weddings: list[str], sinks: Mapping[str, Sink]
                    ) -> dict[str, Manifest | WedbackupError]:
        plan = facts[6]
        results: dict[str, Manifest | WedbackupError] = {}
        keys = self._find_weddings(conn, plan, weddings)
        batch = [p for p in weddings if keys[p] == p]
        # A wedding found under another spelling of its key ("07" for 7) goes alone, through the
        # per-wedding SELECT: the batch routes rows by the key's text as COPY prints it.
        alone = [p for p in weddings if isinstance(keys[p], str) and keys[p] != p]
        for p in weddings:
            if isinstance(keys[p], WedbackupError):
                results[p] = keys[p]
        streams = {p: _GuardedSink(p, sinks[p]) for p in (*batch, *alone)}
        if batch:
            for p in batch:
                self._write_head(conn, facts, p, streams[p])
            tables: dict[str, list[TableManifest]] = {p: [] for p in batch}
            literal = sql.Literal(_array_literal(batch)).as_bytes(conn)
            per_wedding = self._statements(conn, plan, False)
            for (t, select_sql, _), parts in zip(per_wedding, self._batch_statements(conn, plan)):
                t0 = time.monotonic()
                outs: dict[bytes, _TableOut] = {}
                for p in batch:
                    write_record(streams[p], TABLE_BEGIN, _table_begin(t, select_sql, {"wedding_id": p}))
                    outs[p.encode()] = _TableOut(streams[p])
                _copy_batch(conn, literal.join(parts), outs, t.table)
                share = (time.monotonic() - t0) / len(batch)
                for p in batch:
                    out = outs[p.encode()]
                    sha = out.digest.hexdigest()
                    write_record(out.sink, TABLE_END, _json_bytes({"rows": out.rows, "bytes": out.bytes,
                                                                   "sha256": sha}))
                    tables[p].append(_table_manifest(t, select_sql, {"wedding_id": p}, out.rows, out.bytes, sha,
                                                     share))
            for p in batch:
                results[p] = self._finish(facts, p, tables[p], streams[p])
        for p in alone:
            results[p] = self._write_partition(conn, facts, p, streams[p])
        for p, stream in streams.items():
            if stream.error is not None:
                results[p] = stream.error
        return {p: results[p] for p in weddings}

    def _find_weddings(self, conn, plan: tenancy.TenancyPlan, weddings: list[str]
                       ) -> dict[str, str | UnknownWeddingError]:
        """wedding id → its key's text in the root table, or why there is no such wedding. One query
        for the batch; one more for each id it did not find as spelled (or for all of them when some
        id is not even a valid key: that error ends the batch query)."""
        root_key = self._root_key(plan)
        query = sql.SQL("SELECT {key}::text FROM {root} WHERE {key} = ANY({ids})").format(
            key=root_key, root=plan.root.ident(), ids=sql.Literal(_array_literal(weddings)))
        try:
            found = {row[0] for row in self._query_in_savepoint(conn, query)}
        except (psycopg.DataError, psycopg.ProgrammingError):
            found = set()
        return {p: p if p in found else self._find_wedding(conn, plan, p) for p in weddings}

    def _find_wedding(self, conn, plan: tenancy.TenancyPlan, wedding_id: str) -> str | UnknownWeddingError:
        """One wedding's key text, or the error `snapshot()` raises for it, without ending the transaction."""
        query = sql.SQL("SELECT {key}::text FROM {root} WHERE {key} = {id}").format(
            key=self._root_key(plan), root=plan.root.ident(), id=sql.Literal(wedding_id))
        try:
            rows = self._query_in_savepoint(conn, query)
        except (psycopg.DataError, psycopg.ProgrammingError):
            return UnknownWeddingError(wedding_id, f"not a valid key for {plan.root}.{plan.root_key[0]}")
        if not rows:
            return UnknownWeddingError(wedding_id, f"no such wedding in {plan.root} of the source database")
        return rows[0][0]

    @staticmethod
    def _query_in_savepoint(conn, query: sql.Composable) -> list[tuple]:
        """Rows of `query`; an error in it is rolled back to a savepoint, so the snapshot transaction
        (and what the other weddings of a batch read) survives it. One round trip when it succeeds."""
        text = sql.SQL("SAVEPOINT wedbackup_check; {}; RELEASE SAVEPOINT wedbackup_check").format(query)
        try:
            cur = conn.execute(text.as_string(conn))
        except psycopg.Error:
            conn.execute("ROLLBACK TO SAVEPOINT wedbackup_check; RELEASE SAVEPOINT wedbackup_check")
            raise
        cur.nextset()
        return cur.fetchall()

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

    def _batch_statements(self, conn, plan: tenancy.TenancyPlan) -> list[list[bytes]]:
        """Each tenant table's batch COPY (same order as `_statements`), cut at the wedding_ids placeholder."""
        key = (id(plan), "batch")
        cached = self._rendered.get(key)
        if cached is None or cached[0] is not plan:
            statements = []
            for t in plan.tenant_tables:
                copy = sql.SQL("COPY ({}) TO STDOUT").format(t.wedding_batch_select()).as_bytes(conn)
                parts = copy.split(_WEDDINGS_PLACEHOLDER)
                if len(parts) != 2 or b"%" in b"".join(parts):
                    raise SnapshotError(f"the batch SELECT of {t.table} holds an unexpected placeholder: "
                                        f"{copy[:200]!r}")
                statements.append(parts)
            cached = self._rendered[key] = (plan, statements)
        return cached[1]

    @staticmethod
    def _root_key(plan: tenancy.TenancyPlan) -> sql.Identifier:
        if len(plan.root_key) != 1:
            raise SnapshotError(f"tenant root {plan.root} must have a single-column key, has {list(plan.root_key)}")
        return sql.Identifier(plan.root_key[0])

    @classmethod
    def _check_wedding(cls, conn, plan: tenancy.TenancyPlan, wedding_id: str) -> None:
        query = sql.SQL("SELECT EXISTS (SELECT FROM {} WHERE {} = %s)").format(plan.root.ident(), cls._root_key(plan))
        try:
            found = conn.execute(query, (wedding_id,)).fetchone()[0]
        except (psycopg.DataError, psycopg.ProgrammingError):
            raise UnknownWeddingError(wedding_id, f"not a valid key for {plan.root}.{plan.root_key[0]}") from None
        if not found:
            raise UnknownWeddingError(wedding_id, f"no such wedding in {plan.root} of the source database")


def _table_begin(t: tenancy.TenantTable | tenancy.PlatformTable, select_sql: str,
                 params: dict[str, str] | None) -> bytes:
    return _json_bytes({"schema": t.table.schema, "name": t.table.name, "columns": list(t.columns),
                        "select_sql": select_sql, "params": params, "order_by": list(t.order_by)})


def _table_manifest(t: tenancy.TenantTable | tenancy.PlatformTable, select_sql: str, params: dict[str, str] | None,
                    rows: int, nbytes: int, sha: str, seconds: float) -> TableManifest:
    return TableManifest(schema=t.table.schema, name=t.table.name, columns=list(t.columns), rows=rows, bytes=nbytes,
                         sha256=sha, select_sql=select_sql, params=params, order_by=list(t.order_by),
                         path=_path_text(t), seconds=round(seconds, 6))


def _array_literal(values: Iterable[str]) -> str:
    """A PostgreSQL array literal of `values`, every element quoted (the server casts it to the key's type)."""
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


class _GuardedSink:
    """One wedding's sink inside a batch: a failing write is remembered and ends only that wedding's
    stream, so the batch's COPY (and the other weddings) carry on."""

    def __init__(self, wedding_id: str, sink: Sink):
        self.wedding_id = wedding_id
        self._sink = sink
        self.error: WedbackupError | None = None

    def write(self, data: bytes | bytearray) -> None:
        if self.error is not None:
            return
        try:
            self._sink.write(data)
        except Exception as e:
            if isinstance(e, WedbackupError):
                self.error = e
            else:
                self.error = SnapshotError(
                    f"wedding {self.wedding_id}: writing its snapshot failed: {type(e).__name__}: {e}")
                self.error.__cause__ = e


class _TableOut:
    """One wedding's rows of one table: counted, hashed and written as DATA records, as `_copy_table` does."""

    __slots__ = ("sink", "digest", "rows", "bytes")

    def __init__(self, sink: Sink):
        self.sink = sink
        self.digest = hashlib.sha256()
        self.rows = 0
        self.bytes = 0

    def emit(self, buf: bytearray) -> None:
        self.digest.update(buf)
        self.rows += buf.count(b"\n")
        self.bytes += len(buf)
        _write_data(self.sink, buf)


def _copy_batch(conn, query: bytes, outs: Mapping[bytes, _TableOut], table: tenancy.TableName) -> None:
    """Run a batch COPY (each row led by its wedding's key and a tab, rows grouped by wedding) and hand
    each wedding its own rows without that key, framed exactly as `copy_out` frames a COPY of that
    wedding alone: a DATA record closes at the first row end at or past DATA_RECORD_TARGET.

    The server sends one message per row (the protocol promises it for COPY OUT), so the key is cut
    off each message as it arrives: a slice per row, which costs less than searching the text for
    row starts when rows are large (documents), and no more when they are small."""
    pgconn = _start_copy(conn, query)
    get = pgconn.get_copy_data
    target = DATA_RECORD_TARGET
    out: _TableOut | None = None
    seen: set[bytes] = set()
    prefix = b""
    cut = 0
    buf = bytearray()
    while True:
        nbytes, data = get(1)
        if nbytes > 0:
            if out is None or data[:cut] != prefix:  # the next wedding's rows begin
                if buf:
                    out.emit(buf)
                    buf = bytearray()
                row = bytes(data)
                key = row[:max(0, row.find(b"\t"))]
                out = outs.get(key)
                if out is None or key in seen or not row.endswith(b"\n"):
                    _drain_copy(pgconn)
                    what = "a row of no wedding in the batch" if out is None else \
                        "rows of one wedding in two places" if key in seen else "a message that is not one row"
                    raise SnapshotError(f"the batch COPY of {table} returned {what} (key {key[:80]!r})")
                seen.add(key)
                cut = len(key) + 1
                prefix = row[:cut]
            buf += data[cut:]
            if len(buf) >= target:
                out.emit(buf)
                buf = bytearray()
        elif nbytes == 0:  # nothing buffered: wait for the socket without holding the GIL
            select.select([pgconn.socket], [], [])
            pgconn.consume_input()
        else:
            break
    if buf:
        out.emit(buf)
    _finish_copy(pgconn)


def _drain_copy(pgconn) -> None:
    """Read a COPY to its end, so the connection is ready for the rollback that follows an error."""
    while True:
        nbytes, _ = pgconn.get_copy_data(0)
        if nbytes < 0:
            break
    while _next_result(pgconn) is not None:
        pass


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
