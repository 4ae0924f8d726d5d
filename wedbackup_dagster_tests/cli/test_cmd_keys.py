"""`wedbackup keys …` and the key side of `wedbackup catalogue rebuild` on the real stack: status, backup,
rotate, restore and new, with no key material in any output except the key `keys new` makes."""
from __future__ import annotations

import base64
import json
import os

import psycopg

from wedbackup_dagster import cli
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.keys.keyring import MasterKeyring, SecretKey
from wedbackup_dagster_tests.core.keys.test_backup import back_up, engine, replicas_of  # noqa: F401
from wedbackup_dagster_tests.core.keys.test_rotation import ring_text


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


def test_cli_catalogue_rebuild_brings_the_keys_back(engine, capsys):
    replicas = replicas_of(engine)
    back_up(engine, ["1", "3"], replicas)
    for partition in ("1", "3"):
        engine.replicate(partition, replicas["gcs"])
    assert cli.main(["keys", "backup"]) == 0
    dsn = engine.settings.catalogue_dsn
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM wedbackup.backups")
        conn.execute("DELETE FROM wedbackup.wedding_keys")
    capsys.readouterr()
    assert cli.main(["catalogue", "rebuild", "--from", "gcs"]) == 0
    out = capsys.readouterr().out
    assert "2 wedding key(s) restored from gcs:wedbackup/keys/" in out and "2 backup(s) added" in out
    rebuilt = Engine(engine.settings, engine.keyring, Catalogue(dsn))
    assert rebuilt.verify("3", replicas, provider="gcs").tables
    assert cli.main(["keys", "status"]) == 0
    assert "wedding keys: 2 live, 0 shredded" in capsys.readouterr().out
