"""Master key rotation on the real stack: archives made before rotation still restore once the old master
key is retired; rotation is idempotent and survives a crash half-way; `key_status` tells which key wraps
what and when retiring is safe, and shows no key material."""
from __future__ import annotations

import base64
import json

import psycopg
import pytest

from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.errors import CryptoKeyError
from wedbackup_dagster.core.keys.backup import refresh_key_backups
from wedbackup_dagster.core.keys.rotation import key_status, rotate_master_key
from wedbackup_dagster.core.keys.keyring import MasterKeyring, SecretKey

from wedbackup_dagster_tests.core.keys.test_backup import back_up, engine, replicas_of  # noqa: F401 - the engine fixture

PARTITIONS = ["1", "2", "3", "4"]


def ring_text(*keys: SecretKey) -> str:
    return ",".join(f"{k.key_id}:{base64.b64encode(k.material).decode()}" for k in keys)


def wrapped_by(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT partition, master_key_id FROM wedbackup.wedding_keys").fetchall())


def test_rotate_then_retire_the_old_master_key_and_every_archive_still_restores(engine):
    replicas = replicas_of(engine)
    back_up(engine, PARTITIONS, replicas)
    old = engine.keyring.current
    dsn = engine.settings.catalogue_dsn
    archives = {p: engine.catalogue.latest_backup(p).archive_sha256 for p in PARTITIONS}
    with psycopg.connect(dsn) as conn:
        wedding_keys_before = conn.execute("SELECT key_id FROM wedbackup.wedding_keys ORDER BY 1").fetchall()
    refresh_key_backups(engine.settings, engine.catalogue, replicas, engine.keyring)

    new = SecretKey.generate("master-new")
    both = MasterKeyring([new, old])
    before = key_status(engine.catalogue, both)
    uses = {m.master_key_id: m for m in before.masters}
    assert uses[old.key_id].wedding_keys == 4 and not uses[old.key_id].retire_safe
    assert uses["master-new"].current and uses["master-new"].wedding_keys == 0

    report = rotate_master_key(engine.catalogue, both)
    assert report.rewrapped == {old.key_id: 4} and report.total == 4
    assert set(wrapped_by(dsn).values()) == {"master-new"}
    assert rotate_master_key(engine.catalogue, both).total == 0  # idempotent
    # The key backup is still sealed with the old key: not safe to retire until it is replaced.
    assert not {m.master_key_id: m for m in key_status(engine.catalogue, both).masters}[old.key_id].retire_safe
    refresh_key_backups(engine.settings, engine.catalogue, replicas, both)
    after = {m.master_key_id: m for m in key_status(engine.catalogue, both).masters}
    assert after[old.key_id].retire_safe and after[old.key_id].wedding_keys == 0
    assert after[old.key_id].key_backups == 0

    # Retired: a keyring without the old master key. Same wedding keys, same archives, every one restores.
    retired = MasterKeyring([new])
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT key_id FROM wedbackup.wedding_keys ORDER BY 1").fetchall() == wedding_keys_before
    rotated = Engine(engine.settings, retired, Catalogue(dsn))
    for partition in PARTITIONS:
        assert rotated.catalogue.latest_backup(partition).archive_sha256 == archives[partition]
        outcome = rotated.verify(partition, replicas, provider="s3" if partition != "4" else "vault")
        assert outcome.tables
    status = key_status(rotated.catalogue, retired)
    assert status.unreadable == {} and status.backup_current
    shown = json.dumps(status.to_dict(), default=str) + "\n".join(status.lines())
    for key in (old, new):
        assert base64.b64encode(key.material).decode() not in shown and key.material.hex() not in shown


def test_a_crash_half_way_leaves_every_key_readable_and_a_rerun_finishes(engine):
    replicas = replicas_of(engine)
    back_up(engine, PARTITIONS, replicas)
    old, new = engine.keyring.current, SecretKey.generate("master-b")
    both = MasterKeyring([new, old])
    seen = []

    def crash(done: int) -> None:
        seen.append(done)
        if done >= 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        rotate_master_key(engine.catalogue, both, batch_size=1, progress=crash)
    dsn = engine.settings.catalogue_dsn
    halfway = wrapped_by(dsn)
    assert sorted(halfway.values()) == sorted([old.key_id] * 2 + ["master-b"] * 2)
    catalogue = Catalogue(dsn)
    with psycopg.connect(dsn) as conn:
        key_ids = [r[0] for r in conn.execute("SELECT key_id FROM wedbackup.wedding_keys").fetchall()]
    for key_id in key_ids:
        catalogue.key_by_id(key_id, both)  # every key opens with the keyring of the rotation

    # Without the old master key some keys cannot be read: status says so, and rotation refuses to start.
    only_new = MasterKeyring([new])
    status = key_status(catalogue, only_new)
    assert status.unreadable == {old.key_id: 2}
    with pytest.raises(CryptoKeyError, match=rf"{old.key_id} \(2 keys\)"):
        rotate_master_key(catalogue, only_new)

    report = rotate_master_key(catalogue, both)
    assert report.total == 2 and report.already_current == 2
    assert set(wrapped_by(dsn).values()) == {"master-b"}
    for key_id in key_ids:
        catalogue.key_by_id(key_id, only_new)
    with psycopg.connect(dsn) as conn:
        audits = conn.execute("SELECT detail FROM wedbackup.audit WHERE action = 'key-rotation'").fetchall()
    assert [a[0]["total"] for a in audits] == [2]
