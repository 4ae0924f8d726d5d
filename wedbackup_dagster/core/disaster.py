"""Disaster recovery: the whole platform back into an empty database (`restore --all`) — the platform
partition first, then every wedding's newest verified backup at or before one time, in parallel, each wedding in
its own transaction together with its row in the target's progress table (schema `wedbackup_restore`), so a
crashed or killed run, run again with `resume`, neither redoes nor duplicates a wedding — the runbook of a
disaster scenario (`dr plan`), the weekly drill into a scratch database, and the master-key recovery kit.
Plain Python: the `restore_platform` and `dr_drill` jobs and `wedbackup restore --all` / `wedbackup dr …` are
thin calls into this module."""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import psycopg
from psycopg import sql

from wedbackup_dagster.core.partitions import PLATFORM, partition_label
from wedbackup_dagster.core.formats.archive import open_archive
from wedbackup_dagster.core.postgres.identity import check_restore_target
from .errors import ArchiveError, ProviderError, RestoreError, WedbackupError
from wedbackup_dagster.core.postgres.restore_wedding import (NoRecoveryPointError, RecoveryPoint, connect_target,
                                                             choose_point)
from wedbackup_dagster.core.postgres.load_snapshot import (advance_sequences, check_foreign_keys, db_error_line,
                                                           restore_snapshot, scratch_database)
from wedbackup_dagster.core.postgres.snapshot import (RESTORE_PROGRESS_SCHEMA, database_label, describe_schema,
                                                      schema_is_empty)
from .progress import Progress as Counter  # done of total, rate, ETA (plain Python, shared with the wiring)

Progress = Callable[[str], None]
LOCATIONS = ("vault", "s3", "gcs", "azure")
PROGRESS_EVERY = 2.0  # seconds between progress lines
# A copy that fails in these ways is that copy's fault: the wedding moves on to its next copy.
_COPY_FAULTS = (ArchiveError, ProviderError, OSError)
_SERIALISATION = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)

_PROGRESS_DDL = sql.SQL("""
CREATE SCHEMA {s};
CREATE TABLE {s}.run (only_one boolean PRIMARY KEY DEFAULT true CHECK (only_one),
                      as_of timestamptz NOT NULL, started_at timestamptz NOT NULL DEFAULT now(),
                      include_unverified boolean NOT NULL);
CREATE TABLE {s}.partitions (partition text PRIMARY KEY, archive_sha256 text NOT NULL,
                             snapshot_time timestamptz NOT NULL, copy text NOT NULL, rows bigint NOT NULL,
                             bytes bigint NOT NULL, seconds double precision NOT NULL,
                             restored_at timestamptz NOT NULL DEFAULT now());
""").format(s=sql.Identifier(RESTORE_PROGRESS_SCHEMA))

# Enabled user triggers that a COPY fires (INSERT, tgtype bit 2): only then must each load hold them off.
_INSERT_TRIGGERS_SQL = """
SELECT n.nspname::text || '.' || c.relname::text || ': ' || tg.tgname::text
FROM pg_catalog.pg_trigger tg JOIN pg_catalog.pg_class c ON c.oid = tg.tgrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE NOT tg.tgisinternal AND tg.tgenabled <> 'D' AND (tg.tgtype & 4) <> 0
  AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
ORDER BY 1
"""

_TABLES_SQL = """
SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
  AND n.nspname <> %s
ORDER BY 1, 2
"""


def _quiet(_: str) -> None:
    pass


def _partition_order(partition: str) -> tuple[int, int, str]:
    return (0, int(partition), "") if partition.isdigit() else (1, 0, partition)


# --- the report ---------------------------------------------------------------------------------------

@dataclass
class PartitionResult:
    partition: str
    ok: bool
    archive_sha256: str = ""
    snapshot_time: str = ""
    copy: str = ""
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    attempts: list[str] = field(default_factory=list)  # copies that failed first, with why
    error: str = ""


@dataclass
class PlatformReport:
    target: str
    as_of: str
    partitions_total: int = 0  # platform + every wedding planned (erased weddings excluded)
    restored_now: int = 0
    restored_before: int = 0  # committed by an earlier (interrupted) run, not redone
    rows: int = 0  # of every partition in the target
    bytes: int = 0  # archive bytes of every partition in the target
    phases: dict[str, float] = field(default_factory=lambda: {"download": 0.0, "decrypt": 0.0, "load": 0.0,
                                                               "check": 0.0})
    newest_point: str = ""
    oldest_point: str = ""
    copies_used: dict[str, int] = field(default_factory=dict)
    per_copy: dict[str, dict[str, float]] = field(default_factory=dict)  # location -> bytes, seconds (this run)
    slowest: dict[str, Any] = field(default_factory=dict)  # this run's slowest partition and its seconds
    fallbacks: list[str] = field(default_factory=list)  # "wedding 7: s3 failed (…), restored from gcs"
    failed: dict[str, str] = field(default_factory=dict)  # partition -> reason
    erased: list[str] = field(default_factory=list)  # erased weddings: not restored, by design
    erasures_reapplied: list[str] = field(default_factory=list)
    foreign_key_problems: list[str] = field(default_factory=list)
    sequences_checked: int = 0
    seconds: float = 0.0
    complete: bool = False
    stopped: str = ""  # why the run stopped early (it can be resumed)
    # Per partition restored by this run: seconds from the run's start to its commit, its own seconds and its
    # recovery point (a drill's per-tier RTO and RPO); left out of to_dict (one entry per wedding).
    timeline: dict[str, tuple[float, float, str]] = field(default_factory=dict, repr=False)
    started: float = field(default=0.0, repr=False)  # time.perf_counter() at the run's start

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("timeline")
        d.pop("started")
        return d

    def lines(self) -> list[str]:
        state = "complete" if self.complete else ("STOPPED: " + self.stopped if self.stopped else "INCOMPLETE")
        done = self.restored_now + self.restored_before
        out = [f"restore --all into {self.target} as of {self.as_of}: {state}",
               f"  partitions restored: {done} of {self.partitions_total} ({self.restored_now} now, "
               f"{self.restored_before} by an earlier run)",
               f"  rows {self.rows:,}, archive bytes {self.bytes:,}, {self.seconds:.1f} s",
               "  phases (s, summed over workers): " + ", ".join(f"{k} {v:.2f}" for k, v in self.phases.items()),
               f"  recovery points used: newest {self.newest_point or '-'}, oldest {self.oldest_point or '-'}",
               "  copies used: " + (", ".join(f"{k} {v}" for k, v in sorted(self.copies_used.items())) or "-")]
        out += [f"  fell back: {line}" for line in self.fallbacks]
        out += [f"  erased, not restored: wedding {p}" for p in self.erased]
        out += [f"  re-applied erasure: {line}" for line in self.erasures_reapplied]
        out += [f"  NOT RESTORED {partition_label(p)}: {why}" for p, why in sorted(self.failed.items(),
                                                                          key=lambda kv: _partition_order(kv[0]))]
        out += [f"  FOREIGN KEY: {line}" for line in self.foreign_key_problems]
        return out


@dataclass(frozen=True)
class RestoreAllOptions:
    as_of: datetime | None = None  # None: now (or, resuming, the time the first run chose)
    providers: tuple[str, ...] | None = None  # copies to use, in order; default vault, s3, gcs, azure
    jobs: int = 4
    resume: bool = False
    include_unverified: bool = False
    stop_after: int | None = None  # test hook: stop (as a crash would) after this many weddings this run
    window_seconds: float | None = None  # start no wedding after this long (a drill's window); resumable
    only: frozenset[str] | None = None  # restore only these weddings (a drill's sample); None: every wedding
    batches: bool = True  # many weddings per transaction (core/disaster_batch.py); False: one per transaction


def copy_order(first: str | None) -> tuple[str, ...]:
    """`--from X`: X first, then the other providers as fall-backs (the vault only when X is the vault)."""
    if first is None:
        return LOCATIONS
    if first not in LOCATIONS:
        raise WedbackupError(f"--from {first!r} is not one of {', '.join(LOCATIONS)}")
    return (first,) + tuple(p for p in LOCATIONS if p not in (first, "vault"))


# --- the target's state -------------------------------------------------------------------------------

def _progress_exists(conn) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                        (f"{RESTORE_PROGRESS_SCHEMA}.partitions",)).fetchone()[0]


def _what_is_there(conn) -> list[str]:
    """The target's objects beyond what a new database has (its bookkeeping schema excluded)."""
    description = describe_schema(conn)
    if schema_is_empty(description):
        return []
    return [f"{kind} {key}" for kind, key, _ in description
            if not (kind == "extension" or (kind == "schema" and key == "public"))]


def _done(conn) -> dict[str, dict[str, Any]]:
    rows = conn.execute(sql.SQL("SELECT partition, archive_sha256, snapshot_time, copy, rows, bytes FROM {}").format(
        sql.Identifier(RESTORE_PROGRESS_SCHEMA, "partitions"))).fetchall()
    return {r[0]: {"archive_sha256": r[1], "snapshot_time": r[2], "copy": r[3], "rows": r[4], "bytes": r[5]}
            for r in rows}


def _prepare_target(conn, target: str, options: RestoreAllOptions, as_of: datetime
                    ) -> tuple[datetime, bool, dict]:
    """Refuse a target in use; make the progress tables (new run) or read them (resume). Returns the run's
    as-of time, whether it takes unverified backups, and the partitions already committed."""
    if _progress_exists(conn):
        row = conn.execute(sql.SQL("SELECT as_of, include_unverified FROM {}").format(
            sql.Identifier(RESTORE_PROGRESS_SCHEMA, "run"))).fetchone()
        done = _done(conn)
        if not options.resume:
            raise RestoreError(f"the target, {target}, holds an unfinished restore --all ({len(done)} partition(s) "
                               f"committed, as of {row[0].isoformat() if row else '?'}): run again with --resume to "
                               f"finish it, or restore into a new empty database")
        if row is None:
            raise RestoreError(f"the target, {target}: its {RESTORE_PROGRESS_SCHEMA} schema has no run record; "
                               f"restore into a new empty database")
        if options.as_of is not None and options.as_of != row[0]:
            raise RestoreError(f"--as-of {options.as_of.isoformat()} differs from the interrupted run's "
                               f"{row[0].isoformat()}: resume without --as-of (one common point for all)")
        return row[0], row[1] or options.include_unverified, done
    there = _what_is_there(conn)
    if there:
        more = f" and {len(there) - 8} more" if len(there) > 8 else ""
        hint = (" (--resume continues only a restore --all that wedbackup started in this database)"
                if options.resume else "")
        raise RestoreError(f"the target, {target}, is not empty: {', '.join(there[:8])}{more}; restore --all "
                           f"writes only into a new, empty database{hint}")
    with conn.transaction():
        conn.execute(_PROGRESS_DDL)
        conn.execute(sql.SQL("INSERT INTO {} (as_of, include_unverified) VALUES (%s, %s)").format(
            sql.Identifier(RESTORE_PROGRESS_SCHEMA, "run")), (as_of, options.include_unverified))
    return as_of, options.include_unverified, {}


# --- one partition ------------------------------------------------------------------------------------

def _timed(chunks: Iterable[bytes], spent: list[float]) -> Iterator[bytes]:
    """The archive's plaintext chunks, adding the time spent producing them (decrypt + decompress)."""
    it = iter(chunks)
    while True:
        t0 = time.perf_counter()
        try:
            chunk = next(it)
        except StopIteration:
            spent[0] += time.perf_counter() - t0
            return
        spent[0] += time.perf_counter() - t0
        yield chunk


def _record_progress(partition: str, backup: Any, copy: str) -> Callable[[Any, Any], None]:
    started = time.perf_counter()

    def record(conn, report) -> None:  # inside the partition's own transaction: committed with its rows
        conn.execute(sql.SQL("INSERT INTO {} (partition, archive_sha256, snapshot_time, copy, rows, bytes, seconds) "
                             "VALUES (%s, %s, %s, %s, %s, %s, %s)").format(
            sql.Identifier(RESTORE_PROGRESS_SCHEMA, "partitions")),
            (partition, backup.archive_sha256, backup.snapshot_time, copy, report.total_rows, backup.size,
             round(time.perf_counter() - started, 6)))
    return record


def restore_partition(engine: Any, replicas: Mapping[str, Any], target_dsn: str, point: RecoveryPoint,
                      order: Iterable[str], *, hold_triggers: bool) -> PartitionResult:
    """One partition's chosen backup into the target, from the first copy in `order` that works: a copy
    that cannot be fetched, fails its SHA-256 or cannot be decrypted moves on to the next one."""
    partition = point.partition
    result = PartitionResult(partition, False, point.archive_sha256, point.snapshot_time.isoformat(),
                             bytes=point.size)
    backup = engine.catalogue.backup_by_sha(point.archive_sha256)
    held = {c.provider for c in engine.catalogue.copies(backup.id)}
    candidates = []
    for p in order:
        if p not in held:
            continue
        if p == "vault" and engine.vault.get(partition, backup.archive_sha256) is None:
            result.attempts.append("vault: the copy is missing from the vault")
        elif p != "vault" and p not in replicas:
            result.attempts.append(f"{p}: not configured for this restore")
        else:
            candidates.append(p)
    started = time.perf_counter()
    for copy in candidates:
        for attempt in range(3):  # a deadlock with another worker is retried; anything else is not
            decrypt = [0.0]
            t0 = time.perf_counter()
            try:
                with engine.fetched_copy(backup, copy, replicas) as tmp:
                    download = time.perf_counter() - t0
                    name = engine.archive_name(backup, copy)
                    chunks = _timed(open_archive(tmp, name=name, resolve_key=engine.resolve_key), decrypt)
                    t1 = time.perf_counter()
                    report = restore_snapshot(chunks, target_dsn, create_schema=partition == PLATFORM, name=name,
                                              hold_triggers=hold_triggers,
                                              before_commit=_record_progress(partition, backup, copy))
                    load = time.perf_counter() - t1 - decrypt[0]
            except _COPY_FAULTS as exc:
                result.attempts.append(f"{copy}: {str(exc)[:300]}")
                break
            except _SERIALISATION:
                if attempt == 2:
                    result.attempts.append(f"{copy}: deadlocked three times with other workers")
                    break
                continue
            except psycopg.errors.UniqueViolation as exc:
                result.error = f"already in the target (another run restoring it?): {db_error_line(exc)}"
                return result
            except WedbackupError as exc:
                result.error = str(exc)
                return result
            except psycopg.Error as exc:
                result.error = f"the target failed: {type(exc).__name__}: {db_error_line(exc)[:300]}"
                return result
            result.ok, result.copy, result.rows = True, copy, report.total_rows
            result.phases = {"download": download, "decrypt": decrypt[0], "load": max(load, 0.0)}
            result.seconds = round(time.perf_counter() - started, 6)
            return result
    tried = "; ".join(result.attempts) or f"copies at {', '.join(sorted(held)) or 'no location'}, none usable"
    result.error = f"no copy could be restored: {tried}"
    return result


# --- the whole platform -------------------------------------------------------------------------------

def planned_partitions(catalogue: Any) -> tuple[list[str], list[str]]:
    """(weddings to restore, erased weddings): every wedding with a backup or known to discovery, and every
    wedding the catalogue records as erased (its backups are gone: it is named, never restored)."""
    with catalogue.connect() as conn:
        backed_up = {r["partition"] for r in conn.execute(
            "SELECT DISTINCT partition FROM wedbackup.backups WHERE deleting_since IS NULL").fetchall()}
    known = backed_up | set(catalogue.live_partitions())
    known.discard(PLATFORM)
    erased = catalogue.erased_partitions()
    weddings = sorted(known - erased, key=_partition_order)
    return weddings, sorted(erased, key=_partition_order)


_ALL_POINTS_SQL = """
SELECT b.id, b.partition, b.snapshot_time, b.archive_sha256, b.size, b.rows,
       coalesce(c.copies, '{}') AS copies, r.verified_at
FROM wedbackup.backups b
LEFT JOIN (SELECT backup_id, array_agg(provider ORDER BY provider) AS copies FROM wedbackup.copies
           GROUP BY backup_id) c ON c.backup_id = b.id
LEFT JOIN (SELECT backup_id, max(at) AS verified_at FROM wedbackup.restores WHERE ok GROUP BY backup_id) r
       ON r.backup_id = b.id
WHERE b.deleting_since IS NULL  -- being pruned: its copies may already be gone
ORDER BY b.partition, b.snapshot_time DESC, b.id DESC
"""


def all_recovery_points(catalogue: Any) -> dict[str, list[RecoveryPoint]]:
    """recovery.recovery_points for every partition at once (newest first in each): one query."""
    out: dict[str, list[RecoveryPoint]] = {}
    with catalogue.connect() as conn:
        for r in conn.execute(_ALL_POINTS_SQL):
            out.setdefault(r["partition"], []).append(RecoveryPoint(
                r["id"], r["partition"], r["snapshot_time"], r["archive_sha256"], r["size"], r["rows"],
                tuple(r["copies"]), r["verified_at"]))
    return out


def restore_all(engine: Any, replicas: Mapping[str, Any], target_dsn: str,
                options: RestoreAllOptions = RestoreAllOptions(), *, progress: Progress = _quiet) -> PlatformReport:
    """The whole platform into an empty database (see the module's first lines). The target may be neither
    the live source nor the catalogue, however its DSN is written (core/postgres/identity.py)."""
    started = time.perf_counter()
    settings = engine.settings
    check_restore_target(target_dsn, source_dsn=settings.source_dsn, catalogue_dsn=settings.catalogue_dsn,
                         mode="target")
    target = database_label(target_dsn)
    order = tuple(options.providers or LOCATIONS)
    for p in order:
        if p not in LOCATIONS:
            raise WedbackupError(f"copy location {p!r} is not one of {', '.join(LOCATIONS)}")
    jobs = max(1, int(options.jobs))
    with connect_target(target_dsn, f"the target, {target}", "wedbackup-restore-all") as coord:
        # One restore --all per target at a time: the lock lives as long as this connection.
        if not coord.execute("SELECT pg_try_advisory_lock(hashtext('wedbackup-restore-all'))").fetchone()[0]:
            raise RestoreError(f"another restore --all is running into {target}; wait for it (or stop it) first")
        as_of, include_unverified, done = _prepare_target(coord, target, options,
                                                          options.as_of or datetime.now(timezone.utc))
        report = PlatformReport(target, as_of.isoformat())
        weddings, report.erased = planned_partitions(engine.catalogue)
        if options.only is not None:
            weddings = [w for w in weddings if w in options.only]
        report.started = started
        report.partitions_total = len(weddings) + 1
        report.restored_before = len(done)
        progress(f"restore --all into {target} as of {as_of.isoformat()}: platform + {len(weddings)} wedding(s), "
                 f"{len(done)} already committed, {jobs} worker(s), copies from {', '.join(order)}")
        points: dict[str, RecoveryPoint] = {}
        every = all_recovery_points(engine.catalogue)  # one query, not one per wedding
        for partition in [PLATFORM] + weddings:
            if partition in done:
                continue
            try:
                points[partition] = choose_point(every.get(partition, []), partition, as_of,
                                                 include_unverified=include_unverified)
            except NoRecoveryPointError as exc:
                report.failed[partition] = str(exc)
        # This run's work: weddings without a recovery point are reported, never started.
        ticker = Counter("restore --all", len(points), progress, every=50, seconds=PROGRESS_EVERY)
        if PLATFORM not in done:
            if PLATFORM in report.failed:
                raise RestoreError(f"restore --all into {target}: {report.failed[PLATFORM]}; nothing of the "
                                   f"weddings can be restored without the platform's schema and rows")
            result = restore_partition(engine, replicas, target_dsn, points.pop(PLATFORM), order, hold_triggers=True)
            _account(report, result)
            if not result.ok:
                raise RestoreError(f"restore --all into {target}: the platform partition could not be restored: "
                                   f"{result.error}")
            ticker.step()
        report.erasures_reapplied += _reapply(engine, target_dsn)
        inserting = coord.execute(_INSERT_TRIGGERS_SQL).fetchall()
        if inserting:
            progress(f"user triggers fire on INSERT ({', '.join(r[0] for r in inserting[:5])}): each wedding holds "
                     f"them off while it loads, which serialises the workers on those tables")
        todo = [points[p] for p in weddings if p in points]
        deadline = None if options.window_seconds is None else started + options.window_seconds
        if inserting or not options.batches:
            stopped = _run_weddings(engine, replicas, target_dsn, todo, order, jobs, options.stop_after, deadline,
                                    report, ticker, hold_triggers=bool(inserting))
        else:
            stopped = _run_batches(engine, replicas, target_dsn, todo, order, jobs, options.stop_after, deadline,
                                   report, ticker, progress)
        if stopped:
            report.stopped = stopped
        else:
            t0 = time.perf_counter()
            _check(coord, engine, target_dsn, report, progress)
            report.phases["check"] += time.perf_counter() - t0
        _summarise(coord, report)
        report.complete = not stopped and not report.failed and not report.foreign_key_problems
        if report.complete:  # a finished target holds the platform only: nothing of wedbackup's
            coord.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(RESTORE_PROGRESS_SCHEMA)))
    report.seconds = round(time.perf_counter() - started, 3)
    for k in report.phases:
        report.phases[k] = round(report.phases[k], 3)
    if not stopped:
        engine.catalogue.audit("restore-all", PLATFORM, {
            "target": target, "as_of": report.as_of, "complete": report.complete,
            "restored": report.restored_now + report.restored_before, "failed": sorted(report.failed)[:50],
            "seconds": report.seconds, "phases": report.phases})
    return report


def _account(report: PlatformReport, result: PartitionResult) -> None:
    if result.ok:
        report.restored_now += 1
        report.copies_used[result.copy] = report.copies_used.get(result.copy, 0) + 1
        spent = report.per_copy.setdefault(result.copy, {"bytes": 0, "seconds": 0.0})
        spent["bytes"] += result.bytes
        spent["seconds"] += result.seconds
        report.timeline[result.partition] = (round(time.perf_counter() - report.started, 3), result.seconds,
                                             result.snapshot_time)
        if result.seconds > report.slowest.get("seconds", -1.0):
            report.slowest = {"partition": result.partition, "seconds": round(result.seconds, 3)}
        for k, v in result.phases.items():
            report.phases[k] += v
        if result.attempts:
            report.fallbacks.append(f"{partition_label(result.partition)}: " + "; ".join(result.attempts)
                                    + f"; restored from {result.copy}")
    else:
        report.failed[result.partition] = result.error


def _worker_engines(engine: Any) -> tuple[Callable[[], Any], list[Any]]:
    """(the calling thread's own engine, made on first use; every engine made, to close at the end): the
    catalogue connection is not shared between threads."""
    local = threading.local()
    engines: list[Any] = []
    lock = threading.Lock()

    def worker_engine() -> Any:
        if getattr(local, "engine", None) is None:
            local.engine = type(engine)(engine.settings, engine.keyring)
            with lock:
                engines.append(local.engine)
        return local.engine

    return worker_engine, engines


def _run_weddings(engine: Any, replicas: Mapping[str, Any], target_dsn: str, todo: list[RecoveryPoint],
                  order: tuple[str, ...], jobs: int, stop_after: int | None, deadline: float | None,
                  report: PlatformReport, ticker: Counter, *, hold_triggers: bool) -> str:
    """Every wedding on `jobs` workers, each with its own engine (the catalogue connection is not shared
    between threads); no wedding starts after `deadline` (time.perf_counter()). Returns why it stopped
    early, or ''."""
    worker_engine, engines = _worker_engines(engine)

    def one(point: RecoveryPoint) -> PartitionResult:
        try:
            return restore_partition(worker_engine(), replicas, target_dsn, point, order, hold_triggers=hold_triggers)
        except Exception as exc:  # noqa: BLE001 — one wedding's surprise must not stop the others
            return PartitionResult(point.partition, False, point.archive_sha256, point.snapshot_time.isoformat(),
                                   error=f"{type(exc).__name__}: {str(exc)[:300]}")

    restored = 0
    stopped = ""
    pending: set[Future] = set()
    queue = list(reversed(todo))
    try:
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="wedbackup-dr") as pool:
            while queue or pending:
                if queue and deadline is not None and time.perf_counter() >= deadline:
                    stopped = (f"ran past its window: {len(queue)} wedding(s) not started (the weddings already "
                               f"committed stay; run again with resume to finish)")
                    queue.clear()
                while queue and len(pending) < jobs * 2:
                    pending.add(pool.submit(one, queue.pop()))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    result = future.result()
                    _account(report, result)
                    ticker.step()
                    restored += result.ok
                if stop_after is not None and restored >= stop_after:
                    queue.clear()
                    for future in pending:
                        future.cancel()
                    for future in pending:
                        if not future.cancelled():
                            _account(report, future.result())
                    return f"stopped after {restored} wedding(s) by the test hook stop_after"
    finally:
        for e in engines:
            e.catalogue.close()
    return stopped


def _run_batches(engine: Any, replicas: Mapping[str, Any], target_dsn: str, todo: list[RecoveryPoint],
                 order: tuple[str, ...], jobs: int, stop_after: int | None, deadline: float | None,
                 report: PlatformReport, ticker: Counter, progress: Progress) -> str:
    """The weddings through the batch path (core/disaster_batch.py); those it hands back — no copy read
    through, or their batch failed to load — again alone through `_run_weddings`, which reports each one
    that fails again by name with its reason. Returns why it stopped early, or ''."""
    from .disaster_batch import run_batches

    worker_engine, engines = _worker_engines(engine)
    lock = threading.Lock()
    retry: dict[str, tuple[RecoveryPoint, str]] = {}
    restored = [0]
    target = database_label(target_dsn)

    def on_done(d: Any, batch_seconds: float) -> None:
        result = PartitionResult(d.point.partition, True, d.point.archive_sha256, d.point.snapshot_time.isoformat(),
                                 copy=d.copy, rows=d.rows, bytes=d.point.size,
                                 seconds=round(d.seconds + batch_seconds, 6), attempts=list(d.attempts),
                                 phases={**d.phases, "load": 0.0})
        with lock:
            _account(report, result)
            restored[0] += 1
            ticker.step()

    def on_batch(seconds: float) -> None:
        with lock:
            report.phases["load"] += seconds

    def on_retry(point: RecoveryPoint, why: str) -> None:
        with lock:
            retry[point.partition] = (point, why)

    def should_stop() -> str:
        if deadline is not None and time.perf_counter() >= deadline:
            return (f"ran past its window: {len(todo) - restored[0]} wedding(s) not started (the weddings already "
                    f"committed stay; run again with resume to finish)")
        if stop_after is not None and restored[0] >= stop_after:
            return f"stopped after {restored[0]} wedding(s) by the test hook stop_after"
        return ""

    try:
        stopped = run_batches(engine, replicas, target_dsn, todo, order, jobs, copy_faults=_COPY_FAULTS,
                              connect=lambda: connect_target(target_dsn, f"the target, {target}", "wedbackup-restore-all"),
                              worker_engine=worker_engine, on_done=on_done, on_batch=on_batch, on_retry=on_retry,
                              should_stop=should_stop, progress=progress)
    finally:
        for e in engines:
            e.catalogue.close()
    if stopped:
        return stopped
    if retry:
        progress(f"{len(retry)} wedding(s) again one by one: " + "; ".join(
            f"{partition_label(p)}: {why}" for p, (_, why) in list(sorted(retry.items()))[:5]))
        again = [point for point, _ in sorted(retry.values(), key=lambda pw: _partition_order(pw[0].partition))]
        return _run_weddings(engine, replicas, target_dsn, again, order, jobs, None, deadline, report, ticker,
                             hold_triggers=False)
    return ""


def _reapply(engine: Any, target_dsn: str) -> list[str]:
    from wedbackup_dagster.core.governance.erasure import reapply_erasures

    return reapply_erasures(target_dsn, engine.catalogue)


def _check(coord, engine: Any, target_dsn: str, report: PlatformReport, progress: Progress) -> None:
    """After every wedding: erasures again, every sequence past its column's largest value (the workers'
    setval calls raced each other), and every foreign key of every table counted for orphans."""
    report.erasures_reapplied += _reapply(engine, target_dsn)
    tables = [tuple(r) for r in coord.execute(_TABLES_SQL, (RESTORE_PROGRESS_SCHEMA,)).fetchall()]
    with coord.transaction():
        report.sequences_checked = len(advance_sequences(coord, tables))
    manifest = SimpleNamespace(tables=[SimpleNamespace(schema=s, name=n) for s, n in tables])
    with coord.transaction():
        coord.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        checks = check_foreign_keys(coord, manifest)
    report.foreign_key_problems = [
        f"{c.constraint} on {c.table}: {c.orphans} row(s) point at no row of {c.parent}" if c.status == "orphans"
        else f"{c.constraint} on {c.table}: could not be checked: {c.problem}"
        for c in checks if c.status in ("orphans", "unreadable")]
    progress(f"checked {len(checks)} foreign key(s) and {report.sequences_checked} sequence(s)"
             + (f": {len(report.foreign_key_problems)} problem(s)" if report.foreign_key_problems else ": all good"))


def _summarise(coord, report: PlatformReport) -> None:
    """Totals over every partition in the target (this run's and earlier runs')."""
    row = coord.execute(sql.SQL("SELECT coalesce(sum(rows), 0), coalesce(sum(bytes), 0), max(snapshot_time), "
                                "min(snapshot_time) FROM {}").format(
        sql.Identifier(RESTORE_PROGRESS_SCHEMA, "partitions"))).fetchone()
    report.rows, report.bytes = int(row[0]), int(row[1])
    report.newest_point = row[2].isoformat() if row[2] else ""
    report.oldest_point = row[3].isoformat() if row[3] else ""

# --- recovery plans -----------------------------------------------------------------------------------

SCENARIOS = ("source-lost", "vault-lost", "catalogue-lost", "provider-lost:NAME")
PROVIDER_LOCATIONS = LOCATIONS[1:]


def parse_scenario(text: str) -> tuple[str, str | None]:
    """`source-lost`, `vault-lost`, `catalogue-lost` or `provider-lost:NAME` → (kind, provider)."""
    kind, _, name = (text or "").strip().partition(":")
    if kind == "provider-lost":
        if name not in PROVIDER_LOCATIONS:
            raise WedbackupError(f"--scenario {text!r}: name the lost provider, one of "
                                 f"{', '.join(PROVIDER_LOCATIONS)} (e.g. provider-lost:s3)")
        return kind, name
    if kind in SCENARIOS and not name:
        return kind, None
    raise WedbackupError(f"--scenario {text!r} is not one of {', '.join(SCENARIOS)}")


@dataclass
class RecoveryPlan:
    scenario: str
    surviving: list[str]  # copy locations the plan reads, in the order restore --all tries them
    steps: list[str]
    partitions: int = 0  # platform + weddings (erased ones excluded)
    uses: dict[str, int] = field(default_factory=dict)  # location -> partitions restored from it
    restore_bytes: int = 0
    missing: dict[str, str] = field(default_factory=dict)  # partition -> why nothing can be restored
    stale: dict[str, str] = field(default_factory=dict)  # partition -> newer backup not usable, older used
    estimate_seconds: float | None = None
    estimate_basis: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [f"recovery plan: {self.scenario} (from the catalogue as it is now)",
               f"  copies used, in order: {', '.join(self.surviving)}",
               f"  partitions: {self.partitions}, archive bytes to restore {self.restore_bytes:,}; per copy: "
               + (", ".join(f"{k} {v}" for k, v in self.uses.items()) or "none")]
        if self.estimate_seconds is not None:
            out.append(f"  expected duration: {self.estimate_seconds / 60:.1f} min ({self.estimate_basis})")
        else:
            out.append(f"  expected duration: unknown ({self.estimate_basis})")
        out.append("  steps:")
        out += [f"    {i}. {step}" for i, step in enumerate(self.steps, 1)]
        out += [f"  MISSING {partition_label(p)}: {why}" for p, why in self.missing.items()]
        out += [f"  STALE {partition_label(p)}: {why}" for p, why in self.stale.items()]
        out += [f"  note: {n}" for n in self.notes]
        return out


_RATES_SQL = """
SELECT r.provider, count(*) AS n, sum(r.seconds) AS seconds, sum(b.size) AS bytes
FROM wedbackup.restores r JOIN wedbackup.backups b ON b.id = r.backup_id
WHERE r.ok AND r.at > now() - interval '30 days'
GROUP BY r.provider
"""

_LAST_RESTORE_ALL_SQL = """
SELECT detail FROM wedbackup.audit WHERE action = 'restore-all' AND (detail->>'complete')::boolean
ORDER BY id DESC LIMIT 1
"""


def _age(newer: datetime, older: datetime) -> str:
    hours = (newer - older).total_seconds() / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def recovery_plan(catalogue: Any, scenario: str, *, jobs: int = 4, target: str = "postgresql://…/new_db"
                  ) -> RecoveryPlan:
    """The runbook of a disaster scenario from the catalogue's state: the commands in order, which copy each
    partition will come from, what is missing (no verified copy at a surviving location) or stale (a newer
    backup exists but cannot be used), and the expected duration from the last measured restore rates."""
    kind, lost = parse_scenario(scenario)
    backups = [b for b in catalogue.backups_with_copies() if b["deleting_since"] is None]
    erased = catalogue.erased_partitions()
    by_partition: dict[str, list[dict[str, Any]]] = {}
    for b in backups:
        if b["partition"] not in erased:
            by_partition.setdefault(b["partition"], []).append(b)
    for partition in catalogue.live_partitions():
        if partition not in erased:
            by_partition.setdefault(partition, [])
    by_partition.setdefault(PLATFORM, [])
    newest_copies = [{c["provider"] for c in max(bs, key=lambda b: b["snapshot_time"])["copies"]}
                     for bs in by_partition.values() if bs]
    coverage = {p: sum(p in copies for copies in newest_copies) for p in PROVIDER_LOCATIONS}
    best = max(PROVIDER_LOCATIONS, key=lambda p: (coverage[p], -PROVIDER_LOCATIONS.index(p)))
    need_verified = True
    if kind == "source-lost":
        surviving = list(LOCATIONS)
    elif kind == "vault-lost":
        surviving = list(PROVIDER_LOCATIONS)
    elif kind == "provider-lost":
        surviving = [p for p in LOCATIONS if p != lost]
    else:  # catalogue-lost: rebuilt from one provider's listing; verification history does not come back
        surviving, need_verified = [best], False
    plan = RecoveryPlan(scenario, surviving, [])
    chosen_from: dict[str, str] = {}
    chosen_sha: dict[str, str] = {}
    for partition in sorted(by_partition, key=lambda p: (p != PLATFORM, _partition_order(p))):
        history = sorted(by_partition[partition], key=lambda b: (b["snapshot_time"], b["id"]), reverse=True)
        plan.partitions += 1
        if not history:
            plan.missing[partition] = "no backup at all in the catalogue"
            continue
        usable = None
        for b in history:
            at = [p for p in surviving if any(c["provider"] == p for c in b["copies"])]
            if at and (b["verified"] or not need_verified):
                usable, chosen_from[partition] = b, at[0]
                break
        newest = history[0]
        if usable is None:
            where = sorted({c["provider"] for b in history for c in b["copies"]})
            plan.missing[partition] = (f"no {'verified ' if need_verified else ''}copy at {', '.join(surviving)} "
                                       f"({len(history)} backup(s); copies at {', '.join(where) or 'no location'})")
            continue
        plan.uses[chosen_from[partition]] = plan.uses.get(chosen_from[partition], 0) + 1
        chosen_sha[partition] = usable["archive_sha256"]
        if usable is not newest:
            plan.stale[partition] = (f"newest backup {newest['snapshot_time'].isoformat()} has no "
                                     f"{'verified ' if need_verified else ''}copy at a surviving location; "
                                     f"{usable['snapshot_time'].isoformat()} is used "
                                     f"({_age(newest['snapshot_time'], usable['snapshot_time'])} older)")
    sizes = _sizes(catalogue)
    plan.restore_bytes = sum(sizes.get(sha, 0) for sha in chosen_sha.values())
    _estimate(catalogue, plan, jobs)
    plan.steps = _steps(kind, lost, surviving, best, target, jobs, bool(plan.missing))
    if kind == "catalogue-lost":
        plan.notes.append(f"the catalogue is rebuilt from {best} (it holds the newest backup of "
                          f"{coverage[best]} partition(s), the most of any provider); verification history is "
                          f"not in storage, so the restore takes the newest backup with --include-unverified "
                          f"(each is still checked against its manifest while it loads)")
    if erased:
        plan.notes.append(f"{len(erased)} erased wedding(s) are not restored; their rows in the platform "
                          f"partition are removed again by restore --all")
    return plan


def _sizes(catalogue: Any) -> dict[str, int]:
    """Archive size per archive SHA-256."""
    with catalogue.connect() as conn:
        rows = conn.execute("SELECT archive_sha256, size FROM wedbackup.backups WHERE deleting_since IS NULL")
        return {r["archive_sha256"]: int(r["size"]) for r in rows.fetchall()}


def _estimate(catalogue: Any, plan: RecoveryPlan, jobs: int) -> None:
    count = sum(plan.uses.values())
    with catalogue.connect() as conn:
        last = conn.execute(_LAST_RESTORE_ALL_SQL).fetchone()
        rates = {r["provider"]: r for r in conn.execute(_RATES_SQL).fetchall()}
    if last and last["detail"].get("restored"):
        per = float(last["detail"]["seconds"]) / int(last["detail"]["restored"])
        plan.estimate_seconds = round(per * count, 1)
        plan.estimate_basis = (f"the last complete restore --all: {per:.2f} s per partition over "
                               f"{last['detail']['restored']} partition(s)")
        return
    if not rates:
        plan.estimate_basis = "no restore measured in the last 30 days: run `wedbackup verify --all` or a drill"
        return
    seconds, basis = 0.0, []
    for location, n in plan.uses.items():
        r = rates.get(location) or max(rates.values(), key=lambda x: x["n"])
        per = float(r["seconds"]) / int(r["n"])
        seconds += per * n
        basis.append(f"{location}: {per:.2f} s per partition ({r['n']} verification restore(s), "
                     f"{'measured' if location in rates else 'from ' + r['provider']})")
    plan.estimate_seconds = round(seconds / max(1, jobs), 1)
    plan.estimate_basis = f"verification restores of the last 30 days on {jobs} worker(s): " + "; ".join(basis)


def _steps(kind: str, lost: str | None, surviving: list[str], best: str, target: str, jobs: int,
           missing: bool) -> list[str]:
    first = surviving[0]
    restore = f"wedbackup restore --all --target-dsn {target} --jobs {jobs}" + (
        "" if first == "vault" else f" --from {first}")
    check = ("read the report: every partition restored, no foreign key problem; if it stopped, run the same "
             "command with --resume")
    if kind == "source-lost":
        steps = ["create a new, empty database on a healthy server (createdb new_db)", restore, check,
                 "point the application and WEDBACKUP_SOURCE_DSN at the new database",
                 "wedbackup backup --all   # fresh backups of the restored platform"]
    elif kind == "vault-lost":
        steps = ["recreate the vault directory (WEDBACKUP_VAULT_DIR), empty",
                 "wedbackup backup --all   # new backups fill the vault again and go to every provider",
                 "wedbackup keys backup --force   # a key-store backup in the new vault",
                 f"until then every restore reads a provider; rehearse it: {restore} (into a scratch database)"]
    elif kind == "catalogue-lost":
        steps = ["create a new, empty catalogue database and set WEDBACKUP_CATALOGUE_DSN to it "
                 "(the master key, WEDBACKUP_MASTER_KEY, must be the one the key-store backups were sealed with)",
                 f"wedbackup catalogue rebuild --from {best}   # wedding keys from the key-store backup, then "
                 f"every archive's manifest",
                 "wedbackup catalogue status   # counts and copies per provider",
                 "wedbackup verify --all   # verification history is not in storage: verify again",
                 f"if the source is lost too: {restore} --include-unverified", check]
    else:
        steps = ["wedbackup health   # confirm the provider is down (recorded in the catalogue)",
                 f"restores read the others ({', '.join(surviving)}); a full restore: {restore}",
                 f"when {lost} is back (or replaced, same bucket settings): the provider_health sensor "
                 f"re-replicates every partition that missed it; `wedbackup catalogue status` shows what is "
                 f"still missing"]
    if missing:
        steps.append("the partitions listed MISSING cannot be restored from the surviving copies: back them up "
                     "now if the source still has them (wedbackup backup --wedding ID …)")
    return steps


# --- drills -------------------------------------------------------------------------------------------

DRILL_LABEL = "dr-drill"
RTO_TARGET_SECONDS = 4 * 3600.0  # the seeds: the whole system back within 4 hours
PARTITION_TARGET_SECONDS = 60.0  # … and each (critical) wedding within a minute


def drill_sample(weddings: Iterable[str], dates: Mapping[str, Any], policy: Any, size: int | None,
                 now: datetime) -> frozenset[str] | None:
    """Which of `weddings` a drill restores (the platform partition always comes too): every one (None) when
    `size` is None, else `size` of them — every critical wedding (by its date in `dates`) always in, the rest
    drawn at random with the ISO week as the seed, so each week's drill proves different weddings and a rerun
    the same ones."""
    if size is None:
        return None
    import random

    today = policy.today(now)
    weddings = sorted((p for p in weddings if p != PLATFORM), key=_partition_order)
    critical = [p for p in weddings if dates.get(p) is not None and policy.tier(dates[p], today) == "critical"]
    others = [p for p in weddings if p not in set(critical)]
    year, week, _ = now.isocalendar()
    drawn = random.Random(f"{year}-{week}").sample(others, max(0, min(len(others), size - len(critical))))
    return frozenset(critical) | frozenset(drawn)


def tier_outcomes(report: PlatformReport, tiers: Mapping[str, str], started_at: datetime) -> dict[str, dict]:
    """Per tier, from this run's timeline: partitions restored, the achieved RTO (seconds from the start until
    the tier's last partition was committed), the slowest partition's own seconds, and the achieved RPO
    (the drill's start minus the tier's oldest recovery point)."""
    out: dict[str, dict[str, Any]] = {}
    for partition, (finished, seconds, point) in report.timeline.items():
        tier = tiers.get(partition, PLATFORM if partition == PLATFORM else "unknown")
        t = out.setdefault(tier, {"partitions": 0, "rto_seconds": 0.0, "slowest_seconds": 0.0,
                                  "slowest_partition": "", "rpo_seconds": 0.0})
        t["partitions"] += 1
        t["rto_seconds"] = max(t["rto_seconds"], finished)
        if seconds >= t["slowest_seconds"]:
            t["slowest_seconds"], t["slowest_partition"] = round(seconds, 3), partition
        if point:
            t["rpo_seconds"] = max(t["rpo_seconds"],
                                   round((started_at - datetime.fromisoformat(point)).total_seconds(), 1))
    for partition in report.failed:
        tier = tiers.get(partition, PLATFORM if partition == PLATFORM else "unknown")
        out.setdefault(tier, {"partitions": 0, "rto_seconds": 0.0, "slowest_seconds": 0.0,
                              "slowest_partition": "", "rpo_seconds": 0.0}).setdefault("failed", 0)
        out[tier]["failed"] += 1
    return dict(sorted(out.items()))


@dataclass
class DrillReport:
    provider: str
    started_at: str
    restore: PlatformReport
    rto_seconds: float  # the whole restore, scratch database made to checks done
    rpo_seconds: float  # from the oldest recovery point used to the drill's start
    throughput: dict[str, float]  # bytes per second of partition restore time, per copy location
    earlier: list[dict[str, Any]] = field(default_factory=list)  # the previous drills, newest first
    catalogue_rebuilt: dict[str, Any] = field(default_factory=dict)  # the catalogue-lost variant: what came back
    tiers: dict[str, dict[str, Any]] = field(default_factory=dict)  # per tier: partitions, RTO, RPO, slowest
    sampled: int | None = None  # weddings sampled (None: every wedding)

    @property
    def complete(self) -> bool:
        return self.restore.complete

    def critical_over(self, target_seconds: float) -> list[str]:
        """Critical weddings whose own restore took longer than `target_seconds`."""
        return [p for p, (_, seconds, _) in sorted(self.restore.timeline.items())
                if self.tier_of.get(p) == "critical" and seconds > target_seconds]

    tier_of: dict[str, str] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("tier_of")
        d["restore"] = self.restore.to_dict()
        d["complete"] = self.complete
        return d

    def markdown(self, rto_target: float = RTO_TARGET_SECONDS) -> str:
        r = self.restore
        out = [f"# DR drill from {self.provider} ({self.started_at})", "",
               f"**{'Complete' if self.complete else 'INCOMPLETE'}**: {r.restored_now} of {r.partitions_total} "
               f"partition(s) restored into a scratch database and checked against their manifests, "
               f"{r.rows:,} rows, {r.bytes:,} archive bytes.", "",
               f"- achieved RTO: **{self.rto_seconds:.1f} s** (target {rto_target:.0f} s)",
               f"- achieved RPO: oldest recovery point {r.oldest_point or '-'} ({self.rpo_seconds / 3600:.1f} h "
               f"before the drill), newest {r.newest_point or '-'}",
               f"- slowest partition: {r.slowest.get('partition', '-')} ({r.slowest.get('seconds', 0)} s)",
               f"- weddings: {'every wedding' if self.sampled is None else f'a sample of {self.sampled}'}"
               f" plus the platform partition"]
        if self.catalogue_rebuilt:
            c = self.catalogue_rebuilt
            out.append(f"- catalogue-lost scenario: a scratch catalogue rebuilt from {c['provider']} in "
                       f"{c['seconds']} s: {c['backups']} backup(s), {c['wedding_keys']} wedding key(s) from the "
                       f"key-store backup ({len(c['skipped'])} archive(s) skipped)")
        out += ["", "| phase | seconds (summed over workers) |", "|---|---|"]
        out += [f"| {k} | {v:.2f} |" for k, v in r.phases.items()]
        if self.tiers:
            out += ["", "| tier | partitions | RTO s (committed by) | slowest s | RPO h (oldest point) |",
                    "|---|---|---|---|---|"]
            out += [f"| {k} | {v['partitions']}{' (' + str(v['failed']) + ' failed)' if v.get('failed') else ''} | "
                    f"{v['rto_seconds']:.1f} | {v['slowest_seconds']:.2f} ({v['slowest_partition'] or '-'}) | "
                    f"{v['rpo_seconds'] / 3600:.1f} |" for k, v in self.tiers.items()]
        out += ["", "| copy | partitions | bytes/s |", "|---|---|---|"]
        out += [f"| {k} | {r.copies_used.get(k, 0)} | {v:,.0f} |" for k, v in self.throughput.items()]
        if self.earlier:
            last = self.earlier[0].get("rto_seconds")
            if isinstance(last, (int, float)) and last > 0:
                change = (self.rto_seconds - last) / last * 100
                out += ["", f"Trend: RTO {self.rto_seconds:.1f} s against {last:.1f} s at the previous drill "
                            f"({change:+.0f}%)."]
            out += ["", "| earlier drill | provider | partitions | RTO s | RPO h | complete |",
                    "|---|---|---|---|---|---|"]
            out += [f"| {d.get('started_at', '?')} | {d.get('provider', '?')} | {d.get('partitions', '?')} | "
                    f"{d.get('rto_seconds', '?')} | "
                    f"{round(d['rpo_seconds'] / 3600, 1) if isinstance(d.get('rpo_seconds'), (int, float)) else '?'}"
                    f" | {d.get('complete', '?')} |" for d in self.earlier[:8]]
        if r.stopped:
            out += ["", f"**Stopped**: {r.stopped}"]
        if r.failed or r.foreign_key_problems or r.fallbacks:
            out += ["", "Problems:"] + [f"- {line}" for line in r.lines()[6:]]
        return "\n".join(out)


def drill(engine: Any, replicas: Mapping[str, Any], provider: str, *, jobs: int = 4,
          window_seconds: float | None = None, catalogue_lost: bool = False, sample: int | None = None,
          policy: Any = None, progress: Progress = _quiet) -> DrillReport:
    """The whole platform restored from `provider` (falling back to the other providers, never the vault)
    into a scratch database on the scratch server, checked (every table against its manifest while it loads,
    foreign keys and sequences at the end), timed per phase, and dropped. A drill past `window_seconds`
    starts no more weddings: it is reported incomplete (`restore.stopped`), its scratch dropped all the
    same. `catalogue_lost`: the catalogue-lost scenario in full — a scratch catalogue rebuilt from that
    provider alone (wedding keys from its key-store backup, opened with the master key), the restore driven
    by it; it proves the keys are recoverable without the live catalogue. Recorded in the live catalogue's
    audit trail (`dr-drill`) so the next drill shows the trend and `dr plan` its rates. `sample`: that many
    weddings (every critical one always in, drill_sample) plus the platform partition; `policy` (default: the
    policy file's) assigns the tiers of the per-tier RTO and RPO."""
    from .policy.backup_policy import Policy

    if provider not in PROVIDER_LOCATIONS:
        raise WedbackupError(f"a drill restores from a provider ({', '.join(PROVIDER_LOCATIONS)}), never the vault; "
                             f"not {provider!r}")
    earlier = _earlier_drills(engine.catalogue)
    started_at = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    policy = policy or Policy.from_env()
    dates = engine.catalogue.live_partitions()
    today = policy.today(started_at)
    tier_of = {p: policy.tier(d, today) if p != PLATFORM else PLATFORM for p, d in dates.items()}
    only = drill_sample(planned_partitions(engine.catalogue)[0], dates, policy, sample, started_at)
    options = RestoreAllOptions(providers=copy_order(provider), jobs=jobs, window_seconds=window_seconds,
                                include_unverified=catalogue_lost, only=only)
    rebuilt: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        driver = engine
        if catalogue_lost:
            driver = stack.enter_context(_rebuilt_engine(engine, replicas[provider], rebuilt, progress))
        scratch = stack.enter_context(scratch_database(engine.settings.scratch_dsn, label=DRILL_LABEL))
        report = restore_all(driver, replicas, scratch, options, progress=progress)
    rto = round(time.perf_counter() - t0, 3)
    oldest = datetime.fromisoformat(report.oldest_point) if report.oldest_point else started_at
    throughput = {k: round(v["bytes"] / v["seconds"], 1) if v["seconds"] else 0.0
                  for k, v in report.per_copy.items()}
    result = DrillReport(provider, started_at.isoformat(), report, rto,
                         round((started_at - oldest).total_seconds(), 1), throughput, earlier, rebuilt,
                         tier_outcomes(report, tier_of, started_at), None if only is None else len(only), tier_of)
    engine.catalogue.audit("dr-drill", PLATFORM, {
        "tiers": result.tiers, "sampled": result.sampled,
        "provider": provider, "started_at": result.started_at, "rto_seconds": rto, "complete": result.complete,
        "rpo_seconds": result.rpo_seconds, "partitions": report.partitions_total, "phases": report.phases,
        "throughput": throughput, "failed": sorted(report.failed)[:50], "stopped": report.stopped,
        "catalogue_rebuilt": rebuilt or None})
    return result


@contextlib.contextmanager
def _rebuilt_engine(engine: Any, replica: Any, rebuilt: dict[str, Any], progress: Progress) -> Iterator[Any]:
    """An engine over a scratch catalogue rebuilt from `replica` alone, dropped afterwards."""
    import dataclasses

    from wedbackup_dagster.core.catalogue.rebuild_from_storage import rebuild_from

    with scratch_database(engine.settings.scratch_dsn, label=DRILL_LABEL + "-catalogue") as catalogue_dsn:
        other = type(engine)(dataclasses.replace(engine.settings, catalogue_dsn=catalogue_dsn), engine.keyring)
        try:
            t0 = time.perf_counter()
            found = rebuild_from(replica, other.catalogue, other.keyring)
            rebuilt.update(provider=replica.provider, seconds=round(time.perf_counter() - t0, 3),
                           backups=found.backups_added, wedding_keys=found.keys_restored,
                           key_backup=found.key_backup, skipped=found.skipped[:20])
            progress(f"scratch catalogue rebuilt from {replica.provider}: {found.backups_added} backup(s), "
                     f"{found.keys_restored} wedding key(s) from the key-store backup, {len(found.skipped)} skipped")
            yield other
        finally:
            other.catalogue.close()


def _earlier_drills(catalogue: Any, limit: int = 8) -> list[dict[str, Any]]:
    with catalogue.connect() as conn:
        rows = conn.execute("SELECT detail FROM wedbackup.audit WHERE action = 'dr-drill' ORDER BY id DESC LIMIT %s",
                            (limit,)).fetchall()
    return [r["detail"] for r in rows]


CATALOGUE_LOST_MODES = ("monthly", "always", "never")


def drill_catalogue_lost(mode: str, now: datetime | None = None) -> bool:
    """Whether this drill runs the catalogue-lost scenario: `monthly` (the default) for the first drill of
    each month (a weekly drill in the month's first 7 days), `always`, or `never`."""
    if mode not in CATALOGUE_LOST_MODES:
        raise WedbackupError(f"catalogue_lost {mode!r} is not one of {', '.join(CATALOGUE_LOST_MODES)}")
    return mode == "always" or (mode == "monthly" and (now or datetime.now(timezone.utc)).day <= 7)


def drill_provider(now: datetime | None = None) -> str:
    """The provider of this week's drill: s3, gcs, azure in turn by ISO week, so every provider is proved."""
    week = (now or datetime.now(timezone.utc)).isocalendar()[1]
    return PROVIDER_LOCATIONS[week % len(PROVIDER_LOCATIONS)]


# --- the master-key recovery kit ----------------------------------------------------------------------

_FINGERPRINT_LABEL = b"wedbackup recovery-kit fingerprint v1"


def key_fingerprint(key: Any) -> str:
    """16 hex characters of HMAC-SHA256(master key, a fixed label): tells keys apart and checks a kit's copy
    against the sheet without showing (or helping to guess) the 256-bit key."""
    import hashlib
    import hmac

    return hmac.new(key.material, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]


def kit_sheet(keyring: Any, catalogue: Any, settings: Any) -> dict[str, Any]:
    """The non-secret half of the recovery kit, to print and keep with the sealed copy of the master key
    file: key ids and fingerprints, where the key-store backups and archives are, and the newest key backup."""
    from wedbackup_dagster.core.keys.backup import newest_recorded_key_backup

    newest = newest_recorded_key_backup(catalogue)
    return {
        "master_keys": [{"id": k, "fingerprint": key_fingerprint(keyring.get(k)),
                         "current": k == keyring.current.key_id} for k in keyring.key_ids],
        "newest_key_backup": None if newest is None else {
            "sha256": newest["sha256"], "sealed_by": newest["master_key_id"], "wedding_keys": newest["key_count"],
            "created_at": str(newest["created_at"]), "copies": sorted(newest["providers"])},
        "locations": {"s3": f"{settings.s3.bucket}/{settings.s3.prefix}", "gcs": f"{settings.gcs.bucket}/"
                      f"{settings.gcs.prefix}", "azure": f"{settings.azure.container}/{settings.azure.prefix}",
                      "vault": str(settings.vault_dir)},
        "recover": ["put the kit's copy of the master key file in place and point WEDBACKUP_MASTER_KEY_FILE at it",
                    "wedbackup dr kit --check FILE --from s3   # proves it opens the newest key-store backup",
                    "if the catalogue is lost too: wedbackup catalogue rebuild --from s3"],
    }


def check_kit_key_file(key_file: str, replica: Any) -> dict[str, Any]:
    """Whether the master key file `key_file` (a kit's copy) opens the newest key-store backup at `replica`:
    its key ids and fingerprints, the backup, the master key that sealed it and how many wedding keys it
    holds. Raises a clear error otherwise; never shows key material."""
    from wedbackup_dagster.core.keys.backup import newest_key_backup
    from wedbackup_dagster.core.keys.keyring import MASTER_KEY_FILE_ENV, load_master_keyring

    keyring = load_master_keyring({MASTER_KEY_FILE_ENV: key_file})
    found = newest_key_backup(replica, keyring)
    if found is None:
        raise WedbackupError(f"{replica.provider} holds no key-store backup to check the key file against: "
                             f"run `wedbackup keys backup` first")
    sha, contents = found
    return {"key_file": key_file, "provider": replica.provider, "key_backup": sha,
            "sealed_by": contents.master_key_id, "wedding_keys": len(contents.entries),
            "created_at": contents.created_at,
            "master_keys": [{"id": k, "fingerprint": key_fingerprint(keyring.get(k))} for k in keyring.key_ids]}
