"""Restore a snapshot stream into a target database (one transaction, all-or-nothing, checked against
its manifest), verify a restored copy independently, and provide throw-away scratch databases."""
from __future__ import annotations

import contextlib
import hashlib
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from wedbackup_dagster.core.postgres import tenancy
from wedbackup_dagster.core.partitions import PLATFORM, partition_label
from wedbackup_dagster.core.errors import (RestoreError, SchemaMismatchError, SnapshotFormatError,
                                           VerificationError)
from wedbackup_dagster.core.formats.snapshot_stream import (MANIFEST, Manifest, Record, TableTotals,
                                                            check_table_end, header_of, manifest_of, read_snapshot,
                                                            read_table_data, read_to_end, table_begin_of)
from wedbackup_dagster.core.postgres.snapshot import (broken_key_names, copy_out, database_label, describe_schema,
                                                      partition_selects, plan_description, schema_fingerprint,
                                                      schema_is_empty, use_qualified_names)

# --- reports ----------------------------------------------------------------------------------------

@dataclass
class TableReport:
    table: str
    rows: int
    bytes: int
    seconds: float
    ok: bool = True
    problem: str = ""


@dataclass
class RestoreReport(TableTotals):
    partition: str
    target: str  # database label, never a DSN
    tables: list[TableReport]
    created_schema: bool
    schema_fingerprint: str
    schema_matches: bool  # after the restore, the target's fingerprint equals the archive's
    sequences: list[dict[str, Any]] = field(default_factory=list)
    triggers_held: list[str] = field(default_factory=list)  # user triggers disabled during the load
    unvalidated_foreign_keys: list[str] = field(default_factory=list)  # created NOT VALID: parents elsewhere
    seconds: float = 0.0
    # defer_post_data: the archive's secondary indexes, foreign keys and triggers, not yet applied (apply_deferred)
    deferred_post_data: str = field(default="", repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("deferred_post_data")
        d.update(total_rows=self.total_rows, total_bytes=self.total_bytes)
        return d


@dataclass
class ForeignKeyCheck:
    constraint: str
    table: str
    parent: str
    status: str  # "ok", "orphans", "external, not checked", "unreadable"
    orphans: int = 0
    problem: str = ""  # why an unreadable key could not be checked


@dataclass
class VerifyReport(TableTotals):
    partition: str
    target: str
    tables: list[TableReport]
    foreign_keys: list[ForeignKeyCheck]
    seconds: float = 0.0

    @property
    def problems(self) -> list[str]:
        out = [f"table {t.table}: {t.problem}" for t in self.tables if not t.ok]
        out += [f"foreign key {f.constraint} on {f.table}: {f.orphans} row(s) without a parent in {f.parent}"
                for f in self.foreign_keys if f.status == "orphans"]
        out += [f"foreign key {f.constraint} on {f.table}: cannot be checked: {f.problem}"
                for f in self.foreign_keys if f.status == "unreadable"]
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise VerificationError(f"restore of {partition_label(self.partition)} into {self.target} does not "
                                    f"match its manifest: " + "; ".join(self.problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ok=self.ok, problems=self.problems, total_rows=self.total_rows, total_bytes=self.total_bytes)
        return d


# --- schema comparison ------------------------------------------------------------------------------

def schema_differences(archive: Iterable[Iterable[str]], target: Iterable[Iterable[str]], limit: int = 25) -> list[str]:
    """Readable differences between two schema descriptions ([kind, key, detail] lines)."""
    a = {(k, key): d for k, key, d in archive}
    t = {(k, key): d for k, key, d in target}
    out = []
    for k, key in sorted(a.keys() | t.keys()):
        if (k, key) not in t:
            out.append(f"{k} {key} ({a[(k, key)]}) is in the archive but not in the target")
        elif (k, key) not in a:
            out.append(f"{k} {key} ({t[(k, key)]}) is in the target but not in the archive")
        elif a[(k, key)] != t[(k, key)]:
            out.append(f"{k} {key} differs: archive has {a[(k, key)]!r}, target has {t[(k, key)]!r}")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out


# --- post-data DDL ----------------------------------------------------------------------------------

# pg_dump's plain output heads every object with "-- Name: ...; Type: ...; Schema: ...; Owner: ..."
_TOC = re.compile(r"^--\n-- Name: (?P<name>.*); Type: (?P<type>.*?); Schema: (?P<schema>.*?); Owner: .*\n--\n",
                  re.MULTILINE)


def split_ddl(script: str) -> list[tuple[str, str, str, str, str]]:
    """(type, schema, name, heading, body) per pg_dump entry; the preamble (SETs) has type ''."""
    matches = list(_TOC.finditer(script))
    first = matches[0].start() if matches else len(script)
    out = [("", "", "", "", script[:first])]
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(script)
        out.append((m["type"], m["schema"], m["name"], m.group(0), script[m.end():end]))
    return out


def _post_data_script(post_data: str, external_fks: set[tuple[str, str, str]]) -> tuple[str, list[str]]:
    """The post-data script with foreign keys to tables outside the archive made NOT VALID: their
    parent rows live in another partition, so they cannot be validated here (new rows still are)."""
    if not external_fks:
        return post_data, []
    parts, relaxed = [], []
    for typ, schema, name, heading, body in split_ddl(post_data):
        table, _, constraint = name.partition(" ")
        if typ == "FK CONSTRAINT" and (schema, table, constraint) in external_fks:
            statement = body.rstrip()
            # pg_dump writes one FK per entry, as a single ALTER TABLE ... ADD CONSTRAINT statement.
            if statement.endswith(";") and statement.count(";") == 1:
                body = statement[:-1] + " NOT VALID;\n\n"
                relaxed.append(f"{schema}.{table}.{constraint}")
        parts.append(heading + body)
    return "".join(parts), relaxed


# What a load into fresh tables is faster without, built once the rows are in (as pg_restore does): indexes that
# enforce nothing, foreign keys (validated when added), triggers. Primary keys, unique and exclusion constraints
# and unique indexes stay with the tables, so a row loaded twice is still refused by the load that brings it.
_DEFERRABLE = {"INDEX", "INDEX ATTACH", "FK CONSTRAINT", "TRIGGER"}
_UNIQUE_INDEX = re.compile(r"^CREATE UNIQUE INDEX ", re.MULTILINE)


def split_post_data(script: str) -> tuple[str, str]:
    """(what to apply with the schema, what may wait until the rows are loaded) of a post-data script, each in
    pg_dump's order with its preamble. An INDEX ATTACH waits exactly when its partition's index does."""
    now: list[str] = []
    later: list[str] = []
    waiting: set[tuple[str, str]] = set()
    for typ, schema, name, heading, body in split_ddl(script):
        if not typ:
            now.append(body)
            later.append(body)
            continue
        if typ == "INDEX":
            wait = not _UNIQUE_INDEX.search(body)
            if wait:
                waiting.add((schema, name))
        elif typ == "INDEX ATTACH":
            wait = (schema, name) in waiting
        else:
            wait = typ in _DEFERRABLE
        (later if wait else now).append(heading + body)
    return "".join(now), ("".join(later) if len(later) > 1 else "")


def relax_foreign_keys(script: str) -> str:
    """A post-data script with every foreign key created NOT VALID (its orphans then counted by
    check_foreign_keys and named, instead of failing the whole script)."""
    fks = {(schema, *name.partition(" ")[::2]) for typ, schema, name, _, _ in split_ddl(script)
           if typ == "FK CONSTRAINT"}
    return _post_data_script(script, fks)[0]


def apply_deferred(conn, script: str, what: str, target: str, *, then: Callable[[Any], None] | None = None) -> None:
    """The post-data a restore deferred (RestoreReport.deferred_post_data), in one transaction: indexes built,
    foreign keys added and validated over every row loaded, triggers created; `then(conn)` last in the same
    transaction. The archive's own DDL, as the rest of its post-data (see _restore_in_transaction)."""
    try:
        with conn.transaction():
            conn.execute(script)
            use_qualified_names(conn)
            if then is not None:
                then(conn)
    except psycopg.Error as e:
        raise RestoreError(f"restore of {what} into {target}: constraints and indexes (post-data DDL, built after "
                           f"the rows were loaded) cannot be applied: {db_error_line(e)}") from None


# --- restoring --------------------------------------------------------------------------------------

_SEQUENCES_SQL = """
WITH t AS (SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
           JOIN unnest(%(schemas)s::text[], %(names)s::text[]) AS r(s, n) ON r.s = n.nspname AND r.n = c.relname)
SELECT DISTINCT sn.nspname::text, s.relname::text, tn.nspname::text, tc.relname::text, a.attname::text,
       tc.relkind::text
FROM (
    SELECT d.objid AS seq, d.refobjid AS tab, d.refobjsubid AS att FROM pg_catalog.pg_depend d
    WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
      AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.deptype IN ('a', 'i')
      AND d.refobjid IN (SELECT oid FROM t)
    UNION
    SELECT d.refobjid, ad.adrelid, ad.adnum FROM pg_catalog.pg_attrdef ad
    JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass AND d.objid = ad.oid
     AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
    WHERE ad.adrelid IN (SELECT oid FROM t)
) x
JOIN pg_catalog.pg_class s ON s.oid = x.seq AND s.relkind = 'S'
JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace
JOIN pg_catalog.pg_sequence sq ON sq.seqrelid = s.oid AND sq.seqincrement > 0
JOIN pg_catalog.pg_class tc ON tc.oid = x.tab JOIN pg_catalog.pg_namespace tn ON tn.oid = tc.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = x.tab AND a.attnum = x.att
ORDER BY 1, 2, 3, 4, 5
"""

_USER_TRIGGERS_SQL = """
SELECT n.nspname::text, c.relname::text, tg.tgname::text, tg.tgenabled::text, c.relkind::text
FROM pg_catalog.pg_trigger tg JOIN pg_catalog.pg_class c ON c.oid = tg.tgrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN unnest(%(schemas)s::text[], %(names)s::text[]) AS r(s, n) ON r.s = n.nspname AND r.n = c.relname
WHERE NOT tg.tgisinternal AND tg.tgenabled <> 'D'
ORDER BY 1, 2, 3
"""

_ENABLE = {"O": sql.SQL("ENABLE TRIGGER"), "A": sql.SQL("ENABLE ALWAYS TRIGGER"), "R": sql.SQL("ENABLE REPLICA TRIGGER")}


def db_error_line(e: BaseException) -> str:
    """The error's first line; a row-security refusal (see no_row_security) also says what the role needs."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if is_row_security_refusal(e):
        line += (" (row security is off, as for pg_dump, so that a policy cannot silently hide rows: the "
                 "connecting role needs BYPASSRLS — ALTER ROLE <role> BYPASSRLS — or must own the table, "
                 "which then must not FORCE ROW LEVEL SECURITY)")
    return line


def is_row_security_refusal(e: BaseException) -> bool:
    return isinstance(e, psycopg.errors.InsufficientPrivilege) and "row-level security" in str(e)


def no_row_security(conn) -> None:
    """row_security off for the rest of the transaction, as pg_dump sets it: a table whose policy would
    filter what this role sees raises (InsufficientPrivilege, naming the table) instead of silently
    reading, locking or deleting fewer rows."""
    conn.execute("SELECT pg_catalog.set_config('row_security', 'off', true)")


def exact_table(schema: str, name: str, relkind: str) -> sql.Composable:
    """A table in a FROM, ALTER or DELETE addressing exactly its own rows: ONLY for an ordinary table
    (never its legacy INHERITS children); a partitioned table ('p') as itself, its partitions being its rows."""
    ident = sql.Identifier(schema, name)
    return ident if relkind == "p" else sql.SQL("ONLY {}").format(ident)


def copy_table_in(cur, into: sql.Composable, columns: list[str], records: Iterator[Record],
                  on_chunk: Callable[[int], None] | None = None) -> tuple[int, int, str, Record | None]:
    """COPY one table's data records, up to the record that ends them, into `into`, hashing as they go.
    Returns (rows, bytes, sha256, the record that ended the data); `on_chunk(rows so far)` after each
    chunk. psycopg's errors pass through: the caller names the restore they belong to."""
    query = sql.SQL("COPY {} ({}) FROM STDIN").format(into, sql.SQL(", ").join(map(sql.Identifier, columns)))
    with cur.copy(query) as copy:
        return read_table_data(records, copy.write, on_chunk)


def restore_snapshot(chunks: Iterable[bytes], target_dsn: str, *, create_schema: bool | str = "auto",
                     name: str = "snapshot stream", hold_triggers: bool = True,
                     before_commit: Callable[[Any, RestoreReport], None] | None = None,
                     defer_post_data: bool = False) -> RestoreReport:
    """Restore a snapshot stream into the target, in ONE transaction: committed only when every table
    matches the manifest. `create_schema`: True applies the archive's DDL (target must be empty of it),
    False requires the target's schema to match the archive's fingerprint, "auto" picks by whether the
    target is empty. Raises SchemaMismatchError, VerificationError, RestoreError, SnapshotFormatError.
    `hold_triggers=False` leaves the target's triggers enabled (no ALTER TABLE lock: parallel loads into the
    same tables, for a caller that knows no user trigger fires on INSERT); `before_commit(conn, report)` runs
    last inside the transaction (core/disaster/ records its progress row there). `defer_post_data`, when the
    schema is created: the post-data split (split_post_data), what may wait left out and handed back in
    `deferred_post_data` for the caller to apply (apply_deferred) once more rows are loaded."""
    if create_schema not in (True, False, "auto"):
        raise ValueError(f"create_schema must be True, False or 'auto', not {create_schema!r}")
    started = time.monotonic()
    target = database_label(target_dsn)
    records = read_snapshot(chunks, name=name)
    header = header_of(next(records))
    pre_data = next(records).text()
    post_data = next(records).text()
    partition = str(header["partition"])
    try:
        conn = psycopg.connect(target_dsn, autocommit=True, application_name="wedbackup-restore")
    except psycopg.OperationalError as e:
        raise RestoreError(f"cannot connect to {target}: {db_error_line(e)}") from None
    except psycopg.Error:
        # psycopg's parse errors quote the connection string (`missing "=" after "<password>"`): never echo it.
        raise RestoreError(f"cannot connect to {target}: the connection string does not parse") from None
    with conn:
        conn.execute("BEGIN")
        try:
            report = _restore_in_transaction(conn, records, header, pre_data, post_data, create_schema, target,
                                             name, hold_triggers=hold_triggers, defer_post_data=defer_post_data)
            if before_commit is not None:
                before_commit(conn, report)
            conn.execute("COMMIT")
        except BaseException:
            if not conn.closed:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
            raise
    report.seconds = round(time.monotonic() - started, 6)
    report.partition = partition
    return report


def _restore_in_transaction(conn, records: Iterator[Record], header: dict[str, Any], pre_data: str,
                            post_data: str, create_schema: bool | str, target: str, name: str, *,
                            hold_triggers: bool = True, defer_post_data: bool = False) -> RestoreReport:
    use_qualified_names(conn)
    no_row_security(conn)
    partition = str(header["partition"])
    what = partition_label(partition)
    if create_schema == "auto":
        create_schema = schema_is_empty(describe_schema(conn))
    if create_schema:
        # The one place SQL text from an archive is executed: its pre- and post-data DDL (pg_dump's
        # script, sealed and authenticated with the archive), only into a target that holds nothing of
        # ours yet. Every other statement of a restore or a verification is built here from names and
        # columns with psycopg.sql; nothing else an archive carries (header, table records, manifest,
        # select_sql) is ever run.
        try:
            conn.execute(pre_data)
        except psycopg.Error as e:
            raise RestoreError(f"restore of {what} into {target}: the schema (pre-data DDL) cannot be created: "
                               f"{db_error_line(e)}") from None
        use_qualified_names(conn)
    else:
        found = schema_fingerprint(conn)
        if found != header["schema_fingerprint"]:
            diffs = schema_differences(header.get("schema", []), describe_schema(conn))
            raise SchemaMismatchError(
                f"restore of {what} into {target}: the target's schema differs from the archive's "
                f"(fingerprint {found[:12]} vs {header['schema_fingerprint'][:12]}):\n  " + "\n  ".join(diffs))

    tables: list[TableReport] = []
    seen: dict[str, tuple[int, int, str]] = {}
    stream_columns: dict[str, list[str]] = {}
    table_names: list[tuple[str, str]] = []
    held: list[tuple[str, str, str, str, str]] = []
    manifest_record: Record | None = None
    with conn.cursor() as cur:
        for record in records:
            if record.kind == MANIFEST:
                manifest_record = record
                break
            schema, tname, columns = table_begin_of(record)  # read_snapshot guarantees a table-begin here
            table = f"{schema}.{tname}"
            if table in seen:  # its rows would go in twice (nothing refuses them in a table without a key)
                raise SnapshotFormatError(name, f"table {table} appears twice in the stream")
            table_names.append((schema, tname))
            stream_columns[table] = list(columns)
            if not create_schema and hold_triggers:
                held += _hold_triggers(conn, schema, tname)
            t0 = time.monotonic()
            try:
                rows, nbytes, sha, end_record = copy_table_in(cur, sql.Identifier(schema, tname), columns, records)
            except psycopg.Error as e:
                raise RestoreError(f"restore of {what} into {target}: table {table} refused its rows: "
                                   f"{db_error_line(e)}") from None
            check_table_end(end_record, rows, nbytes, sha, what=what, target=target, table=table, done="restored")
            seen[table] = (rows, nbytes, sha)
            tables.append(TableReport(table, rows, nbytes, round(time.monotonic() - t0, 6)))
    if manifest_record is None:  # read_snapshot raises first; kept for a clear message if that changes
        raise SnapshotFormatError(name, "the stream has no manifest")
    read_to_end(records, name)
    manifest = manifest_of(manifest_record)
    compare_with_manifest(manifest, seen, what, target, stream_columns)

    unvalidated: list[str] = []
    deferred = ""
    if create_schema:
        # A wedding's rows point at platform rows (vendors) that are not in its archive. The platform
        # partition's tenant-table rows reach no wedding, so their keys are NULL (or were orphans under
        # an FK the source itself had NOT VALID, which pg_dump writes as such): its FKs all validate.
        restored = set(table_names)
        # The platform also carries rows that broke a validated foreign key on the source (snapshot's
        # broken_foreign_keys): that key cannot validate here either, so it is created NOT VALID.
        external = broken_key_names(manifest) if partition == PLATFORM else {
            (fk["schema"], fk["table"], fk["name"]) for fk in header.get("foreign_keys", [])
            if (fk["schema"], fk["table"]) in restored and (fk["ref_schema"], fk["ref_table"]) not in restored}
        script, unvalidated = _post_data_script(post_data, external)
        if defer_post_data:
            script, deferred = split_post_data(script)
        try:  # the archive's DDL into an empty target: see the pre-data above
            conn.execute(script)
        except psycopg.Error as e:
            raise RestoreError(f"restore of {what} into {target}: constraints and indexes (post-data DDL) "
                               f"cannot be applied: {db_error_line(e)}") from None
        use_qualified_names(conn)
    sequences = advance_sequences(conn, table_names)
    for schema, tname, trigger, state, relkind in held:
        conn.execute(sql.SQL("ALTER TABLE {} {} {}").format(exact_table(schema, tname, relkind), _ENABLE[state],
                                                            sql.Identifier(trigger)))
    matches = schema_fingerprint(conn) == header["schema_fingerprint"]
    return RestoreReport(partition=partition, target=target, tables=tables, created_schema=bool(create_schema),
                         schema_fingerprint=header["schema_fingerprint"], schema_matches=matches,
                         sequences=sequences, triggers_held=[f"{s}.{t}: {g}" for s, t, g, _, _ in held],
                         unvalidated_foreign_keys=unvalidated, deferred_post_data=deferred)


def deferred_post_data_of(chunks: Iterable[bytes], name: str) -> tuple[str, str]:
    """(the post-data restore_snapshot(defer_post_data=True) hands back, the schema fingerprint) of a platform
    partition's archive, read again from the archive itself: a resumed restore --all whose first run died
    before building them. The whole stream is read and authenticated; its rows are discarded."""
    records = read_snapshot(chunks, name=name)
    header = header_of(next(records))
    next(records)  # pre-data: already applied
    post_data = next(records).text()
    if str(header["partition"]) != PLATFORM:
        raise SnapshotFormatError(name, f"holds partition {header['partition']!r}, not the platform partition")
    manifest_record = None
    for record in records:
        if record.kind == MANIFEST:
            manifest_record = record
            break
        table_begin_of(record)
        read_table_data(records, lambda block: None)
    if manifest_record is None:
        raise SnapshotFormatError(name, "the stream has no manifest")
    read_to_end(records, name)
    script, _ = _post_data_script(post_data, broken_key_names(manifest_of(manifest_record)))
    return split_post_data(script)[1], str(header["schema_fingerprint"])


def compare_with_manifest(manifest: Manifest, seen: Mapping[str, tuple[int, int, str]], what: str,
                           target: str, columns: Mapping[str, list[str]] | None = None) -> None:
    """Every table of the stream is the manifest's, with its rows, bytes and SHA-256; and, given the columns
    each table-begin record named, the manifest's columns in the same order (rows loaded into other columns
    hash the same: the checksum is over the COPY text, not over which column each value went to)."""
    listed = {t.table: t for t in manifest.tables}
    for table in listed.keys() ^ seen.keys():
        raise VerificationError(f"restore of {what} into {target}: table {table} is "
                                f"{'in the manifest but not in the stream' if table in listed else 'in the stream but not in the manifest'}")
    for table, names in (columns or {}).items():
        if table in listed and list(listed[table].columns) != list(names):
            raise VerificationError(f"restore of {what} into {target}: table {table} was streamed into columns "
                                    f"{names} but the manifest lists {list(listed[table].columns)}")
    for table, (rows, nbytes, sha) in seen.items():
        m = listed[table]
        if (m.rows, m.bytes, m.sha256) != (rows, nbytes, sha):
            raise VerificationError(f"restore of {what} into {target}: table {table} does not match the manifest: "
                                    f"{rows} rows / sha256 {sha[:16]}… restored, "
                                    f"{m.rows} rows / sha256 {m.sha256[:16]}… in the manifest")


def _hold_triggers(conn, schema: str, table: str) -> list[tuple[str, str, str, str, str]]:
    """Disable the table's enabled user triggers for the load: restored rows are already what the
    triggers made of them once, and must not be changed (or cause writes elsewhere) a second time."""
    held = conn.execute(_USER_TRIGGERS_SQL, {"schemas": [schema], "names": [table]}).fetchall()
    for s, t, trigger, _, relkind in held:
        conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER {}").format(exact_table(s, t, relkind),
                                                                         sql.Identifier(trigger)))
    return held


def advance_sequences(conn, tables: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Move every sequence feeding a restored column (serial, identity, or a nextval() default) past
    the largest restored value, never backwards."""
    if not tables:
        return []
    out = []
    found = conn.execute(_SEQUENCES_SQL, {"schemas": [s for s, _ in tables], "names": [n for _, n in tables]}).fetchall()
    for seq_schema, seq_name, schema, table, column, relkind in found:
        seq = sql.Identifier(seq_schema, seq_name)
        row = conn.execute(sql.SQL(
            "SELECT pg_catalog.setval({seq_text}::pg_catalog.regclass, m.v, true)"
            " FROM (SELECT pg_catalog.max({col})::bigint AS v FROM {table}) m, {seq} s"
            " WHERE m.v IS NOT NULL AND (m.v > s.last_value OR (m.v = s.last_value AND NOT s.is_called))").format(
            seq_text=sql.Literal(seq.as_string(conn)), col=sql.Identifier(column),
            table=exact_table(schema, table, relkind), seq=seq)).fetchone()
        out.append({"sequence": f"{seq_schema}.{seq_name}", "column": f"{schema}.{table}.{column}",
                    "set_to": row[0] if row else None})
    return out


# --- verification -----------------------------------------------------------------------------------

def foreign_keys_sql(of: str) -> str:
    """Every foreign key (name, schema, table, referenced schema, referenced table, columns, referenced
    columns, the two tables' relkinds) whose referencing table (`of="referencing"`) or referenced table
    (`of="referenced"`) is one of the (%(schemas)s, %(names)s) pairs. Partitions' inherited copies of a
    key are left out."""
    side = {"referencing": "cn.nspname AND r.n = c.relname", "referenced": "pn.nspname AND r.n = p.relname"}[of]
    return f"""
SELECT con.conname::text, cn.nspname::text, c.relname::text, pn.nspname::text, p.relname::text,
       ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum ORDER BY k.ord),
       ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum ORDER BY k.ord),
       c.relkind::text, p.relkind::text
FROM pg_catalog.pg_constraint con
JOIN pg_catalog.pg_class c ON c.oid = con.conrelid JOIN pg_catalog.pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_catalog.pg_class p ON p.oid = con.confrelid JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
JOIN unnest(%(schemas)s::text[], %(names)s::text[]) AS r(s, n) ON r.s = {side}
WHERE con.contype = 'f' AND con.conparentid = 0
ORDER BY 2, 3, 1
"""


_FK_OF_TABLES_SQL = foreign_keys_sql("referencing")


def plan_root(plan: Mapping[str, Any]) -> tenancy.TableName:
    """The tenant root a manifest's or header's plan description names (default public.weddings)."""
    schema, _, name = str(plan.get("root", "public.weddings")).partition(".")
    return tenancy.TableName(schema, name)


def plan_matching(conn, plan: Mapping[str, Any], what: str, target: str) -> tenancy.TenancyPlan:
    """The tenancy plan discovered on `conn`, which must route the same tables the same way as the
    archive's plan description: every statement run on restored or live rows is built from it, never
    from SQL text an archive or the catalogue holds."""
    live_plan = tenancy.discover(conn, plan_root(plan))
    live = plan_description(live_plan)["tenant_tables"]
    archived = plan.get("tenant_tables", {})
    if not isinstance(archived, Mapping):
        archived = {}  # garbled: every live tenant table is then a difference
    if live != archived:
        none = "(not a tenant table)"
        diffs = [f"{t}: archive {archived.get(t, none)!r}, {target} {live.get(t, none)!r}"
                 for t in sorted(live.keys() | archived.keys()) if live.get(t) != archived.get(t)]
        raise SchemaMismatchError(f"restore of {what} into {target}: the target routes tables to weddings "
                                  f"differently from the archive; nothing was written:\n  " + "\n  ".join(diffs))
    return live_plan


def _selects_for(conn, manifest: Manifest, plan_or_selects, target: str
                 ) -> dict[str, tuple[sql.Composable, dict | None]]:
    """Each table's SELECT of the partition's rows, built from a tenancy plan (the one given, else the one
    discovered on the target) or given as composed SQL. The manifest's `select_sql` is a record for
    people and is never executed: a crafted manifest could hold any statement."""
    params = None if manifest.partition == PLATFORM else {"wedding_id": manifest.partition}
    if plan_or_selects is None:
        plan_or_selects = plan_matching(conn, manifest.plan, partition_label(manifest.partition), target)
    if isinstance(plan_or_selects, tenancy.TenancyPlan):
        return {str(t.table): (select, params) for t, select in partition_selects(plan_or_selects, manifest.partition)}
    if not all(isinstance(s, sql.Composable) for s in plan_or_selects.values()):
        raise TypeError("verify_restored takes a TenancyPlan or {table: psycopg.sql.Composable}, not SQL text")
    return {name: (s, params) for name, s in plan_or_selects.items()}


def verify_restored(target_dsn: str, manifest: Manifest, plan_or_selects=None) -> VerifyReport:
    """Recompute every table's row count and SHA-256 on the target with SELECTs built from a tenancy
    plan (given, or discovered on the target and checked against the manifest's) or given as
    {table: composed select}, and count rows whose foreign keys point at no parent. Row security is
    off (a policy that would filter a table is an error naming it). Returns a report;
    `report.raise_if_failed()` to insist."""
    started = time.monotonic()
    target = database_label(target_dsn)
    tables: list[TableReport] = []
    checks: list[ForeignKeyCheck] = []
    with psycopg.connect(target_dsn, autocommit=True, application_name="wedbackup-verify") as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            use_qualified_names(conn)
            no_row_security(conn)
            selects = _selects_for(conn, manifest, plan_or_selects, target)
            with conn.cursor() as cur:
                for m in manifest.tables:
                    t0 = time.monotonic()
                    if m.table not in selects:
                        tables.append(TableReport(m.table, 0, 0, 0.0, False, "no SELECT to verify it with"))
                        continue
                    select, params = selects[m.table]
                    try:
                        with conn.transaction():
                            rows, nbytes, sha = table_checksum(conn, select, params)
                    except psycopg.Error as e:
                        if conn.closed or conn.broken:
                            raise  # the connection is gone: this error, not a later "connection is closed"
                        tables.append(TableReport(m.table, 0, 0, round(time.monotonic() - t0, 6), False,
                                                  f"cannot be read on the target: {db_error_line(e)}"))
                        continue
                    problem = ""
                    if rows != m.rows:
                        problem = f"{rows} rows restored, {m.rows} in the manifest"
                    elif sha != m.sha256 or nbytes != m.bytes:
                        problem = f"sha256 {sha[:16]}… restored, {m.sha256[:16]}… in the manifest"
                    tables.append(TableReport(m.table, rows, nbytes, round(time.monotonic() - t0, 6), not problem, problem))
            listed = {m.table for m in manifest.tables}
            tables += [TableReport(name, 0, 0, 0.0, False, "belongs to the partition but is not in the manifest")
                       for name in selects if name not in listed]
            checks = check_foreign_keys(conn, manifest)
        finally:
            if not conn.closed and not conn.broken:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
    return VerifyReport(partition=manifest.partition, target=target, tables=tables, foreign_keys=checks,
                        seconds=round(time.monotonic() - started, 6))


def table_checksum(conn, select: sql.Composable, params) -> tuple[int, int, str]:
    digest = hashlib.sha256()
    counts = [0, 0]

    def add(buf: bytearray) -> None:
        digest.update(buf)
        counts[0] += buf.count(b"\n")
        counts[1] += len(buf)

    copy_out(conn, sql.SQL("COPY ({}) TO STDOUT").format(select), params, add)
    return counts[0], counts[1], digest.hexdigest()


def check_foreign_keys(conn, manifest: Manifest) -> list[ForeignKeyCheck]:
    restored = {(t.schema, t.name) for t in manifest.tables}
    fks = conn.execute(_FK_OF_TABLES_SQL, {"schemas": [s for s, _ in restored],
                                           "names": [n for _, n in restored]}).fetchall()
    out = []
    for conname, cs, ct, ps, pt, cols, pcols, ckind, pkind in fks:
        try:
            with conn.transaction():
                out.append(_check_foreign_key(conn, restored, conname, cs, ct, ps, pt, cols, pcols, ckind, pkind))
        except psycopg.Error as e:
            if conn.closed or conn.broken:
                raise
            out.append(ForeignKeyCheck(conname, f"{cs}.{ct}", f"{ps}.{pt}", "unreadable", problem=db_error_line(e)))
    return out


def _check_foreign_key(conn, restored: set[tuple[str, str]], conname: str, cs: str, ct: str, ps: str, pt: str,
                       cols: list[str], pcols: list[str], ckind: str, pkind: str) -> ForeignKeyCheck:
    # A foreign key binds the two tables' own rows: not their INHERITS children's (exact_table).
    child, parent = exact_table(cs, ct, ckind), exact_table(ps, pt, pkind)
    if (ps, pt) not in restored:
        has_rows = conn.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(parent)).fetchone()[0]
        if not has_rows:
            return ForeignKeyCheck(conname, f"{cs}.{ct}", f"{ps}.{pt}", "external, not checked")
    # MATCH SIMPLE: a row with any NULL in the key points nowhere and is not checked.
    query = sql.SQL("SELECT count(*) FROM {child} AS c WHERE {notnull} AND NOT EXISTS "
                    "(SELECT FROM {parent} AS p WHERE {match})").format(
        child=child, parent=parent,
        notnull=sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(sql.Identifier("c", c)) for c in cols),
        match=sql.SQL(" AND ").join(sql.SQL("{} = {}").format(sql.Identifier("p", p), sql.Identifier("c", c))
                                    for c, p in zip(cols, pcols)))
    orphans = conn.execute(query).fetchone()[0]
    return ForeignKeyCheck(conname, f"{cs}.{ct}", f"{ps}.{pt}", "ok" if orphans == 0 else "orphans", orphans)


# --- scratch databases ------------------------------------------------------------------------------

SCRATCH_PREFIX = "wedbackup_scratch_"


def scratch_name(label: str) -> str:
    """A unique database name, safe whatever the label: lower-case letters, digits, underscores."""
    safe = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")[:24]
    return f"{SCRATCH_PREFIX}{safe + '_' if safe else ''}{uuid.uuid4().hex[:12]}"


def _scratch_lock_key(name: str) -> sql.Composable:
    return sql.SQL("hashtextextended({}, 0)").format(sql.Literal(name))


@contextlib.contextmanager
def scratch_database(admin_dsn: str, *, label: str) -> Iterator[str]:
    """A new empty database on the admin DSN's server, yielded as a DSN, dropped afterwards (WITH
    (FORCE), so leftover sessions do not keep it alive) even when the body fails.

    The admin session holds an advisory lock named after the database for its whole life, so
    `drop_abandoned_scratch_databases` can tell a scratch database in use from one a killed process left."""
    name = scratch_name(label)
    ident = sql.Identifier(name)
    admin = psycopg.connect(admin_dsn, autocommit=True)
    try:
        admin.execute(sql.SQL("SELECT pg_advisory_lock({})").format(_scratch_lock_key(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(ident))
        parts = conninfo_to_dict(admin_dsn)
        parts["dbname"] = name
        try:
            yield make_conninfo(**parts)
        finally:
            _drop_scratch(admin, admin_dsn, ident)
    finally:
        admin.close()


def _drop_scratch(admin, admin_dsn: str, ident: sql.Identifier) -> None:  # noqa: ANN001
    """DROP the scratch database, reconnecting when the admin session was lost meanwhile (a network blip
    must not leave a database behind); the last failure is raised."""
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident)
    for attempt in range(3):
        try:
            if admin.closed or admin.broken:
                with psycopg.connect(admin_dsn, autocommit=True) as fresh:
                    fresh.execute(drop)
            else:
                admin.execute(drop)
            return
        except psycopg.OperationalError:
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))


def drop_abandoned_scratch_databases(admin_dsn: str) -> list[str]:
    """Drop the scratch databases no live restore holds (their advisory lock is free and nobody is
    connected): what a killed verification left behind. Returns their names."""
    dropped = []
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT d.datname FROM pg_database d WHERE starts_with(d.datname, %s) AND NOT EXISTS "
            "(SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)", (SCRATCH_PREFIX,))]
        for name in names:
            key = _scratch_lock_key(name)
            if not conn.execute(sql.SQL("SELECT pg_try_advisory_lock({})").format(key)).fetchone()[0]:
                continue  # a live restore owns it
            try:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
                dropped.append(name)
            finally:
                conn.execute(sql.SQL("SELECT pg_advisory_unlock({})").format(key))
    return dropped
