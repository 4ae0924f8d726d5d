"""The catalogue's key store: one live key per wedding, wrapped by the master key, bound to its wedding."""
from __future__ import annotations

import psycopg
import pytest

from wedbackup_dagster.core.catalogue.store import BackupRecord, Catalogue
from wedbackup_dagster.core.errors import CryptoKeyError
from wedbackup_dagster.core.keys.keyring import MasterKeyring, SecretKey


@pytest.fixture
def catalogue(make_database) -> Catalogue:
    cat = Catalogue(make_database())
    cat.migrate()
    cat.migrate()  # twice is harmless
    return cat


def test_wedding_key_is_created_once_and_reopened(catalogue):
    ring = MasterKeyring([SecretKey.generate("m1")])
    k1 = catalogue.wedding_key("42", ring)
    k2 = catalogue.wedding_key("42", ring)
    assert k1 == k2 and k1.key_id.startswith("42.")
    assert catalogue.key_by_id(k1.key_id, ring) == k1
    assert catalogue.wedding_key("43", ring) != k1
    with catalogue.connect() as conn:
        stored = conn.execute("SELECT wrapped FROM wedbackup.wedding_keys WHERE key_id = %s",
                              (k1.key_id,)).fetchone()["wrapped"]
    assert k1.material not in bytes(stored)


def test_wrong_master_key_cannot_open(catalogue):
    k = catalogue.wedding_key("42", MasterKeyring([SecretKey.generate("m1")]))
    with pytest.raises(CryptoKeyError):
        catalogue.key_by_id(k.key_id, MasterKeyring([SecretKey.generate("m1")]))
    with pytest.raises(CryptoKeyError, match="m1"):
        catalogue.key_by_id(k.key_id, MasterKeyring([SecretKey.generate("m2")]))


def test_wrapped_key_moved_to_another_wedding_does_not_open(catalogue):
    ring = MasterKeyring([SecretKey.generate("m1")])
    a = catalogue.wedding_key("1", ring)
    b = catalogue.wedding_key("2", ring)
    with catalogue.connect() as conn:
        conn.execute("UPDATE wedbackup.wedding_keys SET wrapped = (SELECT wrapped FROM wedbackup.wedding_keys "
                     "WHERE key_id = %s) WHERE key_id = %s", (a.key_id, b.key_id))
    with pytest.raises(CryptoKeyError):
        catalogue.key_by_id(b.key_id, ring)


def test_unknown_key_id(catalogue):
    with pytest.raises(CryptoKeyError, match="nope"):
        catalogue.key_by_id("nope", MasterKeyring([SecretKey.generate("m1")]))


def test_backups_by_sha_reads_many_with_or_without_their_manifests(catalogue):
    manifest = {"snapshot_time": "2026-01-02T03:04:05+00:00", "txid": "7", "schema_fingerprint": "f" * 64,
                "tables": [{"schema": "public", "name": "guests", "rows": 3, "bytes": 30}]}
    recorded = [catalogue.record_backup(partition=str(n), archive_sha256=f"{n:064x}", size=100 + n,
                                        key_id=f"{n}.k", manifest=manifest) for n in (1, 2)]
    wanted = [b.archive_sha256 for b in recorded] + ["0" * 64]  # the last is unknown: absent
    full = catalogue.backups_by_sha(wanted)
    light = catalogue.backups_by_sha(wanted, manifests=False)
    assert sorted(full) == sorted(light) == sorted(b.archive_sha256 for b in recorded)
    for b in recorded:
        assert full[b.archive_sha256] == b and full[b.archive_sha256].manifest["tables"] == manifest["tables"]
        assert light[b.archive_sha256].manifest == {}
        assert light[b.archive_sha256] == BackupRecord(**{**vars(b), "manifest": {}})


def _manifest(rows: int) -> dict:
    return {"snapshot_time": "2026-12-01T10:00:00+00:00", "txid": "7", "schema_fingerprint": "f",
            "tables": [{"table": "public.guests", "rows": rows, "bytes": 10 * rows, "sha256": "0" * 64}]}


def _vault_copy(sha: str) -> dict:
    return dict(provider="vault", uri=f"file:///v/{sha}.wbk", object_key=f"{sha}.wbk", version_id=None, size=9,
                checksum=sha, storage_class="local-disk", region=None, media="disk", offsite=False)


def test_a_batch_of_backups_is_recorded_as_one_by_one_and_read_back_in_batches(catalogue):
    """record_backups (a snapshot batch, one transaction) records what record_backup records: the backup,
    its audit row and its vault copy; restore_counts and copies_of answer as restore_count and copies."""
    one = catalogue.record_backup(partition="1", archive_sha256="a" * 64, size=9, key_id="1.k",
                                  manifest=_manifest(3), vault_copy=_vault_copy("a" * 64))
    many = catalogue.record_backups([
        dict(partition=p, archive_sha256=c * 64, size=9, key_id=f"{p}.k", manifest=_manifest(int(p)),
             vault_copy=_vault_copy(c * 64)) for p, c in (("2", "b"), ("3", "c"))])
    assert [b.partition for b in many] == ["2", "3"]
    assert catalogue.latest_backups(["1", "2", "3"]) == {"1": one, "2": many[0], "3": many[1]}
    # Without their manifests (the upload step): the same records, each manifest left empty.
    assert catalogue.latest_backups(["1", "2", "3", "4"], manifests=False) == {
        p: BackupRecord(**{**vars(b), "manifest": {}}) for p, b in (("1", one), ("2", many[0]), ("3", many[1]))}
    copies = catalogue.copies_of([one.id, *(b.id for b in many)])
    assert {i: c for i, c in copies.items()} == {b.id: catalogue.copies(b.id) for b in (one, *many)}
    assert all([c.provider for c in cs] == ["vault"] for cs in copies.values())
    with catalogue.connect() as conn:
        audited = conn.execute("SELECT partition FROM wedbackup.audit WHERE action = 'backup' ORDER BY id").fetchall()
    assert [r["partition"] for r in audited] == ["1", "2", "3"]
    catalogue.record_restores([(many[0].id, "vault", True, 0.1, {}), (many[0].id, "vault", False, 0.1, {}),
                               (one.id, "vault", True, 0.1, {})])
    assert catalogue.restore_counts([one.id, *(b.id for b in many)]) == {one.id: 1, many[0].id: 2}
    assert [catalogue.restore_count(b.id) for b in (one, *many)] == [1, 2, 0]


def test_a_batch_of_backups_is_all_or_none(catalogue):
    with pytest.raises(Exception):
        catalogue.record_backups([
            dict(partition="1", archive_sha256="a" * 64, size=9, key_id="1.k", manifest=_manifest(1),
                 vault_copy=_vault_copy("a" * 64)),
            dict(partition="2", archive_sha256="b" * 64, size=9, key_id="2.k", manifest={"tables": []},
                 vault_copy=_vault_copy("b" * 64))])  # no snapshot_time: the second fails
    assert catalogue.latest_backups(["1", "2"]) == {}
    # Refused by the server after the backups' rows came back (the statements are pipelined): none either.
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        catalogue.record_backups([
            dict(partition="1", archive_sha256="a" * 64, size=9, key_id="1.k", manifest=_manifest(1),
                 vault_copy=_vault_copy("a" * 64)),
            dict(partition="2", archive_sha256="b" * 64, size=9, key_id="2.k", manifest=_manifest(1),
                 vault_copy={**_vault_copy("b" * 64), "size": "nine"})])
    assert catalogue.latest_backups(["1", "2"]) == {}
    with catalogue.connect() as conn:
        assert conn.execute("SELECT count(*) AS n FROM wedbackup.audit WHERE action = 'backup'").fetchone()["n"] == 0
        assert conn.execute("SELECT count(*) AS n FROM wedbackup.copies").fetchone()["n"] == 0
    assert [b.partition for b in catalogue.record_backups([  # and the connection is fit for the next batch
        dict(partition="1", archive_sha256="a" * 64, size=9, key_id="1.k", manifest=_manifest(1),
             vault_copy=_vault_copy("a" * 64))])] == ["1"]


def test_keys_read_in_a_batch_leave_out_an_erased_wedding_whose_key_is_not_shredded_yet(catalogue):
    """keys_by_id (batch verification, archive integrity, restore --all) hands over no key that key_by_id
    would refuse: an erasure that has begun stops the wedding's key from being used, shredded or not."""
    ring = MasterKeyring([SecretKey.generate("m1")])
    a, b = catalogue.wedding_key("1", ring), catalogue.wedding_key("2", ring)
    assert catalogue.keys_by_id([a.key_id, b.key_id], ring) == {a.key_id: a, b.key_id: b}
    catalogue.begin_erasure("1", "1", "tests")
    assert catalogue.keys_by_id([a.key_id, b.key_id], ring) == {b.key_id: b}
    with pytest.raises(CryptoKeyError, match="erased"):
        catalogue.key_by_id(a.key_id, ring)


def test_live_keys_read_in_a_batch_are_wedding_key_and_leave_out_what_it_would_make_or_refuse(catalogue):
    ring = MasterKeyring([SecretKey.generate("m1")])
    a, b, c = (catalogue.wedding_key(p, ring) for p in ("1", "2", "3"))
    catalogue.begin_erasure("3", "3", "tests")
    # "4" has no key yet (wedding_key makes it), "3" is being erased (wedding_key refuses it).
    assert catalogue.live_wedding_keys(["1", "2", "3", "4"], ring) == {"1": a, "2": b}
    with catalogue.connect() as conn:
        made = conn.execute("SELECT count(*) AS n FROM wedbackup.wedding_keys WHERE partition = '4'").fetchone()
    assert made["n"] == 0
    # A key that does not unwrap under this keyring is left to wedding_key, which names it.
    assert catalogue.live_wedding_keys(["1"], MasterKeyring([SecretKey.generate("m2")])) == {}
    assert c.key_id.startswith("3.")


def _live_keys(catalogue: Catalogue) -> dict[str, int]:
    with catalogue.connect() as conn:
        rows = conn.execute("SELECT partition, count(*) AS n FROM wedbackup.wedding_keys WHERE shredded_at IS NULL "
                            "GROUP BY partition").fetchall()
    return {r["partition"]: r["n"] for r in rows}


def test_keys_made_in_a_batch_are_wedding_key_and_an_erased_wedding_is_refused_by_name(catalogue):
    """wedding_keys (a snapshot batch's first backups, one transaction): the keys wedding_key reads back,
    wrapped by the current master key and awaiting the key-store backup; an erased wedding of the batch is
    refused naming it while the others get their keys."""
    ring = MasterKeyring([SecretKey.generate("m1")])
    old = catalogue.wedding_key("1", ring)
    catalogue.begin_erasure("3", "3", "dpo@example.org")
    keys = catalogue.wedding_keys(["1", "2", "3", "4", "2"], ring)
    assert list(keys) == ["1", "2", "3", "4"]
    assert keys["1"] == old
    assert isinstance(keys["3"], CryptoKeyError) and "wedding 3 was erased" in str(keys["3"])
    assert "dpo@example.org" in str(keys["3"])
    for p in ("2", "4"):
        assert isinstance(keys[p], SecretKey) and keys[p].key_id.startswith(f"{p}.")
        assert catalogue.wedding_key(p, ring) == keys[p] == catalogue.key_by_id(keys[p].key_id, ring)
    assert keys["2"] != keys["4"]
    assert _live_keys(catalogue) == {"1": 1, "2": 1, "4": 1}
    with catalogue.connect() as conn:
        rows = conn.execute("SELECT partition, wrapped, master_key_id, key_backup_at FROM wedbackup.wedding_keys "
                            "WHERE partition IN ('2', '4')").fetchall()
    for r in rows:
        assert r["master_key_id"] == "m1" and r["key_backup_at"] is None
        assert keys[r["partition"]].material not in bytes(r["wrapped"])
    with pytest.raises(CryptoKeyError, match="m1"):  # wrapped by the master key: another one cannot open it
        catalogue.key_by_id(keys["2"].key_id, MasterKeyring([SecretKey.generate("m2")]))
    assert catalogue.wedding_keys(["2", "4"], ring) == {"2": keys["2"], "4": keys["4"]}  # nothing made twice


def test_a_second_spelling_in_a_batch_is_refused_naming_the_wedding_that_has_backups(catalogue):
    ring = MasterKeyring([SecretKey.generate("m1")])
    seven = catalogue.wedding_key("7", ring)
    catalogue.record_backup(partition="7", archive_sha256="7" * 64, size=9, key_id=seven.key_id,
                            manifest=_manifest(1))
    keys = catalogue.wedding_keys(["007", "8", "0008"], ring)
    assert isinstance(keys["007"], CryptoKeyError)
    assert "'007' is another spelling of wedding '7'" in str(keys["007"])
    # "8" has no backup yet: its first key is made, and so is one for "0008", as wedding_key would.
    assert isinstance(keys["8"], SecretKey) and isinstance(keys["0008"], SecretKey)
    assert "007" not in _live_keys(catalogue)
    # A uuid id in another letter case, and a negative id with leading zeros, the same way.
    uuid_id = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
    for partition in (uuid_id, "-7"):
        key = catalogue.wedding_key(partition, ring)
        catalogue.record_backup(partition=partition, archive_sha256=f"{len(partition):064x}", size=9,
                                key_id=key.key_id, manifest=_manifest(1))
    keys = catalogue.wedding_keys([uuid_id.upper(), "-0007", "70", "-70"], ring)
    assert f"is another spelling of wedding {uuid_id!r}" in str(keys[uuid_id.upper()])
    assert "is another spelling of wedding '-7'" in str(keys["-0007"])
    assert isinstance(keys["70"], SecretKey) and isinstance(keys["-70"], SecretKey)
    for partition in (uuid_id.upper(), "-0007"):  # what wedding_key says alone
        with pytest.raises(CryptoKeyError, match="another spelling"):
            catalogue.wedding_key(partition, ring)


def test_two_batches_making_the_same_weddings_keys_at_once_end_with_one_key_each(catalogue):
    """Two runs (two connections) making overlapping batches' first keys at the same time, in opposite
    orders: every wedding ends with one live key, and both runs hand out that key."""
    import threading

    ring = MasterKeyring([SecretKey.generate("m1")])
    weddings = [str(n) for n in range(1, 201)]
    barrier = threading.Barrier(3)
    got: list[dict] = []

    def make(order: list[str]) -> None:
        cat = Catalogue(catalogue.dsn)
        try:
            barrier.wait()
            for _ in range(3):
                got.append(cat.wedding_keys(order, ring))
        finally:
            cat.close()

    threads = [threading.Thread(target=make, args=(weddings,)), threading.Thread(target=make, args=(weddings[::-1],)),
               threading.Thread(target=make, args=(weddings[50:150],))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and len(got) == 9
    assert _live_keys(catalogue) == {w: 1 for w in weddings}
    for keys in got:
        for p, key in keys.items():
            assert key == catalogue.wedding_key(p, ring), p
