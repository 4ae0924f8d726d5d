"""Erasure against key creation on the real catalogue: an erasure that starts while a wedding's first key is
being made still shreds that key, and an erased wedding's existing key is never read again (issue 14,
defect 5). The interleaving is forced with a trigger that parks the key's INSERT on an advisory lock the
test holds, and by waiting for server-side lock waits, never by sleeping."""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.errors import CryptoKeyError
from wedbackup_dagster.core.keys.keyring import MasterKeyring, SecretKey

GATE = 914_014  # the advisory lock the parked INSERT waits for


@pytest.fixture
def catalogue(make_database) -> Catalogue:
    cat = Catalogue(make_database())
    cat.migrate()
    return cat


def wait_for(condition, what: str, limit: float = 30.0) -> None:
    """Poll a server-side state (a lock wait, a finished thread); the limit only guards against a hang."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def lock_waiters(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                            ).fetchone()[0]


@contextlib.contextmanager
def parked_key_inserts(dsn: str) -> Iterator[psycopg.Connection]:
    """Every INSERT into wedding_keys parks (a trigger waits for the advisory lock GATE, which the yielded
    admin connection holds) until the test unlocks GATE; the trigger is dropped afterwards."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"""CREATE FUNCTION wedbackup.park() RETURNS trigger LANGUAGE plpgsql AS $$
                          BEGIN PERFORM pg_advisory_xact_lock({GATE}); RETURN NEW; END $$""")
        admin.execute("CREATE TRIGGER park BEFORE INSERT ON wedbackup.wedding_keys "
                      "FOR EACH ROW EXECUTE FUNCTION wedbackup.park()")
        admin.execute("SELECT pg_advisory_lock(%s)", (GATE,))
        try:
            yield admin
        finally:
            admin.execute("SELECT pg_advisory_unlock_all()")
            admin.execute("DROP TRIGGER park ON wedbackup.wedding_keys")


def erasing(dsn: str, partition: str) -> tuple[threading.Thread, threading.Event]:
    """An erasure of `partition` (begun, then its key shredded) started in a thread; the event is set once
    it has finished."""
    erased = threading.Event()

    def erase():
        eraser = Catalogue(dsn)
        eraser.begin_erasure(partition, partition, "test")
        eraser.shred_wedding_key(partition)
        eraser.close()
        erased.set()

    thread = threading.Thread(target=erase)
    thread.start()
    return thread, erased


def test_an_erasure_racing_the_first_key_shreds_it(catalogue):
    dsn = catalogue.dsn
    ring = MasterKeyring([SecretKey.generate("m1")])
    with parked_key_inserts(dsn) as admin:
        made: dict = {}

        def make_key():
            try:
                made["key"] = Catalogue(dsn).wedding_key("7", ring)
            except Exception as exc:  # noqa: BLE001 - reported by the assertions below
                made["error"] = exc

        maker = threading.Thread(target=make_key)
        maker.start()
        # The key maker has checked for an erasure and is parked inside its INSERT.
        wait_for(lambda: lock_waiters(dsn) == 1, "the key's INSERT to park")

        eraser, erased = erasing(dsn, "7")
        # Either the erasure waits for the key being made (serialised), or it ran straight through (the race).
        wait_for(lambda: erased.is_set() or lock_waiters(dsn) == 2, "the erasure to finish or wait")
        admin.execute("SELECT pg_advisory_unlock(%s)", (GATE,))
        maker.join(30)
        eraser.join(30)
    assert not maker.is_alive() and not eraser.is_alive()
    with psycopg.connect(dsn) as conn:
        live = conn.execute("SELECT count(*) FROM wedbackup.wedding_keys WHERE partition = '7' "
                            "AND wrapped IS NOT NULL").fetchone()[0]
    assert live == 0, "an erasure that began while the key was being made left that key alive"
    with pytest.raises(CryptoKeyError, match="wedding 7 was erased"):
        catalogue.wedding_key("7", ring)


def test_an_erased_weddings_existing_key_is_not_read(catalogue):
    ring = MasterKeyring([SecretKey.generate("m1")])
    key = catalogue.wedding_key("8", ring)
    # The erasure is recorded but has not shredded yet (or a restored catalogue got the key back).
    catalogue.begin_erasure("8", "8", "dpo@example.org")
    with pytest.raises(CryptoKeyError, match=r"wedding 8 was erased .*dpo@example.org"):
        catalogue.wedding_key("8", ring, create=False)
    with pytest.raises(CryptoKeyError, match="wedding 8 was erased"):
        catalogue.key_by_id(key.key_id, ring)
    assert catalogue.wedding_key("9", ring).key_id.startswith("9.")  # other weddings are untouched


def test_an_erasure_racing_a_batch_of_first_keys_shreds_that_weddings_key_only(catalogue):
    """The same race against Catalogue.wedding_keys (a snapshot batch's first keys, one transaction): the
    erasure of one wedding of the batch waits for the batch's key lock, then shreds that wedding's key;
    the batch's other weddings keep theirs."""
    dsn = catalogue.dsn
    ring = MasterKeyring([SecretKey.generate("m1")])
    with parked_key_inserts(dsn) as admin:
        made: dict = {}

        def make_keys():
            try:
                made["keys"] = Catalogue(dsn).wedding_keys(["6", "7", "8"], ring)
            except Exception as exc:  # noqa: BLE001 - reported by the assertions below
                made["error"] = exc

        maker = threading.Thread(target=make_keys)
        maker.start()
        wait_for(lambda: lock_waiters(dsn) == 1, "the batch's INSERT to park")
        eraser, erased = erasing(dsn, "7")
        # The erasure waits for the batch's key lock on wedding 7 (it cannot have run straight through).
        wait_for(lambda: lock_waiters(dsn) == 2, "the erasure to wait for the batch")
        assert not erased.is_set()
        admin.execute("SELECT pg_advisory_unlock(%s)", (GATE,))
        maker.join(30)
        eraser.join(30)
    assert not maker.is_alive() and not eraser.is_alive() and "error" not in made
    with psycopg.connect(dsn) as conn:
        live = dict(conn.execute("SELECT partition, count(*) FROM wedbackup.wedding_keys WHERE wrapped IS NOT NULL "
                                 "GROUP BY partition").fetchall())
    assert live == {"6": 1, "8": 1}, "an erasure that began while the batch made the key left that key alive"
    with pytest.raises(CryptoKeyError, match="wedding 7 was erased"):
        _raise(catalogue.wedding_keys(["7"], ring)["7"])


def _raise(result):
    if isinstance(result, Exception):
        raise result
    return result
