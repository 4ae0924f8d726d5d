"""Master key rotation on the real stack: archives made before rotation still restore once the old master
key is retired; rotation is idempotent and survives a crash half-way; `key_status` tells which key wraps
what and when retiring is safe, and shows no key material."""
from __future__ import annotations

import base64
import json
import os

import psycopg
import pytest

from wedbackup_dagster import cli
from wedbackup_dagster.core.catalogue import Catalogue
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.errors import KeyError_
from wedbackup_dagster.core.keybackup import refresh_key_backups
from wedbackup_dagster.core.keyrotation import key_status, rotate_master_key
from wedbackup_dagster.core.keys import MasterKeyring, SecretKey

from .test_keybackup import back_up, engine, replicas_of  # noqa: F401 - the engine fixture

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
    with pytest.raises(KeyError_, match=rf"{old.key_id} \(2 keys\)"):
        rotate_master_key(catalogue, only_new)

    report = rotate_master_key(catalogue, both)
    assert report.total == 2 and report.already_current == 2
    assert set(wrapped_by(dsn).values()) == {"master-b"}
    for key_id in key_ids:
        catalogue.key_by_id(key_id, only_new)
    with psycopg.connect(dsn) as conn:
        audits = conn.execute("SELECT detail FROM wedbackup.audit WHERE action = 'key-rotation'").fetchall()
    assert [a[0]["total"] for a in audits] == [2]


def test_cli_keys_status_rotate_backup_show_no_key_material(engine, capsys, monkeypatch):
    replicas = replicas_of(engine)
    back_up(engine, ["1", "2"], replicas)
    old = engine.keyring.current
    dsn = engine.settings.catalogue_dsn
    with psycopg.connect(dsn) as conn:
        wrapped = [bytes(r[0]) for r in conn.execute("SELECT wrapped FROM wedbackup.wedding_keys").fetchall()]
    wedding_keys = [engine.catalogue.wedding_key(p, engine.keyring, create=False).material for p in ("1", "2")]
    secrets = [base64.b64encode(m).decode() for m in [old.material, *wedding_keys, *wrapped]]

    assert cli.main(["keys", "status"]) == 0
    out = capsys.readouterr().out
    assert "key backup: NONE" in out and f"current: {old.key_id}" in out
    assert cli.main(["keys", "backup"]) == 0
    out = capsys.readouterr().out
    assert "2 wedding key(s)" in out and all(p in out for p in ("vault", "s3", "gcs", "azure"))
    assert cli.main(["keys", "backup"]) == 0
    assert "kept: unchanged" in capsys.readouterr().out

    new = SecretKey.generate("master-cli")
    secrets.append(base64.b64encode(new.material).decode())
    monkeypatch.setenv("WEDBACKUP_MASTER_KEY", ring_text(new, old))
    assert cli.main(["keys", "rotate"]) == 0
    out = capsys.readouterr().out
    assert f"2 wedding key(s) moved from {old.key_id}" in out and "older key backup(s) deleted" in out
    assert cli.main(["keys", "status"]) == 0
    out = capsys.readouterr().out
    assert "safe to retire" in out and "up to date" in out
    assert cli.main(["keys", "status", "--json"]) == 0
    raw = capsys.readouterr().out
    status = json.loads(raw)
    assert {m["master_key_id"]: m["retire_safe"] for m in status["masters"]} == {"master-cli": False,
                                                                                old.key_id: True}
    assert status["newest_backup"]["master_key_id"] == "master-cli"
    for secret in secrets:
        assert secret not in out and secret not in raw

    monkeypatch.setenv("WEDBACKUP_MASTER_KEY", ring_text(new))  # retired
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM wedbackup.wedding_keys")
    assert cli.main(["keys", "restore", "--from", "azure"]) == 0
    assert "2 restored" in capsys.readouterr().out
    restored = Engine(engine.settings, MasterKeyring([new]), Catalogue(dsn))
    assert restored.verify("2", replicas, provider="s3").tables
    assert cli.main(["keys", "new", "--id", "next"]) == 0
    assert capsys.readouterr().out.startswith("next:")
    assert os.environ["WEDBACKUP_MASTER_KEY"].split(":")[1] not in out
