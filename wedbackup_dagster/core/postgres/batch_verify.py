"""Verify the newest backups of many weddings in ONE scratch database: the schema is created once, every
wedding's archive is loaded in its own transaction, then each table is read back once for the whole batch
(one COPY ordered by wedding, split per wedding as `snapshot_many` does) and every wedding's rows are
checked against its own manifest (rows, bytes, SHA-256 per table) and its own foreign keys.

Why a batch cannot make a bad wedding look good: rows are routed back to a wedding by their own key
along the tenancy path, never by the archive they came from; each archive's stream must equal its own
catalogue manifest table by table as it is loaded, and the rows read back under its wedding key must
equal that manifest again, so rows of another wedding (in its archive or anyone else's) make it fail.
Any wedding that fails in the batch, for whatever reason (its own archive, or a neighbour's bad rows
colliding with it), is verified again ALONE by `Engine.verify`, whose verdict is the one recorded: a
failure names that wedding only, and the others of the batch are unaffected."""
from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from wedbackup_dagster.core.postgres import load_snapshot as restore
from wedbackup_dagster.core.postgres import tenancy
from wedbackup_dagster.core.formats.archive import open_archive
from wedbackup_dagster.core.catalogue.store import BackupRecord
from wedbackup_dagster.core.storage.providers import PROVIDERS
from wedbackup_dagster.core.outcomes import VerifyOutcome
from wedbackup_dagster.core.errors import VerificationError, WedbackupError
from wedbackup_dagster.core.formats.snapshot_stream import (MANIFEST, Manifest, check_table_end, header_of, manifest_of,
                                                            read_snapshot, read_to_end, table_begin_of)
from wedbackup_dagster.core.postgres.snapshot import (array_literal, copy_batch, TableOut, database_label,
                                                      use_qualified_names)
from wedbackup_dagster.core.partitions import PLATFORM, check_partition

_WEDDINGS_PLACEHOLDER = b"%(wedding_ids)s"
DOWNLOAD_IN_MEMORY = 4 << 20  # a downloaded copy stays in memory up to this (prefetch at a time), then spills to disk
log = logging.getLogger("wedbackup.verify")


class _Alone(Exception):
    """This wedding cannot be checked in this batch (another schema, another routing): verify it alone."""


class _NullSink:
    @staticmethod
    def write(data: bytes) -> None:
        return None


@dataclass
class _Job:
    partition: str
    backup: BackupRecord
    provider: str
    manifest: Manifest
    object_key: str | None = None  # of the chosen copy at a provider (looked up before the fetch threads run)
    download_seconds: float = 0.0
    load_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    fk_checked: int = 0
    fk_external: int = 0


@dataclass
class _Read:
    """A wedding's archive read into memory, already checked against its own manifests: each table's
    name, columns and COPY text (what `_Scratch.load_many` loads with one COPY per table per batch)."""

    job: _Job
    tables: dict[str, tuple[list[str], list[bytes]]]


class _Collect:
    """Stands in for a cursor in `restore.copy_table_in`, which then hashes and checks the rows as for a
    restore but keeps them in memory instead of sending them; never more than the wedding's manifest
    says it holds (a stream that is longer is a mismatch anyway), so memory stays bounded."""

    def __init__(self, job: _Job, held: list[int]) -> None:
        self.payloads: list[bytes] = []
        self._job, self._held = job, held

    @contextlib.contextmanager
    def copy(self, query: Any) -> Iterator[_Collect]:
        yield self

    def write(self, payload: bytes) -> None:
        self._held[0] += len(payload)
        if self._held[0] > self._job.manifest.total_bytes:
            raise VerificationError(f"wedding {self._job.partition}: its archive holds more than the "
                                    f"{self._job.manifest.total_bytes} bytes of rows its manifest lists")
        self.payloads.append(payload)


class _Scratch:
    """The batch's scratch database: schema from the first archive read (in its own transaction), the
    tenancy plan read back from it; weddings loaded together (`load_many`) or one by one (`load`)."""

    def __init__(self, conn: psycopg.Connection, dsn: str):
        self.conn = conn
        self.target = database_label(dsn)
        self.fingerprint: str | None = None
        self.header: dict[str, Any] | None = None  # the header the schema was created from (checked in full)
        self.plan: tenancy.TenancyPlan | None = None
        self.selects: dict[str, str] = {}  # table -> its per-wedding SELECT as the manifest renders it
        self.columns: dict[str, list[str]] = {}  # table -> the columns COPY moves
        self.foreign_keys: list[tuple[Any, ...]] = []  # every foreign key of the restored tables (foreign_keys_sql)

    def load(self, job: _Job, chunks: Any, name: str) -> None:
        """Stream one wedding's archive into the scratch database in its own transaction (memory bounded
        whatever its size)."""
        records = self._open(job, chunks, name)
        with self._transaction(), self.conn.cursor() as cur:
            self._read(job, records, name, cur)

    def read(self, job: _Job, chunks: Any, name: str) -> _Read:
        """One wedding's archive into memory, checked (to be loaded by `load_many`)."""
        records = self._open(job, chunks, name)
        return _Read(job, self._read(job, records, name, None))

    def load_many(self, reads: list[_Read]) -> list[tuple[_Read, str]]:
        """Every wedding read, with ONE COPY per table, in one transaction. When that fails (a wedding's
        rows break a key or constraint), each wedding is loaded again in its own transaction: returns the
        weddings that failed there, with why."""
        if not reads:
            return []
        try:
            with self._transaction(), self.conn.cursor() as cur:
                for t in self.plan.tenant_tables:
                    table = str(t.table)
                    parts = [r.tables[table][1] for r in reads if table in r.tables]
                    if parts:
                        self._copy_in(cur, table, [p for payloads in parts for p in payloads])
            return []
        except psycopg.Error:
            if self.conn.closed or self.conn.broken:
                raise
        failed = []
        for r in reads:
            try:
                with self._transaction(), self.conn.cursor() as cur:
                    for table, (_, payloads) in r.tables.items():
                        self._copy_in(cur, table, payloads)
            except psycopg.Error as e:
                if self.conn.closed or self.conn.broken:
                    raise
                failed.append((r, f"restore of wedding {r.job.partition} into {self.target}: "
                                  f"{restore.db_error_line(e)}"))
        return failed

    def _copy_in(self, cur: Any, table: str, payloads: list[bytes]) -> None:
        schema, _, name = table.partition(".")
        query = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(schema, name), sql.SQL(", ").join(map(sql.Identifier, self.columns[table])))
        with cur.copy(query) as copy:
            for payload in payloads:
                copy.write(payload)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        conn = self.conn
        conn.execute("BEGIN")
        try:
            use_qualified_names(conn)  # COPY reads values (regclass, …) as the snapshot wrote them
            yield
            conn.execute("COMMIT")
        except BaseException:
            if not conn.closed and not conn.broken:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
            raise

    def _open(self, job: _Job, chunks: Any, name: str) -> Iterator[Any]:
        """The archive's records after its header and DDL: the header names this wedding, the schema is
        the batch's (created from this archive when it is the first), every table is routed as in the
        wedding's manifest."""
        p = job.partition
        records = read_snapshot(chunks, name=name)
        header = header_of(next(records), like=self.header)
        pre_data = next(records).text()
        post_data = next(records).text()
        if header["partition"] != p:
            raise VerificationError(f"wedding {p}: its archive {name} holds partition "
                                    f"{str(header['partition'])[:40]!r}, not this wedding")
        if self.fingerprint is None:
            with self._transaction():
                self._create_schema(header, pre_data, post_data)
        elif header["schema_fingerprint"] != self.fingerprint:
            raise _Alone(f"schema {header['schema_fingerprint'][:12]} differs from the batch's")
        for t in job.manifest.tables:
            if self.selects.get(t.table) != t.select_sql:
                raise _Alone(f"table {t.table} is not routed in the scratch database as in its manifest")
        return records

    def _read(self, job: _Job, records: Iterator[Any], name: str, cur: Any
              ) -> dict[str, tuple[list[str], list[bytes]]]:
        """The tables' rows, COPYed into `cur` (or kept in memory when `cur` is None), each checked against
        its table-end record; then the archive's own manifest and the catalogue's, table by table."""
        p, what = job.partition, f"wedding {job.partition}"
        seen: dict[str, tuple[int, int, str]] = {}
        kept: dict[str, tuple[list[str], list[bytes]]] = {}
        manifest_record = None
        held = [0]
        for record in records:
            if record.kind == MANIFEST:
                manifest_record = record
                break
            schema, tname, columns = table_begin_of(record)
            table = f"{schema}.{tname}"
            if table not in self.selects or table in seen:
                raise VerificationError(f"wedding {p}: its archive {name} holds table {table} "
                                        f"{'twice' if table in seen else 'which is no tenant table of its schema'}")
            if columns != self.columns[table]:
                raise _Alone(f"table {table} has other columns than the batch's")
            into = _Collect(job, held) if cur is None else cur
            try:
                rows, nbytes, sha, end = restore.copy_table_in(into, sql.Identifier(schema, tname), columns, records)
            except psycopg.Error as e:
                raise VerificationError(f"restore of {what} into {self.target}: table {table} refused its "
                                        f"rows: {restore.db_error_line(e)}") from None
            check_table_end(end, rows, nbytes, sha, what=what, target=self.target, table=table,
                                    done="restored")
            seen[table] = (rows, nbytes, sha)
            if cur is None:
                kept[table] = (columns, into.payloads)
        if manifest_record is None:
            raise VerificationError(f"wedding {p}: its archive {name} has no manifest")
        read_to_end(records, name)
        embedded = manifest_of(manifest_record)
        if embedded.partition != p:
            raise VerificationError(f"wedding {p}: the manifest inside {name} is wedding "
                                    f"{embedded.partition[:40]!r}'s")
        restore.compare_with_manifest(embedded, seen, what, self.target)  # the archive is self-consistent
        restore.compare_with_manifest(job.manifest, seen, what, self.target)  # and is the catalogue's backup
        return kept

    def _create_schema(self, header: dict[str, Any], pre_data: str, post_data: str) -> None:
        """The archive's DDL on the empty scratch, before any rows: keys and indexes are enforced while
        loading; the foreign keys between restored tables are listed, then left to `check` (per wedding,
        `_drop_checked_foreign_keys`); keys to tables outside a wedding (vendors) are left out (their parents
        are in no wedding's archive); user triggers are disabled."""
        conn = self.conn
        try:
            conn.execute(pre_data)
            use_qualified_names(conn)
            tenant_tables = _plan_of(header).get("tenant_tables", {})
            restored = {tuple(str(name).partition(".")[::2]) for name in tenant_tables}
            external = {(fk["schema"], fk["table"], fk["name"]) for fk in header.get("foreign_keys", [])
                        if (fk["ref_schema"], fk["ref_table"]) not in restored}
            script = _without(post_data, external)
            conn.execute(script)
            use_qualified_names(conn)
        except psycopg.Error as e:
            raise VerificationError(f"wedding {header['partition']}: its schema (DDL) cannot be created in "
                                    f"{self.target}: {restore.db_error_line(e)}") from None
        plan = tenancy.discover(conn, _root(header))
        for t in (*plan.tenant_tables, *plan.platform_tables):
            conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(t.table.ident()))
        tenants = [(t.table.schema, t.table.name) for t in plan.tenant_tables]
        self.foreign_keys = conn.execute(
            restore.foreign_keys_sql("referencing"),
            {"schemas": [s for s, _ in tenants], "names": [n for _, n in tenants]}).fetchall()
        self._drop_checked_foreign_keys(set(tenants))
        self.plan = plan
        self.selects = {str(t.table): t.wedding_select().as_string(conn) for t in plan.tenant_tables}
        self.columns = {str(t.table): list(t.columns) for t in plan.tenant_tables}
        self.fingerprint = header["schema_fingerprint"]
        self.header = header

    def _drop_checked_foreign_keys(self, tenants: set[tuple[str, str]]) -> None:
        """Drop the MATCH SIMPLE foreign keys between restored tables before any row is loaded: `check` counts
        each one's orphans per wedding after the load (`_orphans_query`, a parent of the SAME wedding: stricter
        than the constraint, which accepts a parent of any wedding), so enforcing them row by row while
        loading (a trigger and a lookup per row, most of the server's work in a batch) proved nothing more.
        A wedding breaking one still fails, named alone. Keys of another MATCH type stay in force."""
        kept = {tuple(r) for r in self.conn.execute(_NOT_MATCH_SIMPLE_SQL).fetchall()}
        for conname, cs, ct, ps, pt, _cols, _pcols, ckind, _pkind in self.foreign_keys:
            if (cs, ct) in tenants and (ps, pt) in tenants and (cs, ct, conname) not in kept:
                self.conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                    restore.exact_table(cs, ct, ckind), sql.Identifier(conname)))

    def check(self, jobs: list[_Job]) -> None:
        """Every table read back once for all `jobs` (loaded weddings) and compared with each wedding's
        manifest; then each foreign key between restored tables, orphans counted per wedding."""
        if not jobs or self.plan is None:
            return
        conn = self.conn
        ids = sql.Literal(array_literal(j.partition for j in jobs)).as_bytes(conn)
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            use_qualified_names(conn)
            for t in self.plan.tenant_tables:
                outs = {j.partition.encode(): TableOut(_NullSink) for j in jobs}
                copy = sql.SQL("COPY ({}) TO STDOUT").format(t.wedding_batch_select()).as_bytes(conn)
                copy_batch(conn, ids.join(copy.split(_WEDDINGS_PLACEHOLDER)), outs, t.table)
                for j in jobs:
                    _compare(j, str(t.table), outs[j.partition.encode()])
            self._check_foreign_keys(jobs, ids)
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")

    def _check_foreign_keys(self, jobs: list[_Job], ids: bytes) -> None:
        tenants = {(t.table.schema, t.table.name): t for t in self.plan.tenant_tables}
        for conname, cs, ct, ps, pt, cols, pcols, *_relkinds in self.foreign_keys:
            parent = tenants.get((ps, pt))
            if parent is None:
                for j in jobs:
                    j.fk_external += 1
                continue
            child = tenants[(cs, ct)]
            query = _orphans_query(child, parent, cols, pcols).as_bytes(self.conn)
            rows = self.conn.execute(ids.join(query.split(_WEDDINGS_PLACEHOLDER))).fetchall()
            orphans = {str(w): n for w, n in rows}
            for j in jobs:
                j.fk_checked += 1
                if orphans.get(j.partition):
                    j.problems.append(f"foreign key {conname} on {cs}.{ct}: {orphans[j.partition]} row(s) without "
                                      f"a parent of this wedding in {ps}.{pt}")


def _plan_of(header: dict[str, Any]) -> dict[str, Any]:
    plan = header.get("plan")
    return plan if isinstance(plan, dict) else {}


def _root(header: dict[str, Any]) -> tenancy.TableName:
    return restore.plan_root(_plan_of(header))


def _without(post_data: str, external: set[tuple[str, str, str]]) -> str:
    """The post-data script without the foreign keys listed (schema, table, constraint)."""
    parts = []
    for typ, schema, name, heading, body in restore.split_ddl(post_data):
        table, _, constraint = name.partition(" ")
        if typ == "FK CONSTRAINT" and (schema, table, constraint) in external:
            continue
        parts.append(heading + body)
    return "".join(parts)


_KEY = "wedbackup_wedding"
# Foreign keys whose MATCH is not SIMPLE (FULL): `_orphans_query` counts as MATCH SIMPLE does, so these stay
# enforced by the server while loading.
_NOT_MATCH_SIMPLE_SQL = """
SELECT n.nspname::text, c.relname::text, con.conname::text FROM pg_catalog.pg_constraint con
JOIN pg_catalog.pg_class c ON c.oid = con.conrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE con.contype = 'f' AND con.confmatchtype <> 's'
"""


def _orphans_query(child: tenancy.TenantTable, parent: tenancy.TenantTable, cols: list[str],
                   pcols: list[str]) -> sql.Composable:
    """Rows of `child` per wedding whose key (MATCH SIMPLE: no NULL in it) finds no `parent` row of the
    SAME wedding: both sides routed by the tenancy plan, so a parent that exists only in another wedding
    is an orphan, as it would be in a scratch database of this wedding alone."""
    def aliased(t: tenancy.TenantTable, alias: str) -> sql.Composable:
        names = sql.SQL(", ").join(map(sql.Identifier, (_KEY, *t.columns)))
        return sql.SQL("({}) AS {}({})").format(t.wedding_batch_select(), sql.Identifier(alias), names)

    return sql.SQL("SELECT c.{key}::text, count(*) FROM {child} WHERE {notnull} AND NOT EXISTS "
                   "(SELECT FROM {parent} WHERE p.{key} = c.{key} AND {match}) GROUP BY 1").format(
        key=sql.Identifier(_KEY), child=aliased(child, "c"), parent=aliased(parent, "p"),
        notnull=sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(sql.Identifier("c", c)) for c in cols),
        match=sql.SQL(" AND ").join(sql.SQL("{} = {}").format(sql.Identifier("p", p), sql.Identifier("c", c))
                                    for c, p in zip(cols, pcols)))


def _table_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """The tables checked, shaped as `VerifyReport.table_rows()` (every one matched, or the wedding failed):
    built as dicts directly, as `asdict(TableReport(...))` would make them (a deep copy per table cost more)."""
    return [{"table": t.table, "rows": t.rows, "bytes": t.bytes, "seconds": 0.0, "ok": True, "problem": ""}
            for t in manifest.tables]


def _compare(job: _Job, table: str, out: TableOut) -> None:
    try:
        m = job.manifest.table(table)
    except KeyError:
        if out.rows:
            job.problems.append(f"table {table}: {out.rows} rows read back, none in the manifest")
        return
    sha = out.digest.hexdigest()
    if out.rows != m.rows:
        job.problems.append(f"table {table}: {out.rows} rows read back, {m.rows} in the manifest")
    elif (out.bytes, sha) != (m.bytes, m.sha256):
        job.problems.append(f"table {table}: sha256 {sha[:16]}… read back, {m.sha256[:16]}… in the manifest")
    if m.counted is not None and out.rows != m.counted:
        # The independent count taken in the same snapshot (snapshot.count_mismatches, as Engine.verify checks).
        job.problems.append(f"table {table}: {out.rows} rows read back, {m.counted} counted independently at "
                            "snapshot time")


def verify_many(engine: Any, partitions: list[str], replicas: Mapping[str, Any], provider: str | None = None,
                *, prefetch: int = 4, memory_bytes: int = 64 << 20,
                on_progress: Callable[[], object] | None = None) -> Iterator[tuple[str, Any]]:
    """`Engine.verify` for many weddings, sharing one scratch database: yields (partition, VerifyOutcome
    or the WedbackupError that failed it). Copies are fetched `prefetch` at a time in threads while
    earlier ones are read; weddings are read into memory and loaded with one COPY per table for up to
    `memory_bytes` of COPY text at a time (a larger wedding streams in alone, in its own transaction).
    The platform partition, and every wedding that fails or cannot be checked in the batch, go through
    `Engine.verify` alone (its verdict and records are final); each wedding verified in the batch is
    recorded as `verify` records it (restore row, copy verified). `on_progress()` once per partition as its
    work is done (a batch's results come when its read-back ends: this is what a progress line counts)."""
    step = on_progress or (lambda: None)
    jobs: list[_Job] = []
    alone: list[str] = []
    weddings: list[str] = []
    for p in dict.fromkeys(partitions):
        try:
            if check_partition(p) == PLATFORM:
                alone.append(p)
            else:
                weddings.append(p)
        except WedbackupError as exc:
            step()
            yield p, exc
    # The batch's newest backups, their copies and restore counts in three queries, not four per wedding.
    catalogue = engine.catalogue
    newest = catalogue.latest_backups(weddings) if weddings else {}
    ids = [b.id for b in newest.values()]
    copies = catalogue.copies_of(ids) if ids else {}
    restores = catalogue.restore_counts(ids) if ids else {}
    available = [x for x in PROVIDERS if x in replicas]
    for p in weddings:
        try:
            backup = newest.get(p) or catalogue.require_latest_backup(p)  # raises naming the wedding
            held = copies.get(backup.id, [])
            chosen = engine.choose_provider(backup, available, provider, copies=held,
                                            restores=restores.get(backup.id, 0))
            key = next((c.object_key for c in held if c.provider == chosen), None)
            jobs.append(_Job(p, backup, chosen, Manifest.from_dict(backup.manifest), key))
        except WedbackupError as exc:
            step()
            yield p, exc
    if jobs:
        done: set[str] = set()
        try:
            for p, outcome in _verify_batch(engine, jobs, replicas, prefetch, memory_bytes, step):
                done.add(p)
                yield p, outcome
        except psycopg.Error as exc:
            # The scratch server failed under the batch (unreachable, connection lost): each wedding not yet
            # reported is verified alone, which names it and the server in its own error, as before batching.
            log.warning("the batch's scratch database failed (%s); verifying its weddings alone",
                        restore.db_error_line(exc)[:300])
            for job in jobs:
                if job.partition not in done:
                    try:
                        yield job.partition, engine.verify(job.partition, replicas, provider=job.provider)
                    except WedbackupError as err:
                        yield job.partition, err
    for p in alone:
        try:
            outcome = engine.verify(p, replicas, provider=provider)
        except WedbackupError as exc:
            outcome = exc
        step()
        yield p, outcome


def _verify_batch(engine: Any, jobs: list[_Job], replicas: Mapping[str, Any], prefetch: int,
                  memory_bytes: int, step: Callable[[], object]) -> Iterator[tuple[str, Any]]:
    engine.drop_abandoned_scratch(restore)
    started = time.perf_counter()

    def fetch(job: _Job) -> tuple[contextlib.ExitStack, Any]:
        """The chosen copy in a temporary file, checked as `Engine.verify` checks it; in a thread, so it
        touches no catalogue connection (the object key was looked up before)."""
        t0 = time.perf_counter()
        stack = contextlib.ExitStack()
        try:
            if job.provider == "vault":
                tmp = stack.enter_context(engine.fetched_copy(job.backup, job.provider, replicas))
            else:
                # In memory up to DOWNLOAD_IN_MEMORY (a temporary file past it): creating and freeing a file
                # per wedding cost about a third of a verification worker's time (profile, README).
                folder = engine.vault.root if engine.vault.root.exists() else None
                tmp = stack.enter_context(tempfile.SpooledTemporaryFile(max_size=DOWNLOAD_IN_MEMORY, dir=folder))
                engine.download_copy(replicas[job.provider], job.object_key, tmp, job.backup)
                tmp.seek(0)
        except BaseException:
            stack.close()
            raise
        job.download_seconds = time.perf_counter() - t0
        return stack, tmp

    keys = engine.catalogue.keys_by_id([j.backup.key_id for j in jobs], engine.keyring)

    def resolve_key(key_id: str) -> Any:
        return keys[key_id] if key_id in keys else engine.resolve_key(key_id)

    loaded: list[_Job] = []
    retry: list[_Job] = []
    reads: list[_Read] = []
    held = 0

    def flush() -> None:
        """Load the weddings read so far (one COPY per table), freeing their memory."""
        nonlocal reads, held
        failed = {id(r): why for r, why in scratch.load_many(reads)}
        for r in reads:
            if id(r) in failed:
                r.job.problems.append(failed[id(r)])
                retry.append(r.job)
            else:
                loaded.append(r.job)
        reads, held = [], 0

    with restore.scratch_database(engine.settings.scratch_dsn, label="batch") as dsn, \
            psycopg.connect(dsn, autocommit=True, application_name="wedbackup-batch-verify") as conn, \
            ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="wedbackup-fetch") as pool:
        scratch = _Scratch(conn, dsn)
        pending: deque[tuple[_Job, Future]] = deque()
        queue = iter(jobs)
        for job in queue:
            pending.append((job, pool.submit(fetch, job)))
            if len(pending) >= prefetch:
                break
        while pending:
            job, future = pending.popleft()
            step()  # counted once its copy is taken up, whatever comes of it (the read-back is the short tail)
            nxt = next(queue, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(fetch, nxt)))
            try:
                stack, tmp = future.result()
            except WedbackupError as exc:
                job.problems.append(str(exc))  # verify alone says why again, and records it
                retry.append(job)
                continue
            with stack:
                t0 = time.perf_counter()
                name = engine.archive_name(job.backup, job.provider)
                try:
                    chunks = open_archive(tmp, name=name, resolve_key=resolve_key)
                    if job.manifest.total_bytes > memory_bytes:  # a large wedding streams in on its own
                        scratch.load(job, chunks, name)
                        loaded.append(job)
                    else:
                        reads.append(scratch.read(job, chunks, name))
                        held += job.manifest.total_bytes
                except (WedbackupError, _Alone) as exc:
                    job.problems.append(str(exc))
                    retry.append(job)
                except psycopg.Error as exc:
                    if conn.closed or conn.broken:
                        raise
                    job.problems.append(restore.db_error_line(exc))
                    retry.append(job)
                job.load_seconds = time.perf_counter() - t0
            if held >= memory_bytes:
                flush()
        flush()
        try:
            scratch.check(loaded)
        except WedbackupError as exc:  # the batch read-back itself failed: every wedding is tried alone
            for job in loaded:
                job.problems.append(str(exc))
    share = (time.perf_counter() - started) / max(1, len(jobs))
    retry += [job for job in loaded if job.problems]
    verified = [job for job in loaded if not job.problems]
    engine.catalogue.record_restores([
        (job.backup.id, job.provider, True, share,
         {"tables": len(job.manifest.tables), "fk_checked": job.fk_checked, "batch": len(jobs)}) for job in verified])
    for job in verified:
        yield job.partition, VerifyOutcome(job.partition, job.backup, job.provider, share, job.download_seconds,
                                           share - job.download_seconds, tables=_table_rows(job.manifest),
                                           fk_checked=job.fk_checked, fk_external=job.fk_external)
    for job in sorted(retry, key=jobs.index):
        log.warning("wedding %s: did not verify in the batch (%s); verifying it alone", job.partition,
                    "; ".join(job.problems)[:500])
        try:
            yield job.partition, engine.verify(job.partition, replicas, provider=job.provider)
        except WedbackupError as exc:
            yield job.partition, exc
