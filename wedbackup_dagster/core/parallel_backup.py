"""A step's weddings on every core: snapshot-and-seal batches and verification batches run in a few worker
processes side by side (`WEDBACKUP_SNAPSHOT_WORKERS`), each with its own engine (and source snapshot, or
scratch database), as `make bench`'s fleet does it. One process seals at most one core's worth (zstd and
AES-GCM hold the GIL for most of their work), and PostgreSQL's COPY overlaps with sealing only across
processes.

Each batch is `Engine.back_up_many` in a worker: the same archives, locks, vault writes and catalogue
records as in the step's own process. Per-wedding semantics are kept: a wedding that failed is returned
with its error, a wedding whose lock was busy goes back to the caller (which backs it up alone once the lock
is free), and a batch whose source or catalogue failed under it names each of its weddings with that
error while the other batches go on. Worker processes are forked from a `forkserver` (the step's process
has threads and open connections a fork would copy; the server has neither) once the platform's backup is
done, so no wedding shares the platform's snapshot. The server is started once per process with the core
preloaded (`_PRELOAD`), so a step's workers start in milliseconds instead of each importing the package
again as `spawn` did (about a second of CPU each, twice per backup run); each worker takes the step's
environment as it is when the step starts (the server's own may be older), so settings are the step's.

Verification: each worker runs `batch_verify.verify_many` on its share of the weddings, in its own
scratch database, with replicas built from the settings as the step's are; every verdict and record is
`verify_many`'s own (a wedding failing in a batch is verified alone and named alone)."""
from __future__ import annotations

import multiprocessing
import os
import pickle
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .errors import PartitionBusyError, WedbackupError

_engine: Any = None
_replicas: dict[str, Any] = {}
_session: Any = None
_session_cm: Any = None


# What every worker needs, imported once in the fork server rather than in every worker (the providers' SDKs
# are imported when a replica is first built; they are the larger part).
_PRELOAD = ["wedbackup_dagster.core.engine", "wedbackup_dagster.core.postgres.batch_verify",
            "wedbackup_dagster.core.storage.providers", "wedbackup_dagster.core.storage.replicas.s3",
            "wedbackup_dagster.core.storage.replicas.gcs", "wedbackup_dagster.core.storage.replicas.azure"]


def worker_context() -> multiprocessing.context.BaseContext:
    """Forkserver where the platform has it (Linux, macOS), its server preloading the core; else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)  # only read when the server starts (first pool of the process)
    return context


def _started_pool(engine_class: Any, workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` processes, every one of them started before any share is handed out.

    CPython's ProcessPoolExecutor otherwise spawns a worker on each submit. If a worker dies while submits
    are still spawning, the pool's manager thread terminates the workers it knows of while a submit adds
    one it does not, then joins that one forever: the step hangs in its teardown. With every worker
    started first, no submit spawns, a dead worker breaks the pool at once, and the shares still to hand
    out fail by name (`_hand_out`). `_launch_processes` is the executor's own start-all, which it uses
    for `fork`; it is private, so where a Python lacks it the pool starts its workers on submit as before."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=worker_context(), initializer=_start_worker,
                               initargs=(engine_class, dict(os.environ)))
    launch = getattr(pool, "_launch_processes", None)
    if launch is not None:
        launch()
    return pool


def _start_worker(engine_class: Any, environ: dict[str, str]) -> None:
    """In each worker process: the step's environment, then its own engine (settings and keys from it)."""
    global _engine
    os.environ.clear()
    os.environ.update(environ)
    _engine = engine_class.from_env()


class _CarriedError:
    """An error whose class does not unpickle from its args (most of ours take named fields): its class,
    words and attributes, made into the same error again in the parent (`_restored`)."""

    def __init__(self, error: BaseException):
        self.cls, self.message = type(error), str(error)
        self.state = {k: v for k, v in vars(error).items() if _picklable(v)}

    def restored(self) -> BaseException:
        error = self.cls.__new__(self.cls)
        Exception.__init__(error, self.message)
        error.__dict__.update(self.state)
        return error


def _picklable(value: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(value))
        return True
    except Exception:  # noqa: BLE001 - whatever does not cross the process boundary stays behind
        return False


def _portable(partition: str, outcome: Any) -> Any:
    """An outcome the parent can unpickle: a busy wedding as the marker BUSY, an error of a class that does
    not unpickle as a _CarriedError (the same class and words once back, `_restored`)."""
    if isinstance(outcome, PartitionBusyError):
        return BUSY
    if isinstance(outcome, BaseException) and not _picklable(outcome):
        return _CarriedError(outcome)
    return outcome


def _restored(results: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [(p, o.restored() if isinstance(o, _CarriedError) else o) for p, o in results]


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
    yield from _in_workers(engine_class, workers, _back_up_batch, [(batch,) for batch in batches], "backup")


def _hand_out(pool: ProcessPoolExecutor, work: Any, shares: list[tuple[Any, ...]]) -> dict[Future, tuple[Any, ...]]:
    """`work(*share)` submitted for every share: future -> share. A share that meets a pool a dead worker has
    already broken (submit raises BrokenProcessPool) gets a future holding that error, so it fails by name as
    a dead worker's share does, and the next run does it."""
    pending: dict[Future, tuple[Any, ...]] = {}
    for share in shares:
        try:
            future = pool.submit(work, *share)
        except BrokenProcessPool as exc:
            future = Future()
            future.set_exception(exc)
        pending[future] = share
    return pending


def _in_workers(engine_class: Any, workers: int, work: Any, shares: list[tuple[Any, ...]], what: str
                ) -> Iterator[tuple[str, Any]]:
    """`work(*share)` for every share (its first argument: the share's partitions) in at most `workers`
    worker processes; each share's (partition, outcome) pairs as it ends. A worker that died names each
    partition of its share with why."""
    with _started_pool(engine_class, max(1, min(workers, len(shares)))) as pool:
        pending = {future: share[0] for future, share in _hand_out(pool, work, shares).items()}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                partitions = pending.pop(future)
                try:
                    results = future.result()
                except Exception as exc:  # noqa: BLE001 - a worker that died names its share's partitions
                    results = [(p, WedbackupError(f"wedding {p}: its {what} worker failed: "
                                                  f"{type(exc).__name__}: {exc}")) for p in partitions]
                yield from _restored(results)


def _verify_chunk(partitions: list[str], providers: list[str], provider: str | None) -> list[tuple[str, Any]]:
    """One share of a verification step in a worker: `verify_many` with this worker's replicas."""
    from .postgres.batch_verify import verify_many
    from .storage.providers import replica_for

    for name in providers:
        if name not in _replicas:
            _replicas[name] = replica_for(name, _engine.settings)
    replicas = {name: _replicas[name] for name in providers}
    return [(p, _portable(p, o)) for p, o in verify_many(_engine, partitions, replicas, provider)]


def verify_in_workers(engine_class: Any, partitions: list[str], providers: list[str], provider: str | None,
                      chunk: int, workers: int) -> Iterator[tuple[str, Any]]:
    """Every partition's VerifyOutcome or WedbackupError, as each share of at most `chunk` ends, verified
    by `workers` processes, each share in one scratch database."""
    shares = [(partitions[i:i + chunk], providers, provider) for i in range(0, len(partitions), chunk)]
    yield from _in_workers(engine_class, workers, _verify_chunk, shares, "verification")


def _upload_share(sources: list[Any], providers: list[str], bounds: dict[str, int]
                  ) -> list[tuple[str, str, Any, float]]:
    """One share of an upload step in a worker: `Engine._uploads` with this worker's replicas (clients built
    once per worker), each archive read from the vault and hashed here; nothing is recorded in the catalogue
    (the step's process records what comes back): (provider, partition, ReplicaRecord or error, seconds)."""
    from .storage.providers import replica_for

    for name in providers:
        if name not in _replicas:
            _replicas[name] = replica_for(name, _engine.settings)
    replicas = {name: _replicas[name] for name in providers}
    # S3's abandoned multipart parts are tidied once by the step's process, not once per share.
    return [(provider, partition, _portable(partition, outcome), seconds)
            for provider, partition, _, outcome, seconds in _engine._uploads(sources, replicas, bounds, tidy=False)]


def upload_in_workers(engine_class: Any, sources: list[Any], providers: list[str], bounds: dict[str, int],
                      share: int, workers: int, tick: float | None = None) -> Iterator[Any]:
    """Every upload of `sources` ((partition, backup, vault entry, providers) each) as (provider, partition,
    backup, ReplicaRecord or WedbackupError, seconds), a share's at once as it ends, uploaded by `workers`
    processes each running at most `bounds[provider]` uploads to a provider at once; None after `tick`
    seconds with nothing new. A worker that died fails every (provider, wedding) of its share, by name."""
    shares = [sources[i:i + share] for i in range(0, len(sources), share)]
    with _started_pool(engine_class, max(1, min(workers, len(shares)))) as pool:
        pending = {future: share[0] for future, share in
                   _hand_out(pool, _upload_share, [(part, providers, bounds) for part in shares]).items()}
        while pending:
            done, _ = wait(pending, timeout=tick, return_when=FIRST_COMPLETED)
            if not done:
                yield None
            for future in done:
                part = pending.pop(future)
                backups = {partition: backup for partition, backup, _, _ in part}
                try:
                    results = future.result()
                except Exception as exc:  # noqa: BLE001 - a worker that died names its share's weddings
                    failure = f"{type(exc).__name__}: {exc}"
                    for partition, backup, _, to in part:
                        for provider in to:
                            yield provider, partition, backup, WedbackupError(
                                f"wedding {partition}: its upload worker failed ({provider} upload): {failure}"), 0.0
                    continue
                for provider, partition, outcome, seconds in results:
                    if isinstance(outcome, _CarriedError):
                        outcome = outcome.restored()
                    yield provider, partition, backups[partition], outcome, seconds
