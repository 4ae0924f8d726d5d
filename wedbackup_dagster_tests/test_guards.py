"""Guards against hostile or careless input (issue 14): restore targets compared by the database they reach,
not by the variable that names them; the catalogue never the source; crafted JSON in archives and snapshot
streams failing as the format's own error; one wedding under one partition name; the secrets scan
finding raw key bytes in bytea columns of big tables."""
from __future__ import annotations

import hashlib
import io
import os

import psycopg
import pytest

from wedbackup_dagster.core.archive import MAGIC, read_header
from wedbackup_dagster.core.errors import ArchiveCorrupt, SnapshotFormatError

NESTED = b"[" * 20_000 + b"]" * 20_000  # deeper than json's recursion limit, small enough for a header label


# --- 3. crafted JSON in archives and snapshot streams -----------------------------------------------

def crafted_archive(label: bytes) -> bytes:
    """An archive whose header carries `label` verbatim (a real writer only writes labels it made)."""
    from wedbackup_dagster.core.archive import _encode_header

    return _encode_header("1.abcdef012345", b"w" * 60, b"n" * 7, 1 << 20, label) + b"\0" * 64


def test_a_deeply_nested_header_label_is_a_corrupt_archive_naming_it():
    assert crafted_archive(b"{}").startswith(MAGIC)
    with pytest.raises(ArchiveCorrupt, match=r"^archive crafted\.wbk: header is malformed: the label is not valid"):
        read_header(io.BytesIO(crafted_archive(b'{"a":' + NESTED + b"}")), name="crafted.wbk")


def test_deeply_nested_snapshot_records_and_manifests_fail_with_the_format_error():
    from wedbackup_dagster.core.restore import Record
    from wedbackup_dagster.core.snapshot import MANIFEST, Manifest

    with pytest.raises(SnapshotFormatError, match="manifest record at offset 7 is not valid JSON"):
        Record(MANIFEST, NESTED, 7, "archive x.wbk").json()
    with pytest.raises(ValueError, match="nested too deeply"):
        Manifest.from_json(NESTED)


def test_rebuild_goes_on_past_an_archive_with_a_crafted_label_and_reports_it(demo_env):
    from wedbackup_dagster.core.catalogue import Catalogue
    from wedbackup_dagster.core.engine import Engine
    from wedbackup_dagster.core.rebuild import rebuild_from
    from wedbackup_dagster.core.replicas import S3Replica, ensure_targets
    from wedbackup_dagster.core.replicas.base import archive_key
    from wedbackup_dagster.core.replicas.s3 import s3_client_from

    demo_env(weddings=3, seed=5, document_bytes=64)
    engine = Engine.from_env()
    ensure_targets(engine.settings)
    s3 = S3Replica(s3_client_from(engine.settings.s3, os.environ), engine.settings.s3)
    with engine.snapshot_session() as session:
        engine.back_up("1", session)
    engine.replicate("1", s3)
    crafted = crafted_archive(b'{"a":' + NESTED + b"}")
    sha = hashlib.sha256(crafted).hexdigest()
    key = archive_key("s3", engine.settings.s3.prefix, "2", sha)
    s3.client.put_object(Bucket=engine.settings.s3.bucket, Key=key, Body=crafted)
    with psycopg.connect(engine.settings.catalogue_dsn) as conn:
        conn.execute("DELETE FROM wedbackup.backups")
    report = rebuild_from(s3, Catalogue(engine.settings.catalogue_dsn), engine.keyring, vault=engine.vault)
    assert report.listed == 2 and report.backups_added == 1
    assert len(report.skipped) == 1 and report.skipped[0].startswith(f"{key}: archive s3:{key}: header is malformed")


def test_a_key_backup_with_nested_json_is_a_key_backup_error():
    from wedbackup_dagster.core.archive import ArchiveWriter
    from wedbackup_dagster.core.errors import KeyBackupError
    from wedbackup_dagster.core.keybackup import FORMAT_NAME, read_key_backup, sealing_key
    from wedbackup_dagster.core.keys import MasterKeyring, SecretKey

    keyring = MasterKeyring([SecretKey("mk1", b"k" * 32)])
    sealed = io.BytesIO()
    with ArchiveWriter(sealed, wedding_key=sealing_key(keyring.current), label={"kind": FORMAT_NAME}) as writer:
        writer.write(NESTED + b"\n")
    sealed.seek(0)
    with pytest.raises(KeyBackupError, match="keys.wbk.*do not parse"):
        read_key_backup(sealed, name="keys.wbk", keyring=keyring)
