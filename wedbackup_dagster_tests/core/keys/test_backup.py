"""The encrypted key-store backup on the real stack: written to the vault and every provider, restores the
wedding keys of a lost catalogue so archives restore again, leaves a shredded key in no key backup
anywhere after refresh_key_backups, and fails with a clear error naming the file when damaged."""
from __future__ import annotations

import base64
import io
import json
import os

import psycopg
import pytest

from wedbackup_dagster.core.formats.archive import open_archive
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.errors import ArchiveError, KeyBackupError
from wedbackup_dagster.core.keys.backup import (back_up_key_store, fetch_key_backup, key_backup_is_current,
                                                read_key_backup_bytes, read_vault_key_backup, refresh_key_backups,
                                                restore_key_store, vault_key_backup_dir)
from wedbackup_dagster.core.keys.keyring import MasterKeyring, SecretKey, unwrap_key
from wedbackup_dagster.core.catalogue.store import wedding_key_context
from wedbackup_dagster.core.catalogue.rebuild_from_storage import rebuild_from
from wedbackup_dagster.core.storage.replicas import AzureReplica, GCSReplica, S3Replica
from wedbackup_dagster.core.storage.providers import ensure_targets
from wedbackup_dagster.core.storage.replicas.azure import azure_service_from
from wedbackup_dagster.core.storage.replicas.gcs import gcs_client_from
from wedbackup_dagster.core.storage.replicas.s3 import s3_client_from


@pytest.fixture
def engine(demo_env) -> Engine:
    demo_env(weddings=4, seed=5, document_bytes=256)
    e = Engine.from_env()
    ensure_targets(e.settings)
    return e


def replicas_of(engine: Engine) -> dict:
    s = engine.settings
    return {"s3": S3Replica(s3_client_from(s.s3, os.environ), s.s3),
            "gcs": GCSReplica(gcs_client_from(s.gcs), s.gcs),
            "azure": AzureReplica(azure_service_from(s.azure), s.azure)}


def back_up(engine: Engine, partitions: list[str], replicas: dict) -> None:
    with engine.snapshot_session() as session:
        for partition in partitions:
            engine.back_up(partition, session)
    for partition in partitions:
        engine.replicate(partition, replicas["s3"])


def key_backup_objects(replicas: dict) -> dict[str, list[tuple[str, str | None]]]:
    """Every key-backup object (key, version) at every provider, S3 noncurrent versions included."""
    s3 = replicas["s3"]
    out = {"s3": []}
    for page in s3.client.get_paginator("list_object_versions").paginate(
            Bucket=s3.target.bucket, Prefix=f"{s3.prefix}/keys/"):
        out["s3"] += [(v["Key"], v["VersionId"]) for v in page.get("Versions", [])]
    for provider in ("gcs", "azure"):
        out[provider] = [(o.key, None) for o in replicas[provider].list("keys/")]
    return out


def test_key_backup_everywhere_and_a_lost_catalogue_gets_its_keys_back(engine):
    replicas = replicas_of(engine)
    back_up(engine, ["1", "2", "3"], replicas)
    catalogue = engine.catalogue
    result = back_up_key_store(engine.settings, catalogue, replicas, engine.keyring)
    assert result.ok and result.key_count == 3 and not result.skipped
    assert set(result.copies) == {"vault", "s3", "gcs", "azure"}
    for provider, objects in key_backup_objects(replicas).items():
        assert [k for k, _ in objects] == [f"wedbackup/keys/{result.sha256}.wbk"], provider
    vault_file = vault_key_backup_dir(engine.settings) / f"{result.sha256}.wbk"
    contents = read_vault_key_backup(vault_file, engine.keyring)
    assert sorted(e.partition for e in contents.entries) == ["1", "2", "3"]
    # The vault's archive listing does not mistake the key backup for a wedding's archive.
    assert all(entry.partition in {"1", "2", "3"} for entry in engine.vault.entries())

    # Unchanged key set, copies everywhere: no new file. A new wedding key: a new one.
    again = back_up_key_store(engine.settings, catalogue, replicas, engine.keyring)
    assert again.skipped and again.sha256 == result.sha256
    back_up(engine, ["4"], replicas)
    newer = back_up_key_store(engine.settings, catalogue, replicas, engine.keyring)
    assert not newer.skipped and newer.key_count == 4 and newer.sha256 != result.sha256

    # The catalogue loses every wedding key and backup: rebuilt from S3, keys included.
    dsn = engine.settings.catalogue_dsn
    with psycopg.connect(dsn) as conn:
        keys_before = conn.execute("SELECT key_id, partition, master_key_id FROM wedbackup.wedding_keys "
                                   "ORDER BY key_id").fetchall()
        conn.execute("DELETE FROM wedbackup.backups")
        conn.execute("DELETE FROM wedbackup.wedding_keys")
        conn.execute("DELETE FROM wedbackup.key_backups")
    fresh = Catalogue(dsn)
    report = rebuild_from(replicas["s3"], fresh, engine.keyring, vault=engine.vault)
    assert report.skipped == [] and report.keys_restored == 4 and report.backups_added == 4
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT key_id, partition, master_key_id FROM wedbackup.wedding_keys "
                            "ORDER BY key_id").fetchall() == keys_before
    restored = Engine(engine.settings, engine.keyring, fresh)
    for partition in ("1", "2", "3", "4"):
        outcome = restored.verify(partition, replicas, provider="s3")  # real restore into a scratch database
        assert outcome.tables and outcome.provider == "s3"
    # The restored backup is recorded and counts as current: the next routine backup writes nothing new.
    assert key_backup_is_current(fresh, engine.keyring)[0]
    # A second restore changes nothing.
    second = restore_key_store(replicas["gcs"], fresh, engine.keyring)
    assert (second.restored, second.known, second.conflicts) == (0, 4, [])


def test_a_shredded_key_is_in_no_key_backup_anywhere_after_refresh(engine):
    replicas = replicas_of(engine)
    back_up(engine, ["1", "2"], replicas)
    catalogue = engine.catalogue
    for _ in range(2):  # two older key backups, everywhere (and S3 keeps every version)
        back_up_key_store(engine.settings, catalogue, replicas, engine.keyring, force=True)
    s3 = replicas["s3"]
    old = catalogue.latest_backup("2")
    with open(engine.vault.get("2", old.archive_sha256).path, "rb") as fh:
        archive_2 = fh.read()
    with catalogue.connect() as conn:
        shredded = [r["key_id"] for r in conn.execute(
            "SELECT key_id FROM wedbackup.wedding_keys WHERE partition = '2'").fetchall()]
    assert catalogue.shred_wedding_key("2") == len(shredded) == 1 and catalogue.shred_wedding_key("2") == 0

    result = refresh_key_backups(engine.settings, catalogue, replicas, engine.keyring)
    assert result.key_count == 1 and result.deleted == {"vault": 2, "s3": 2, "gcs": 2, "azure": 2}
    objects = key_backup_objects(replicas)
    assert all(len(found) == 1 for found in objects.values()), objects
    assert [p.name for p in vault_key_backup_dir(engine.settings).iterdir()] == [f"{result.sha256}.wbk"]

    # No key in any key backup anywhere (every S3 version, GCS, Azure, the vault) opens wedding 2's archive.
    keys_held: list[SecretKey] = []
    blobs = [p.read_bytes() for p in vault_key_backup_dir(engine.settings).iterdir()]
    for key, version in objects["s3"]:
        blobs.append(s3.client.get_object(Bucket=s3.target.bucket, Key=key, VersionId=version)["Body"].read())
    for provider in ("gcs", "azure"):
        for key, _ in objects[provider]:
            buf = io.BytesIO()
            replicas[provider].download(key, buf)
            blobs.append(buf.getvalue())
    for blob in blobs:
        for e in read_key_backup_bytes(blob, name="held", keyring=engine.keyring).entries:
            assert e.partition != "2" and e.key_id not in shredded
            keys_held.append(SecretKey(e.key_id, unwrap_key(engine.keyring.get(e.master_key_id), e.wrapped,
                                                            wedding_key_context(e.partition, e.key_id))))
    assert keys_held
    for key in keys_held:
        with pytest.raises(ArchiveError):
            b"".join(open_archive(io.BytesIO(archive_2), name="wedding 2", resolve_key=lambda _id, k=key: k))
    with psycopg.connect(engine.settings.catalogue_dsn) as conn:
        live = conn.execute("SELECT count(*) FROM wedbackup.key_backups WHERE deleted_at IS NULL").fetchone()[0]
        actions = [r[0] for r in conn.execute("SELECT action FROM wedbackup.audit ORDER BY id").fetchall()]
    assert live == 1 and "key-shredded" in actions and "key-backups-refreshed" in actions

    # A catalogue rebuilt from the refreshed backup gets wedding 1's key, never wedding 2's back.
    with psycopg.connect(engine.settings.catalogue_dsn) as conn:
        conn.execute("DELETE FROM wedbackup.wedding_keys WHERE partition = '1'")
    report = restore_key_store(s3, catalogue, engine.keyring)
    assert report.restored == 1 and report.known == 0
    with psycopg.connect(engine.settings.catalogue_dsn) as conn:
        rows = conn.execute("SELECT partition, wrapped IS NULL FROM wedbackup.wedding_keys ORDER BY 1").fetchall()
    assert rows == [("1", False), ("2", True)]


def test_damaged_or_foreign_key_backups_fail_naming_the_file(engine):
    replicas = replicas_of(engine)
    back_up(engine, ["1"], replicas)
    result = back_up_key_store(engine.settings, engine.catalogue, replicas, engine.keyring)
    path = vault_key_backup_dir(engine.settings) / f"{result.sha256}.wbk"
    good = path.read_bytes()

    tampered = bytearray(good)
    tampered[len(good) // 2] ^= 0x01
    path.write_bytes(bytes(tampered))
    with pytest.raises(KeyBackupError, match=str(path)):
        read_vault_key_backup(path, engine.keyring)
    path.write_bytes(good[:-20])
    with pytest.raises(KeyBackupError, match=rf"key backup vault:{path}: .*(truncated|cut short)"):
        read_vault_key_backup(path, engine.keyring)
    path.write_bytes(good)

    current = engine.keyring.current
    impostor = MasterKeyring([SecretKey(current.key_id, os.urandom(32))])  # same id, other material
    with pytest.raises(KeyBackupError, match=str(path)):
        read_vault_key_backup(path, impostor)
    other = MasterKeyring([SecretKey("someone-else", os.urandom(32))])
    with pytest.raises(KeyBackupError, match=rf"{path}.*{current.key_id}.*not configured"):
        read_vault_key_backup(path, other)
    # A wedding archive is not a key backup.
    backup = engine.catalogue.latest_backup("1")
    with pytest.raises(KeyBackupError, match="wedding 1's archive"):
        read_key_backup_bytes(engine.vault.get("1", backup.archive_sha256).path.read_bytes(),
                              name="wedding 1's archive", keyring=engine.keyring)

    # At a provider: bytes swapped under the content address are refused, naming the object.
    s3 = replicas["s3"]
    key = f"{s3.prefix}/keys/{result.sha256}.wbk"
    s3.client.put_object(Bucket=s3.target.bucket, Key=key, Body=bytes(tampered))
    with pytest.raises(KeyBackupError, match=rf"s3:{key}"):
        fetch_key_backup(s3, result.sha256, engine.keyring)
    with pytest.raises(KeyBackupError, match=rf"s3:{key}"):
        restore_key_store(s3, engine.catalogue, engine.keyring)
    for material in (current.material,):
        assert base64.b64encode(material).decode() not in str(result.to_dict())


# ---------------------------------------------------------------------------- pure: format and keys


def _entries(master: SecretKey, n: int = 3) -> list:
    from wedbackup_dagster.core.keys.backup import KeyEntry
    from wedbackup_dagster.core.keys.keyring import wrap_key

    out = []
    for i in range(n):
        key_id = f"{i}.abc{i}"
        out.append(KeyEntry(key_id, str(i), wrap_key(master, os.urandom(32), wedding_key_context(str(i), key_id)),
                            master.key_id, "2026-12-01T00:00:00+00:00"))
    return out


def test_format_round_trip_and_what_it_refuses():
    from wedbackup_dagster.core.formats.archive import seal_bytes
    from wedbackup_dagster.core.keys.backup import sealing_key, write_key_backup

    master = SecretKey.generate("m1")
    ring = MasterKeyring([master])
    buf = io.BytesIO()
    stats = write_key_backup(buf, _entries(master), master, created_at="2026-12-01T00:00:00+00:00")
    data = buf.getvalue()
    assert stats.key_id == "m1" and len(data) == stats.sealed_bytes
    contents = read_key_backup_bytes(data, name="kb", keyring=ring)
    assert [e.partition for e in contents.entries] == ["0", "1", "2"] and contents.master_key_id == "m1"
    assert sealing_key(master).material != master.material  # derived, not the master key itself
    # No wedding key and no master key appears in the sealed bytes or an entry's repr.
    assert master.material not in data and base64.b64encode(master.material) not in data
    assert "wrapped" not in repr(contents.entries[0])

    # Entries wrapped by another master key than the seal's are refused when writing.
    other = SecretKey.generate("m0")
    with pytest.raises(Exception, match="wrapped by its sealing master key"):
        write_key_backup(io.BytesIO(), _entries(other), master, created_at="x")

    # Authenticated but wrong: a count that does not add up, an unknown version, an entry that does not open.
    def sealed(lines: list[dict]) -> bytes:
        payload = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
        return seal_bytes(payload, wedding_key=sealing_key(master),
                          label={"app": "wedbackup", "kind": "wedbackup-key-store"})[0]

    head = {"format": "wedbackup-key-store", "version": 1, "created_at": "x", "master_key_id": "m1", "key_count": 2}
    line = {"key_id": "5.x", "partition": "5", "master_key_id": "m1", "created_at": "x",
            "wrapped": base64.b64encode(_entries(master, 1)[0].wrapped).decode()}  # wrapped for wedding 0
    with pytest.raises(KeyBackupError, match="kb-count: says it holds 2 keys but holds 1"):
        read_key_backup_bytes(sealed([head, line]), name="kb-count", keyring=ring)
    with pytest.raises(KeyBackupError, match="kb-version: unknown key backup format"):
        read_key_backup_bytes(sealed([head | {"version": 9}]), name="kb-version", keyring=ring)
    with pytest.raises(KeyBackupError, match="kb-entry: wedding key 5.x: .*does not open"):
        read_key_backup_bytes(sealed([head | {"key_count": 1}, line]), name="kb-entry", keyring=ring)
    with pytest.raises(KeyBackupError, match="kb-json: its contents do not parse"):
        read_key_backup_bytes(seal_bytes(b"{not json\n", wedding_key=sealing_key(master),
                                         label={"kind": "wedbackup-key-store"})[0], name="kb-json", keyring=ring)


def test_key_backup_object_keys_stay_apart_from_archives():
    from wedbackup_dagster.core.errors import ReplicaKeyRejected
    from wedbackup_dagster.core.storage.replicas import key_backup_key, parse_archive_key, parse_key_backup_key
    from wedbackup_dagster.core.storage.replicas.base import upload_key

    sha = "ab" * 32
    key = key_backup_key("s3", "wedbackup", sha)
    assert key == f"wedbackup/keys/{sha}.wbk"
    assert parse_key_backup_key("wedbackup", key) == sha and parse_archive_key("wedbackup", key) == (None, None)
    assert parse_key_backup_key("wedbackup", f"wedbackup/weddings/1/{sha}.wbk") is None
    assert upload_key("s3", "wedbackup", None, "7", sha) == f"wedbackup/weddings/7/{sha}.wbk"
    assert upload_key("s3", "wedbackup", key, "key-store", sha) == key
    with pytest.raises(ReplicaKeyRejected):
        upload_key("s3", "wedbackup", "elsewhere/keys/x.wbk", "key-store", sha)
    with pytest.raises(ReplicaKeyRejected):
        key_backup_key("s3", "wedbackup", "../x")


# ------------------------------------------------------------------------------ stack: the edges


def test_a_provider_down_is_named_older_backups_are_kept_and_refresh_refuses_success(engine):
    from dataclasses import replace

    replicas = replicas_of(engine)
    back_up(engine, ["1", "2"], replicas)
    first = back_up_key_store(engine.settings, engine.catalogue, replicas, engine.keyring)
    s = engine.settings
    broken = dict(replicas, s3=S3Replica(s3_client_from(s.s3, os.environ), replace(s.s3, bucket="no-such-bucket-kb")))
    second = back_up_key_store(s, engine.catalogue, broken, engine.keyring, force=True)
    assert not second.ok and set(second.failures) == {"s3"} and "s3" in second.failures["s3"]
    assert set(second.copies) == {"vault", "gcs", "azure"} and second.deleted == {}  # nothing pruned
    assert {k for k, _ in key_backup_objects(replicas)["s3"]} == {f"wedbackup/keys/{first.sha256}.wbk"}

    engine.catalogue.shred_wedding_key("1")
    with pytest.raises(KeyBackupError, match=r"key backups \(s3\)"):
        refresh_key_backups(engine.settings, engine.catalogue, broken, engine.keyring)
    # Everything reachable was still cleaned: GCS, Azure and the vault hold only the new backup.
    objects = key_backup_objects(replicas)
    assert len(objects["gcs"]) == len(objects["azure"]) == 1
    assert len(list(vault_key_backup_dir(engine.settings).glob("*.wbk"))) == 1
    # With S3 back, refresh finishes the job.
    result = refresh_key_backups(engine.settings, engine.catalogue, replicas, engine.keyring)
    assert result.key_count == 1 and result.deleted.get("s3") == 1
    assert [k for k, _ in key_backup_objects(replicas)["s3"]] == [f"wedbackup/keys/{result.sha256}.wbk"]


def test_routine_backups_keep_the_newest_few_and_the_inventory_sees_no_orphans(engine):
    from wedbackup_dagster.core.catalogue.inventory import take_inventory

    replicas = replicas_of(engine)
    back_up(engine, ["1"], replicas)
    made = [back_up_key_store(engine.settings, engine.catalogue, replicas, engine.keyring, force=True, keep=2).sha256
            for _ in range(3)]
    for provider, objects in key_backup_objects(replicas).items():
        assert sorted(k for k, _ in objects) == sorted(f"wedbackup/keys/{sha}.wbk" for sha in made[1:]), provider
    assert sorted(p.stem for p in vault_key_backup_dir(engine.settings).glob("*.wbk")) == sorted(made[1:])
    with psycopg.connect(engine.settings.catalogue_dsn) as conn:
        rows = conn.execute("SELECT sha256, deleted_at IS NOT NULL FROM wedbackup.key_backups").fetchall()
    assert dict(rows) == {made[0]: True, made[1]: False, made[2]: False}
    inventory = take_inventory(engine.catalogue, {"s3": replicas["s3"]}, engine.vault)
    assert inventory.orphans.empty and inventory.serious.empty
