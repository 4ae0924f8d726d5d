"""The logical snapshot of one wedding (or of the platform partition): one REPEATABLE READ transaction,
the schema DDL from pg_dump, and every table's rows as COPY text, framed into one stream with a manifest.

The stream format (docs/SNAPSHOT.md), its writer and its reader, is core/formats/snapshot_stream.py.
"""
from __future__ import annotations

import hashlib
import os
import re
import select
import shutil
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from wedbackup_dagster.core.postgres import tenancy
from wedbackup_dagster.core.errors import (SnapshotError, SnapshotIncomplete, SnapshotRetryable, UnknownWeddingError,
                                           WedbackupError)
from wedbackup_dagster.core.formats.snapshot_stream import (DATA, DATA_RECORD_TARGET, FORMAT_NAME, FORMAT_VERSION,
                                                            HEADER, MAGIC, MANIFEST, MAX_DATA_RECORD, POST_DATA,
                                                            PRE_DATA, TABLE_BEGIN, TABLE_END, Manifest, Sink,
                                                            TableManifest, json_payload, json_payload_with,
                                                            json_text, write_record)
from wedbackup_dagster.core.partitions import PLATFORM, partition_label

_WEDDING_PLACEHOLDER = b"%(wedding_id)s"
_WEDDINGS_PLACEHOLDER = b"%(wedding_ids)s"  # a batch's array of wedding ids
_T = TypeVar("_T")

# How long the snapshot waits for its ACCESS SHARE lock on a table (WEDBACKUP_SNAPSHOT_LOCK_TIMEOUT).
DEFAULT_LOCK_TIMEOUT = 30.0


# --- the schema: description, fingerprint, DDL ------------------------------------------------------

# `restore --all`'s bookkeeping in its target (core/disaster/); never part of the data it restores.
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


def _run_pg_dump(dsn: str, server_version_num: int, section: str, snapshot_id: str,
                 lock_timeout: float | None = None) -> str:
    parts = conninfo_to_dict(dsn)
    env = dict(os.environ)
    password = parts.pop("password", None)
    if password is not None:
        env["PGPASSWORD"] = password
    argv = [pg_tool("pg_dump", server_version_num), "--schema-only", "--no-owner", "--no-privileges",
            "--no-publications", "--no-subscriptions", "--no-security-labels", "--no-tablespaces",
            f"--section={section}", f"--snapshot={snapshot_id}", "--dbname", make_conninfo(**parts)]
    if lock_timeout is not None:  # pg_dump locks every table too: a held lock fails it, bounded like ours
        argv.insert(1, f"--lock-wait-timeout={max(1, round(lock_timeout * 1000))}ms")
    proc = subprocess.run(argv, env=env, capture_output=True, timeout=600)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        if password:
            err = err.replace(password, "***")
        error = SnapshotRetryable if "could not obtain lock" in err else SnapshotError
        raise error(f"pg_dump --section={section} of {database_label(dsn)} failed: {err[-2000:]}")
    return _PSQL_META.sub("", proc.stdout.decode())


def schema_ddl(conn, dsn: str, fingerprint: str, *, lock_timeout: float | None = None) -> SchemaDDL:
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
    pre = _run_pg_dump(dsn, version, "pre-data", snapshot_id, lock_timeout)
    post = _run_pg_dump(dsn, version, "post-data", snapshot_id, lock_timeout)
    ddl = SchemaDDL(fingerprint=fingerprint, pre_data=pre, post_data=post,
                    description=tuple(tuple(r) for r in describe_schema(conn)),
                    foreign_keys=tuple(foreign_keys(conn)))
    with _DDL_LOCK:
        _DDL_CACHE[key] = ddl
        while len(_DDL_CACHE) > _DDL_CACHE_SIZE:
            _DDL_CACHE.popitem(last=False)
    return ddl


# --- framing ----------------------------------------------------------------------------------------

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
                 overrides: dict[str, object] | None = None, share_seconds: float = 0.0,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT):
        self.source_dsn = source_dsn
        self.share_seconds = share_seconds
        self.lock_timeout = lock_timeout  # seconds to wait for each table's ACCESS SHARE lock
        self._shared: tuple[float, tuple[Any, ...]] | None = None  # (opened at, transaction facts)
        self._fixed_plan = plan
        self._root = root
        self._overrides = overrides
        self._plans: dict[str, tenancy.TenancyPlan] = {}
        self._rendered: dict[tuple, tuple[tenancy.TenancyPlan, list]] = {}
        self._conn: psycopg.Connection | None = None
        self._header_parts: tuple[Any, Any, dict[str, str]] | None = None  # (ddl, plan, their JSON), _write_head

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
        user = conn.info.user
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
            refusal = row_security_refusal(exc, f"snapshot of {database_label(self.source_dsn)}", user)
            if refusal is not None:
                raise refusal from None
            if isinstance(exc, psycopg.errors.LockNotAvailable) and not conn.closed:
                # Reading the schema (pg_get_expr & co. open the tables) waited past lock_timeout.
                raise SnapshotRetryable(
                    f"snapshot of {database_label(self.source_dsn)}: reading the schema waited longer than the "
                    f"snapshot lock timeout ({self.lock_timeout:g} s, WEDBACKUP_SNAPSHOT_LOCK_TIMEOUT) for "
                    f"{_lock_holders(conn)}; retry when that transaction has ended") from None
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
        # row_security off, as pg_dump sets it: a table the role would read filtered by a row-level
        # security policy is refused by the server (see row_security_refusal), never copied short.
        opened = time.monotonic()
        lock_ms = max(1, round(self.lock_timeout * 1000))
        cur = conn.execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;"
            " SELECT pg_catalog.set_config('search_path', '', true),"
            " pg_catalog.set_config('row_security', 'off', true),"
            f" pg_catalog.set_config('lock_timeout', '{lock_ms}ms', true), pg_catalog.now(),"
            " pg_catalog.pg_current_snapshot()::text,"
            " pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text::bigint,"
            " pg_catalog.current_setting('server_version')")
        cur.nextset()
        _, _, _, snap_time, snapshot, xmin, server_version = cur.fetchone()
        fingerprint = schema_fingerprint(conn)
        ddl = schema_ddl(conn, self.source_dsn, fingerprint, lock_timeout=self.lock_timeout)
        plan = self._plan(conn, fingerprint)
        self._lock_tables(conn, plan)
        facts = (snap_time, snapshot, xmin, server_version, fingerprint, ddl, plan)
        if self.share_seconds > 0:
            self._shared = (opened, facts)
        return facts

    def _lock_tables(self, conn, plan: tenancy.TenancyPlan) -> None:
        """ACCESS SHARE on every table of the plan (a partitioned table with its partitions), as pg_dump
        takes them, so no TRUNCATE or table-rewriting ALTER (not MVCC-safe: a snapshot from before them
        reads the new, empty file) can commit until this transaction ends; then make sure none committed
        between the snapshot and the locks: every table's file (relfilenode as of the snapshot) must
        still be its file now (pg_relation_filenode reads the current catalogue). Once per transaction:
        a shared transaction's weddings are all read under these locks."""
        tables = [t.table for t in (*plan.tenant_tables, *plan.platform_tables)]
        names = {"schemas": [t.schema for t in tables], "names": [t.name for t in tables]}
        kinds = {ord_: (oid, kind) for ord_, oid, kind in conn.execute(_PLAN_RELATIONS_SQL, names)}
        for i, table in enumerate(tables, start=1):
            if i not in kinds:  # created after the snapshot began, or gone before it: the plan is stale
                raise SnapshotRetryable(f"snapshot of {database_label(self.source_dsn)}: table {table} of the "
                                        "tenancy plan is not in the snapshot's catalogue; retry the snapshot")
            oid, kind = kinds[i]
            # ONLY for an ordinary table (its inheritance children are plan tables of their own); a
            # partitioned table's partitions hold its rows and are locked with it.
            only = sql.SQL("ONLY ") if kind == "r" else sql.SQL("")
            try:
                conn.execute(sql.SQL("LOCK TABLE {}{} IN ACCESS SHARE MODE").format(only, table.ident()))
            except psycopg.errors.LockNotAvailable:
                conn.execute("ROLLBACK")  # the transaction is lost anyway; now pg_locks can be read
                raise SnapshotRetryable(
                    f"snapshot of {database_label(self.source_dsn)}: table {table} stayed locked for longer "
                    f"than the snapshot lock timeout ({self.lock_timeout:g} s, WEDBACKUP_SNAPSHOT_LOCK_TIMEOUT) "
                    f"by {_lock_holders(conn, oid)}; retry when that transaction has ended") from None
            except psycopg.errors.UndefinedTable:
                raise SnapshotRetryable(f"snapshot of {database_label(self.source_dsn)}: table {table} was "
                                        "dropped or renamed during the snapshot; retry the snapshot") from None
        changed = [tables[i - 1] for (i,) in conn.execute(_REWRITTEN_SQL, names)]
        if changed:
            raise SnapshotRetryable(
                f"snapshot of {database_label(self.source_dsn)}: table(s) {', '.join(map(str, changed))} were "
                "rewritten, truncated or dropped during the snapshot (TRUNCATE, VACUUM FULL, CLUSTER or a "
                "table-rewriting ALTER committed after it began): the snapshot would read them short; retry")

    def _write_head(self, conn, facts: tuple[Any, ...], partition: str, sink: Sink) -> None:
        """Magic, header, pre-data and post-data: everything before the first table."""
        snap_time, snapshot, xmin, server_version, fingerprint, ddl, plan = facts
        header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "partition": partition,
                  "snapshot_time": snap_time.isoformat(), "txid": xmin, "snapshot": snapshot,
                  "server_version": server_version, "server_version_num": conn.info.server_version,
                  "schema_fingerprint": fingerprint}
        if self._header_parts is None or self._header_parts[0] is not ddl or self._header_parts[1] is not plan:
            # The schema description, foreign keys and tenancy plan: the same for every wedding of a shared
            # transaction, encoded once (most of a header's bytes) instead of once per wedding.
            self._header_parts = (ddl, plan, {k: json_text(v) for k, v in (
                ("schema", [list(r) for r in ddl.description]), ("foreign_keys", list(ddl.foreign_keys)),
                ("plan", plan_description(plan)))})
        sink.write(MAGIC)
        write_record(sink, HEADER, json_payload_with(header, self._header_parts[2]))
        write_record(sink, PRE_DATA, ddl.pre_data.encode())
        write_record(sink, POST_DATA, ddl.post_data.encode())

    @staticmethod
    def _finish(facts: tuple[Any, ...], partition: str, tables: list[TableManifest], sink: Sink,
                broken_foreign_keys: list[dict[str, Any]] | None = None) -> Manifest:
        snap_time, snapshot, xmin, server_version, fingerprint, _, plan = facts
        manifest = Manifest(partition=partition, snapshot_time=snap_time.isoformat(), txid=xmin,
                            snapshot=snapshot, server_version=server_version, schema_fingerprint=fingerprint,
                            tables=tables, plan=plan_description(plan), broken_foreign_keys=broken_foreign_keys)
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
        counts = conn.execute(self._count_statement(conn, plan, partition == PLATFORM), params,
                              prepare=True).fetchone()[0]
        for (t, select_sql, parts), counted in zip(self._statements(conn, plan, partition == PLATFORM), counts):
            t0 = time.monotonic()
            write_record(sink, TABLE_BEGIN, _table_begin(t, select_sql, params))
            rows, nbytes, sha = _copy_table(conn, literal.join(parts), None, sink)
            _check_count(partition, t, rows, counted)
            write_record(sink, TABLE_END, json_payload({"rows": rows, "bytes": nbytes, "sha256": sha}))
            tables.append(_table_manifest(t, select_sql, params, rows, nbytes, sha, time.monotonic() - t0, counted))
        broken = broken_foreign_keys(conn, plan) if partition == PLATFORM else None
        return self._finish(facts, partition, tables, sink, broken)

    def _write_many(self, conn, facts: tuple[Any, ...], weddings: list[str], sinks: Mapping[str, Sink]
                    ) -> dict[str, Manifest | WedbackupError]:
        plan = facts[6]
        results: dict[str, Manifest | WedbackupError] = {}
        keys = self._find_weddings(conn, plan, weddings)
        batch = [p for p in weddings if keys[p] == p]
        # A wedding found under another spelling of its key ("07" for 7) is refused: one wedding, one
        # partition (and the batch routes rows by the key's text as COPY prints it).
        for p in weddings:
            if isinstance(keys[p], str) and keys[p] != p:
                keys[p] = _other_spelling(plan, p, keys[p])
            if isinstance(keys[p], WedbackupError):
                results[p] = keys[p]
        streams = {p: _GuardedSink(p, sinks[p]) for p in batch}
        if batch:
            for p in batch:
                self._write_head(conn, facts, p, streams[p])
            tables: dict[str, list[TableManifest]] = {p: [] for p in batch}
            literal = sql.Literal(array_literal(batch)).as_bytes(conn)
            per_wedding = self._statements(conn, plan, False)
            # The independent count: one grouped count per table for the whole batch, one round trip.
            counts = {(i, w): n for i, w, n in conn.execute(self._batch_count_statement(conn, plan),
                                                             {"wedding_ids": array_literal(batch)}, prepare=True)}
            incomplete: dict[str, SnapshotIncomplete] = {}
            for i, ((t, select_sql, _), parts) in enumerate(zip(per_wedding, self._batch_statements(conn, plan))):
                t0 = time.monotonic()
                outs: dict[bytes, TableOut] = {}
                for p in batch:
                    write_record(streams[p], TABLE_BEGIN, _table_begin(t, select_sql, {"wedding_id": p}))
                    outs[p.encode()] = TableOut(streams[p])
                copy_batch(conn, literal.join(parts), outs, t.table)
                share = (time.monotonic() - t0) / len(batch)
                for p in batch:
                    out = outs[p.encode()]
                    sha = out.digest.hexdigest()
                    counted = counts.get((i, p), 0)
                    try:
                        _check_count(p, t, out.rows, counted)
                    except SnapshotIncomplete as e:
                        incomplete.setdefault(p, e)
                    write_record(out.sink, TABLE_END, json_payload({"rows": out.rows, "bytes": out.bytes,
                                                                   "sha256": sha}))
                    tables[p].append(_table_manifest(t, select_sql, {"wedding_id": p}, out.rows, out.bytes, sha,
                                                     share, counted))
            for p in batch:
                results[p] = incomplete[p] if p in incomplete else self._finish(facts, p, tables[p], streams[p])
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
            key=root_key, root=plan.root.ident(), ids=sql.Literal(array_literal(weddings)))
        try:
            found = {row[0] for row in self._query_in_savepoint(conn, query)}
        except psycopg.errors.InsufficientPrivilege:
            raise
        except (psycopg.DataError, psycopg.ProgrammingError):
            found = set()
        return {p: p if p in found else self._find_wedding(conn, plan, p) for p in weddings}

    def _find_wedding(self, conn, plan: tenancy.TenancyPlan, wedding_id: str) -> str | UnknownWeddingError:
        """One wedding's key text, or the error `snapshot()` raises for it, without ending the transaction."""
        query = sql.SQL("SELECT {key}::text FROM {root} WHERE {key} = {id}").format(
            key=self._root_key(plan), root=plan.root.ident(), id=sql.Literal(wedding_id))
        try:
            rows = self._query_in_savepoint(conn, query)
        except psycopg.errors.InsufficientPrivilege:
            raise
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

    def _count_statement(self, conn, plan: tenancy.TenancyPlan, platform: bool) -> bytes:
        """One query counting every table's rows of a partition (same order as `_statements`), as an
        array: count(*) over the table's filter with no ORDER BY and no column list, so the server picks
        its own plan (often another index, or none) and counts, independently of the COPY's rows as the
        client splits them. Rendered once per plan; `%(wedding_id)s` is a real parameter (sent untyped,
        so the server types it from the key column), so the session prepares the query once."""
        key = (id(plan), "count", platform)
        cached = self._rendered.get(key)
        if cached is None or cached[0] is not plan:
            count = [sql.SQL("count(*)")]
            selects = partition_selects(plan, PLATFORM if platform else "0")
            counts = [sql.SQL("SELECT count(*) FROM ({}) AS s").format(select) if platform else t.wedding_rows(count)
                      for t, select in selects]
            query = sql.SQL("SELECT ARRAY[{}]::pg_catalog.int8[]").format(
                sql.SQL(", ").join(sql.SQL("({})").format(c) for c in counts)).as_bytes(conn)
            cached = self._rendered[key] = (plan, _only_placeholder(query, _WEDDING_PLACEHOLDER, "count"))
        return cached[1]

    def _batch_count_statement(self, conn, plan: tenancy.TenancyPlan) -> bytes:
        """`_count_statement` for a batch: (table's index in the plan, wedding key's text, count) rows,
        one grouped count per tenant table, all in one query; `%(wedding_ids)s` is a real parameter."""
        key = (id(plan), "batch-count")
        cached = self._rendered.get(key)
        if cached is None or cached[0] is not plan:
            parts = []
            for i, t in enumerate(plan.tenant_tables):
                joined, filter_columns = t._reach()
                wedding = sql.Identifier(f"t{len(joined) - 1}", filter_columns[0])
                parts.append(sql.SQL("SELECT {i}, {w}::text, count(*) FROM {chain} WHERE {w} = ANY(%(wedding_ids)s) "
                                     "GROUP BY 2").format(i=sql.Literal(i), w=wedding,
                                                          chain=t._join_chain(joined, 0)))
            query = sql.SQL(" UNION ALL ").join(parts).as_bytes(conn)
            cached = self._rendered[key] = (plan, _only_placeholder(query, _WEDDINGS_PLACEHOLDER, "batch count"))
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
        query = sql.SQL("SELECT {key}::text FROM {root} WHERE {key} = %s").format(
            root=plan.root.ident(), key=cls._root_key(plan))
        try:
            found = conn.execute(query, (wedding_id,)).fetchone()
        except psycopg.errors.InsufficientPrivilege:
            raise
        except (psycopg.DataError, psycopg.ProgrammingError):
            raise UnknownWeddingError(wedding_id, f"not a valid key for {plan.root}.{plan.root_key[0]}") from None
        if found is None:
            raise UnknownWeddingError(wedding_id, f"no such wedding in {plan.root} of the source database")
        if found[0] != wedding_id:
            raise _other_spelling(plan, wedding_id, found[0])


def _other_spelling(plan: tenancy.TenancyPlan, wedding_id: str, canonical: str) -> UnknownWeddingError:
    """The error for a wedding id the root table prints otherwise ("07" for 7): backing it up under both
    names would give one wedding two partitions, each with its own key."""
    return UnknownWeddingError(wedding_id, f"{plan.root}.{plan.root_key[0]} writes this wedding's key as "
                                           f"{canonical!r}: back it up and restore it as wedding {canonical} "
                                           "(one wedding, one partition)")


# The plan's tables as of the snapshot, numbered from 1 in the order given: oid and relkind.
_PLAN_RELATIONS_SQL = """
SELECT p.ord, c.oid, c.relkind::text
FROM unnest(%(schemas)s::text[], %(names)s::text[]) WITH ORDINALITY AS p(s, n, ord)
JOIN pg_catalog.pg_namespace ns ON ns.nspname = p.s
JOIN pg_catalog.pg_class c ON c.relnamespace = ns.oid AND c.relname = p.n
"""

# Which plan tables (numbered as above) no longer have the file the snapshot sees: the catalogue rows
# are read under the snapshot, pg_relation_filenode() reads the current catalogue. Partitions count
# as their parent.
_REWRITTEN_SQL = """
WITH RECURSIVE tree AS (
    SELECT c.oid, p.ord
    FROM unnest(%(schemas)s::text[], %(names)s::text[]) WITH ORDINALITY AS p(s, n, ord)
    JOIN pg_catalog.pg_namespace ns ON ns.nspname = p.s
    JOIN pg_catalog.pg_class c ON c.relnamespace = ns.oid AND c.relname = p.n
    UNION ALL
    SELECT i.inhrelid, tree.ord FROM tree
    JOIN pg_catalog.pg_inherits i ON i.inhparent = tree.oid
    JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid AND c.relispartition
)
SELECT DISTINCT tree.ord FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.oid
WHERE c.relkind = 'r' AND c.relfilenode IS DISTINCT FROM pg_catalog.pg_relation_filenode(c.oid)
ORDER BY 1
"""


# Validated foreign keys of user tables, with the columns they match and whether each side is read
# with ONLY (an ordinary table: a legacy inheritance child's rows are not bound by its parent's FKs).
_VALIDATED_FOREIGN_KEYS_SQL = """
SELECT con.conname::text, cn.nspname::text, c.relname::text, pn.nspname::text, p.relname::text,
       c.relkind = 'r', p.relkind = 'r',
       ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum ORDER BY k.ord),
       ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum ORDER BY k.ord)
FROM pg_catalog.pg_constraint con
JOIN pg_catalog.pg_class c ON c.oid = con.conrelid JOIN pg_catalog.pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_catalog.pg_class p ON p.oid = con.confrelid JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
WHERE con.contype = 'f' AND con.convalidated AND con.conparentid = 0
  AND cn.nspname <> 'information_schema' AND cn.nspname !~ '^pg_'
ORDER BY 2, 3, 1
"""


def broken_foreign_keys(conn, plan: tenancy.TenancyPlan) -> list[dict[str, Any]]:
    """For the platform partition: validated foreign keys that rows of the source break (a non-NULL key with
    no parent row: possible after session_replication_role = replica or disabled triggers), in the
    caller's snapshot. Empty when every key holds (one query: an anti-join per key).

    Rows that break a key on their path reach no wedding and the platform carries them; their other keys
    then point at rows of weddings, not in the platform archive. So, only when something is broken, each
    key is also counted as the platform archive's own rows break it: `rows` (what a restore of the archive
    must create NOT VALID, and finds as orphans), `source_rows` (broken on the source itself)."""
    keys = conn.execute(_VALIDATED_FOREIGN_KEYS_SQL).fetchall()

    def rows_of(schema: str, name: str, only: bool) -> sql.Composable:
        return sql.SQL("{}{}").format(sql.SQL("ONLY " if only else ""), sql.Identifier(schema, name))

    source = _orphan_counts(conn, [(rows_of(cs, ct, co), rows_of(ps, pt, po), cols, pcols)
                                   for _, cs, ct, ps, pt, co, po, cols, pcols in keys])
    if not any(source):
        return []
    selects = {(t.table.schema, t.table.name): select for t, select in partition_selects(plan, PLATFORM)}
    in_archive = [i for i, k in enumerate(keys) if (k[1], k[2]) in selects]
    archive = dict(zip(in_archive, _orphan_counts(conn, [
        (sql.SQL("({})").format(selects[(cs, ct)]),
         sql.SQL("({})").format(selects[(ps, pt)]) if (ps, pt) in selects else None, cols, pcols)
        for cs, ct, ps, pt, cols, pcols in ((keys[i][1], keys[i][2], keys[i][3], keys[i][4], keys[i][7], keys[i][8])
                                            for i in in_archive)])))
    return [{"schema": k[1], "table": k[2], "constraint": k[0], "parent": f"{k[3]}.{k[4]}",
             "rows": archive.get(i, 0), "source_rows": source[i]}
            for i, k in enumerate(keys) if source[i] or archive.get(i)]


def _orphan_counts(conn, checks: list[tuple[sql.Composable, sql.Composable | None, list[str], list[str]]]
                   ) -> list[int]:
    """For each (child rows, parent rows or None for none, columns, parent columns): how many child rows
    have a non-NULL key that no parent row matches (MATCH SIMPLE). One query for all."""
    if not checks:
        return []
    parts = []
    for i, (child, parent, cols, pcols) in enumerate(checks):
        notnull = sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(sql.Identifier("c", c)) for c in cols)
        missing = sql.SQL("TRUE") if parent is None else sql.SQL("NOT EXISTS (SELECT FROM {} AS p WHERE {})").format(
            parent, sql.SQL(" AND ").join(sql.SQL("{} = {}").format(sql.Identifier("p", q), sql.Identifier("c", c))
                                          for c, q in zip(cols, pcols)))
        parts.append(sql.SQL("SELECT {}, count(*) FROM {} AS c WHERE {} AND {}").format(
            sql.Literal(i), child, notnull, missing))
    counts = dict(conn.execute(sql.SQL(" UNION ALL ").join(parts)).fetchall())
    return [counts[i] for i in range(len(checks))]


def broken_key_names(manifest: Manifest) -> set[tuple[str, str, str]]:
    """(schema, table, constraint) of every foreign key a platform manifest says the source's rows break:
    a restore of that partition creates them NOT VALID. Entries of another shape are ignored."""
    keys = manifest.broken_foreign_keys
    if not isinstance(keys, list):
        return set()
    return {(fk["schema"], fk["table"], fk["constraint"]) for fk in keys
            if isinstance(fk, dict) and all(isinstance(fk.get(k), str) for k in ("schema", "table", "constraint"))}


def _lock_holders(conn, oid: int | None = None) -> str:
    """Who holds (or queues ahead for) an ACCESS EXCLUSIVE lock on the table `oid` (else on any table of
    this database): table, pid, role, application and transaction age, never the query text (it may hold
    secrets). Read outside any transaction."""
    try:
        rows = conn.execute(
            "SELECT n.nspname || '.' || c.relname, l.pid, l.granted, a.usename::text, a.application_name, "
            "extract(epoch FROM pg_catalog.now() - a.xact_start)::int "
            "FROM pg_catalog.pg_locks l LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid "
            "LEFT JOIN pg_catalog.pg_class c ON c.oid = l.relation "
            "LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE l.locktype = 'relation' AND l.mode = 'AccessExclusiveLock' "
            "AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()) "
            "AND (l.relation = %(oid)s::oid OR %(oid)s::oid IS NULL) AND l.pid <> pg_catalog.pg_backend_pid() "
            "ORDER BY NOT l.granted, l.pid", {"oid": oid}).fetchall()
    except psycopg.Error:
        return "another session (pg_locks could not be read)"
    if not rows:
        return "another session (gone by now)"
    return "; ".join(f"pid {pid} ({'holding' if granted else 'waiting for'} ACCESS EXCLUSIVE"
                     f"{'' if oid else ' on ' + str(table)}, role {user}, application {app or '-'}, "
                     f"transaction open {age if age is not None else '?'} s)"
                     for table, pid, granted, user, app, age in rows[:5])


_ROW_SECURITY_REFUSAL = re.compile(r'row-level security policy for table "((?:[^"]|"")+)"')


def row_security_refusal(exc: BaseException, what: str, role: str | None) -> SnapshotError | None:
    """The server's refusal to read a table past its row-level security policy (with row_security =
    off, a role that would see rows filtered gets an error instead) as an error naming the table and
    what the role needs; None for any other error."""
    if not isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return None
    found = _ROW_SECURITY_REFUSAL.search(str(exc))
    if found is None:
        return None
    table = found.group(1).replace('""', '"')
    return SnapshotError(
        f"{what}: table {table} has row-level security, and role {role} would read it filtered by its policy, "
        f"so nothing was backed up from a short read: give the backup role BYPASSRLS (ALTER ROLE {role} "
        "BYPASSRLS), or make it the owner of the table without FORCE ROW LEVEL SECURITY")


def _only_placeholder(query: bytes, placeholder: bytes, what: str) -> bytes:
    """`query` when its only `%` characters are `placeholder`s (a name holding a % would be taken for a
    parameter), else a SnapshotError naming the query, as `_statements` raises for the COPYs."""
    if b"%" in b"".join(query.split(placeholder)):
        raise SnapshotError(f"the {what} query holds an unexpected placeholder: {query[:200]!r}")
    return query


def _table_begin(t: tenancy.TenantTable | tenancy.PlatformTable, select_sql: str,
                 params: dict[str, str] | None) -> bytes:
    return json_payload({"schema": t.table.schema, "name": t.table.name, "columns": list(t.columns),
                        "select_sql": select_sql, "params": params, "order_by": list(t.order_by)})


def _table_manifest(t: tenancy.TenantTable | tenancy.PlatformTable, select_sql: str, params: dict[str, str] | None,
                    rows: int, nbytes: int, sha: str, seconds: float, counted: int) -> TableManifest:
    return TableManifest(schema=t.table.schema, name=t.table.name, columns=list(t.columns), rows=rows, bytes=nbytes,
                         sha256=sha, select_sql=select_sql, params=params, order_by=list(t.order_by),
                         path=_path_text(t), seconds=round(seconds, 6), counted=counted)


def _check_count(partition: str, t: tenancy.TenantTable | tenancy.PlatformTable, rows: int, counted: int) -> None:
    if rows != counted:
        what = partition_label(partition)
        raise SnapshotIncomplete(
            f"snapshot of {what}: table {t.table}: the COPY handed over {rows} rows but count(*) of the same rows "
            f"in the same snapshot found {counted}: the archive would be incomplete, so none is written; "
            "report this (it is a defect in the read path, or a damaged index on the source: try REINDEX)")


def count_mismatches(manifest: Manifest, restored_rows: Mapping[str, int]) -> list[str]:
    """Tables whose restored row count differs from the independent count taken at snapshot time (the
    manifest's `counted`; archives written before it have none and are not checked here)."""
    problems = []
    for t in manifest.tables:
        if t.counted is not None and restored_rows.get(t.table) != t.counted:
            problems.append(f"table {t.table}: {restored_rows.get(t.table)} rows restored, {t.counted} counted "
                            "independently at snapshot time")
    return problems


def array_literal(values: Iterable[str]) -> str:
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


class TableOut:
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


def copy_batch(conn, query: bytes, outs: Mapping[bytes, TableOut], table: tenancy.TableName) -> None:
    """Run a batch COPY (each row led by its wedding's key and a tab, rows grouped by wedding) and hand
    each wedding its own rows without that key, framed exactly as `copy_out` frames a COPY of that
    wedding alone: a DATA record closes at the first row end at or past DATA_RECORD_TARGET.

    The server sends one message per row (the protocol promises it for COPY OUT), so the key is cut
    off each message as it arrives: a slice per row, which costs less than searching the text for
    row starts when rows are large (documents), and no more when they are small."""
    pgconn = _start_copy(conn, query)
    get = pgconn.get_copy_data
    target = DATA_RECORD_TARGET
    out: TableOut | None = None
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
