"""restore --all's batch path: many weddings per transaction. The weddings are disjoint, so after the platform
partition the target's schema is compared once; then a few fetchers — each taking a chunk of weddings and
reading their catalogue rows together — download, check, decrypt and read each wedding's archive (every table
against its table-end record and the manifest) into a spool file, ahead of the loaders, which load a batch of
weddings per transaction — one COPY per table for the whole batch — with the batch's progress rows in that same
transaction (so a crash or `kill -9`, rerun with resume, neither redoes nor duplicates a batch). Foreign keys
are not checked row by row (session_replication_role = replica, as pg_restore --disable-triggers does) but once
for the whole target at the end (disaster/restore_all.py, _check). A wedding whose archive fails on every copy,
or whose batch fails to load, is restored again alone by the one-wedding path (restore_all.restore_partition),
which reports it by name with its reason if it fails again."""
from __future__ import annotations

import contextlib
import math
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from wedbackup_dagster.core.disaster.copy_health import CopyHealth
from wedbackup_dagster.core.disaster.packs import Entry, Pack, Segment, archive_from, download_segment, plan
from wedbackup_dagster.core.formats.archive import open_archive
from wedbackup_dagster.core.errors import WedbackupError
from wedbackup_dagster.core.postgres.restore_wedding import RecoveryPoint
from wedbackup_dagster.core.formats.snapshot_stream import (
    MANIFEST,
    check_table_end,
    header_of,
    manifest_of,
    read_snapshot,
    read_table_data,
    read_to_end,
    table_begin_of,
)
from wedbackup_dagster.core.postgres.load_snapshot import compare_with_manifest, no_row_security
from wedbackup_dagster.core.postgres.snapshot import RESTORE_PROGRESS_SCHEMA, schema_fingerprint, use_qualified_names

BATCH_WEDDINGS = 200  # at most this many weddings per transaction
BATCH_BYTES = 64 << 20  # … and at most about this much plaintext
SPOOL_IN_MEMORY = 1 << 20  # a wedding's decoded rows stay in memory up to this, then spill to a temporary file
COPY_BLOCK = 1 << 20
FETCHERS_PER_LOADER = 2  # downloads wait on the network: two fetchers keep one loader fed
FETCH_CHUNK = 32  # a fetcher takes up to this many weddings at once and reads their catalogue rows together
DOWNLOAD_IN_MEMORY = 4 << 20  # a downloaded copy stays in memory up to this, then spills to a temporary file
# A fetcher hands its decoded weddings to the loaders this many at a time: each hand-off wakes a waiting loader
# thread, and on a busy machine the waker is often descheduled right then, still holding the GIL.
HANDOFF = 8


def batch_size(weddings: int, jobs: int) -> int:
    """Weddings per batch: big enough that the per-transaction cost is shared, small enough that each loader
    gets several batches (progress is visible, a resumed run redoes little) — at most BATCH_WEDDINGS."""
    return max(1, min(BATCH_WEDDINGS, math.ceil(weddings / (max(1, jobs) * 4))))


@dataclass
class Decoded:
    """One wedding's archive read and checked, its rows spooled table by table, ready to load."""

    point: RecoveryPoint
    copy: str
    spool: Any  # tempfile.SpooledTemporaryFile
    # (schema, table, columns, offset in the spool, length) in the stream's order
    tables: list[tuple[str, str, tuple[str, ...], int, int]]
    rows: int
    plain_bytes: int
    fingerprint: str
    attempts: list[str]
    phases: dict[str, float]
    seconds: float
    packed: bool = False  # read from a DR pack (packs.py), not the wedding's own object


@dataclass
class Failed:
    """A wedding the batch path could not prepare: restored again alone."""

    point: RecoveryPoint
    why: str
    attempts: list[str] = field(default_factory=list)


@dataclass
class Known:
    """What the catalogue says about a few weddings, read for all of them at once — their backups, their
    copies' object keys and their wedding keys: three queries for a fetcher's chunk of weddings instead of
    four catalogue transactions for each wedding."""

    backups: dict[str, Any]  # archive SHA-256 -> BackupRecord
    copies: dict[int, list[Any]]  # backup id -> CopyRecords
    keys: dict[str, Any]  # key id -> the live wedding key (a missing or destroyed one is left out)
    seconds: float = 0.0


def known_for(engine: Any, points: list[RecoveryPoint]) -> Known:
    t0 = time.perf_counter()
    # Without the catalogue's manifests: decode checks each archive, once its SHA-256 matches the catalogue's,
    # against the manifest it carries (_spool)
    backups = engine.catalogue.backups_by_sha([p.archive_sha256 for p in points], manifests=False)
    copies = engine.catalogue.copies_of([b.id for b in backups.values()])
    keys = engine.catalogue.keys_by_id(sorted({b.key_id for b in backups.values()}), engine.keyring)
    return Known(backups, copies, keys, time.perf_counter() - t0)


@contextlib.contextmanager
def _fetched(engine: Any, backup: Any, copy: Any, replicas: Mapping[str, Any]) -> Iterator[Any]:
    """The copy, its SHA-256 checked, read into memory (spilling to a temporary file past DOWNLOAD_IN_MEMORY):
    a provider's downloaded by the object key already read, the vault's read from its file."""
    with tempfile.SpooledTemporaryFile(max_size=DOWNLOAD_IN_MEMORY) as tmp:
        if copy.provider == "vault":
            engine.copy_from_vault(backup, tmp)
        else:
            engine.download_copy(replicas[copy.provider], copy.object_key, tmp, backup)
        tmp.seek(0)
        yield tmp


def decode(engine: Any, replicas: Mapping[str, Any], point: RecoveryPoint, order: tuple[str, ...],
           copy_faults: tuple[type[BaseException], ...], known: Known | None = None,
           health: CopyHealth | None = None, packed: tuple[str, Any, Entry] | None = None) -> Decoded | Failed:
    """The wedding's chosen backup from the first copy in `order` that downloads, matches its SHA-256,
    decrypts and reads through with every table matching its table-end record and the manifest. `known`:
    its catalogue rows, read with other weddings' (known_for); read here when not given. `health`: the run's
    memory of failing locations (copy_health.py), which tries them last. `packed`: (provider, its downloaded
    DR pack segment, where the archive lies in it), tried first; a pack entry that is stale or damaged is
    noted and the copies follow (it says nothing of the provider's health: a pack is a hint)."""
    started = time.perf_counter()
    known = known or known_for(engine, [point])
    backup = known.backups.get(point.archive_sha256)
    if backup is None:
        return Failed(point, f"its backup {point.archive_sha256[:12]}… is no longer in the catalogue")
    held = {c.provider: c for c in known.copies.get(backup.id, [])}

    def resolve_key(key_id: str) -> Any:  # the catalogue again only for a key it did not hand over (says why)
        return known.keys[key_id] if key_id in known.keys else engine.resolve_key(key_id)

    usable = [c for c in order if c in held and (c == "vault" or c in replicas)]
    usable, attempts = health.order(usable) if health is not None else (usable, [])
    # (where it is read from, its copy location, the archive checked against the catalogue's SHA-256)
    sources: list[tuple[str, str, Callable[[], Any]]] = []
    if packed is not None:
        provider, segment_file, entry = packed
        sources.append((f"{provider} DR pack", provider, lambda: archive_from(
            segment_file, entry, backup.archive_sha256, engine.archive_name(backup, provider) + " (DR pack)")))
    sources += [(c, c, lambda c=c: _fetched(engine, backup, held[c], replicas)) for c in usable]
    for label, copy, fetch in sources:
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
        t0 = time.perf_counter()
        try:
            with fetch() as tmp:
                download = time.perf_counter() - t0
                t1 = time.perf_counter()
                name = engine.archive_name(backup, copy)
                chunks = open_archive(tmp, name=name, resolve_key=resolve_key)
                tables, rows, nbytes, fingerprint = _spool(chunks, name, point.partition, spool)
                read = time.perf_counter() - t1
        except copy_faults as exc:
            spool.close()
            attempts.append(f"{label}: {str(exc)[:300]}")
            if health is not None and label == copy:
                health.failed(copy, str(exc))
            continue
        except WedbackupError as exc:
            spool.close()
            return Failed(point, str(exc)[:500], attempts)
        except BaseException:
            spool.close()
            raise
        if health is not None and label == copy:
            health.succeeded(copy)
        return Decoded(point, copy, spool, tables, rows, nbytes, fingerprint, attempts,
                       {"download": download, "decrypt": read}, time.perf_counter() - started, label != copy)
    return Failed(point, "; ".join(attempts) or "no usable copy", attempts)


# The last header _spool checked, in this process. Every value it holds was checked: header_of returns a header
# only after checking it, or after finding its large parts equal to `like`'s, itself checked.
_checked_header: dict[str, Any] | None = None


def _spool(chunks: Any, name: str, partition: str, spool: Any
           ) -> tuple[list[tuple[str, str, tuple[str, ...], int, int]], int, int, str]:
    """Read a snapshot stream into `spool`, each table's data checked against its table-end record, the whole
    against the manifest (as a one-wedding restore checks while it loads)."""
    global _checked_header
    records = read_snapshot(chunks, name=name)
    # The weddings share one schema: a header whose large parts equal the last checked one's is not walked again
    # element by element (header_of's `like`, as batch verification does).
    header = _checked_header = header_of(next(records), like=_checked_header)
    next(records)  # pre-data DDL: the schema is already there (compared by fingerprint)
    next(records)  # post-data DDL
    if str(header["partition"]) != partition:
        raise WedbackupError(f"{name}: the archive holds partition {header['partition']!r}, not {partition!r}")
    what = f"wedding {partition}"
    tables: list[tuple[str, str, tuple[str, ...], int, int]] = []
    seen: dict[str, tuple[int, int, str]] = {}
    columns_of: dict[str, list[str]] = {}
    manifest_record = None
    total_rows = total_bytes = 0
    for record in records:
        if record.kind == MANIFEST:
            manifest_record = record
            break
        schema, table, columns = table_begin_of(record)
        key = f"{schema}.{table}"
        if key in seen:
            raise WedbackupError(f"{name}: table {key} appears twice in the stream")
        offset = spool.tell()
        rows, nbytes, sha, end = read_table_data(records, spool.write)
        check_table_end(end, rows, nbytes, sha, what=what, target="a batch", table=key, done="read")
        seen[key] = (rows, nbytes, sha)
        columns_of[key] = list(columns)
        tables.append((schema, table, tuple(columns), offset, nbytes))
        total_rows += rows
        total_bytes += nbytes
    if manifest_record is None:
        raise WedbackupError(f"{name}: the stream has no manifest")
    read_to_end(records, name)
    compare_with_manifest(manifest_of(manifest_record), seen, what, "a batch", columns_of)
    return tables, total_rows, total_bytes, str(header["schema_fingerprint"])


def _copy_blocks(spool: Any, offset: int, length: int) -> Iterator[bytes]:
    spool.seek(offset)
    left = length
    while left > 0:
        block = spool.read(min(COPY_BLOCK, left))
        if not block:
            raise WedbackupError("a spooled wedding ended early")  # our own temporary file: never expected
        left -= len(block)
        yield block


def load_batch(conn: Any, batch: list[Decoded], *, replica_role: bool) -> float:
    """The batch's rows into the target in one transaction, one COPY per table, with one progress row per
    wedding committed together. Returns the seconds it took. psycopg errors pass through (rolled back)."""
    t0 = time.perf_counter()
    groups: dict[tuple[str, str, tuple[str, ...]], list[tuple[Decoded, int, int]]] = {}
    for d in batch:
        for schema, table, columns, offset, length in d.tables:
            groups.setdefault((schema, table, columns), []).append((d, offset, length))
    with conn.transaction():
        use_qualified_names(conn)
        no_row_security(conn)
        if replica_role:  # no per-row foreign key triggers: every key is checked once at the end
            conn.execute("SET LOCAL session_replication_role = replica")
        with conn.cursor() as cur:
            for (schema, table, columns), parts in groups.items():
                if not any(length for _, _, length in parts):
                    continue
                query = sql.SQL("COPY {} ({}) FROM STDIN").format(
                    sql.Identifier(schema, table), sql.SQL(", ").join(map(sql.Identifier, columns)))
                with cur.copy(query) as copy:
                    for d, offset, length in parts:
                        for block in _copy_blocks(d.spool, offset, length):
                            copy.write(block)
            seconds = time.perf_counter() - t0
            cur.executemany(
                sql.SQL("INSERT INTO {} (partition, archive_sha256, snapshot_time, copy, rows, bytes, seconds) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s)").format(
                    sql.Identifier(RESTORE_PROGRESS_SCHEMA, "partitions")),
                [(d.point.partition, d.point.archive_sha256, d.point.snapshot_time, d.copy, d.rows, d.point.size,
                  round(d.seconds + seconds, 6)) for d in batch])
    return time.perf_counter() - t0


def can_skip_row_triggers(conn: Any) -> bool:
    """Whether this role may set session_replication_role (a superuser, or granted the setting)."""
    try:
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
        return True
    except psycopg.errors.InsufficientPrivilege:
        return False


def run_batches(engine: Any, replicas: Mapping[str, Any], target_dsn: str, todo: list[RecoveryPoint],
                order: tuple[str, ...], jobs: int, *, copy_faults: tuple[type[BaseException], ...],
                connect: Callable[[], Any], worker_engine: Callable[[], Any],
                on_done: Callable[[Decoded, float], None], on_batch: Callable[[float], None],
                on_retry: Callable[[RecoveryPoint, str], None],
                should_stop: Callable[[], str], progress: Callable[[str], None],
                expected_fingerprint: str | None = None, health: CopyHealth | None = None,
                pack: Pack | None = None) -> str:
    """Every point of `todo` through the batch path on `jobs` loaders and FETCHERS_PER_LOADER × `jobs`
    fetchers. `on_done(wedding, batch seconds)` for each committed wedding and `on_batch(seconds)` for each
    batch; `on_retry(point, why)` for each to restore again alone (its batch failed, or no copy read
    through); `should_stop()` returns why to stop early ('' to go on): no batch starts after it does.
    Returns why it stopped, or ''. `expected_fingerprint`: the schema the archives must have (the target's
    own when None; given while the target's post-data waits, see restore_snapshot's defer_post_data).
    `pack`: a DR pack at one of `replicas` (packs.py): a fetcher takes one of its segments at a time — one
    download for the weddings whose chosen archives it holds — and the other weddings in chunks as before."""
    fingerprint_conn = connect()
    try:
        with fingerprint_conn.transaction():
            use_qualified_names(fingerprint_conn)  # as every restore describes its target
            expected = expected_fingerprint or schema_fingerprint(fingerprint_conn)
        replica_role = can_skip_row_triggers(fingerprint_conn)
    finally:
        fingerprint_conn.close()
    if not replica_role:
        progress("this role may not set session_replication_role: foreign keys are checked row by row while "
                 "the batches load (slower), and again at the end")
    size = batch_size(len(todo), jobs)
    ready: queue.Queue[list[Decoded | Failed] | None] = queue.Queue(
        maxsize=max(2, math.ceil(jobs * size * 2 / HANDOFF)))
    stop = threading.Event()
    stopped = [""]
    lock = threading.Lock()
    fetchers_n = jobs * FETCHERS_PER_LOADER
    segments, loose = plan(pack, todo) if pack is not None else ([], todo)
    chunk_size = max(1, min(FETCH_CHUNK, math.ceil(len(loose) / fetchers_n)))
    # Work units, taken from the end: a pack segment with the points it serves, or a chunk of loose points.
    units: list[tuple[Segment | None, list[RecoveryPoint], list[Entry | None]]] = [
        (segment, [p for p, _ in served], [e for _, e in served]) for segment, served in segments]
    units += [(None, loose[i:i + chunk_size], [None] * len(loose[i:i + chunk_size]))
              for i in range(0, len(loose), chunk_size)]
    pending = list(reversed(units))

    def hand_over(items: list[Decoded | Failed]) -> bool:
        """`items` to the loaders; False (their spools closed) when the run stops first."""
        while not stop.is_set():
            try:
                ready.put(items, timeout=0.2)
                return True
            except queue.Full:
                continue
        close_spools(items)
        return False

    def fetcher() -> None:
        while not stop.is_set():
            with lock:
                if not pending:
                    return
                segment, chunk, entries = pending.pop()
            with contextlib.ExitStack() as closing:
                shared = 0.0  # the chunk's catalogue reads and its segment's download, shared by its weddings
                try:
                    known: Known | None = known_for(worker_engine(), chunk)
                    shared += known.seconds
                except Exception:  # noqa: BLE001 - then each wedding reads its own rows, and says what failed
                    known = None
                segment_file = None
                if segment is not None:
                    t0 = time.perf_counter()
                    segment_file = closing.enter_context(tempfile.SpooledTemporaryFile(max_size=DOWNLOAD_IN_MEMORY))
                    try:
                        download_segment(replicas[pack.provider], segment, segment_file)
                    except Exception as exc:  # noqa: BLE001 - its weddings are read from their own objects
                        progress(f"DR pack segment {segment.sha256[:12]}… at {pack.provider} not used "
                                 f"({len(chunk)} wedding(s) read from their own objects): {str(exc)[:200]}")
                        segment_file = None
                    shared += time.perf_counter() - t0
                held: list[Decoded | Failed] = []
                for point, entry in zip(chunk, entries):
                    if stop.is_set():
                        close_spools(held)
                        return
                    packed = (pack.provider, segment_file, entry) if segment_file is not None else None
                    try:
                        item: Decoded | Failed = decode(worker_engine(), replicas, point, order, copy_faults, known,
                                                       health, packed)
                    except Exception as exc:  # noqa: BLE001 - one wedding's surprise must not stop the others
                        item = Failed(point, f"{type(exc).__name__}: {str(exc)[:300]}")
                    if isinstance(item, Decoded):
                        item.phases["download"] += shared / len(chunk)
                    held.append(item)
                    if len(held) >= HANDOFF:
                        if not hand_over(held):
                            return
                        held = []
                if held and not hand_over(held):
                    return

    def loader() -> None:
        conn = None
        ended = False
        backlog: list[Decoded | Failed] = []  # handed over, not yet in a batch
        try:
            while not ended and not stop.is_set():
                batch: list[Decoded] = []
                plain = 0
                while len(batch) < size and plain < BATCH_BYTES:
                    if not backlog:
                        try:
                            got = ready.get(timeout=0.05 if batch else 0.5)
                        except queue.Empty:
                            if batch or stop.is_set():
                                break
                            continue
                        if got is None:
                            ready.put(None)  # the end: let the other loaders see it too
                            ended = True
                            break
                        backlog = list(reversed(got))
                    item = backlog.pop()
                    if isinstance(item, Failed):
                        on_retry(item.point, item.why)
                        continue
                    batch.append(item)
                    plain += item.plain_bytes
                if not batch:
                    continue
                why = should_stop()
                if why:
                    with lock:
                        stopped[0] = stopped[0] or why
                    stop.set()
                    for d in batch:
                        d.spool.close()
                    return
                wrong = [d for d in batch if d.fingerprint != expected]
                for d in wrong:
                    on_retry(d.point, "its schema differs from the target's")
                    d.spool.close()
                batch = [d for d in batch if d.fingerprint == expected]
                if not batch:
                    continue
                try:
                    if conn is None or conn.closed:
                        conn = connect()
                    seconds = load_batch(conn, batch, replica_role=replica_role)
                except Exception as exc:  # noqa: BLE001 - the batch is rolled back; its weddings go alone
                    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                    for d in batch:
                        on_retry(d.point, f"its batch of {len(batch)} failed to load: {first}")
                    if conn is not None and conn.broken:
                        conn.close()
                        conn = None
                else:
                    on_batch(seconds)
                    for d in batch:
                        on_done(d, seconds)
                finally:
                    for d in batch:
                        d.spool.close()
        finally:
            close_spools(backlog)  # stopped early: handed over, never loaded
            if conn is not None:
                conn.close()

    fetchers = [threading.Thread(target=fetcher, name=f"wedbackup-dr-fetch-{i}", daemon=True)
                for i in range(fetchers_n)]
    loaders = [threading.Thread(target=loader, name=f"wedbackup-dr-load-{i}", daemon=True) for i in range(jobs)]
    for t in fetchers + loaders:
        t.start()
    for t in fetchers:
        t.join()
    if not stop.is_set():
        ready.put(None)
    for t in loaders:
        t.join()
    while True:  # anything fetched but never loaded (stopped early): close its spool
        try:
            items = ready.get_nowait()
        except queue.Empty:
            break
        close_spools(items or [])
    return stopped[0]


def close_spools(items: list[Decoded | Failed]) -> None:
    for item in items:
        if isinstance(item, Decoded):
            item.spool.close()
