"""Snapshot and seal on every core: a step's weddings, in the engine's batches, backed up by a few worker
processes side by side (`WEDBACKUP_SNAPSHOT_WORKERS`), each with its own engine and source snapshot, as
`make bench`'s fleet does it. One process seals at most one core's worth (zstd and AES-GCM hold the GIL
for most of their work), and PostgreSQL's COPY overlaps with sealing only across processes.

Each batch is `Engine.back_up_many` in a worker: the same archives, locks, vault writes and catalogue
records as in the step's own process. Per-wedding semantics are kept: a wedding that failed is returned
with its error, a wedding whose lock was busy goes back to the caller (which backs it up alone once the lock
is free), and a batch whose source or catalogue failed under it names each of its weddings with that
error while the other batches go on. Worker processes are started with `spawn` (the step's process has
threads and open connections a fork would copy) once the platform's backup is done, so no wedding shares
the platform's snapshot."""
from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from .errors import PartitionBusyError, WedbackupError

_engine: Any = None
_session: Any = None
_session_cm: Any = None


def _start_worker(engine_class: Any) -> None:
    """In each worker process: its own engine (settings and keys from the inherited environment)."""
    global _engine
    _engine = engine_class.from_env()


def _portable(partition: str, outcome: Any) -> Any:
    """An outcome the parent can unpickle: a busy wedding as the marker BUSY, an error whose class cannot
    cross a process boundary as a WedbackupError with the same words."""
    if isinstance(outcome, PartitionBusyError):
        return BUSY
    if isinstance(outcome, BaseException):
        try:
            pickle.loads(pickle.dumps(outcome))
        except Exception:  # noqa: BLE001 - any error class that does not round-trip is carried as text
            return WedbackupError(str(outcome))
    return outcome


BUSY = "busy"


def _back_up_batch(weddings: list[str]) -> list[tuple[str, Any]]:
    """One batch in a worker: `back_up_many` with the engine's retries, from the worker's snapshot session
    (kept across batches; shared for a few seconds as in the step's own process)."""
    global _session, _session_cm
    if _session is None:
        _session_cm = _engine.snapshot_session()
        _session = _session_cm.__enter__()
    try:
        outcomes = _engine._retrying(lambda: _engine.back_up_many(weddings, _session))
    except WedbackupError as exc:
        # The session may be broken (source gone away): the next batch opens a new one.
        _close_session()
        return [(w, WedbackupError(f"wedding {w}: its batch failed: {exc}")) for w in weddings]
    return [(w, _portable(w, o)) for w, o in outcomes.items()]


def _close_session() -> None:
    global _session, _session_cm
    cm, _session, _session_cm = _session_cm, None, None
    if cm is not None:
        try:
            cm.__exit__(None, None, None)
        except Exception:  # noqa: BLE001 - a broken session is dropped either way
            pass


def back_up_in_workers(engine_class: Any, weddings: list[str], batch_size: int, workers: int
                       ) -> Iterator[tuple[str, Any]]:
    """Every wedding's outcome (BackupOutcome, its WedbackupError, or BUSY), as each batch ends, backed up
    by `workers` processes each with its own `engine_class.from_env()`. At most `workers` batches run at
    once, so memory stays `workers` times one batch's."""
    batches = [weddings[i:i + batch_size] for i in range(0, len(weddings), batch_size)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(batches)), mp_context=context,
                             initializer=_start_worker, initargs=(engine_class,)) as pool:
        pending = {pool.submit(_back_up_batch, batch): batch for batch in batches}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                batch = pending.pop(future)
                try:
                    results = future.result()
                except Exception as exc:  # noqa: BLE001 - a worker that died names its batch's weddings
                    results = [(w, WedbackupError(f"wedding {w}: its backup worker failed: "
                                                  f"{type(exc).__name__}: {exc}")) for w in batch]
                yield from results

