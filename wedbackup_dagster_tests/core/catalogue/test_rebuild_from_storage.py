"""Storage is the source of truth: back up through the engine, drop the catalogue's backups and copies,
rebuild them from S3 (and the vault) and get the same content back, except what storage cannot know."""
from __future__ import annotations

import os
import time

import psycopg
import pytest

from wedbackup_dagster import cli
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.catalogue.rebuild_from_storage import rebuild_from
from wedbackup_dagster.core.storage.replicas import GCSReplica, S3Replica
from wedbackup_dagster.core.storage.providers import ensure_targets
from wedbackup_dagster.core.storage.replicas.gcs import gcs_client_from
from wedbackup_dagster.core.storage.replicas.s3 import s3_client_from

# Every column the rebuild must bring back. Left out, because storage cannot know them: backups.id,
# created_at and source_fingerprint; copies.backup_id (compared through the archive's SHA-256 instead),
# stored_at and verified_at; the restores table; and the manifest's `seconds` (how long the snapshot took,
# known only after the manifest inside the archive was written: the archive says 0).
BACKUP_COLUMNS = ("partition, archive_sha256, size, key_id, snapshot_time, txid, schema_fingerprint, rows, "
                  "raw_bytes, manifest")
COPY_COLUMNS = ("b.archive_sha256, c.provider, c.uri, c.object_key, c.version_id, c.size, c.checksum, "
                "c.storage_class, c.region, c.media, c.offsite")


def content(dsn: str, providers: tuple[str, ...] = ("s3", "vault")) -> tuple[list, list]:
    with psycopg.connect(dsn) as conn:
        backups = conn.execute(f"SELECT {BACKUP_COLUMNS} FROM wedbackup.backups ORDER BY archive_sha256").fetchall()
        backups = [(*b[:-1], {k: v for k, v in b[-1].items() if k != "seconds"}) for b in backups]
        copies = conn.execute(
            f"SELECT {COPY_COLUMNS} FROM wedbackup.copies c JOIN wedbackup.backups b ON b.id = c.backup_id "
            "WHERE c.provider = ANY(%s) ORDER BY 1, 2", (list(providers),)).fetchall()
    return backups, copies


def drop_backups(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM wedbackup.backups")  # copies and restores go with them (ON DELETE CASCADE)


@pytest.fixture
def engine(demo_env) -> Engine:
    demo_env(weddings=5, seed=3, document_bytes=256)
    e = Engine.from_env()
    ensure_targets(e.settings)
    return e


def s3_of(engine: Engine) -> S3Replica:
    return S3Replica(s3_client_from(engine.settings.s3, os.environ), engine.settings.s3)


def back_up_and_replicate(engine: Engine, partitions: list[str], replica) -> None:
    with engine.snapshot_session() as session:
        for partition in partitions:
            engine.back_up(partition, session)
    for partition in partitions:
        engine.replicate(partition, replica)


def test_drop_and_rebuild_from_s3_gives_the_same_content(engine):
    s3 = s3_of(engine)
    back_up_and_replicate(engine, ["platform", "1", "2", "3"], s3)
    engine.share_seconds = 0  # a second, later snapshot of wedding 2: two archives of one wedding
    time.sleep(0.05)
    back_up_and_replicate(engine, ["2"], s3)
    gcs = GCSReplica(gcs_client_from(engine.settings.gcs), engine.settings.gcs)
    engine.replicate("1", gcs)  # a copy the S3 listing cannot know about
    dsn = engine.settings.catalogue_dsn
    before = content(dsn)
    assert len(before[0]) == 5 and len(before[1]) == 10  # 5 archives, each in S3 and in the vault

    drop_backups(dsn)
    assert content(dsn) == ([], [])
    catalogue = Catalogue(dsn)
    report = rebuild_from(s3, catalogue, engine.keyring, vault=engine.vault)
    assert (report.listed, report.backups_added, report.backups_known, report.skipped) == (5, 5, 0, [])
    assert report.copies_written == {"s3": 5, "vault": 5}
    assert content(dsn) == before
    assert catalogue.require_latest_backup("2").archive_sha256 == max(
        (b for b in before[0] if b[0] == "2"), key=lambda b: b[4])[1]

    # Idempotent: a second rebuild adds nothing and changes nothing.
    again = rebuild_from(s3, catalogue, engine.keyring, vault=engine.vault)
    assert (again.backups_added, again.backups_known) == (0, 5)
    assert content(dsn) == before


def test_a_backup_not_at_the_provider_is_not_invented_and_a_shredded_key_is_named(engine):
    s3 = s3_of(engine)
    back_up_and_replicate(engine, ["1", "2"], s3)
    with engine.snapshot_session() as session:
        engine.back_up("3", session)  # in the vault only
    dsn = engine.settings.catalogue_dsn
    with psycopg.connect(dsn) as conn:  # wedding 2 erased: its key destroyed
        conn.execute("UPDATE wedbackup.wedding_keys SET wrapped = NULL, shredded_at = now() WHERE partition = '2'")
    expected_backups, expected_copies = content(dsn)
    drop_backups(dsn)
    report = rebuild_from(s3, Catalogue(dsn), engine.keyring, vault=engine.vault)
    assert report.backups_added == 1 and len(report.skipped) == 1
    assert "weddings/2/" in report.skipped[0] and "destroyed" in report.skipped[0]
    backups, copies = content(dsn)
    assert [b[0] for b in backups] == ["1"]
    assert backups == [b for b in expected_backups if b[0] == "1"]
    assert copies == [c for c in expected_copies if c[0] == backups[0][1]]


def test_cli_rebuild_and_status(engine, capsys):
    s3 = s3_of(engine)
    back_up_and_replicate(engine, ["platform", "4"], s3)
    dsn = engine.settings.catalogue_dsn
    before = content(dsn)
    drop_backups(dsn)
    assert cli.main(["catalogue", "rebuild", "--from", "s3"]) == 0
    out = capsys.readouterr().out
    assert "2 archive(s) listed; 2 backup(s) added" in out and "not recoverable" in out
    assert content(dsn) == before
    assert cli.main(["catalogue", "status"]) == 0
    out = capsys.readouterr().out
    assert "backups: 2 over 2 partition(s)" in out
    assert "s3     2 copies; newest backup missing here: 0" in out
    assert "gcs    0 copies; newest backup missing here: 2" in out
    assert os.environ["WEDBACKUP_MASTER_KEY"] not in out
