"""The engine against bad input, on the real stack: every failure names the archive, wedding or provider,
and nothing already backed up is harmed."""
from __future__ import annotations

import psycopg
import pytest

from wedbackup_dagster.core.config import Settings
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.errors import (ArchiveError, ConfigError, ProviderError, SchemaMismatchError,
                                           UnknownWeddingError, WedbackupError)
from wedbackup_dagster.core.keys.keyring import MasterKeyring, SecretKey, load_master_keyring
from wedbackup_dagster.core.storage.replicas import GCSReplica, S3Replica
from wedbackup_dagster.core.storage.providers import ensure_targets
from wedbackup_dagster.core.storage.replicas.azure import AzureReplica, azure_service_from
from wedbackup_dagster.core.storage.replicas.gcs import gcs_client_from
from wedbackup_dagster.core.storage.replicas.s3 import s3_client_from

WEDDING = "3"


@pytest.fixture
def env(demo_env):
    demo_env(weddings=6, seed=5, document_bytes=256)
    import os

    return dict(os.environ)


@pytest.fixture
def engine(env) -> Engine:
    e = Engine.from_env(env)
    ensure_targets(e.settings)
    return e


def replicas_for(settings: Settings, env) -> dict:
    return {
        "s3": S3Replica(s3_client_from(settings.s3, env), settings.s3),
        "gcs": GCSReplica(gcs_client_from(settings.gcs), settings.gcs),
        "azure": AzureReplica(azure_service_from(settings.azure), settings.azure),
    }


def back_up(engine: Engine, partition: str = WEDDING):
    with engine.snapshot_session() as session:
        return engine.back_up(partition, session)


def test_each_copy_verifies_and_a_wedding_restores_next_to_the_platform(engine, env, make_database):
    replicas = replicas_for(engine.settings, env)
    back_up(engine, "platform")
    outcome = back_up(engine)
    for provider, replica in replicas.items():
        engine.replicate(WEDDING, replica)
        engine.replicate("platform", replica)
    for provider in ("vault", "s3", "gcs", "azure"):
        verified = engine.verify(WEDDING, replicas, provider=provider)
        assert verified.provider == provider and verified.tables
    target = make_database()
    engine.restore_to("platform", target, replicas)
    backup, chosen, report = engine.restore_to(WEDDING, target, replicas, provider="gcs")
    assert chosen == "gcs" and backup.archive_sha256 == outcome.stats.sha256
    assert report.total_rows == sum(t["rows"] for t in outcome.manifest["tables"])


def test_flipped_bit_in_vault_copy_is_named_and_other_copies_still_restore(engine, env):
    replicas = replicas_for(engine.settings, env)
    outcome = back_up(engine)
    engine.replicate(WEDDING, replicas["s3"])
    data = bytearray(outcome.vault.path.read_bytes())
    data[len(data) // 2] ^= 0x01
    outcome.vault.path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError) as err:
        engine.verify(WEDDING, replicas, provider="vault")
    assert f"vault:{WEDDING}/" in str(err.value)
    assert engine.verify(WEDDING, replicas, provider="s3").provider == "s3"


def test_truncated_vault_copy_is_named(engine, env):
    outcome = back_up(engine)
    data = outcome.vault.path.read_bytes()
    outcome.vault.path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ArchiveError, match=f"vault:{WEDDING}/"):
        engine.verify(WEDDING, {}, provider="vault")


def test_corrupted_replica_is_named_and_vault_copy_unharmed(engine, env):
    replicas = replicas_for(engine.settings, env)
    outcome = back_up(engine)
    record = engine.replicate(WEDDING, replicas["s3"]).record
    client = s3_client_from(engine.settings.s3, env)
    client.put_object(Bucket=engine.settings.s3.bucket, Key=record.key, Body=b"not the archive")
    with pytest.raises(ProviderError) as err:
        engine.verify(WEDDING, replicas, provider="s3")
    assert "s3" in str(err.value) and record.key in str(err.value)
    assert outcome.vault.path.exists()
    assert engine.verify(WEDDING, replicas, provider="vault").provider == "vault"


def test_wrong_master_key_cannot_open_and_says_which_archive(engine, env):
    back_up(engine)
    current = load_master_keyring(env).current
    impostor = Engine(engine.settings, MasterKeyring([SecretKey.generate(current.key_id)]))
    with pytest.raises(Exception) as err:
        impostor.verify(WEDDING, {}, provider="vault")
    assert current.key_id in str(err.value) or WEDDING in str(err.value)
    assert current.material.hex() not in str(err.value)
    assert engine.verify(WEDDING, {}, provider="vault").provider == "vault"  # the right key still works


def test_missing_master_key_names_the_variable(env):
    without = {k: v for k, v in env.items() if not k.startswith("WEDBACKUP_MASTER_KEY")}
    with pytest.raises(ConfigError, match="WEDBACKUP_MASTER_KEY"):
        Engine.from_env(without)


def test_unknown_wedding_leaves_nothing_behind(engine):
    first = back_up(engine)
    with pytest.raises(UnknownWeddingError, match="999999"):
        back_up(engine, "999999")
    assert not (engine.vault.root / "999999").exists() or not list((engine.vault.root / "999999").iterdir())
    assert engine.catalogue.latest_backup("999999") is None
    assert engine.catalogue.latest_backup(WEDDING).archive_sha256 == first.stats.sha256


def test_wedding_deleted_after_a_backup_keeps_that_backup(engine, env):
    first = back_up(engine)
    with psycopg.connect(env["WEDBACKUP_SOURCE_DSN"]) as conn:
        conn.execute("DELETE FROM weddings WHERE id = %s", (int(WEDDING),))
    with pytest.raises(UnknownWeddingError, match=WEDDING):
        back_up(engine)
    assert first.vault.path.exists()
    assert engine.catalogue.latest_backup(WEDDING).archive_sha256 == first.stats.sha256
    assert engine.verify(WEDDING, {}, provider="vault").provider == "vault"


def test_schema_changed_between_backup_and_restore_is_reported(engine, make_database):
    back_up(engine, "platform")
    back_up(engine)
    target = make_database()
    engine.restore_to("platform", target, {})
    with psycopg.connect(target) as conn:
        conn.execute("ALTER TABLE guests ADD COLUMN seat_number int")
    with pytest.raises(SchemaMismatchError, match="guests"):
        engine.restore_to(WEDDING, target, {})
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM guests").fetchone()[0] == 0  # nothing half-restored


def test_back_up_many_seals_each_wedding_as_back_up_does_and_skips_the_unknown(engine, env):
    with engine.snapshot_session() as session:
        outcomes = engine.back_up_many(["2", WEDDING, "999999", "../etc", "platform", "5"], session)
    assert list(outcomes) == ["2", WEDDING, "999999", "../etc", "platform", "5"]
    assert isinstance(outcomes["999999"], UnknownWeddingError) and "999999" in str(outcomes["999999"])
    assert "'../etc'" in str(outcomes["../etc"]) and "back_up" in str(outcomes["platform"])
    assert engine.catalogue.latest_backup("999999") is None
    assert not list(engine.vault.root.glob("999999/*")) and not list(engine.vault.root.glob("platform/*"))
    for wedding in ("2", WEDDING, "5"):
        outcome = outcomes[wedding]
        assert engine.catalogue.latest_backup(wedding).archive_sha256 == outcome.stats.sha256
        assert outcome.vault.path.exists() and outcome.manifest["partition"] == wedding
    # The same rows, bytes and checksums as a backup of that wedding on its own.
    alone = back_up(engine, WEDDING)
    strip = lambda m: [(t["name"], t["rows"], t["bytes"], t["sha256"], t["select_sql"]) for t in m["tables"]]
    assert strip(alone.manifest) == strip(outcomes[WEDDING].manifest)
    assert alone.manifest["total_rows"] > 0
    # Each archive opens with its own wedding's key and restores and verifies.
    assert outcomes["5"].stats.key_id.startswith("5.") and outcomes["2"].stats.key_id.startswith("2.")
    assert engine.verify("5", {}, provider="vault").tables


def test_back_up_many_a_failed_write_leaves_no_archive_and_the_others_commit(engine, monkeypatch):
    real_writer = engine._archive_writer

    def writer_for(partition, fh, wedding_key=None):
        writer = real_writer(partition, fh, wedding_key)
        if partition == "4":
            def full_disk(data):
                raise OSError("no space left on device")
            writer.write = full_disk
        return writer

    monkeypatch.setattr(engine, "_archive_writer", writer_for)
    with engine.snapshot_session() as session:
        outcomes = engine.back_up_many(["1", "4", "6"], session)
    assert isinstance(outcomes["4"], WedbackupError) and "wedding 4" in str(outcomes["4"])
    assert "no space" in str(outcomes["4"])
    assert engine.catalogue.latest_backup("4") is None and not list((engine.vault.root / "4").iterdir())
    assert engine.catalogue.latest_backup("1").archive_sha256 == outcomes["1"].stats.sha256
    assert engine.verify("6", {}, provider="vault").provider == "vault"
