"""Erasures survive a catalogue loss (issue 14, defect 6): the key-store backups carry the erasure list
(format version 2), a rebuilt catalogue gets it back, and the erased wedding, whose row is still in the
source, is neither discovered, keyed nor backed up again; platform restores still re-apply it."""
from __future__ import annotations

import base64
import io
import json

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from wedbackup_dagster.core.formats.archive import ArchiveWriter
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.postgres.discovery import wedding_ids
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.errors import CryptoKeyError
from wedbackup_dagster.core.governance.erasure import erase_wedding, reapply_erasures
from wedbackup_dagster.core.keys.backup import (FORMAT_NAME, ErasureEntry, read_key_backup_bytes, restore_erasures,
                                                restore_key_store, sealing_key)
from wedbackup_dagster.core.keys.keyring import MasterKeyring, SecretKey
from wedbackup_dagster.core.catalogue.rebuild_from_storage import rebuild_from
from wedbackup_dagster_tests.governance_fleet import back_up, make_governance_fleet  # noqa: F401 - fixture


def lose_catalogue(dsn: str) -> Catalogue:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA wedbackup CASCADE")
    return Catalogue(dsn)


def test_an_erasure_comes_back_with_the_rebuilt_catalogue(make_governance_fleet, make_database):
    fleet = make_governance_fleet()
    engine, replicas = fleet["engine"], fleet["replicas"]
    for partition in ("2", "3", "platform"):
        back_up(fleet, partition)
    erase_wedding(fleet["catalogue"], engine.vault, replicas, "2", requested_by="dpo@example.org",
                  settings=engine.settings)
    assert "2" in wedding_ids(fleet["source"])  # the application has not deleted the wedding's row (yet)

    fresh = lose_catalogue(engine.settings.catalogue_dsn)
    report = rebuild_from(replicas["gcs"], fresh, engine.keyring, vault=engine.vault)
    assert report.keys_restored == 2  # wedding 3 and the platform; the erased wedding's key is in no backup
    erasures = fresh.erasures()
    assert [(e["partition"], e["requested_by"]) for e in erasures] == [("2", "dpo@example.org")]
    assert fresh.erased_partitions() == {"2"}
    # Discovery leaves it out (the sensor and `backup --all` filter on erased_partitions) and a backup refuses.
    rebuilt = Engine(engine.settings, engine.keyring, fresh)
    with rebuilt.snapshot_session() as session, pytest.raises(CryptoKeyError, match="wedding 2 was erased"):
        rebuilt.back_up("2", session)
    with rebuilt.snapshot_session() as session:
        assert rebuilt.back_up("3", session).backup.partition == "3"
    # A platform restore after the loss re-applies the erasure it got back.
    full = make_database(template=conninfo_to_dict(fleet["source"])["dbname"])
    assert any(line.startswith("public.weddings: 1 row") for line in reapply_erasures(full, fresh))

    # `keys restore` into another empty catalogue brings the erasure back the same way.
    other = lose_catalogue(engine.settings.catalogue_dsn)
    keys = restore_key_store(replicas["azure"], other, engine.keyring)
    assert keys.erasures_restored == 1 and other.erased_partitions() == {"2"}


def test_a_key_backup_erasure_wins_over_a_key_and_version_1_still_reads(make_database):
    ring = MasterKeyring([SecretKey.generate("m1")])
    cat = Catalogue(make_database())
    cat.migrate()
    key = cat.wedding_key("5", ring)
    with cat.connect() as conn:
        wrapped = bytes(conn.execute("SELECT wrapped FROM wedbackup.wedding_keys").fetchone()["wrapped"])
    # A version 1 file (before erasure lines existed), written as that version did.
    buf = io.BytesIO()
    writer = ArchiveWriter(buf, wedding_key=sealing_key(ring.current), label={"app": "wedbackup", "kind": FORMAT_NAME})
    head = {"format": FORMAT_NAME, "version": 1, "created_at": "2026-12-01T00:00:00+00:00", "master_key_id": "m1",
            "key_count": 1}
    line = {"key_id": key.key_id, "partition": "5", "master_key_id": "m1", "created_at": "2026-12-01T00:00:00+00:00",
            "wrapped": base64.b64encode(wrapped).decode()}
    writer.write(json.dumps(head).encode() + b"\n" + json.dumps(line).encode() + b"\n")
    writer.close()
    old = read_key_backup_bytes(buf.getvalue(), name="v1", keyring=ring)
    assert [e.key_id for e in old.entries] == [key.key_id] and old.erasures == []


    # An erasure in a key backup wins over a live key the catalogue still has for that wedding.
    old.erasures.append(ErasureEntry("5", "5", "2026-12-02T00:00:00+00:00", "dpo"))
    assert restore_erasures(cat, old) == 1
    with cat.connect() as conn:
        assert conn.execute("SELECT wrapped FROM wedbackup.wedding_keys").fetchone()["wrapped"] is None
    with pytest.raises(CryptoKeyError, match="wedding 5 was erased"):
        cat.key_by_id(key.key_id, ring)
