"""Uploads in worker processes (Engine.replicate_to_all with `processes`, core/parallel_backup.py
upload_in_workers) on the real stand-ins: the copies are those the step's own process makes (each provider's
own checksum, recorded in the catalogue by the step's process), a provider that is down fails only its own
weddings, each provider's bound holds across the workers, and a worker that dies fails its share's weddings
by name with nothing recorded for them."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.errors import WedbackupError
from wedbackup_dagster.core.outcomes import ReplicaOutcome
from wedbackup_dagster.core.storage.providers import PROVIDERS, replica_for
from wedbackup_dagster_tests.core.test_parallel_uploads import seal

WEDDINGS = [str(i) for i in range(1, 13)]


@pytest.fixture
def sealed(demo_env) -> Engine:
    engine = seal(demo_env, WEDDINGS, seed=23, upload_concurrency=4)
    engine.upload_min_share = 3  # four shares of three weddings: two workers, two rounds
    return engine


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recorded(engine: Engine, wedding: str) -> set[str]:
    backup = engine.catalogue.require_latest_backup(wedding)
    return {c.provider for c in engine.catalogue.copies(backup.id)}


def test_weddings_uploaded_in_workers_are_recorded_as_the_steps_own_process_records_them(sealed: Engine):
    engine = sealed
    replicas = {p: replica_for(p, engine.settings) for p in PROVIDERS}

    outcomes = {(p, w): o for p, w, o in engine.replicate_to_all(WEDDINGS, replicas, processes=2)}

    assert set(outcomes) == {(p, w) for p in PROVIDERS for w in WEDDINGS}
    assert all(isinstance(o, ReplicaOutcome) and not o.record.already_present for o in outcomes.values()), outcomes
    for wedding in WEDDINGS:
        backup = engine.catalogue.require_latest_backup(wedding)
        data = engine.vault.get(wedding, backup.archive_sha256).path.read_bytes()
        copies = {c.provider: c for c in engine.catalogue.copies(backup.id)}
        assert set(copies) == {"vault", *PROVIDERS}
        for provider, replica in replicas.items():
            record = outcomes[(provider, wedding)].record
            assert outcomes[(provider, wedding)].backup.id == backup.id
            assert record.sha256 == backup.archive_sha256 == hashlib.sha256(data).hexdigest()
            # What the provider itself stores (looked at from this process) is what was recorded.
            head = replica.head(copies[provider].object_key)
            assert head is not None and head.size == len(data) == copies[provider].size
            assert head.provider_checksum == record.provider_checksum == copies[provider].checksum

    # A re-run in workers uploads nothing twice: every copy is found already there.
    again = list(engine.replicate_to_all(WEDDINGS, replicas, processes=2))
    assert len(again) == len(PROVIDERS) * len(WEDDINGS)
    assert all(isinstance(o, ReplicaOutcome) and o.record.already_present for _, _, o in again)


def test_a_provider_down_in_the_workers_fails_only_its_own_weddings(sealed: Engine, monkeypatch):
    engine = sealed
    # The workers build their replicas from the step's environment: S3 there points at a closed port.
    monkeypatch.setenv("WEDBACKUP_S3_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    replicas = {p: replica_for(p, engine.settings) for p in ("gcs", "azure")}
    replicas["s3"] = replica_for("s3", Engine.from_env().settings)

    outcomes = {(p, w): o for p, w, o in engine.replicate_to_all(WEDDINGS, replicas, processes=2)}

    assert set(outcomes) == {(p, w) for p in PROVIDERS for w in WEDDINGS}
    for wedding in WEDDINGS:
        error = outcomes[("s3", wedding)]
        assert isinstance(error, WedbackupError) and "provider s3" in str(error) and f"/{wedding}/" in str(error)
        assert isinstance(outcomes[("gcs", wedding)], ReplicaOutcome)
        assert isinstance(outcomes[("azure", wedding)], ReplicaOutcome)
        assert _recorded(engine, wedding) == {"vault", "gcs", "azure"}


def test_each_providers_bound_is_split_between_the_workers(sealed: Engine, monkeypatch):
    """Two workers under a bound of 4 run 2 uploads each at most; a bound of 1 keeps the step in-process
    (one upload at a time at that provider), as it would be without workers."""
    from wedbackup_dagster.core import parallel_backup

    seen: list[tuple[int, dict[str, int]]] = []
    real = parallel_backup.upload_in_workers

    def watched(engine_class, sources, providers, bounds, share, workers, tick=None):
        seen.append((workers, dict(bounds)))
        return real(engine_class, sources, providers, bounds, share, workers, tick=tick)

    monkeypatch.setattr(parallel_backup, "upload_in_workers", watched)
    replicas = {p: replica_for(p, sealed.settings) for p in PROVIDERS}
    assert all(isinstance(o, ReplicaOutcome)
               for _, _, o in sealed.replicate_to_all(WEDDINGS, replicas, processes=2))
    assert seen == [(2, {"s3": 2, "gcs": 2, "azure": 2})]

    seen.clear()
    assert all(isinstance(o, ReplicaOutcome) for _, _, o in sealed.replicate_to_all(
        WEDDINGS, replicas, workers={"s3": 1}, processes=2))
    assert seen == []  # S3 may have one upload at a time: no second process may add another


def _descendants(pid: int) -> dict[int, int]:
    """Every process below `pid` (the fork server, its workers) -> its parent, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                found[child] = parent
                todo.append(child)
    return found


def test_a_worker_that_dies_fails_its_shares_weddings_by_name_with_nothing_recorded(sealed: Engine):
    engine = sealed
    replicas = {p: replica_for(p, engine.settings) for p in PROVIDERS}
    before = set(_descendants(os.getpid()))
    killed: list[int] = []

    def kill_a_worker() -> None:
        # A worker (a new process forked by the fork server, not by us) is killed as soon as both workers of
        # the pool exist. Not before: CPython's ProcessPoolExecutor can spawn a worker while it is tearing
        # down a pool a dead worker broke, and then waits forever for that worker (it hung CI once).
        # (A pool that only ever starts one worker has handed out its shares by 0.3 s after it started it.)
        deadline, first_seen = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            workers = [pid for pid, parent in _descendants(os.getpid()).items()
                       if pid not in before and parent != os.getpid()]
            first_seen = first_seen or (time.monotonic() if workers else None)
            if len(workers) >= 2 or (workers and time.monotonic() - first_seen > 0.3):
                os.kill(workers[0], signal.SIGKILL)
                killed.append(workers[0])
                return
            time.sleep(0.002)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    try:
        outcomes = {(p, w): o for p, w, o in engine.replicate_to_all(WEDDINGS, replicas, processes=2)}
    finally:
        killer.join()

    assert killed, "no worker process was seen"
    assert set(outcomes) == {(p, w) for p in PROVIDERS for w in WEDDINGS}
    failed = {w for (p, w), o in outcomes.items() if isinstance(o, WedbackupError)}
    assert failed, "a worker was killed, yet every wedding uploaded"
    for (provider, wedding), outcome in outcomes.items():
        if wedding in failed:
            assert isinstance(outcome, WedbackupError), (provider, wedding, outcome)
            assert f"wedding {wedding}:" in str(outcome) and "upload worker failed" in str(outcome)
            assert f"({provider} upload)" in str(outcome)
            assert _recorded(engine, wedding) == {"vault"}  # nothing recorded for a wedding of a dead share
        else:
            assert isinstance(outcome, ReplicaOutcome)
            assert _recorded(engine, wedding) == {"vault", *PROVIDERS}

    # The next run uploads what the dead worker left undone (and finds any object it did upload).
    again = {(p, w): o for p, w, o in engine.replicate_to_all(WEDDINGS, replicas, processes=2)}
    assert all(isinstance(o, ReplicaOutcome) for o in again.values()), again
    assert all(_recorded(engine, w) == {"vault", *PROVIDERS} for w in WEDDINGS)
