"""Dagster instance storage: the local instance's choice of storage (LocalStackStorage), and for deployments
dagster-postgres's event log holding its connection open (PooledPostgresEventLogStorage).

LocalStackStorage is what the project's dagster.yaml (linked into the local stack's DAGSTER_HOME) selects:
dagster-postgres with the pooled event log below (the storage production runs on), in the stack's own
`dagster` database when WEDBACKUP_DAGSTER_PG_URL is set (`wedbackup stack env` sets it; the URL lives only
in the environment, never in a file); Dagster's SQLite storage under DAGSTER_HOME where no stack runs. A run
worker or subprocess reloading the instance makes the same choice from the same environment.


dagster-postgres opens a new PostgreSQL connection for every statement batch (NullPool), so each event
written on its own costs two connection set-ups (the event row, then the asset index). This storage is
the same class with a small pool (what dagster-webserver itself switches to, `optimize_for_webserver`),
so a run's events reuse one connection. The docker-compose deployment selects it as `storage: {custom:
{module: wedbackup_dagster.instance.storage, class: PooledPostgresStorage, config: {postgres_db: ...}}}`
(the same config as dagster-postgres); the Helm chart writes dagster-postgres's classes into its instance
ConfigMap itself (README, Running in production). The event log alone: `event_log_storage: {module:
wedbackup_dagster.instance.storage, class: PooledPostgresEventLogStorage, config: {postgres_url: ...}}`.

It also stores in one transaction the per-wedding events Dagster's PostgreSQL storage writes one at a time
(`BATCH_WRITABLE_EVENTS` leaves it to a loop): a range run's planned materializations (one per wedding and
asset at run creation) and check evaluations (one per wedding and check, handed over in batches by
event_batches.py); and a range step's materializations (one per wedding and asset), which dagster-postgres
does write a batch at a time, but as a multi-row INSERT that SQLAlchemy compiles anew for every batch, indexed
in a second transaction. Each event row, its asset index and its check-execution row are written by Dagster's own
code, on one connection inside one transaction: a failed batch leaves nothing behind, so Dagster's fallback
(the same events one by one) never stores an event twice.

Those batches are written behind, by a helper process: the caller hands a batch over (pickled: ~0.03 ms an
event) and goes on making the next while the helper serializes it (Dagster's JSON: ~0.3 ms an event) and
stores it in one transaction. A 2,001-wedding job writes ~30,000 such events; in the run's own process their
serialization and writes were most of each step's single-threaded tail, with the second core idle. Order is
kept: the helper writes batches in the order handed over, and any other use of the storage -- a single
event, any read, dispose -- first waits until every batch handed over is written (`_flush`), so nothing
reads the log without them. A batch the helper could not store (its transaction rolled back) is stored again
one event at a time by Dagster's own code in the caller's process, the fallback Dagster itself takes when a
batch write raises; so are the batches of a helper that died (one killed between its commit and its answer
could leave that batch's events in the log twice; the catalogue, not this log, is the record of backups).
A run's last events are single (the run's success or failure), so a finished run has nothing in flight.
A storage writes its first WRITE_BEHIND_AFTER batched events itself (a small run needs no helper), then
starts the helper in the background and goes on writing its batches itself until the helper is ready.

A range run is planned with ONE event per asset naming its weddings (Dagster's switch, below), and the UI's
per-wedding status (in progress, failed) is answered from both kinds of planned event.
"""
from __future__ import annotations

import os
import queue
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import dagster as dg
import sqlalchemy as db
import sqlalchemy.pool as db_pool
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.events import ASSET_CHECK_EVENTS, ASSET_EVENTS, DagsterEventType
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.base_storage import DagsterStorage
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage
from dagster._serdes import ConfigurableClass, ConfigurableClassData, deserialize_value, serialize_value
from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.utils import create_pg_engine, get_token_provider_from_config, pg_url_from_config

# A run's process writes its events from one thread; the overflow covers log capture and the daemon's
# threads. Connections are recycled hourly so a restarted PostgreSQL is never held on to for long.
POOL_SIZE = 1
MAX_OVERFLOW = 4
POOL_RECYCLE_SECONDS = 3600
# The per-wedding events stored here in one transaction a batch: those Dagster's PostgreSQL storage loops over
# (planned events, check evaluations), and materializations, which it writes as one multi-row INSERT compiled
# anew for every batch and then indexes in a second transaction: here one cached statement (executemany) and one
# transaction. 500 event rows of 3 kB: 250-310 ms as a compiled VALUES list, 85-113 ms this way (2026-12-06).
INDEX_BATCHED_EVENTS = frozenset({DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
                                  DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED,
                                  DagsterEventType.ASSET_CHECK_EVALUATION,
                                  DagsterEventType.ASSET_MATERIALIZATION})
ROWS_PER_INSERT = 500
# One check's evaluations of one run set on their planned rows (Dagster's `_update_asset_check_evaluation`,
# for many partitions at once); the unique index (asset_key, check_name, run_id, partition) finds each row.
_UPDATE_EVALUATIONS = db.text(
    "UPDATE asset_check_executions AS a SET execution_status = v.status, evaluation_event = v.event, "
    "evaluation_event_timestamp = v.ts, evaluation_event_storage_id = v.event_id, "
    "materialization_event_storage_id = v.materialization_id, partition = v.partition "
    "FROM unnest(CAST(:partitions AS text[]), CAST(:statuses AS text[]), CAST(:events AS text[]), "
    "CAST(:timestamps AS timestamp[]), CAST(:event_ids AS bigint[]), CAST(:materialization_ids AS bigint[])) "
    "AS v(partition, status, event, ts, event_id, materialization_id) "
    "WHERE a.asset_key = :asset_key AND a.check_name = :check_name AND a.run_id = :run_id "
    "AND a.partition = v.partition RETURNING a.partition")

# A check's PLANNED rows for a run, one per partition (a NULL partition: an unpartitioned check), each holding
# the same planned event: the event is sent once.
_INSERT_PLANNED_CHECKS = db.text(
    "INSERT INTO asset_check_executions (asset_key, check_name, partition, run_id, execution_status, "
    "evaluation_event, evaluation_event_timestamp, evaluation_event_storage_id) "
    "SELECT :asset_key, :check_name, p, :run_id, :status, :event, :ts, :event_id "
    "FROM unnest(CAST(:partitions AS text[])) AS p")


# Attributes that need not wait for the batches written behind: they read no stored event. Dagster asks for
# some between two batches; waiting there would undo the overlap. Every other public attribute waits.
_NO_FLUSH = frozenset({"handles_run_events_in_store_event", "stores_check_evaluations_in_batches",
                       "supports_asset_checks", "supports_global_concurrency_limits", "is_persistent",
                       "supports_partition_subset_in_asset_materialization_planned_events", "inst_data",
                       "store_event_batch", "asset_records_have_last_observation"})
# Batches handed to the helper and not yet answered, at most: bounds the memory they hold and what a crash
# of the run's process can leave unwritten.
BATCHES_IN_FLIGHT = 8
# Batched events a storage writes itself before it starts the helper: a small run (one wedding, a test's
# dozen) would only wait for the helper to start; a fleet's run writes tens of thousands.
WRITE_BEHIND_AFTER = 1000

_INSERT_EVENTS = SqlEventLogStorageTable.insert().returning(SqlEventLogStorageTable.c.id, sort_by_parameter_order=True)


class PooledPostgresEventLogStorage(PostgresEventLogStorage):
    """PostgresEventLogStorage whose engine keeps a connection instead of opening one per write, and which
    stores a batch of materializations, planned materializations or check evaluations in one transaction."""

    # event_batches.py hands check evaluations over in batches only to a storage that says so (stock
    # dagster-postgres refuses them and Dagster falls back to single writes, with a warning on stderr).
    stores_check_evaluations_in_batches = True

    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True, inst_data: Any = None,
                 token_provider: Any = None):
        self._batch = threading.local()  # before super().__init__: its migrations use index_connection
        self._writer: _EventWriter | None = None  # the helper process writing batches behind (started on use)
        # False in the helper itself, and with a token provider (which the helper could not be handed).
        self._writes_behind = token_provider is None
        self._write_behind_after = WRITE_BEHIND_AFTER
        self._batched_events = 0  # batched events stored so far (the helper starts past _write_behind_after)
        self._writer_lock = threading.RLock()
        self._starting: threading.Thread | None = None  # starts the helper in the background
        self._helper_starts = 0
        self._helper_url = postgres_url  # read by the starter thread without the public attribute's wait
        self._tables_present: set[str] = set()  # has_table's answers once True
        super().__init__(postgres_url, should_autocreate_tables, inst_data, token_provider)
        self._engine.dispose()
        self._engine = create_pg_engine(self.postgres_url, token_provider, isolation_level="AUTOCOMMIT",
                                        poolclass=db_pool.QueuePool, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW,
                                        pool_recycle=POOL_RECYCLE_SECONDS)

    def __getattribute__(self, name: str) -> Any:
        # Any public use of the storage first waits for the batches written behind (module docstring), except
        # for the few attributes that read no stored event.
        if name[0] != "_" and name not in _NO_FLUSH:
            writer = object.__getattribute__(self, "__dict__").get("_writer")
            if writer is not None and writer.pending:
                object.__getattribute__(self, "_flush")()
        return object.__getattribute__(self, name)

    def _flush(self) -> None:
        """Wait until every batch handed to the helper is written; a batch it could not store (or a helper
        that died) is stored one event at a time through Dagster's own code, as Dagster does when a batch
        write raises."""
        with self._writer_lock:
            if self._writer is not None and self._writer.pending:
                self._fall_back(self._writer.wait(0))

    def _fall_back(self, failed: list[tuple[Sequence[EventLogEntry], str]]) -> None:
        for events, why in failed:
            sys.stderr.write(f"Exception while storing event batch: {why}\n")
            sys.stderr.write("Falling back to storing multiple single-event storage requests...\n")
            for event in events:
                PostgresEventLogStorage.store_event(self, event)

    def _write_behind(self, events: Sequence[EventLogEntry]) -> bool:
        """Hand a batch to the helper, once fewer than BATCHES_IN_FLIGHT are pending. False while no helper is
        ready (it is started in the background, and the caller stores the batch itself meanwhile: a start
        takes seconds, Dagster and the database imported in a new process)."""
        with self._writer_lock:
            if self._writer is not None and not self._writer.alive:
                self._fall_back(self._writer.wait(0))
                self._writer = None
            if self._writer is None:
                self._start_helper()
                return False
            self._fall_back(self._writer.wait(BATCHES_IN_FLIGHT - 1))
            self._writer.hand_over(events)
            return True

    def _start_helper(self) -> None:
        """Start a helper in the background, unless one is starting; after three, this storage gives up
        writing behind (a helper that keeps dying) and stores every batch itself."""
        if self._starting is not None and self._starting.is_alive():
            return
        if self._helper_starts >= 3:
            self._writes_behind = False
            return
        self._helper_starts += 1
        self._starting = threading.Thread(target=self._start_in_background, name="wedbackup-event-writer-start",
                                          daemon=True)
        self._starting.start()

    def _start_in_background(self) -> None:
        try:
            writer = _EventWriter(self._helper_url)
            writer.ready()
        except Exception as exc:  # noqa: BLE001 - then this process stores its batches itself, as before
            sys.stderr.write(f"the event writer process did not start ({type(exc).__name__}); this process "
                             "stores its event batches itself\n")
            with self._writer_lock:
                self._writes_behind = False
            return
        with self._writer_lock:
            self._writer = writer

    def store_event(self, event: EventLogEntry) -> None:
        self._flush()
        super().store_event(event)

    def dispose(self) -> None:
        if self._starting is not None:
            self._starting.join(timeout=60)
        with self._writer_lock:
            self._flush()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        super().dispose()

    def has_table(self, table_name: str) -> bool:
        """Dagster asks before every batch of asset events whether `asset_event_tags` exists, on a connection
        of its own (with the batch's transaction holding the pooled one: a new connection each time). A table
        found stays (Dagster's migrations add tables, nothing drops one under a running instance): asked once."""
        if table_name in self._tables_present:
            return True
        present = super().has_table(table_name)
        if present:
            self._tables_present.add(table_name)
        return present

    def index_connection(self) -> Any:
        """Inside `store_event_batch`, the batch's own transaction: Dagster's per-event index writes join it."""
        shared = getattr(self._batch, "conn", None)
        return nullcontext(shared) if shared is not None else super().index_connection()

    @contextmanager
    def _one_transaction(self) -> Iterator[Any]:
        with self.index_transaction() as conn:
            self._batch.conn = conn
            try:
                yield conn
            finally:
                self._batch.conn = None

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        types = {event.get_dagster_event().event_type for event in events}
        if not types or not types <= INDEX_BATCHED_EVENTS:
            self._flush()
            super().store_event_batch(events)
            return
        self._batched_events += len(events)
        for start in range(0, len(events), ROWS_PER_INSERT):
            chunk = events[start:start + ROWS_PER_INSERT]
            behind = self._writes_behind and self._batched_events > self._write_behind_after
            if not (behind and self._write_behind(chunk)):
                self._store_in_one_transaction(chunk)

    def _store_in_one_transaction(self, events: Sequence[EventLogEntry]) -> None:
        """What `store_event` does per event, for all of them in one transaction: the event rows (one
        INSERT), the asset index (once per asset: its last event, as Dagster's own materialization batches),
        the check-execution rows (Dagster's code per event, on this transaction's connection)."""
        # The rows of `prepare_insert_event_batch`, kept: each event's serialized JSON is also what a check
        # evaluation's execution row holds (serializing a shrinkage evaluation's table twice cost ~1.5 s a job).
        self._store_rows_in_one_transaction(events, [self._event_to_row(event) for event in events])

    def _store_rows_in_one_transaction(self, events: Sequence[EventLogEntry], rows: list[dict[str, Any]]) -> None:
        with self._one_transaction() as conn:
            # executemany of one statement SQLAlchemy compiles once (its "insertmanyvalues": multi-row INSERTs
            # with the ids RETURNED in the rows' order, which sort_by_parameter_order guarantees), not a
            # multi-row VALUES statement compiled for every batch.
            ids = [int(row[0]) for row in conn.execute(_INSERT_EVENTS, rows).fetchall()]
            if len(ids) != len(events):
                raise RuntimeError(f"stored {len(ids)} of a batch of {len(events)} events")
            stored = list(zip(events, ids))
            asset_events = [(e, i) for e, i in stored
                            if e.dagster_event_type in ASSET_EVENTS and e.get_dagster_event().asset_key]
            if asset_events:
                self._store_asset_event_tags(conn, [e for e, _ in asset_events], [i for _, i in asset_events])
                last = {e.get_dagster_event().asset_key: (e, i) for e, i in asset_events}
                for event, event_id in last.values():
                    self._store_asset_event(conn, event, event_id)
            check_events = [(e, i) for e, i in stored if e.dagster_event_type in ASSET_CHECK_EVENTS]
            serialized = {event_id: row["event"] for event_id, row in zip(ids, rows)}
            for event, event_id in self._update_check_evaluations(conn, check_events, serialized):
                self.store_asset_check_event(event, event_id)

    def _store_asset_check_evaluation_planned(self, event: EventLogEntry, event_id: int | None) -> None:
        """Dagster's own PLANNED rows, one per partition of the run, each holding the planned event: the
        event (which lists every partition of the run) serialized once, not once per partition (2 s for a
        2,001-wedding run's check, O(weddings²)), and sent once: one INSERT … SELECT over the partitions
        (an executemany carried the event in every row, ~40 MB a check for 2,001 weddings)."""
        planned = event.get_dagster_event().event_specific_data
        partition_keys = planned.partitions_subset.get_partition_keys() if planned.partitions_subset else [None]
        with self.index_connection() as conn:
            conn.execute(_INSERT_PLANNED_CHECKS, {
                "asset_key": planned.asset_key.to_string(), "check_name": planned.check_name,
                "partitions": list(partition_keys), "run_id": event.run_id,
                "status": AssetCheckExecutionRecordStatus.PLANNED.value, "event": serialize_value(event),
                "ts": self._event_insert_timestamp(event), "event_id": event_id})

    @property
    def supports_asset_checks(self) -> bool:
        # Dagster asks the database (a reflection query) for every check event it stores; once the table
        # is there it stays.
        if not getattr(self, "_asset_checks_table", False):
            self._asset_checks_table = bool(super().supports_asset_checks)
        return self._asset_checks_table

    @property
    def supports_partition_subset_in_asset_materialization_planned_events(self) -> bool:
        """A range run plans each asset with ONE event naming its weddings, not one event per wedding (a
        2,001-wedding job: 6 planned events instead of 12,006). Dagster then stops counting a failed run's
        weddings as failed (its SQL reads planned events per partition); the method below reads both kinds."""
        return True

    def get_latest_asset_partition_materialization_attempts_without_materializations(
            self, asset_key: dg.AssetKey, after_storage_id: int | None = None) -> Mapping[str, tuple[str, int]]:
        """Per wedding, the (run, event id) of its latest planned materialization with no materialization after
        it: what the UI's asset status (in progress; failed, when that run failed) is made from. Dagster's own
        query answers for planned events of one partition; planned events naming a range of weddings (partition
        NULL, the weddings in the event) are added here, each wedding taking its latest planned event of
        either kind."""
        attempts = dict(super().get_latest_asset_partition_materialization_attempts_without_materializations(
            asset_key, after_storage_id))
        table = SqlEventLogStorageTable.c
        planned_ranges = db.select(table.id, table.run_id, table.event).where(
            table.asset_key == asset_key.to_string(),
            table.dagster_event_type == DagsterEventType.ASSET_MATERIALIZATION_PLANNED.value,
            table.partition.is_(None), table.id > (after_storage_id or 0)).order_by(table.id)
        latest: dict[str, tuple[str, int]] = {}
        with self.index_connection() as conn:
            for event_id, run_id, event in conn.execute(planned_ranges):
                planned = deserialize_value(event, EventLogEntry).get_dagster_event().event_specific_data
                for key in planned.partitions_subset.get_partition_keys() if planned.partitions_subset else ():
                    latest[key] = (run_id, event_id)  # ascending ids: a later range wins
            if not latest:
                return attempts
            materialized = dict(conn.execute(
                db.select(table.partition, db.func.max(table.id)).where(
                    table.asset_key == asset_key.to_string(),
                    table.dagster_event_type == DagsterEventType.ASSET_MATERIALIZATION.value,
                    table.partition.is_not(None),
                    table.id > min(event_id for _, event_id in latest.values())).group_by(table.partition)).all())
        for key, (run_id, event_id) in latest.items():
            if key in attempts and attempts[key][1] > event_id:
                continue  # planned alone later, answered by Dagster's query
            if materialized.get(key, 0) > event_id:
                attempts.pop(key, None)
            else:
                attempts[key] = (run_id, event_id)
        return attempts

    def _update_check_evaluations(self, conn: Any, events: list[tuple[EventLogEntry, int]],
                                  serialized: Mapping[int, str] | None = None) -> list[tuple[EventLogEntry, int]]:
        """Dagster's `_update_asset_check_evaluation` (the planned row of each (check, run, partition) set to
        the evaluation) for a batch of evaluations with one UPDATE per check and run instead of one per
        wedding; the same columns get the same values. Returns the events left to Dagster's own per-event
        code: planned events, evaluations without a run or partition, and any whose planned row was not
        found (Dagster then inserts it, as it does)."""
        left: list[tuple[EventLogEntry, int]] = []
        groups: dict[tuple[str, str, str], list[tuple[EventLogEntry, int]]] = {}
        for event, event_id in events:
            evaluation = event.get_dagster_event().event_specific_data
            if (event.dagster_event_type != DagsterEventType.ASSET_CHECK_EVALUATION or not event.run_id
                    or getattr(evaluation, "partition", None) is None):
                left.append((event, event_id))
                continue
            key = (evaluation.asset_key.to_string(), evaluation.check_name, event.run_id)
            groups.setdefault(key, []).append((event, event_id))
        if events and not self.supports_asset_checks:
            return events  # Dagster's own code says what to do
        for (asset_key, check_name, run_id), group in groups.items():
            if len({e.get_dagster_event().event_specific_data.partition for e, _ in group}) != len(group):
                left += group  # a partition evaluated twice in one batch: one by one, the last one wins
                continue
            rows = []
            for event, event_id in group:
                evaluation = event.get_dagster_event().event_specific_data
                target = evaluation.target_materialization_data
                rows.append((evaluation.partition,
                             (AssetCheckExecutionRecordStatus.SUCCEEDED if evaluation.passed
                              else AssetCheckExecutionRecordStatus.FAILED).value,
                             (serialized or {}).get(event_id) or serialize_value(event),
                             self._event_insert_timestamp(event), event_id,
                             target.storage_id if target else None))
            columns = list(zip(*rows))
            updated = conn.execute(_UPDATE_EVALUATIONS, {
                "asset_key": asset_key, "check_name": check_name, "run_id": run_id,
                "partitions": list(columns[0]), "statuses": list(columns[1]), "events": list(columns[2]),
                "timestamps": list(columns[3]), "event_ids": list(columns[4]),
                "materialization_ids": list(columns[5])}).fetchall()
            counted: dict[str, int] = {}
            for (partition,) in updated:
                counted[partition] = counted.get(partition, 0) + 1
            if any(n > 1 for n in counted.values()):
                # Duplicate planned rows: the batch is rolled back and Dagster's own per-event code reports it.
                raise RuntimeError(f"several planned rows of check {check_name} in run {run_id} for one partition")
            left += [(e, i) for e, i in group
                     if e.get_dagster_event().event_specific_data.partition not in counted]
        return left

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Mapping[str, Any]) -> PooledPostgresEventLogStorage:
        return cls(inst_data=inst_data, postgres_url=pg_url_from_config(config_value),
                   should_autocreate_tables=config_value.get("should_autocreate_tables", True),
                   token_provider=get_token_provider_from_config(config_value))


class _EventWriter:
    """The helper process of one storage: batches of events in, in order; for each, None or why it failed."""

    def __init__(self, postgres_url: str):
        from wedbackup_dagster.core.parallel_backup import worker_context

        self._pipe, child = worker_context().Pipe()
        self._process = worker_context().Process(target=_write_batches, args=(child, postgres_url), daemon=True,
                                                 name="wedbackup-event-writer")
        self._process.start()
        child.close()
        self._sent: dict[int, Sequence[EventLogEntry]] = {}  # handed over, not yet answered
        self._next = 0

    def ready(self) -> None:
        """Wait for the helper's word that it is ready (Dagster imported, its storage made); an error if it
        ended first."""
        if self._pipe.recv() != ("ready", None):
            raise RuntimeError("the event writer process said something else first")

    @property
    def pending(self) -> bool:
        return bool(self._sent)

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def hand_over(self, events: Sequence[EventLogEntry]) -> None:
        """Send a batch. An event that cannot be pickled raises here, before anything is sent or recorded,
        and Dagster stores the batch one event at a time (its fallback when a batch write raises)."""
        number = self._next
        self._next += 1
        try:
            self._pipe.send((number, list(events)))
        except (OSError, EOFError):
            pass  # the helper is gone: recorded below, so wait() hands the batch back
        self._sent[number] = events

    def wait(self, leave: int) -> list[tuple[Sequence[EventLogEntry], str]]:
        """Read answers until at most `leave` batches are unanswered; the batches that failed, with why (all
        unanswered ones when the helper died)."""
        failed: list[tuple[Sequence[EventLogEntry], str]] = []
        while len(self._sent) > leave:
            try:
                number, why = self._pipe.recv()
            except (OSError, EOFError):
                code = self._process.exitcode
                failed += [(events, f"the event writer process ended (exit code {code})")
                           for _, events in sorted(self._sent.items())]
                self._sent.clear()
                break
            events = self._sent.pop(number)
            if why is not None:
                failed.append((events, why))
        return failed

    def close(self) -> None:
        self._pipe.close()  # the helper ends at end of input, after its last batch
        self._process.join(timeout=30)


def _write_batches(pipe: Any, postgres_url: str) -> None:
    """The helper: one thread takes each batch in and serializes its rows while the main thread stores the
    batch before it (one transaction each) and answers, in the order the batches came."""
    storage = PooledPostgresEventLogStorage(postgres_url, should_autocreate_tables=False)
    storage._writes_behind = False  # noqa: SLF001 - this process is the one writing behind
    pipe.send(("ready", None))
    prepared: queue.Queue[tuple[int, Any, Any, str | None] | None] = queue.Queue(maxsize=2)

    def take_in() -> None:
        while True:
            try:
                number, events = pipe.recv()
            except (EOFError, OSError):
                prepared.put(None)
                return
            try:
                prepared.put((number, events, [storage._event_to_row(e) for e in events], None))  # noqa: SLF001
            except Exception as exc:  # noqa: BLE001 - answered; the caller falls back to Dagster's own writes
                prepared.put((number, events, None, f"{type(exc).__name__}: {str(exc)[:500]}"))

    threading.Thread(target=take_in, name="wedbackup-event-writer-in", daemon=True).start()
    while (item := prepared.get()) is not None:
        number, events, rows, why = item
        if why is None:
            try:
                storage._store_rows_in_one_transaction(events, rows)  # noqa: SLF001
            except Exception as exc:  # noqa: BLE001 - answered; the caller falls back to Dagster's own writes
                why = f"{type(exc).__name__}: {str(exc)[:500]}"
        pipe.send((number, why))


class PooledPostgresStorage(DagsterPostgresStorage):
    """DagsterPostgresStorage (runs, schedules, events) whose event log is PooledPostgresEventLogStorage: the
    local stack's instance. `wedbackup backup --all` runs the range job, which stores a few events per
    wedding one by one (planned materializations, check evaluations): on stock dagster-postgres each
    opened its own connection, 264 s of a 408 s 300-wedding job under load (README, Benchmarks)."""

    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True,
                 inst_data: ConfigurableClassData | None = None, token_provider: Any = None):
        super().__init__(postgres_url, should_autocreate_tables, inst_data, token_provider)
        self._event_log_storage.dispose()
        self._event_log_storage = PooledPostgresEventLogStorage(postgres_url, should_autocreate_tables,
                                                                token_provider=token_provider)

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
                          ) -> PooledPostgresStorage:
        """The same config as dagster-postgres's `storage: postgres:` (whose own from_config_value always
        builds the stock class): `storage: {custom: {module: wedbackup_dagster.instance.storage, class:
        PooledPostgresStorage, config: {postgres_db: ...}}}`, as deployments/docker-compose/dagster.yaml."""
        return cls(inst_data=inst_data, postgres_url=pg_url_from_config(config_value),
                   should_autocreate_tables=config_value.get("should_autocreate_tables", True),
                   token_provider=get_token_provider_from_config(config_value))


PG_URL_SETTING = "WEDBACKUP_DAGSTER_PG_URL"


class LocalStackStorage(DagsterStorage, ConfigurableClass):
    """dagster.yaml: `storage: {custom: {module: wedbackup_dagster.instance.storage, class: LocalStackStorage,
    config: {postgres_url_env: WEDBACKUP_DAGSTER_PG_URL}}}`. Builds DagsterPostgresStorage when the variable
    named by `postgres_url_env` is set, else DagsterSqliteStorage in `sqlite_base_dir` (default $DAGSTER_HOME:
    the layout of Dagster's default instance, so an existing local history stays readable; with neither, as
    under `dagster definitions validate` without DAGSTER_HOME, a throw-away temporary directory).
    Only a factory: Dagster requires it to be a DagsterStorage, but it is never instantiated itself."""

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {"postgres_url_env": dg.Field(str, is_required=False, default_value=PG_URL_SETTING),
                "sqlite_base_dir": dg.Field(dg.StringSource, is_required=False)}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
                          ) -> DagsterStorage:
        url = os.environ.get(config_value.get("postgres_url_env") or PG_URL_SETTING)
        if url:
            return PooledPostgresStorage(url, inst_data=inst_data)
        base_dir = config_value.get("sqlite_base_dir") or os.environ.get("DAGSTER_HOME")
        if not base_dir:
            base_dir = tempfile.mkdtemp(prefix="wedbackup-dagster-")
        return DagsterSqliteStorage(base_dir, inst_data=inst_data)
