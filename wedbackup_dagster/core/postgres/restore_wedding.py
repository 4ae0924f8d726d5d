"""Recovery: a wedding's recovery points, the newest verified one as of a time, and restoring it — into
another database, into a new schema for inspection, or in place in the live database (one transaction
that locks and replaces exactly that wedding's rows) — with a dry-run diff first. Plain Python: the
`restore_wedding` job and `wedbackup restore` / `wedbackup points` are thin calls into this module."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import sql

from wedbackup_dagster.core.postgres import tenancy
from wedbackup_dagster.core.formats.archive import open_archive
from wedbackup_dagster.core.catalogue.store import BackupRecord, Catalogue
from wedbackup_dagster.core.postgres.identity import check_restore_target
from wedbackup_dagster.core.errors import (ProviderError, RestoreError, SchemaMismatchError, SnapshotFormatError,
                                           UnknownWeddingError, VerificationError, WedbackupError)
from wedbackup_dagster.core.catalogue.locks import partition_lock
from wedbackup_dagster.core.formats.snapshot_stream import (Record, check_table_end, header_of, manifest_of,
                                                            read_snapshot, read_to_end, table_begin_of)
from wedbackup_dagster.core.postgres.load_snapshot import (advance_sequences, table_checksum, compare_with_manifest,
                                                           db_error_line, copy_table_in, foreign_keys_sql,
                                                           is_row_security_refusal, no_row_security, plan_matching,
                                                           restore_snapshot, schema_differences)
from wedbackup_dagster.core.formats.snapshot_stream import MANIFEST, Manifest
from wedbackup_dagster.core.postgres.snapshot import (database_label, describe_schema, partition_selects,
                                                      schema_fingerprint, schema_is_empty, use_qualified_names)
from wedbackup_dagster.core.partitions import PLATFORM, check_partition, partition_label

Progress = Callable[[str], None]
MODES = ("target", "schema", "in_place")
DEFAULT_LOCK_TIMEOUT = 30.0  # seconds an in-place restore waits for one lock before giving up (rolls back)
PROGRESS_EVERY = 5.0  # seconds between progress lines inside one long table


def _quiet(_: str) -> None:
    pass


class NoRecoveryPointError(UnknownWeddingError):
    """The wedding (or the platform) has no (verified) backup at or before the time asked for."""

    def __init__(self, partition: str, problem: str):
        super().__init__(partition, problem)
        self.args = (f"{partition_label(partition)}: {problem}",)

    def __str__(self) -> str:
        return self.args[0]


# --- recovery points --------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecoveryPoint:
    """One backup of a partition as a point it can be restored to."""

    backup_id: int
    partition: str
    snapshot_time: datetime
    archive_sha256: str
    size: int
    rows: int
    copies: tuple[str, ...]
    verified_at: datetime | None  # newest successful restore of this backup (verified_restore), if any

    @property
    def verified(self) -> bool:
        return self.verified_at is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(snapshot_time=self.snapshot_time.isoformat(), copies=list(self.copies), verified=self.verified,
                 verified_at=self.verified_at.isoformat() if self.verified_at else None)
        return d


_POINTS_SQL = """
SELECT b.id, b.partition, b.snapshot_time, b.archive_sha256, b.size, b.rows,
       coalesce((SELECT array_agg(c.provider ORDER BY c.provider) FROM wedbackup.copies c WHERE c.backup_id = b.id),
                '{}') AS copies,
       (SELECT max(r.at) FROM wedbackup.restores r WHERE r.backup_id = b.id AND r.ok) AS verified_at
FROM wedbackup.backups b WHERE b.partition = %s
  AND b.deleting_since IS NULL  -- being pruned: its copies may already be gone
ORDER BY b.snapshot_time DESC, b.id DESC
"""


def recovery_points(catalogue: Catalogue, partition: str) -> list[RecoveryPoint]:
    """Every backup of the partition, newest first. A point is *verified* when a restore of it (into a
    scratch database, checked against its manifest) succeeded: the freshness check's definition."""
    partition = check_partition(partition)
    with catalogue.connect() as conn:
        rows = conn.execute(_POINTS_SQL, (partition,)).fetchall()
    return [RecoveryPoint(r["id"], r["partition"], r["snapshot_time"], r["archive_sha256"], r["size"], r["rows"],
                          tuple(r["copies"]), r["verified_at"]) for r in rows]


def parse_as_of(text: str | None) -> datetime:
    """An ISO 8601 time with its timezone (`2026-11-30T18:00:00+00:00`, or `...Z`); None means now."""
    if text is None or text == "":
        return datetime.now(timezone.utc)
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise WedbackupError(f"--as-of {text!r} is not an ISO 8601 time such as 2026-11-30T18:00:00+00:00") from None
    if value.tzinfo is None:
        raise WedbackupError(f"--as-of {text!r} has no timezone: add one, e.g. {text.strip()}+00:00 or {text.strip()}Z")
    return value


def choose_point(points: list[RecoveryPoint], partition: str, as_of: datetime, *,
                 include_unverified: bool = False) -> RecoveryPoint:
    """The newest verified point (any point with `include_unverified`) taken at or before `as_of`."""
    if not points:
        raise NoRecoveryPointError(partition, "has no backup in the catalogue (unknown wedding, or never backed up)")
    before = [p for p in points if p.snapshot_time <= as_of]
    usable = before if include_unverified else [p for p in before if p.verified]
    if usable:
        return usable[0]
    when = as_of.isoformat()
    if not before:
        oldest = points[-1].snapshot_time.isoformat()
        raise NoRecoveryPointError(partition, f"has no backup at or before {when}: its oldest is from {oldest}")
    raise NoRecoveryPointError(partition, f"has no verified backup at or before {when}: {len(before)} unverified "
                                          f"backup(s) (newest {before[0].snapshot_time.isoformat()}); verify them "
                                          f"(`wedbackup verify`) or restore with --include-unverified")


# --- reports ----------------------------------------------------------------------------------------

@dataclass
class TableChange:
    """One table of a recovery: rows the archive has and the target had, and what replacing costs."""

    table: str
    archive_rows: int
    live_rows: int = 0
    add: int = 0  # in the archive, not in the target (by primary key)
    remove: int = 0  # in the target, not in the archive
    change: int = 0  # in both, with different contents
    seconds: float = 0.0


@dataclass
class RecoveryReport:
    partition: str
    mode: str  # target | schema | in_place
    target: str  # database label (and schema), never a DSN
    dry_run: bool
    tables: list[TableChange] = field(default_factory=list)
    archive_sha256: str = ""
    snapshot_time: str = ""
    copy: str = ""
    sequences: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    replay: dict[str, Any] | None = None  # changes replayed on top of the snapshot (core/changefeed/replay.py)
    # In place: rows of the wedding's state that another wedding (or the platform) holds now, each
    # {table, key, owner, skipped}; refused unless skip_moved_rows, and then left where they are.
    moved_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def totals(self) -> dict[str, int]:
        return {k: sum(getattr(t, k) for t in self.tables) for k in ("archive_rows", "live_rows", "add", "remove",
                                                                      "change")}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["totals"] = self.totals
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RecoveryReport:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["tables"] = [TableChange(**t) for t in d.get("tables", [])]
        return cls(**known)

    def lines(self) -> list[str]:
        """The per-table table people read on the console."""
        verb = "would" if self.dry_run else "did"
        head = (f"{partition_label(self.partition)} as of {self.snapshot_time} (archive {self.archive_sha256[:12]}, "
                f"{self.copy} copy) -> {self.target} [{self.mode}{', dry run' if self.dry_run else ''}]")
        out = [head, f"  {'table':<32}{'archive':>9}{'live':>9}{'add':>9}{'remove':>9}{'change':>9}"]
        for t in self.tables:
            out.append(f"  {t.table:<32}{t.archive_rows:>9}{t.live_rows:>9}{t.add:>9}{t.remove:>9}{t.change:>9}")
        s = self.totals
        out.append(f"  {'total':<32}{s['archive_rows']:>9}{s['live_rows']:>9}{s['add']:>9}{s['remove']:>9}"
                   f"{s['change']:>9}")
        out.append(f"  ({verb} add {s['add']}, remove {s['remove']}, change {s['change']} row(s))")
        for m in self.moved_rows:
            fate = ("left there (--skip-moved-rows)" if m["skipped"]
                    else "refused: restore it --into-schema or --target-dsn, or pass --skip-moved-rows")
            out.append(f"  row {m['table']} {m['key']} now belongs to {m['owner']}: {fate}")
        return out


# --- reading the archive's head ---------------------------------------------------------------------

def _open_stream(chunks: Iterable[bytes], name: str) -> tuple[dict[str, Any], Iterator[Record]]:
    records = read_snapshot(chunks, name=name)
    header = header_of(next(records))  # format, version and every field a restore relies on, checked
    next(records)  # pre-data DDL: the target already has the schema (in-place, schema) or restore_snapshot runs
    next(records)  # post-data DDL
    return header, records


def connect_target(dsn: str, target: str, application_name: str) -> psycopg.Connection:
    try:
        return psycopg.connect(dsn, autocommit=True, application_name=application_name)
    except psycopg.OperationalError as e:
        raise RestoreError(f"cannot connect to {target}: {db_error_line(e)}") from None
    except psycopg.Error:
        # psycopg's parse errors quote the connection string, password and all: never pass them on.
        raise RestoreError(f"cannot connect to {target}: the connection string does not parse") from None


@contextlib.contextmanager
def _transaction(conn: psycopg.Connection, commit: bool) -> Iterator[None]:
    """BEGIN … COMMIT (or ROLLBACK when `commit` is False, or on any error)."""
    conn.execute("BEGIN")
    try:
        yield
        conn.execute("COMMIT" if commit else "ROLLBACK")
    except BaseException:
        if not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
        raise


# --- schema comparison ------------------------------------------------------------------------------

def _schema_of(kind: str, key: str) -> str | None:
    """The schema (its plain name) a description line belongs to; None for extensions, which have none.
    Keys are qualified with quote_ident: `public.guests.id`, or a quoted name with doubled quotes inside."""
    if kind == "extension":
        return None
    if not key.startswith('"'):
        return key.split(".", 1)[0]
    i, name = 1, []
    while True:
        j = key.index('"', i)
        name.append(key[i:j])
        if key[j + 1:j + 2] != '"':
            return '"'.join(name)
        i = j + 2


def restricted_differences(archive: Iterable[Iterable[str]], target: Iterable[Iterable[str]],
                           schemas: Iterable[str] | None = None) -> list[str]:
    """`schema_differences` over the given schemas only (default: every schema the archive knows), so what
    lives elsewhere — another application's schema, an inspection schema made by `restore --into-schema`
    (in the target, or in an archive taken while it existed) — cannot stop a restore it does not affect."""
    archive = [list(line) for line in archive]
    keep = set(schemas) if schemas is not None else {_schema_of(k, key) for k, key, _ in archive}
    keep.add(None)
    return schema_differences([line for line in archive if _schema_of(line[0], line[1]) in keep],
                              [line for line in target if _schema_of(line[0], line[1]) in keep])


def check_schema(conn, header: Mapping[str, Any], what: str, target: str, *, strict: bool) -> None:
    """Stop before writing when the target's schema differs from the archive's. `strict` compares the
    whole schema (what restore_snapshot does); otherwise only the schemas holding the wedding's tables
    (for the platform partition: every schema the archive knows). Which tables belong to weddings, in any
    schema, is checked by the tenancy plan (see _live_plan)."""
    found = schema_fingerprint(conn)
    if found == header["schema_fingerprint"]:
        return
    archive = header.get("schema", [])
    if strict:
        diffs = schema_differences(archive, describe_schema(conn))
    else:
        tenant_tables = header.get("plan", {}).get("tenant_tables", {})
        schemas = ({t.split(".", 1)[0] for t in tenant_tables}
                   if str(header.get("partition")) != PLATFORM and tenant_tables else None)
        diffs = restricted_differences(archive, describe_schema(conn), schemas)
    if diffs:
        raise SchemaMismatchError(
            f"restore of {what} into {target}: the target's schema differs from the archive's "
            f"(fingerprint {found[:12]} vs {header['schema_fingerprint'][:12]}); nothing was written:\n  "
            + "\n  ".join(diffs))


def _live_plan(conn, header: Mapping[str, Any], what: str, target: str) -> tenancy.TenancyPlan:
    """The live database's tenancy plan, which must route the same tables the same way as the archive's:
    otherwise deleting the wedding would miss (or cascade into) rows the archive does not hold. Every
    statement on live rows is built from it (never from the archive's SQL text)."""
    plan = header.get("plan")
    return plan_matching(conn, plan if isinstance(plan, Mapping) else {}, what, target)


# --- staging the archive's rows ---------------------------------------------------------------------

@dataclass
class _Staged:
    schema: str
    name: str
    columns: list[str]
    table: sql.Identifier  # where the rows were loaded (a temp table, or the inspection schema's table)
    rows: int
    order_by: list[str]
    keyed: bool
    # The partition's rows in the target, built from the live tenancy plan by _attach_plan (never the
    # archive's select_sql), and its parameters.
    select: sql.Composable | None = None
    params: dict[str, str] | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def live(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


def _load(conn, records: Iterator[Record], what: str, target: str, progress: Progress,
          make_table: Callable[[dict[str, Any], int], sql.Identifier]) -> tuple[list[_Staged], Manifest]:
    """COPY every table of the stream into the table `make_table(table_begin, index)` names, checking each
    against its table-end record and the whole against the manifest."""
    staged: list[_Staged] = []
    seen: dict[str, tuple[int, int, str]] = {}
    manifest_record: Record | None = None
    with conn.cursor() as cur:
        for record in records:
            if record.kind == MANIFEST:
                manifest_record = record
                break
            schema, name, columns = table_begin_of(record)  # checked: a garbled record is the format's error
            begin = record.json()
            table = f"{schema}.{name}"
            into = make_table(begin, len(staged))
            t0 = last = time.monotonic()

            def tick(rows: int) -> None:  # called only while this table is copied
                nonlocal last
                if time.monotonic() - last >= PROGRESS_EVERY:
                    last = time.monotonic()
                    progress(f"{table}: {rows:,} rows read from the archive so far")

            try:
                rows, nbytes, sha, end_record = copy_table_in(cur, into, columns, records, on_chunk=tick)
            except psycopg.Error as e:
                raise RestoreError(f"restore of {what} into {target}: table {table} refused the archive's rows: "
                                   f"{db_error_line(e)}") from None
            check_table_end(end_record, rows, nbytes, sha, what=what, target=target, table=table, done="read")
            seen[table] = (rows, nbytes, sha)
            order_by = list(begin.get("order_by") or [])
            staged.append(_Staged(schema, name, list(columns), into, rows, order_by,
                                  keyed=bool(order_by) and order_by != list(columns)))
            progress(f"{table}: {rows:,} rows read from the archive ({time.monotonic() - t0:.1f} s)")
    if manifest_record is None:
        raise SnapshotFormatError("snapshot stream", "the stream has no manifest")
    read_to_end(records, "snapshot stream")
    manifest = manifest_of(manifest_record)
    compare_with_manifest(manifest, seen, what, target)
    return staged, manifest


def _attach_plan(staged: list[_Staged], plan: tenancy.TenancyPlan, partition: str, what: str, target: str) -> None:
    """Give every staged table the SELECT of the partition's rows built from the target's plan (the same
    SELECT the snapshot ran, rebuilt) and its order; the archive must hold exactly the partition's tables
    of that plan, each with the plan's columns, or nothing is compared, locked or written."""
    selects = {str(t.table): (t, select) for t, select in partition_selects(plan, partition)}
    names = [s.qualified for s in staged]
    problems = [f"table {n} is in the archive but not in {partition_label(partition)}'s tables of the target"
                for n in names if n not in selects]
    problems += [f"table {n} of {partition_label(partition)} is not in the archive" for n in selects if n not in names]
    for s in staged:
        if s.qualified in selects and tuple(s.columns) != tuple(selects[s.qualified][0].columns):
            problems.append(f"table {s.qualified} has columns {s.columns} in the archive, "
                            f"{list(selects[s.qualified][0].columns)} in the target")
    if problems:
        raise SchemaMismatchError(f"restore of {what} into {target}: the archive's tables do not match the "
                                  f"target's plan; nothing was written: " + "; ".join(problems))
    params = None if partition == PLATFORM else {"wedding_id": partition}
    for s in staged:
        t, s.select = selects[s.qualified]
        s.params, s.order_by, s.keyed = params, list(t.order_by), t.keyed


def _live_rows(t: _Staged) -> sql.Composable:
    """The target's current rows of the partition in this table, by the snapshot's SELECT rebuilt."""
    assert t.select is not None, "_attach_plan first"
    return sql.SQL("({})").format(t.select)


def _diff(conn, t: _Staged) -> TableChange:
    """Archive rows (staged) against the target's rows of the partition: by primary key when the table has
    one (add / remove / change), else as multisets of whole rows (add / remove)."""
    t0 = time.monotonic()
    cols = sql.SQL(", ").join(sql.Identifier("x", c) for c in t.columns)
    if t.keyed:
        keys = t.order_by
        pk = sql.SQL(", ").join(sql.Identifier("x", c) for c in keys)
        eq = sql.SQL(" AND ").join(sql.SQL("{} = {}").format(sql.Identifier("a", c), sql.Identifier("l", c))
                                   for c in keys)
        query = sql.SQL("""
            WITH a AS MATERIALIZED (SELECT {pk}, ROW({cols})::text AS wb_row FROM {stage} AS x),
                 l AS MATERIALIZED (SELECT {pk}, ROW({cols})::text AS wb_row FROM {live} AS x)
            SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM l),
                   (SELECT count(*) FROM a WHERE NOT EXISTS (SELECT FROM l WHERE {eq})),
                   (SELECT count(*) FROM l WHERE NOT EXISTS (SELECT FROM a WHERE {eq})),
                   (SELECT count(*) FROM a JOIN l ON {eq} WHERE a.wb_row <> l.wb_row)""").format(
            pk=pk, cols=cols, stage=t.table, live=_live_rows(t), eq=eq)
    else:
        query = sql.SQL("""
            WITH a AS MATERIALIZED (SELECT ROW({cols})::text AS wb_row FROM {stage} AS x),
                 l AS MATERIALIZED (SELECT ROW({cols})::text AS wb_row FROM {live} AS x)
            SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM l),
                   (SELECT count(*) FROM (SELECT wb_row FROM a EXCEPT ALL SELECT wb_row FROM l) d),
                   (SELECT count(*) FROM (SELECT wb_row FROM l EXCEPT ALL SELECT wb_row FROM a) d), 0""").format(
            cols=cols, stage=t.table, live=_live_rows(t))
    archive_rows, live_rows, add, remove, change = conn.execute(query, t.params).fetchone()
    return TableChange(t.qualified, archive_rows, live_rows, add, remove, change, round(time.monotonic() - t0, 6))


def _temp_stage(conn) -> Callable[[dict[str, Any], int], sql.Identifier]:
    def make(begin: dict[str, Any], i: int) -> sql.Identifier:
        stage = sql.Identifier(f"wedbackup_stage_{i}")
        # Exactly the stored columns the archive holds, with the live table's types; no constraints.
        conn.execute(sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
            stage, sql.SQL(", ").join(map(sql.Identifier, begin["columns"])),
            sql.Identifier(begin["schema"], begin["name"])))
        return stage
    return make


# --- restoring: into another database ---------------------------------------------------------------

def restore_to_database(chunks: Iterable[bytes], dsn: str, *, name: str, dry_run: bool = False,
                        progress: Progress = _quiet, before_commit: Callable[[Any], None] | None = None
                        ) -> RecoveryReport:
    """The archive into another database (an empty one gets the archive's schema; otherwise its schema
    must match). A dry run compares the archive's rows with the target's rows of the partition."""
    target = database_label(dsn)
    if not dry_run:
        started = time.monotonic()
        progress(f"restoring into {target}")
        report = restore_snapshot(chunks, dsn, create_schema="auto", name=name,
                                  before_commit=(lambda conn, _: before_commit(conn)) if before_commit else None)
        for t in report.tables:
            progress(f"{t.table}: {t.rows:,} rows restored")
        return RecoveryReport(report.partition, "target", target, False,
                              [TableChange(t.table, t.rows, 0, t.rows, 0, 0, t.seconds) for t in report.tables],
                              sequences=report.sequences, seconds=round(time.monotonic() - started, 6))
    return _dry_run(chunks, dsn, target, "target", name=name, progress=progress, replay=before_commit)


def _dry_run(chunks: Iterable[bytes], dsn: str, target: str, mode: str, *, name: str,
             progress: Progress, replay: Callable[..., None] | None = None) -> RecoveryReport:
    started = time.monotonic()
    header, records = _open_stream(chunks, name)
    partition = str(header["partition"])
    what = partition_label(partition)
    with connect_target(dsn, target, "wedbackup-restore-dry-run") as conn, _transaction(conn, commit=False), \
            _row_security_named(what, target):
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        use_qualified_names(conn)
        no_row_security(conn)
        if mode == "target" and schema_is_empty(describe_schema(conn)):
            # An empty database would get the archive's schema: every row is new.
            # With a replay, its inserts less its deletes per table (counted from the segments, not applied).
            net = replay.net_rows() if replay is not None else {}
            tables = []
            for record in records:
                if record.kind == MANIFEST:
                    manifest = manifest_of(record)
                    tables = [TableChange(t.table, t.rows + net.get(t.table, 0), 0, t.rows + net.get(t.table, 0))
                              for t in manifest.tables]
            return RecoveryReport(partition, mode, target, True, tables, seconds=round(time.monotonic() - started, 6))
        check_schema(conn, header, what, target, strict=(mode == "target"))
        plan = _live_plan(conn, header, what, target)  # whichever mode: the target's rows are read by it
        staged, _ = _load(conn, records, what, target, progress, _temp_stage(conn))
        _attach_plan(staged, plan, partition, what, target)
        if replay is not None:
            _replay_into_stage(conn, staged, replay)
        tables = [_diff(conn, t) for t in staged]
    return RecoveryReport(partition, mode, target, True, tables, seconds=round(time.monotonic() - started, 6))


# --- restoring: into a new schema, for inspection ---------------------------------------------------

def restore_into_schema(chunks: Iterable[bytes], dsn: str, schema: str, *, name: str, dry_run: bool = False,
                        progress: Progress = _quiet,
                        before_commit: Callable[[Any, dict[str, sql.Identifier]], None] | None = None
                        ) -> RecoveryReport:
    """The partition's tables created in a NEW schema `schema` of the database at `dsn` (like the live
    tables: columns, generated columns, CHECK constraints, primary keys and indexes; no foreign keys,
    defaults or triggers), and the archive's rows loaded there, in one transaction. Refuses a schema
    that exists. The database's tables must match the archive's schema (its own schemas only)."""
    started = time.monotonic()
    if not schema or len(schema.encode()) > 63:
        raise RestoreError(f"--into-schema {schema!r}: a schema name needs 1 to 63 bytes")
    header, records = _open_stream(chunks, name)
    partition = str(header["partition"])
    what = partition_label(partition)
    target = f"{database_label(dsn)}, schema {schema}"
    with connect_target(dsn, target, "wedbackup-restore-schema") as conn, _transaction(conn, commit=not dry_run):
        use_qualified_names(conn)
        exists = conn.execute("SELECT EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = %s)",
                              (schema,)).fetchone()[0]
        if exists:
            raise RestoreError(f"restore of {what} into {target}: schema {schema} already exists; choose a new "
                               f"name (or drop it first: DROP SCHEMA ... CASCADE)")
        check_schema(conn, header, what, target, strict=False)
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        # Marked as an inspection copy of this partition: in no platform backup, dropped by its erasure.
        conn.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
            sql.Identifier(schema), sql.Literal(tenancy.INSPECTION_MARKER + partition)))
        names: dict[str, int] = {}

        def make(begin: dict[str, Any], i: int) -> sql.Identifier:
            # Tables of different schemas may share a name: the later ones get their schema as a prefix.
            table_name = begin["name"] if begin["name"] not in names else f"{begin['schema']}_{begin['name']}"
            names[table_name] = i
            into = sql.Identifier(schema, table_name)
            conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING GENERATED INCLUDING CONSTRAINTS "
                                 "INCLUDING INDEXES INCLUDING COMMENTS)").format(
                into, sql.Identifier(begin["schema"], begin["name"])))
            return into

        staged, _ = _load(conn, records, what, target, progress, make)
        if before_commit is not None:  # the change feed's replay, into the new tables (a dry run too)
            before_commit(conn, {t.qualified: t.table for t in staged})
        tables = [TableChange(t.qualified, t.rows, 0, t.rows) for t in staged]
        progress(f"{'would create' if dry_run else 'created'} schema {schema} with {len(staged)} table(s)")
    return RecoveryReport(partition, "schema", target, dry_run, tables, seconds=round(time.monotonic() - started, 6))


# --- restoring: in place ----------------------------------------------------------------------------

@contextlib.contextmanager
def _row_security_named(what: str, target: str) -> Iterator[None]:
    """A row-security refusal (row_security is off in every transaction reading live rows) as a
    RestoreError naming the restore, the table and what the role needs."""
    try:
        yield
    except psycopg.Error as e:
        if not is_row_security_refusal(e):
            raise
        raise RestoreError(f"restore of {what} into {target}: {db_error_line(e)}; nothing was written") from None


_REFERENCES_SQL = foreign_keys_sql("referenced")  # keys pointing INTO the given tables

_ROW_ID = (sql.SQL("t0.tableoid"), sql.SQL("t0.ctid"))  # a row's identity while we hold its lock


def _outside_references(conn, plan: tenancy.TenancyPlan, wedding_id: str) -> list[str]:
    """Rows outside the wedding that point at its rows: deleting those rows would cascade into, set NULL
    in, or be refused by another wedding's (or the platform's) rows, so an in-place restore must stop."""
    tenants = {t.table: t for t in plan.tenant_tables}
    fks = conn.execute(_REFERENCES_SQL, {"schemas": [t.schema for t in tenants],
                                         "names": [t.name for t in tenants]}).fetchall()
    params = {"wedding_id": wedding_id}
    out = []
    for conname, cs, ct, ps, pt, cols, pcols, _, _ in fks:
        parent = tenants[tenancy.TableName(ps, pt)]
        child_name = tenancy.TableName(cs, ct)
        child_cols = sql.SQL(", ").join(sql.Identifier("x", c) for c in cols)
        referenced = parent.wedding_rows([sql.Identifier("t0", c) for c in pcols])
        # Exactly the referencing table: a foreign key binds its own rows, not its INHERITS children's.
        query = sql.SQL("SELECT count(*) FROM {child} AS x WHERE ({cols}) IN ({referenced})").format(
            child=plan.exact(child_name), cols=child_cols, referenced=referenced)
        if child_name in tenants:
            own = tenants[child_name].wedding_rows(list(_ROW_ID))
            query = sql.SQL("{} AND (x.tableoid, x.ctid) NOT IN ({})").format(query, own)
        n = conn.execute(query, params).fetchone()[0]
        if n:
            out.append(f"{n} row(s) of {child_name} outside it point at its rows of {parent.table} "
                       f"(foreign key {conname})")
    return out


def restore_in_place(chunks: Iterable[bytes], dsn: str, wedding_id: str, *, name: str, dry_run: bool = False,
                     lock_timeout: float = DEFAULT_LOCK_TIMEOUT, progress: Progress = _quiet,
                     replay: Callable[[Any, dict[str, sql.Identifier]], None] | None = None,
                     skip_moved_rows: bool = False) -> RecoveryReport:
    """Replace exactly one wedding's rows in the live database with the archive's, in ONE transaction:

    1. check the live schema (its own schemas) and tenancy plan against the archive's: stop on a difference;
    2. stage the archive's rows in temporary tables (checked against the manifest); `replay` (the change
       feed's, core/changefeed/replay.py) brings the staged rows to the second asked for, in the stage;
    3. lock the wedding's rows only, parents first (`SELECT … FOR UPDATE OF` the table's own rows, starting
       with the weddings row), so the application's writes to this wedding wait and those to every other
       wedding go on; refuse when rows outside the wedding point at its rows, and when a staged row's key is
       held now by another wedding or the platform (a row that moved away since): putting it back would take
       it from them. `skip_moved_rows` restores the rest and leaves such rows where they are (listed);
    4. diff (per table rows to add, remove and change); a dry run stops here and rolls back;
    5. delete the wedding's rows children first, insert the staged rows parents first, check every
       deferred constraint, recompute each table's checksum against the manifest (against the stage when
       it was replayed or rows were skipped), move sequences forward (never back), commit.

    Triggers fire as for any write (the demo has only BEFORE UPDATE ones); a trigger that changes the
    inserted rows fails the checksum step and the restore rolls back."""
    started = time.monotonic()
    partition = check_partition(str(wedding_id))
    if partition == PLATFORM:
        raise RestoreError("an in-place restore replaces one wedding's rows; the platform partition is shared by "
                           "every wedding: restore it --into-schema or --target-dsn instead")
    header, records = _open_stream(chunks, name)
    if str(header["partition"]) != partition:
        raise RestoreError(f"archive {name} holds {partition_label(str(header['partition']))}, not wedding {partition}")
    what = f"wedding {partition}"
    target = database_label(dsn)
    try:
        with connect_target(dsn, target, "wedbackup-restore-in-place") as conn, _transaction(conn, commit=not dry_run), \
                _row_security_named(what, target):
            report = _replace_wedding(conn, header, records, partition, target, dry_run=dry_run,
                                      lock_timeout=lock_timeout, progress=progress, replay=replay,
                                      skip_moved_rows=skip_moved_rows)
    except psycopg.errors.LockNotAvailable:
        raise RestoreError(f"restore of {what} into {target}: a lock it needs was held by another session for "
                           f"more than {lock_timeout:g} s; nothing was written (try again later)") from None
    except psycopg.errors.DeadlockDetected:
        raise RestoreError(f"restore of {what} into {target}: deadlocked with another session writing to the "
                           f"wedding; nothing was written (try again)") from None
    report.seconds = round(time.monotonic() - started, 6)
    return report


def _replay_into_stage(conn, staged: list[_Staged], replay: Callable[[Any, dict[str, sql.Identifier]], None]
                       ) -> None:
    """Apply the change feed's replay to the staged rows (temporary tables holding this wedding only), so the
    stage is the wedding as of the second asked for; the live tables are not touched. Keyed tables get an
    index on their key first: every replayed UPDATE and DELETE finds its row by it."""
    for s in staged:
        if s.keyed:
            conn.execute(sql.SQL("CREATE INDEX ON {} ({})").format(
                s.table, sql.SQL(", ").join(map(sql.Identifier, s.order_by))))
    replay(conn, {s.qualified: s.table for s in staged})


def _moved_condition(t: tenancy.TenantTable) -> sql.Composable:
    """Staged rows (alias x) whose key exists in the live table but is not among the wedding's live rows."""
    keys = list(t.order_by)
    x_keys = sql.SQL(", ").join(sql.Identifier("x", c) for c in keys)
    eq = sql.SQL(" AND ").join(sql.SQL("{} = {}").format(sql.Identifier("l", c), sql.Identifier("x", c))
                               for c in keys)
    return sql.SQL("EXISTS (SELECT FROM {live} AS l WHERE {eq}) AND ({x_keys}) NOT IN ({own})").format(
        live=t.exact(), eq=eq, x_keys=x_keys, own=t.wedding_rows([sql.Identifier("t0", c) for c in keys]))


def _moved_rows(conn, tenant_order: list[tenancy.TenantTable], by_name: Mapping[str, _Staged],
                partition: str) -> list[dict[str, Any]]:
    """Rows the restore would put back whose key another wedding (or the platform) holds now: each with its
    table, key and owner. Only keyed tables (a keyless row cannot collide with another's)."""
    out: list[dict[str, Any]] = []
    for t in tenant_order:
        s = by_name[str(t.table)]
        if not s.keyed:
            continue
        keys = list(t.order_by)
        owner = sql.SQL("(SELECT o.wb_wedding FROM ({owners}) AS o WHERE {eq} LIMIT 1)").format(
            owners=t.owners([sql.Identifier("t0", c) for c in keys]),
            eq=sql.SQL(" AND ").join(sql.SQL("o.{} = {}").format(sql.Identifier(c), sql.Identifier("x", c))
                                     for c in keys))
        rows = conn.execute(sql.SQL("SELECT ROW({keys})::text, {owner} FROM {stage} AS x WHERE {cond} "
                                    "ORDER BY 1 LIMIT 1000").format(
            keys=sql.SQL(", ").join(sql.Identifier("x", c) for c in keys), owner=owner, stage=s.table,
            cond=_moved_condition(t)), {"wedding_id": partition}).fetchall()
        for key, held_by in rows:
            out.append({"table": str(t.table), "key": f"({', '.join(keys)})={key}",
                        "owner": f"wedding {held_by}" if held_by is not None else "the platform partition",
                        "skipped": False})
    return out


def _unstage_moved(conn, tenant_order: list[tenancy.TenantTable], by_name: Mapping[str, _Staged],
                   partition: str) -> None:
    """Drop from the stage every row _moved_rows names (--skip-moved-rows): they stay where they are now."""
    for t in tenant_order:
        s = by_name[str(t.table)]
        if s.keyed:
            conn.execute(sql.SQL("DELETE FROM {} AS x WHERE {}").format(s.table, _moved_condition(t)),
                         {"wedding_id": partition})


def _replace_wedding(conn, header: Mapping[str, Any], records: Iterator[Record], partition: str, target: str, *,
                     dry_run: bool, lock_timeout: float, progress: Progress,
                     replay: Callable[[Any, dict[str, sql.Identifier]], None] | None = None,
                     skip_moved_rows: bool = False) -> RecoveryReport:
    """The body of restore_in_place's transaction (see there); raises to roll back."""
    what = f"wedding {partition}"
    params = {"wedding_id": partition}
    # READ COMMITTED: after each lock, the next statement sees what was committed before it was granted.
    conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{int(lock_timeout * 1000)}ms")))
    use_qualified_names(conn)
    no_row_security(conn)
    check_schema(conn, header, what, target, strict=False)
    plan = _live_plan(conn, header, what, target)
    staged, manifest = _load(conn, records, what, target, progress, _temp_stage(conn))
    _attach_plan(staged, plan, partition, what, target)
    by_name = {t.qualified: t for t in staged}
    tenant_order = [t for t in plan.tenant_tables if str(t.table) in by_name]
    if replay is not None:  # the stage becomes the wedding as of the second asked for
        _replay_into_stage(conn, staged, replay)
    if not dry_run:  # a dry run reads without locking: it must not hold up the application
        for t in tenant_order:  # parents first: a locked parent keeps new children out
            n = conn.execute(sql.SQL("SELECT count(*) FROM ({}) AS locked").format(
                t.wedding_rows([sql.SQL("1")], lock=True)), params).fetchone()[0]
            progress(f"{t.table}: {n:,} live rows locked")
    outside = _outside_references(conn, plan, partition)
    if outside:
        raise RestoreError(f"restore of {what} into {target} would change rows outside the wedding; nothing "
                           f"was written: " + "; ".join(outside))
    moved = _moved_rows(conn, tenant_order, by_name, partition)
    if moved and not dry_run and not skip_moved_rows:
        shown = "; ".join(f"{m['table']} {m['key']} (now {m['owner']})" for m in moved[:10])
        more = f" and {len(moved) - 10} more" if len(moved) > 10 else ""
        raise RestoreError(f"restore of {what} into {target}: {len(moved)} row(s) of its state are held now by "
                           f"another wedding or the platform: {shown}{more}; putting them back would take them "
                           f"from there, so nothing was written. Restore it --into-schema or --target-dsn to "
                           f"inspect, or pass --skip-moved-rows to restore the rest and leave those rows where "
                           f"they are")
    if moved and skip_moved_rows:
        _unstage_moved(conn, tenant_order, by_name, partition)
        for m in moved:
            m["skipped"] = True
            progress(f"{m['table']} {m['key']}: now {m['owner']}'s, left there")
    tables = [_diff(conn, by_name[str(t.table)]) for t in tenant_order]
    report = RecoveryReport(partition, "in_place", target, dry_run, tables, moved_rows=moved)
    if dry_run:
        return report
    conn.execute("SET CONSTRAINTS ALL DEFERRED")
    for t in reversed(tenant_order):  # children first
        # By primary key (an index probe per row); a table without one by row identity.
        keys = list(t.order_by) if t.keyed else None
        outer = (sql.SQL(", ").join(sql.Identifier("x", c) for c in keys) if keys
                 else sql.SQL("x.tableoid, x.ctid"))
        inner = [sql.Identifier("t0", c) for c in keys] if keys else list(_ROW_ID)
        # Exactly this table (ONLY): its INHERITS children may hold other weddings' rows with the same keys.
        deleted = conn.execute(sql.SQL("DELETE FROM {} AS x WHERE ({}) IN ({})").format(
            t.exact(), outer, t.wedding_rows(inner)), params).rowcount
        progress(f"{t.table}: {deleted:,} rows deleted")
    for t in tenant_order:  # parents first
        s = by_name[str(t.table)]
        cols = sql.SQL(", ").join(map(sql.Identifier, s.columns))
        try:
            # OVERRIDING SYSTEM VALUE: the archive's values go into GENERATED ALWAYS identity columns as
            # COPY puts them (sequences are moved past them below); a no-op for every other column.
            inserted = conn.execute(sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {}").format(
                s.live, cols, cols, s.table)).rowcount
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected):
            raise
        except psycopg.Error as e:
            raise RestoreError(f"restore of {what} into {target}: table {s.qualified} refused the archive's rows: "
                               f"{db_error_line(e)}; nothing was written") from None
        progress(f"{s.qualified}: {inserted:,} rows inserted")
    try:
        conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
    except psycopg.Error as e:
        raise RestoreError(f"restore of {what} into {target}: a deferred constraint fails: {db_error_line(e)}; "
                           f"nothing was written") from None
    for s in staged:
        if replay is not None or moved:
            # The stage is no longer the archive's: the wedding's live rows, read again by the plan, must be
            # exactly the staged rows (as multisets of whole rows; by key: none added, removed or changed).
            d = _diff(conn, s)
            if (d.add, d.remove, d.change) != (0, 0, 0) or d.archive_rows != d.live_rows:
                raise VerificationError(f"restore of {what} into {target}: table {s.qualified} does not match the "
                                        f"restored state after loading ({d.live_rows} rows live, {d.archive_rows} "
                                        f"staged, {d.add} missing, {d.remove} extra, {d.change} changed): a trigger "
                                        f"may have changed the rows; nothing was written")
            continue
        rows, nbytes, sha = table_checksum(conn, s.select, s.params)
        m = manifest.table(s.qualified)
        if (rows, nbytes, sha) != (m.rows, m.bytes, m.sha256):
            raise VerificationError(f"restore of {what} into {target}: table {s.qualified} does not match the "
                                    f"manifest after loading ({rows} rows / sha256 {sha[:16]}… vs {m.rows} / "
                                    f"{m.sha256[:16]}…): a trigger may have changed the rows; nothing was written")
    report.sequences = advance_sequences(conn, [(s.schema, s.name) for s in staged])
    progress(f"{what}: {sum(s.rows for s in staged):,} rows checked against the manifest; committing")
    return report


# --- the whole recovery, as the job and the command line ask for it --------------------------------

@dataclass(frozen=True)
class RecoveryRequest:
    partition: str
    mode: str  # target | schema | in_place
    as_of: datetime | None = None  # None: now
    dry_run: bool = False
    provider: str | None = None  # vault, s3, gcs, azure; default: the vault copy when present
    schema: str | None = None  # for mode "schema"
    include_unverified: bool = False
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    skip_moved_rows: bool = False  # in place: leave rows another wedding holds now where they are (listed)


def _choose_copy(engine: Any, backup: BackupRecord, replicas: Mapping[str, Any], asked: str | None) -> str:
    copies = {c.provider for c in engine.catalogue.copies(backup.id)}
    if asked:
        if asked not in copies:
            raise ProviderError(asked, f"holds no copy of {partition_label(backup.partition)}'s backup "
                                       f"{backup.archive_sha256[:12]} of {backup.snapshot_time.isoformat()}")
        if asked != "vault" and asked not in replicas:
            raise ProviderError(asked, "is not configured for this restore")
        return asked
    if "vault" in copies and engine.vault.get(backup.partition, backup.archive_sha256):
        return "vault"
    for provider in ("s3", "gcs", "azure"):
        if provider in copies and provider in replicas:
            return provider
    raise WedbackupError(f"{partition_label(backup.partition)}: no reachable copy of backup {backup.archive_sha256[:12]}")


def recover(engine: Any, request: RecoveryRequest, replicas: Mapping[str, Any], *, target_dsn: str | None = None,
            progress: Progress = _quiet) -> RecoveryReport:
    """Choose the point (newest verified at or before `as_of`), fetch and open one copy (SHA-256 checked),
    and restore it as asked. `target_dsn`: the other database (mode target; optional for mode schema);
    in place and by default, the source database of the engine's settings. The in-place branch is the one
    call a per-wedding lock should wrap."""
    if request.mode not in MODES:
        raise WedbackupError(f"restore mode {request.mode!r} is not one of {', '.join(MODES)}")
    if request.mode == "target" and not target_dsn:
        raise WedbackupError("a restore into another database needs its DSN (--target-dsn)")
    if request.mode == "schema" and not request.schema:
        raise WedbackupError("a restore into a schema needs its name (--into-schema NAME)")
    if target_dsn and request.mode != "in_place":  # the database it reaches, however the DSN is written
        check_restore_target(target_dsn, source_dsn=engine.settings.source_dsn,
                             catalogue_dsn=engine.settings.catalogue_dsn, mode=request.mode)
    partition = check_partition(request.partition)
    as_of = request.as_of or datetime.now(timezone.utc)
    point = choose_point(recovery_points(engine.catalogue, partition), partition, as_of,
                         include_unverified=request.include_unverified)
    backup = engine.catalogue.backup_by_sha(point.archive_sha256)
    chosen = _choose_copy(engine, backup, replicas, request.provider)
    state = "verified" if point.verified else "NOT verified"
    progress(f"{partition_label(partition)}: recovery point {backup.snapshot_time.isoformat()} (archive "
             f"{backup.archive_sha256[:12]}, {state}), from the {chosen} copy")
    dsn = target_dsn if target_dsn and request.mode != "in_place" else engine.settings.source_dsn
    name = engine.archive_name(backup, chosen)
    from ..changefeed.replay import prepare_for_restore  # to the second, when a change feed covers it

    replay = prepare_for_restore(engine, backup, request.as_of, replicas, progress)  # every mode, dry runs too
    with engine.fetched_copy(backup, chosen, replicas) as tmp:
        progress(f"fetched the {chosen} copy ({backup.size:,} bytes, SHA-256 checked)")
        chunks = open_archive(tmp, name=name, resolve_key=engine.resolve_key)
        if request.mode == "in_place":
            # The wedding's lock (core/catalogue/locks.py): no backup of it snapshots while its rows are replaced,
            # so no archive ever holds half of a restore. A dry run writes nothing and needs none.
            held = (contextlib.nullcontext() if request.dry_run
                    else partition_lock(engine.catalogue, partition, purpose="in-place restore"))
            with held:
                report = restore_in_place(chunks, dsn, partition, name=name, dry_run=request.dry_run,
                                          lock_timeout=request.lock_timeout, progress=progress,
                                          replay=replay, skip_moved_rows=request.skip_moved_rows)
        elif request.mode == "schema":
            report = restore_into_schema(chunks, dsn, request.schema, name=name, dry_run=request.dry_run,
                                         progress=progress, before_commit=replay)
        else:
            report = restore_to_database(chunks, dsn, name=name, dry_run=request.dry_run, progress=progress,
                                         before_commit=replay)
    if partition == PLATFORM and not request.dry_run:
        if request.mode == "target":
            # Platform archives taken before an erasure still name the erased weddings: erase them again.
            from wedbackup_dagster.core.governance.erasure import reapply_erasures

            for line in reapply_erasures(dsn, engine.catalogue):
                progress(f"re-applied a recorded erasure: {line}")
        elif engine.catalogue.erasures():
            progress(f"warning: schema {request.schema} may hold platform rows of erased weddings; recorded "
                     f"erasures are re-applied only by a restore into a database")
    report.archive_sha256, report.snapshot_time, report.copy = (backup.archive_sha256,
                                                                backup.snapshot_time.isoformat(), chosen)
    if replay is not None:
        report.replay = replay.report.to_dict() if replay.report else None
    if not request.dry_run and request.mode == "in_place":
        # The live rows changed without touching updated_at: tell the schedule, so a fresh backup follows.
        engine.catalogue.record_source_changes({partition: datetime.now(timezone.utc)})
    if not request.dry_run:
        engine.catalogue.audit("restore", partition, {
            "mode": request.mode, "archive_sha256": backup.archive_sha256, "copy": chosen, "as_of": as_of.isoformat(),
            "snapshot_time": backup.snapshot_time.isoformat(), "target": report.target, "totals": report.totals,
            "seconds": report.seconds})
    return report
