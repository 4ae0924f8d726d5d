"""The catalogue's key store: one live key per wedding, wrapped by the master key, bound to its wedding."""
from __future__ import annotations

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
