"""Per-wedding locks (core/catalogue/locks.py) on the real catalogue database: two backups of the same wedding at
once, batched or not, and a backup during a restore of that wedding, end with valid archives, one
catalogue row per archive, intact vault files, and backups that never overlapped."""
from __future__ import annotations

import threading
import time

import psycopg
import pytest

from wedbackup_dagster.dev import demo_data
from wedbackup_dagster.core.postgres import restore_wedding as recovery
from wedbackup_dagster.core.formats import snapshot_stream
from wedbackup_dagster.core.formats.archive import open_archive
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.errors import ConfigError, PartitionBusyError
from wedbackup_dagster.core.catalogue.locks import PartitionLocks, partition_lock
from wedbackup_dagster.core.config import Settings
from wedbackup_dagster.core.formats.snapshot_stream import Manifest
from wedbackup_dagster.core.storage.vault import SUFFIX

WEDDING = "3"


@pytest.fixture
def env(stack, make_database, tmp_path, monkeypatch):
    source = make_database()
    values = {"WEDBACKUP_SOURCE_DSN": source, "WEDBACKUP_CATALOGUE_DSN": make_database(),
              "WEDBACKUP_VAULT_DIR": str(tmp_path / "vault"), "WEDBACKUP_LOCK_TIMEOUT": "60"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    demo_data.generate(source, weddings=6, seed=5, document_bytes=256)
    import os

    return dict(os.environ)


def engines(env, n: int = 2) -> list[Engine]:
    # Separate engines have separate catalogue connections: as separate processes would.
    return [Engine.from_env(env) for _ in range(n)]


def run_together(*work):
    """Run the callables in threads released at the same instant; return their results (or raise)."""
    barrier = threading.Barrier(len(work))
    results: list[object] = [None] * len(work)
    errors: list[BaseException] = []

    def run(i, fn):
        barrier.wait()
        try:
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(work)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


def backups_of(engine: Engine, partition: str) -> list[dict]:
    with engine.catalogue.connect() as conn:
        return conn.execute(
            "SELECT b.id, b.archive_sha256, b.size, b.key_id, b.manifest, b.snapshot_time, b.created_at, "
            "       (SELECT count(*) FROM wedbackup.copies c WHERE c.backup_id = b.id) AS copies "
            "FROM wedbackup.backups b WHERE b.partition = %s ORDER BY b.snapshot_time", (partition,)).fetchall()


def assert_intact_and_serialised(engine: Engine, partition: str, expected: int) -> None:
    """Every backup row has exactly one (vault) copy whose file opens and holds the recorded manifest,
    no vault file lacks a row, and each backup's snapshot began after the previous one was recorded."""
    rows = backups_of(engine, partition)
    assert len(rows) == expected
    assert len({r["archive_sha256"] for r in rows}) == expected
    for row in rows:
        assert row["copies"] == 1
        entry = engine.vault.get(partition, row["archive_sha256"])
        assert entry is not None and entry.size == row["size"]
        with open(entry.path, "rb") as fh:
            reader = open_archive(fh, name=str(entry.path), resolve_key=engine.resolve_key)
            manifest = snapshot_stream.read_manifest(reader, name=str(entry.path))
        assert reader.complete
        assert Manifest.from_dict(row["manifest"]).tables == manifest.tables
    files = sorted(p.name for p in (engine.vault.root / partition).iterdir())
    assert files == sorted(r["archive_sha256"] + SUFFIX for r in rows), "stray or temporary vault files"
    for earlier, later in zip(rows, rows[1:]):
        assert later["snapshot_time"] >= earlier["created_at"], "two backups of one wedding overlapped"


def test_a_lock_is_exclusive_reentrant_bounded_and_names_its_holder(env):
    dsn = env["WEDBACKUP_CATALOGUE_DSN"]
    a, b = PartitionLocks(dsn), PartitionLocks(dsn)
    try:
        a.acquire("12", purpose="restore")
        assert b.try_acquire(["12", "13"]) == ["13"]
        started = time.monotonic()
        with pytest.raises(PartitionBusyError) as err:
            b.acquire("12", timeout=0.5)
        assert 0.4 < time.monotonic() - started < 10
        assert "wedding 12" in str(err.value) and "wedbackup-lock: restore 12" in str(err.value)
        with pytest.raises(PartitionBusyError, match="without waiting"):
            b.acquire("12", wait=False)
        a.acquire("12")  # re-entrant on the same connection: counted
        a.release(["12"])
        assert b.try_acquire(["12"]) == []
        a.release(["12"])
        assert b.try_acquire(["12"]) == ["12"]
        b.release(["12", "13"])
        # A holder that dies (connection gone, as on kill -9) releases its locks with it.
        a.acquire("14")
        a._conn.close()
        # The server ends the dead session's backend (and its locks) a moment after the socket closes: under
        # load that moment can outlast the next statement, so wait for it, boundedly.
        deadline = time.monotonic() + 15
        while b.try_acquire(["14"]) != ["14"]:
            assert time.monotonic() < deadline, "the dead holder's lock was never released"
            time.sleep(0.05)
        assert b.held == ["14"]
    finally:
        a.close()
        b.close()


def test_a_waiter_gets_the_lock_as_soon_as_it_is_released(env):
    dsn = env["WEDBACKUP_CATALOGUE_DSN"]
    a, b = PartitionLocks(dsn), PartitionLocks(dsn)
    try:
        a.acquire("7")
        releaser = threading.Timer(0.7, a.release, args=(["7"],))
        started = time.monotonic()
        releaser.start()
        b.acquire("7", timeout=30)
        waited = time.monotonic() - started
        assert 0.5 < waited < 10
    finally:
        a.close()
        b.close()


def test_lock_timeout_setting_is_validated(env):
    assert Settings.from_env({**env, "WEDBACKUP_LOCK_TIMEOUT": "2.5"}).lock_timeout == 2.5
    for bad in ("soon", "-1", "nan", "1e9"):
        with pytest.raises(ConfigError, match="WEDBACKUP_LOCK_TIMEOUT"):
            Settings.from_env({**env, "WEDBACKUP_LOCK_TIMEOUT": bad})


def test_two_backups_of_the_same_wedding_at_once_do_not_overlap(env):
    first, second = engines(env)

    def back_up(engine):
        with engine.snapshot_session() as session:
            return engine.back_up(WEDDING, session)

    a, b = run_together(lambda: back_up(first), lambda: back_up(second))
    assert a.stats.sha256 != b.stats.sha256
    assert_intact_and_serialised(first, WEDDING, 2)
    assert first.verify(WEDDING, {}, provider="vault").tables


def test_two_batched_backups_of_the_same_weddings_at_once_both_complete(env):
    first, second = engines(env)
    weddings = ["platform", "1", "2", "3", "4", "5", "6"]

    def back_up_all(engine):
        with engine.snapshot_session() as session:
            return dict(engine.back_up_each(weddings, session))

    a, b = run_together(lambda: back_up_all(first), lambda: back_up_all(second))
    for outcomes in (a, b):
        assert sorted(outcomes) == sorted(weddings)
        failed = {k: str(v) for k, v in outcomes.items() if isinstance(v, Exception)}
        assert not failed
    for partition in weddings:
        assert_intact_and_serialised(first, partition, 2)


def test_a_backup_that_cannot_get_the_lock_in_time_fails_naming_the_wedding_and_leaves_nothing(env):
    engine = Engine.from_env({**env, "WEDBACKUP_LOCK_TIMEOUT": "0.5"})
    holder = PartitionLocks(env["WEDBACKUP_CATALOGUE_DSN"])
    try:
        holder.acquire(WEDDING, purpose="restore")
        with engine.snapshot_session() as session:
            with pytest.raises(PartitionBusyError, match=f"wedding {WEDDING}: backup not started"):
                engine.back_up(WEDDING, session)
            # In a batch, the busy wedding is named while the others are backed up.
            outcomes = dict(engine.back_up_each(["2", WEDDING, "4"], session))
        assert isinstance(outcomes[WEDDING], PartitionBusyError)
        assert "restore 3" in str(outcomes[WEDDING])
        assert not isinstance(outcomes["2"], Exception) and not isinstance(outcomes["4"], Exception)
        assert backups_of(engine, WEDDING) == []
        assert not (engine.vault.root / WEDDING).exists() or not list((engine.vault.root / WEDDING).iterdir())
    finally:
        holder.close()


@pytest.mark.parametrize("batched", [False, True], ids=["back_up", "back_up_each"])
def test_a_backup_during_a_restore_waits_for_it_and_backs_up_what_it_restored(env, monkeypatch, batched):
    restorer, backer = engines(env)
    source = env["WEDBACKUP_SOURCE_DSN"]
    with restorer.snapshot_session() as session:
        original = restorer.back_up(WEDDING, session)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("DELETE FROM weddings WHERE id = %s", (int(WEDDING),))  # the wedding is lost...

    times: dict[str, float] = {}
    in_restore = threading.Event()
    real_restore = recovery.restore_in_place

    def slow_restore(*args, **kwargs):
        # The restore holds the wedding's lock while it writes the source; slow it down so the backup
        # below certainly asks for the lock in the middle of it.
        in_restore.set()
        time.sleep(1.5)
        report = real_restore(*args, **kwargs)
        times["restore committed"] = time.monotonic()
        return report

    monkeypatch.setattr(recovery, "restore_in_place", slow_restore)

    def restore_into_source():
        # In place: the only restore that may write the live source (a target restore there is refused).
        request = recovery.RecoveryRequest(partition=WEDDING, mode="in_place", provider="vault",
                                           include_unverified=True)
        report = recovery.recover(restorer, request, {})
        return None, report.copy, report

    def back_up_meanwhile():
        assert in_restore.wait(30)
        times["backup asked"] = time.monotonic()
        with backer.snapshot_session() as session:
            if batched:  # the busy wedding leaves its batch and is backed up alone once the lock is free
                outcomes = dict(backer.back_up_each(["2", WEDDING, "4"], session))
                assert not any(isinstance(o, Exception) for o in outcomes.values())
                outcome = outcomes[WEDDING]
            else:
                outcome = backer.back_up(WEDDING, session)
        times["backup done"] = time.monotonic()
        return outcome

    (_, chosen, report), later = run_together(restore_into_source, back_up_meanwhile)
    assert chosen == "vault" and report.totals["archive_rows"] == sum(t["rows"] for t in original.manifest["tables"])
    assert times["backup asked"] < times["restore committed"] < times["backup done"]
    # ...and the backup taken after the wait holds the restored wedding, row for row.
    assert [(t["name"], t["rows"], t["sha256"]) for t in later.manifest["tables"]] == \
        [(t["name"], t["rows"], t["sha256"]) for t in original.manifest["tables"]]
    assert_intact_and_serialised(backer, WEDDING, 2)


def test_partition_lock_wraps_any_writer_of_a_wedding(env):
    engine = Engine.from_env({**env, "WEDBACKUP_LOCK_TIMEOUT": "0.3"})
    other = Engine.from_env({**env, "WEDBACKUP_LOCK_TIMEOUT": "0.3"})
    with partition_lock(engine.catalogue, WEDDING, purpose="in-place restore"):
        # Re-entrant for the same catalogue: the engine's own backup inside the lock goes ahead...
        with engine.snapshot_session() as session:
            engine.back_up(WEDDING, session)
        # ...while another process's waits and gives up, naming who holds it.
        with other.snapshot_session() as session, pytest.raises(PartitionBusyError, match="in-place restore"):
            other.back_up(WEDDING, session)
    assert engine.catalogue.partition_locks.held == []
    with other.snapshot_session() as session:
        other.back_up(WEDDING, session)
    assert_intact_and_serialised(engine, WEDDING, 2)


BACK_UP_IN_A_PROCESS = """
import sys, time
from wedbackup_dagster.core.engine import Engine
engine = Engine.from_env()
go = float(sys.argv[2])
while time.time() < go:  # both processes start their backup at the same instant
    time.sleep(0.005)
with engine.snapshot_session() as session:
    outcome = engine.back_up(sys.argv[1], session)
print(outcome.stats.sha256)
"""


def test_two_processes_backing_up_the_same_wedding_at_once_do_not_overlap(env):
    import subprocess
    import sys

    go = time.time() + 8  # time for both interpreters to import wedbackup on a busy machine
    procs = [subprocess.Popen([sys.executable, "-c", BACK_UP_IN_A_PROCESS, WEDDING, str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    shas = {out.strip() for out, _ in outputs}
    assert len(shas) == 2
    engine = Engine.from_env(env)
    assert {r["archive_sha256"] for r in backups_of(engine, WEDDING)} == shas
    assert_intact_and_serialised(engine, WEDDING, 2)
