"""`restore --all`: the whole platform back into an empty database — the platform partition first, then every
wedding's newest verified backup at or before one time, in parallel, each wedding (or batch of weddings,
batches.py) in its own transaction together with its row in the target's progress table (schema
`wedbackup_restore`), so a crashed or killed run, run again with `resume`, neither redoes nor duplicates a
wedding; erasures re-applied, sequences right and foreign keys checked at the end; a report per phase. As
pg_restore does, the platform's secondary indexes, foreign keys and triggers are built once every wedding is
loaded (primary keys and unique constraints stay, so a row loaded twice is still refused by its batch)."""
from __future__ import annotations

import re
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

from wedbackup_dagster.core.disaster.copy_health import CopyHealth
from wedbackup_dagster.core.partitions import PLATFORM, partition_label
from wedbackup_dagster.core.formats.archive import open_archive
from wedbackup_dagster.core.postgres.identity import check_restore_target
from wedbackup_dagster.core.errors import ArchiveError, ProviderError, RestoreError, WedbackupError
from wedbackup_dagster.core.postgres.restore_wedding import (NoRecoveryPointError, RecoveryPoint, connect_target,
                                                             choose_point)
from wedbackup_dagster.core.postgres.load_snapshot import (advance_sequences, apply_deferred, check_foreign_keys,
                                                           db_error_line, deferred_post_data_of, relax_foreign_keys,
                                                           restore_snapshot, split_ddl)
from wedbackup_dagster.core.postgres.snapshot import (RESTORE_PROGRESS_SCHEMA, database_label, describe_schema,
                                                      schema_fingerprint, schema_is_empty, use_qualified_names)
from wedbackup_dagster.core.progress import Progress as Counter  # done of total, rate, ETA (plain Python, shared with the wiring)

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
                      include_unverified boolean NOT NULL,
                      post_data_pending boolean NOT NULL DEFAULT false);
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


def quiet(_: str) -> None:
    pass


def partition_order(partition: str) -> tuple[int, int, str]:
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
    deferred_post_data: str = field(default="", repr=False)  # the platform's, when its restore deferred some
    schema_fingerprint: str = ""  # the archive's
    packed: bool = False  # read from a DR pack (packs.py) at `copy`, not from the wedding's own object


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
    pack: str = ""  # the DR pack used (its index at its provider), if any
    from_pack: int = 0  # weddings this run read from it (counted in copies_used under its provider too)
    pack_notes: list[str] = field(default_factory=list)  # packs passed over (unreadable, or not listable)
    per_copy: dict[str, dict[str, float]] = field(default_factory=dict)  # location -> bytes, seconds (this run)
    slowest: dict[str, Any] = field(default_factory=dict)  # this run's slowest partition and its seconds
    fallbacks: list[str] = field(default_factory=list)  # "wedding 7: s3 failed (…), restored from gcs"
    tried_last: list[str] = field(default_factory=list)  # locations that kept failing (copy_health.py)
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
        if self.pack:
            out.append(f"  DR pack: {self.pack}, {self.from_pack} wedding(s) read from it")
        out += [f"  DR pack: {line}" for line in self.pack_notes]
        out += [f"  tried last: {line}" for line in self.tried_last]
        out += [f"  fell back: {line}" for line in self.fallbacks]
        out += [f"  erased, not restored: wedding {p}" for p in self.erased]
        out += [f"  re-applied erasure: {line}" for line in self.erasures_reapplied]
        out += [f"  NOT RESTORED {partition_label(p)}: {why}" for p, why in sorted(self.failed.items(),
                                                                          key=lambda kv: partition_order(kv[0]))]
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
    batches: bool = True  # many weddings per transaction (core/disaster/batches.py); False: one per transaction
    # With batches: the platform's secondary indexes, foreign keys and triggers built after every wedding is loaded
    defer_post_data: bool = True
    # With batches, from a provider: read the weddings its newest DR pack holds from the pack (core/disaster/packs.py)
    packs: bool = True


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
        if report.deferred_post_data:  # a crash before they are built: the resumed run builds them
            conn.execute(sql.SQL("UPDATE {} SET post_data_pending = true").format(
                sql.Identifier(RESTORE_PROGRESS_SCHEMA, "run")))
        conn.execute(sql.SQL("INSERT INTO {} (partition, archive_sha256, snapshot_time, copy, rows, bytes, seconds) "
                             "VALUES (%s, %s, %s, %s, %s, %s, %s)").format(
            sql.Identifier(RESTORE_PROGRESS_SCHEMA, "partitions")),
            (partition, backup.archive_sha256, backup.snapshot_time, copy, report.total_rows, backup.size,
             round(time.perf_counter() - started, 6)))
    return record


def restore_partition(engine: Any, replicas: Mapping[str, Any], target_dsn: str, point: RecoveryPoint,
                      order: Iterable[str], *, hold_triggers: bool, defer_post_data: bool = False,
                      health: CopyHealth | None = None) -> PartitionResult:
    """One partition's chosen backup into the target, from the first copy in `order` that works: a copy
    that cannot be fetched, fails its SHA-256 or cannot be decrypted moves on to the next one.
    `defer_post_data` (the platform partition): see restore_snapshot; the result carries what was deferred.
    `health`: the run's memory of failing locations (copy_health.py), which tries them last."""
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
    if health is not None:
        ordered, notes = health.order(candidates)
        candidates = list(ordered)
        result.attempts += notes
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
                                              hold_triggers=hold_triggers, defer_post_data=defer_post_data,
                                              before_commit=_record_progress(partition, backup, copy))
                    load = time.perf_counter() - t1 - decrypt[0]
            except _COPY_FAULTS as exc:
                result.attempts.append(f"{copy}: {str(exc)[:300]}")
                if health is not None:
                    health.failed(copy, str(exc))
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
            if health is not None:
                health.succeeded(copy)
            result.ok, result.copy, result.rows = True, copy, report.total_rows
            result.deferred_post_data, result.schema_fingerprint = report.deferred_post_data, report.schema_fingerprint
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
    weddings = sorted(known - erased, key=partition_order)
    return weddings, sorted(erased, key=partition_order)


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
                options: RestoreAllOptions = RestoreAllOptions(), *, progress: Progress = quiet) -> PlatformReport:
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
        health = CopyHealth()  # locations that keep failing are tried last (copy_health.py)
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
            defer = options.batches and options.defer_post_data
            result = restore_partition(engine, replicas, target_dsn, points.pop(PLATFORM), order, hold_triggers=True,
                                       defer_post_data=defer, health=health)
            _account(report, result)
            if not result.ok:
                raise RestoreError(f"restore --all into {target}: the platform partition could not be restored: "
                                   f"{result.error}")
            ticker.step()
            deferred = Deferred(result.deferred_post_data, result.schema_fingerprint)
        elif _post_data_pending(coord):  # the first run died before building them: read them again
            deferred = _platform_post_data(engine, replicas, done[PLATFORM]["archive_sha256"], order, target)
        else:
            deferred = Deferred("", "")
        report.erasures_reapplied += _reapply(engine, target_dsn)
        inserting = [r[0] for r in coord.execute(_INSERT_TRIGGERS_SQL).fetchall()]
        if deferred.script:
            later = inserting_triggers(deferred.script)
            if later:
                progress(f"user triggers fire on INSERT ({', '.join(later[:5])}): they are created once every "
                         f"wedding is loaded, as pg_restore does, so they do not fire on restored rows")
        elif inserting:
            progress(f"user triggers fire on INSERT ({', '.join(inserting[:5])}): each wedding holds "
                     f"them off while it loads, which serialises the workers on those tables")
        todo = [points[p] for p in weddings if p in points]
        deadline = None if options.window_seconds is None else started + options.window_seconds

        def build_deferred() -> bool:
            """The deferred post-data built (once): whether user triggers now fire on INSERT."""
            if deferred.script:
                t0 = time.perf_counter()
                _build_deferred(target_dsn, target, deferred, report)
                report.phases["load"] += time.perf_counter() - t0
                progress(f"built the platform's indexes, foreign keys and triggers in "
                         f"{time.perf_counter() - t0:.1f} s")
                deferred.script = ""
                return bool(coord.execute(_INSERT_TRIGGERS_SQL).fetchall())
            return bool(inserting)

        if (inserting and not deferred.script) or not options.batches:
            stopped = _run_weddings(engine, replicas, target_dsn, todo, order, jobs, options.stop_after, deadline,
                                    report, ticker, hold_triggers=bool(inserting), health=health)
        else:
            pack = _newest_pack(replicas, order, report, progress) if options.packs else None
            stopped = _run_batches(engine, replicas, target_dsn, todo, order, jobs, options.stop_after, deadline,
                                   report, ticker, progress, expected_fingerprint=deferred.fingerprint or None,
                                   before_alone=build_deferred, health=health, pack=pack)
        report.tried_last = health.lines()
        build_deferred()  # stopped early too: a target stopped on purpose has its whole schema
        if stopped:
            report.stopped = stopped
        else:
            t0 = time.perf_counter()
            _check(coord, engine, target_dsn, report, progress)
            if deferred.fingerprint and not report.foreign_key_problems:  # (NOT VALID keys differ, and are named)
                with coord.transaction():
                    use_qualified_names(coord)
                    found = schema_fingerprint(coord)
                if found != deferred.fingerprint:
                    report.failed[PLATFORM] = (f"once its constraints and indexes were built, the target's schema "
                                               f"differs from the archive's (fingerprint {found[:12]} vs "
                                               f"{deferred.fingerprint[:12]})")
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


@dataclass
class Deferred:
    """The platform's post-data still to build (its secondary indexes, foreign keys, triggers: restore_snapshot's
    defer_post_data) and the platform archive's schema fingerprint, which the target has once they are built."""

    script: str
    fingerprint: str


_TRIGGER_EVENTS = re.compile(r"\bCREATE (?:CONSTRAINT )?TRIGGER \S+ (?:BEFORE|AFTER|INSTEAD OF) (.*?) ON ", re.S)


def inserting_triggers(script: str) -> list[str]:
    """`schema.table: trigger` for each trigger of a post-data script that fires on INSERT."""
    out = []
    for typ, schema, name, _, body in split_ddl(script):
        m = _TRIGGER_EVENTS.search(body) if typ == "TRIGGER" else None
        if m and re.search(r"\bINSERT\b", m.group(1)):
            table, _, trigger = name.partition(" ")
            out.append(f"{schema}.{table}: {trigger}")
    return out


def _newest_pack(replicas: Mapping[str, Any], order: tuple[str, ...], report: PlatformReport,
                 progress: Progress) -> Any:
    """The newest usable DR pack at the first copy location, when that is a provider (the vault is read
    directly: a pack would only add a copy), or None. Anything wrong with a pack is a note, never a stop."""
    from .packs import newest_pack

    first = order[0] if order else "vault"
    if first == "vault" or first not in replicas:
        return None
    pack, notes = newest_pack(replicas[first])
    for note in notes:
        progress(note)
    report.pack_notes += notes
    if pack is not None:
        report.pack = f"{first}:{pack.index_key}"
        progress(f"DR pack of {pack.created_at} at {first}: {sum(len(s.entries) for s in pack.segments)} "
                 f"archive(s) in {len(pack.segments)} segment(s); the weddings it does not hold as chosen are "
                 f"read from their own objects")
    return pack


def _post_data_pending(coord) -> bool:
    return bool(coord.execute(sql.SQL("SELECT post_data_pending FROM {}").format(
        sql.Identifier(RESTORE_PROGRESS_SCHEMA, "run"))).fetchone()[0])


def _platform_post_data(engine: Any, replicas: Mapping[str, Any], sha256: str, order: tuple[str, ...],
                        target: str) -> Deferred:
    """The deferred post-data again, from the platform's archive (the one the first run restored)."""
    backup = engine.catalogue.backup_by_sha(sha256)
    if backup is None:
        raise RestoreError(f"restore --all into {target}: the platform's archive {sha256[:12]}… that the first run "
                           f"restored is no longer in the catalogue, and its indexes and foreign keys are still to "
                           f"build: restore into a new empty database")
    held = {c.provider for c in engine.catalogue.copies(backup.id)}
    problems = []
    for copy in order:
        if copy not in held or (copy != "vault" and copy not in replicas):
            continue
        try:
            with engine.fetched_copy(backup, copy, replicas) as tmp:
                name = engine.archive_name(backup, copy)
                script, fingerprint = deferred_post_data_of(open_archive(tmp, name=name,
                                                                         resolve_key=engine.resolve_key), name)
            return Deferred(script, fingerprint)
        except _COPY_FAULTS as exc:
            problems.append(f"{copy}: {str(exc)[:300]}")
    raise RestoreError(f"restore --all into {target}: the platform's indexes and foreign keys are still to build, "
                       f"and no copy of its archive could be read again: {'; '.join(problems) or 'no usable copy'}")


def _build_deferred(target_dsn: str, target: str, deferred: Deferred, report: PlatformReport) -> None:
    """The deferred post-data into the target, clearing the pending mark in the same transaction."""
    def cleared(conn) -> None:
        conn.execute(sql.SQL("UPDATE {} SET post_data_pending = false").format(
            sql.Identifier(RESTORE_PROGRESS_SCHEMA, "run")))

    with connect_target(target_dsn, f"the target, {target}", "wedbackup-restore-all") as conn:
        try:
            apply_deferred(conn, deferred.script, partition_label(PLATFORM), target, then=cleared)
        except RestoreError as exc:
            # A foreign key some restored row breaks (its parent's wedding could not be restored): built NOT VALID,
            # so that the check at the end counts and names its orphans, as for every other key.
            report.fallbacks.append(f"{exc}; built again with the foreign keys NOT VALID, their orphans counted below")
            apply_deferred(conn, relax_foreign_keys(deferred.script), partition_label(PLATFORM), target, then=cleared)


def _account(report: PlatformReport, result: PartitionResult) -> None:
    if result.ok:
        report.restored_now += 1
        report.copies_used[result.copy] = report.copies_used.get(result.copy, 0) + 1
        report.from_pack += result.packed
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
                  report: PlatformReport, ticker: Counter, *, hold_triggers: bool,
                  health: CopyHealth | None = None) -> str:
    """Every wedding on `jobs` workers, each with its own engine (the catalogue connection is not shared
    between threads); no wedding starts after `deadline` (time.perf_counter()). Returns why it stopped
    early, or ''."""
    worker_engine, engines = _worker_engines(engine)

    def one(point: RecoveryPoint) -> PartitionResult:
        try:
            return restore_partition(worker_engine(), replicas, target_dsn, point, order, hold_triggers=hold_triggers,
                                     health=health)
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
                 report: PlatformReport, ticker: Counter, progress: Progress, *,
                 expected_fingerprint: str | None = None, before_alone: Callable[[], bool] = lambda: False,
                 health: CopyHealth | None = None, pack: Any = None) -> str:
    """The weddings through the batch path (core/disaster/batches.py); those it hands back — no copy read
    through, or their batch failed to load — again alone through `_run_weddings`, which reports each one
    that fails again by name with its reason, once `before_alone()` has completed the target's schema (it
    returns whether the loads must hold user triggers off). `expected_fingerprint`: the schema the weddings'
    archives must have (the platform archive's, while its post-data waits); None: the target's. Returns why
    it stopped early, or ''."""
    from .batches import run_batches

    worker_engine, engines = _worker_engines(engine)
    lock = threading.Lock()
    retry: dict[str, tuple[RecoveryPoint, str]] = {}
    restored = [0]
    target = database_label(target_dsn)

    def on_done(d: Any, batch_seconds: float) -> None:
        result = PartitionResult(d.point.partition, True, d.point.archive_sha256, d.point.snapshot_time.isoformat(),
                                 copy=d.copy, rows=d.rows, bytes=d.point.size,
                                 seconds=round(d.seconds + batch_seconds, 6), attempts=list(d.attempts),
                                 phases={**d.phases, "load": 0.0}, packed=d.packed)
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
                              should_stop=should_stop, progress=progress, expected_fingerprint=expected_fingerprint,
                              health=health, pack=pack)
    finally:
        for e in engines:
            e.catalogue.close()
    if stopped:
        return stopped
    if retry:
        progress(f"{len(retry)} wedding(s) again one by one: " + "; ".join(
            f"{partition_label(p)}: {why}" for p, (_, why) in list(sorted(retry.items()))[:5]))
        again = [point for point, _ in sorted(retry.values(), key=lambda pw: partition_order(pw[0].partition))]
        hold = before_alone()
        return _run_weddings(engine, replicas, target_dsn, again, order, jobs, None, deadline, report, ticker,
                             hold_triggers=hold, health=health)
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
