"""Per-partition locks: at most one backup or restore of a wedding (or of the platform) at a time, across
every process and machine that shares the catalogue. PostgreSQL session-level advisory locks on the
catalogue database, keyed (hashtext('wedbackup-partition'), hashtext(partition)), held on a connection of
their own, so the server releases them the moment a holder dies (kill -9 included): no stale lock files.

Semantics (see README, "Concurrency"): a backup or restore that finds its partition locked *waits*, for
at most `WEDBACKUP_LOCK_TIMEOUT` seconds, and then takes its own fresh snapshot; waiting past that bound is
a `PartitionBusyError` naming the partition and the holder. A batch of weddings never waits for one
member: it takes the locks it can get at once (`try_acquire`) and the busy ones are retried alone.
Re-entrant on one connection (PostgreSQL counts session advisory locks), so a restore wrapped in
`partition_lock` may call code that takes the same lock through the same catalogue."""
from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row

from wedbackup_dagster.core.errors import PartitionBusyError, WedbackupError

NAMESPACE = "wedbackup-partition"
DEFAULT_TIMEOUT = 600.0
_APPLICATION = "wedbackup-lock"

# Who holds the lock of one partition, for the message of a wait that gave up.
_HOLDERS_SQL = """
SELECT a.pid, a.application_name, a.backend_start, a.client_addr::text AS client
FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.classid = pg_catalog.hashtext(%(ns)s)::oid AND l.objid = pg_catalog.hashtext(%(p)s)::oid
  AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())
"""


class PartitionLocks:
    """The advisory locks one process holds, on one dedicated connection to the catalogue database.
    Thread-safe: calls are serialised (a waiting acquire holds the connection until it returns)."""

    def __init__(self, dsn: str, *, timeout: float = DEFAULT_TIMEOUT):
        self.dsn = dsn
        self.timeout = timeout
        self._conn: psycopg.Connection | None = None
        self._held: Counter[str] = Counter()
        self._mutex = threading.RLock()

    # ---- connection ----------------------------------------------------------------------------------
    def _connection(self) -> psycopg.Connection:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if self._held:
                # The server released every lock of the old session with it: say so instead of carrying on.
                lost = sorted(self._held)
                self._held.clear()
                raise WedbackupError(f"the catalogue connection holding the lock(s) of {', '.join(lost[:10])} "
                                     "was lost; the locks were released with it")
            conn = self._conn = psycopg.connect(self.dsn, autocommit=True, application_name=_APPLICATION)
        return conn

    def close(self) -> None:
        """Close the connection: the server drops every lock it held."""
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._held.clear()

    @property
    def held(self) -> list[str]:
        return sorted(self._held)

    def _label(self, conn: psycopg.Connection, purpose: str, partitions: list[str]) -> None:
        # What pg_stat_activity (and a waiter's error message) shows for this holder: the outermost
        # purpose, so a backup inside a held restore lock still shows as the restore.
        if self._held:
            return
        what = partitions[0] if len(partitions) == 1 else f"{len(partitions)} partitions"
        conn.execute("SELECT pg_catalog.set_config('application_name', %s, false)",
                     (f"{_APPLICATION}: {purpose} {what}"[:63],))

    # ---- locking -------------------------------------------------------------------------------------
    def try_acquire(self, partitions: Iterable[str], *, purpose: str = "backup") -> list[str]:
        """Lock every partition that is free right now; return those locked (the others are busy)."""
        wanted = list(dict.fromkeys(partitions))
        if not wanted:
            return []
        with self._mutex:
            conn = self._connection()
            self._label(conn, purpose, wanted)
            rows = conn.execute(
                "SELECT p, pg_catalog.pg_try_advisory_lock(pg_catalog.hashtext(%s), pg_catalog.hashtext(p)) "
                "FROM unnest(%s::text[]) WITH ORDINALITY AS u(p, n) ORDER BY n", (NAMESPACE, wanted)).fetchall()
            got = [p for p, ok in rows if ok]
            self._held.update(got)
            return got

    def acquire(self, partition: str, *, purpose: str = "backup", wait: bool = True,
                timeout: float | None = None) -> None:
        """Lock one partition, waiting at most `timeout` seconds (default: this object's) when another
        backup or restore holds it; `wait=False` fails at once. Raises PartitionBusyError."""
        limit = self.timeout if timeout is None else timeout
        with self._mutex:
            conn = self._connection()
            self._label(conn, purpose, [partition])
            started = time.monotonic()
            if not wait or limit <= 0:
                ok = conn.execute("SELECT pg_catalog.pg_try_advisory_lock(pg_catalog.hashtext(%s), "
                                  "pg_catalog.hashtext(%s))", (NAMESPACE, partition)).fetchone()[0]
                if not ok:
                    raise self.busy_error(partition, purpose, 0.0)
            else:
                # A blocking lock queues fairly behind the holder; lock_timeout bounds the wait server-side.
                try:
                    with conn.transaction():
                        conn.execute("SELECT pg_catalog.set_config('lock_timeout', %s, true)",
                                     (f"{max(1, int(limit * 1000))}ms",))
                        conn.execute("SELECT pg_catalog.pg_advisory_lock(pg_catalog.hashtext(%s), "
                                     "pg_catalog.hashtext(%s))", (NAMESPACE, partition))
                except psycopg.errors.LockNotAvailable:
                    raise self.busy_error(partition, purpose, time.monotonic() - started) from None
            self._held[partition] += 1

    def release(self, partitions: Iterable[str]) -> None:
        """Unlock partitions locked by this object (once per acquire: the locks are counted)."""
        with self._mutex:
            mine = [p for p in partitions if self._held[p] > 0]
            if not mine:
                return
            for p in mine:
                self._held[p] -= 1
                if self._held[p] <= 0:
                    del self._held[p]
            conn = self._conn
            if conn is None or conn.closed or conn.broken:
                return  # the session is gone, and its locks with it
            conn.execute("SELECT pg_catalog.pg_advisory_unlock(pg_catalog.hashtext(%s), pg_catalog.hashtext(p)) "
                         "FROM unnest(%s::text[]) AS u(p)", (NAMESPACE, mine))

    def holders(self, partition: str) -> list[dict[str, Any]]:
        """The sessions holding the lock of `partition` (pid, application_name, since, client)."""
        with psycopg.connect(self.dsn, autocommit=True, application_name=f"{_APPLICATION}-probe") as probe:
            with probe.cursor(row_factory=dict_row) as cur:
                return cur.execute(_HOLDERS_SQL, {"ns": NAMESPACE, "p": partition}).fetchall()

    def busy_error(self, partition: str, purpose: str, waited: float = 0.0) -> PartitionBusyError:
        """The error for a partition whose lock is held elsewhere, naming the holder(s)."""
        try:
            found = self.holders(partition)
        except psycopg.Error:
            found = []
        holder = "; ".join(f"{h['application_name'] or 'a session'} (pid {h['pid']}, connected "
                           f"{h['backend_start']:%Y-%m-%d %H:%M:%S %Z})" for h in found) or "another session"
        return PartitionBusyError(partition, purpose, waited, holder)


@contextmanager
def partition_lock(catalogue: Any, partition: str, *, purpose: str = "restore", wait: bool = True,
                   timeout: float | None = None) -> Iterator[None]:
    """Hold the lock of one partition for the body: `with partition_lock(engine.catalogue, "12"): ...`.
    Waits (bounded) for a backup or restore of the same partition to finish; raises PartitionBusyError
    when it does not in time. Use the engine's own catalogue, so the lock is re-entrant with the engine's."""
    locks: PartitionLocks = catalogue.partition_locks
    locks.acquire(partition, purpose=purpose, wait=wait, timeout=timeout)
    try:
        yield
    finally:
        locks.release([partition])
