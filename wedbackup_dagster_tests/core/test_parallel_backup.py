"""Snapshot and seal in worker processes (core/parallel_backup.py), on the real stack: every wedding gets
the archive the step's own process would have sealed (same rows and SHA-256 per table, its own key, a
catalogue record, restorable), a bad wedding is named alone, a busy wedding is backed up once its lock is
free, and the setting is validated."""
from __future__ import annotations

import os

import pytest

from wedbackup_dagster.core.config import Settings, snapshot_workers_from
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.errors import ConfigError, UnknownWeddingError, WedbackupError


@pytest.fixture
def env(demo_env):
    demo_env(weddings=14, seed=11, document_bytes=256)
    return dict(os.environ)


def _engine(env, workers: int, batch: int = 4) -> Engine:
    engine = Engine.from_env({**env, "WEDBACKUP_SNAPSHOT_WORKERS": str(workers)})
    engine.batch_size = batch
    return engine


def _tables(manifest):
    return [(t["name"], t["rows"], t["sha256"]) for t in manifest["tables"]]


def test_weddings_sealed_in_workers_are_what_the_steps_own_process_seals(env):
    weddings = [str(i) for i in range(1, 15)]
    parallel = _engine(env, workers=2)
    assert parallel.settings.snapshot_workers == 2
    with parallel.snapshot_session() as session:
        ours = dict(parallel.back_up_each(["platform", *weddings, "999999"], session))
    # Every partition once; the unknown wedding named alone, the others all sealed.
    assert sorted(ours) == sorted(["platform", *weddings, "999999"])
    assert isinstance(ours["999999"], WedbackupError) and "999999" in str(ours["999999"])
    assert isinstance(ours["999999"], UnknownWeddingError)
    failed = {k: v for k, v in ours.items() if isinstance(v, Exception)}
    assert list(failed) == ["999999"], failed
    # Each worker's archive is the wedding's newest backup in the catalogue, and restores against its manifest.
    for wedding in weddings:
        assert parallel.catalogue.latest_backup(wedding).archive_sha256 == ours[wedding].stats.sha256
    assert parallel.verify("7", {}, provider="vault").tables
    # The same rows and SHA-256 per table as the step's own process takes (one process, same batches).
    alone = _engine(env, workers=1)
    with alone.snapshot_session() as session:
        theirs = dict(alone.back_up_each(weddings, session))
    for wedding in weddings:
        assert _tables(ours[wedding].manifest) == _tables(theirs[wedding].manifest)
        assert ours[wedding].stats.key_id.startswith(f"{wedding}.")
        assert ours[wedding].vault.path.exists()


def test_a_busy_wedding_is_backed_up_alone_once_its_lock_is_free(env):
    import threading

    engine = _engine(env, workers=2)
    other = Engine.from_env(env)
    holding = threading.Event()
    release = threading.Event()

    def hold():
        from wedbackup_dagster.core.catalogue.locks import partition_lock

        with partition_lock(other.catalogue, "6", purpose="restore"):
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(30)
    threading.Timer(3.0, release.set).start()
    try:
        with engine.snapshot_session() as session:
            outcomes = dict(engine.back_up_each([str(i) for i in range(1, 15)], session))
    finally:
        release.set()
        holder.join()
    assert not [k for k, v in outcomes.items() if isinstance(v, Exception)]
    assert outcomes["6"].manifest["partition"] == "6"


@pytest.mark.parametrize("text", ["0", "17", "two", "-1"])
def test_a_bad_worker_count_names_the_setting(text):
    with pytest.raises(ConfigError, match="WEDBACKUP_SNAPSHOT_WORKERS"):
        snapshot_workers_from({"WEDBACKUP_SNAPSHOT_WORKERS": text})


def test_the_default_is_one_more_than_the_cores_at_most_four():
    assert snapshot_workers_from({}) == max(1, min(4, (os.cpu_count() or 1) + 1))
    assert snapshot_workers_from({"WEDBACKUP_SNAPSHOT_WORKERS": "1"}) == 1
    assert Settings.__dataclass_fields__["snapshot_workers"].default == 1


def test_weddings_verified_in_workers_get_the_verdicts_of_the_steps_own_process(env):
    weddings = [str(i) for i in range(1, 15)]
    engine = _engine(env, workers=2)
    engine.verify_min_share = 4
    with engine.snapshot_session() as session:
        sealed = dict(engine.back_up_each(weddings, session))
    # One wedding's vault copy corrupted: a flipped byte in the middle of its archive.
    path = sealed["9"].vault.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    ours = dict(engine.verify_each(weddings, {}, provider="vault", workers=2))
    theirs = dict(engine.verify_each(weddings, {}, provider="vault"))
    assert sorted(ours, key=int) == weddings
    assert [k for k, v in ours.items() if isinstance(v, Exception)] == ["9"]
    assert isinstance(ours["9"], WedbackupError) and "9" in str(ours["9"])
    assert type(ours["9"]).__name__ == type(theirs["9"]).__name__ and str(ours["9"]) == str(theirs["9"])
    for wedding in weddings:
        if wedding == "9":
            continue
        # Each wedding checked table by table against its own manifest, as in the step's own process.
        assert ours[wedding].tables == theirs[wedding].tables and ours[wedding].tables
        assert ours[wedding].fk_checked == theirs[wedding].fk_checked


def test_verification_shares_fill_whole_rounds_of_workers():
    """No share is left to run alone after the others: shares of at most verify_batch_size, as many as
    make whole rounds of the workers."""
    from wedbackup_dagster.core.engine import Engine

    engine = Engine.__new__(Engine)  # verify_share reads only the class's sizes
    for weddings, workers in [(2001, 3), (2000, 3), (1000, 3), (500, 3), (100, 2), (4000, 4), (1501, 3)]:
        share = engine.verify_share(weddings, workers)
        shares = -(-weddings // share)
        assert share <= engine.verify_batch_size and share >= engine.verify_min_share
        assert shares % workers == 0 or shares < workers or weddings < workers * engine.verify_min_share, \
            (weddings, workers, share)
    assert engine.verify_share(2001, 3) == 334 and engine.verify_share(1000, 3) == 334
    assert engine.verify_share(500, 3) == 167  # as before for a run that fits one round


def test_workers_take_the_steps_environment_not_the_one_their_fork_server_started_with(env, tmp_path, monkeypatch):
    """Workers are forked from one fork server per process, started with the environment of the first step
    that used it; each later step's workers must still take that step's settings (here: another vault)."""
    from wedbackup_dagster.core import parallel_backup

    weddings = [str(i) for i in range(1, 11)]
    first = _engine(env, workers=2)
    with first.snapshot_session() as session:
        assert not [k for k, v in first.back_up_each(weddings[:5], session) if isinstance(v, Exception)]
    assert parallel_backup.worker_context().get_start_method() == "forkserver"
    moved = tmp_path / "another-vault"
    monkeypatch.setenv("WEDBACKUP_VAULT_DIR", str(moved))
    second = _engine(dict(os.environ), workers=2)
    with second.snapshot_session() as session:
        outcomes = dict(second.back_up_each(weddings, session))
    assert not [k for k, v in outcomes.items() if isinstance(v, Exception)]
    assert all(o.vault.path.is_relative_to(moved) and o.vault.path.exists() for o in outcomes.values())


def test_the_upload_workers_default_to_the_snapshot_workers_and_are_checked_like_them(env):
    assert Settings.from_env({**env, "WEDBACKUP_SNAPSHOT_WORKERS": "3"}).upload_workers == 3
    both = {**env, "WEDBACKUP_SNAPSHOT_WORKERS": "3", "WEDBACKUP_UPLOAD_WORKERS": "1"}
    assert Settings.from_env(both).upload_workers == 1 and Settings.from_env(both).snapshot_workers == 3
    unset = {k: v for k, v in env.items() if not k.endswith("_WORKERS")}
    assert Settings.from_env(unset).upload_workers == snapshot_workers_from({})
    with pytest.raises(ConfigError, match="WEDBACKUP_UPLOAD_WORKERS"):
        Settings.from_env({**env, "WEDBACKUP_UPLOAD_WORKERS": "17"})


def _dies_on_share(partitions: list[str], die: bool) -> list[tuple[str, str]]:
    """A share's work in a worker: the worker process dies at once (as if killed) on a marked share."""
    if die:
        os._exit(9)
    return [(p, "done") for p in partitions]


def test_every_worker_of_a_pool_is_started_before_any_share_is_handed_out(env):
    """No submit spawns a worker: a worker dying while submits still spawned others could hang the pool's
    teardown forever (CPython joins a worker it spawned while terminating the broken pool)."""
    import multiprocessing

    from wedbackup_dagster.core import parallel_backup

    before = {p.pid for p in multiprocessing.active_children()}
    with parallel_backup._started_pool(Engine, 3) as pool:
        started = {p.pid for p in multiprocessing.active_children()} - before
        assert len(started) == 3
        assert pool.submit(os.getpid).result(timeout=60) in started


def test_a_worker_that_dies_on_its_first_share_fails_the_shares_by_name_and_the_pool_ends(env):
    """The first share handed out kills its worker while the rest are still being handed out: every share
    the broken pool did not finish is named by its weddings, and the step goes on (no hang at teardown)."""
    from wedbackup_dagster.core import parallel_backup

    for attempt in range(5):  # the death lands at a different moment of the hand-out each time
        shares = [([f"w{attempt}-{i}-{j}" for j in range(3)], i == 0) for i in range(40)]
        outcomes = dict(parallel_backup._in_workers(Engine, 2, _dies_on_share, shares, "backup"))
        assert set(outcomes) == {p for partitions, _ in shares for p in partitions}
        for partition in shares[0][0]:
            assert isinstance(outcomes[partition], WedbackupError)
            assert f"wedding {partition}: its backup worker failed" in str(outcomes[partition])
        assert all(o == "done" or isinstance(o, WedbackupError) for o in outcomes.values())
