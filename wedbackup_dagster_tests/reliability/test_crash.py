"""kill -9 in the middle of a dump, an upload, a verification restore and a restore into a target, then
the same work run again: nothing half-written may be left visible in the vault, at S3, in a scratch
database or in the target, and the re-run must tidy what the killed process could not (vault temp files,
unfinished multipart uploads, scratch databases) and complete."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from wedbackup_dagster.dev import demo_data
from wedbackup_dagster.core.postgres import load_snapshot as restore
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.storage.replicas import S3Replica

from .audit import audit
from .crashdriver import PART
from .faultproxy import wait_until

pytestmark = [pytest.mark.stack]

BIG_WEDDING = "2"
BIG_BYTES = 24 << 20  # about 24 MiB sealed: a dump and an upload that take seconds, not milliseconds
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def crash_env(stack, make_database, tmp_path, monkeypatch, s3_bucket, s3_client):
    source, catalogue = make_database(), make_database()
    prefix = f"{restore.SCRATCH_PREFIX}crash{uuid.uuid4().hex[:6]}_"
    monkeypatch.setattr(restore, "SCRATCH_PREFIX", prefix)
    settings = {"WEDBACKUP_SOURCE_DSN": source, "WEDBACKUP_CATALOGUE_DSN": catalogue,
                "WEDBACKUP_VAULT_DIR": str(tmp_path / "vault"), "WEDBACKUP_S3_BUCKET": s3_bucket,
                "CRASH_SCRATCH_PREFIX": prefix}
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    demo_data.generate(source, weddings=3, seed=13, document_bytes=512)
    with psycopg.connect(source) as conn:
        conn.execute("INSERT INTO documents (wedding_id, filename, mime, content) VALUES (%s, 'scan.pdf', "
                     "'application/pdf', %s)", (int(BIG_WEDDING), os.urandom(BIG_BYTES)))
    engine = Engine.from_env()
    return {"engine": engine, "env": dict(os.environ), "prefix": prefix, "source": source,
            # abandoned_after=0: the killed upload is seconds old; in production only hours-old ones go.
            "s3": S3Replica(s3_client, engine.settings.s3, multipart_threshold=PART, part_size=PART,
                            abandoned_after=0),
            "catalogue": Catalogue(catalogue)}


def _kill_when(env: dict[str, str], args: list[str], reached, what: str, timeout: float = 60) -> None:
    """Start the driver, kill -9 it as soon as `reached()` is true; fail if it finished first."""
    proc = subprocess.Popen([sys.executable, "-m", "wedbackup_dagster_tests.reliability.crashdriver", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        caught = wait_until(lambda: proc.poll() is not None or reached(), timeout, interval=0.01)
        assert caught and proc.poll() is None, f"the driver ended before {what}: {proc.stdout.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def _temp_files(engine: Engine) -> list[Path]:
    return list(engine.vault.root.glob("*/.incoming-*"))


def _assert_whole(crash, *, with_s3: bool = True) -> None:
    engine = crash["engine"]
    report = audit(engine, {"s3": crash["s3"]} if with_s3 else {}, scratch_prefix=crash["prefix"],
                   admin_dsn=engine.settings.scratch_dsn)
    assert report.ok(), report.problems


def _back_up(engine: Engine, wedding: str):
    with engine.snapshot_session() as session:
        return engine.back_up(wedding, session)


def test_kill_during_the_dump_leaves_no_archive_and_the_rerun_sweeps_the_temp_file(crash_env):
    engine, cat = crash_env["engine"], crash_env["catalogue"]
    _kill_when(crash_env["env"], ["dump", BIG_WEDDING],
               lambda: any(t.stat().st_size > (1 << 20) for t in _temp_files(engine)), "the dump was under way")
    assert _temp_files(engine), "the kill left no temp file: it did not hit mid-dump"
    assert list(engine.vault.entries(BIG_WEDDING)) == []  # nothing under an archive's name
    assert cat.latest_backup(BIG_WEDDING) is None

    outcome = _back_up(engine, BIG_WEDDING)
    assert _temp_files(engine) == []
    assert [e.path for e in engine.vault.entries(BIG_WEDDING)] == [outcome.vault.path]
    _assert_whole(crash_env, with_s3=False)


def test_kill_during_the_upload_leaves_no_object_and_the_rerun_aborts_the_multipart_upload(crash_env):
    engine, cat, s3 = crash_env["engine"], crash_env["catalogue"], crash_env["s3"]
    backup = _back_up(engine, BIG_WEDDING).backup
    key = s3.object_key(BIG_WEDDING, backup.archive_sha256)

    def uploads() -> list:
        return s3.client.list_multipart_uploads(Bucket=s3.target.bucket).get("Uploads", [])

    def parts_sent() -> bool:
        found = uploads()
        return bool(found) and bool(s3.client.list_parts(Bucket=s3.target.bucket, Key=key,
                                                         UploadId=found[0]["UploadId"]).get("Parts"))

    _kill_when(crash_env["env"], ["upload", BIG_WEDDING], parts_sent, "a part was uploaded")
    assert [u["Key"] for u in uploads()] == [key]  # the killed process could not abort it
    assert s3.head(key) is None  # and no object, whole or partial, is visible
    assert "s3" not in {c.provider for c in cat.copies(backup.id)}

    record = engine.replicate(BIG_WEDDING, s3).record
    assert uploads() == [] and not record.already_present and record.size == backup.size
    _assert_whole(crash_env)


def test_kill_during_the_verification_restore_and_the_rerun_drops_its_scratch_database(crash_env):
    engine, cat = crash_env["engine"], crash_env["catalogue"]
    backup = _back_up(engine, BIG_WEDDING).backup
    admin = engine.settings.scratch_dsn

    def scratch() -> list[str]:
        with psycopg.connect(admin) as conn:
            return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                                               (crash_env["prefix"],))]

    def restoring() -> bool:
        with psycopg.connect(admin) as conn:
            return bool(conn.execute("SELECT 1 FROM pg_stat_activity WHERE starts_with(datname, %s) "
                                     "AND state = 'active'", (crash_env["prefix"],)).fetchone())

    _kill_when(crash_env["env"], ["verify", BIG_WEDDING], restoring, "the scratch restore was under way")
    left = scratch()
    assert len(left) == 1, left  # the killed process could not drop it
    # The server ends the killed client's sessions as it notices them gone; the lock goes with them.
    assert wait_until(lambda: not restoring(), 15)

    outcome = engine.verify(BIG_WEDDING, {}, provider="vault")
    assert outcome.backup.id == backup.id and scratch() == []
    assert cat.restore_count(backup.id) == 1  # the killed attempt never recorded a result
    _assert_whole(crash_env, with_s3=False)


def test_kill_during_a_restore_commits_nothing_and_the_rerun_restores_everything(crash_env, make_database):
    engine = crash_env["engine"]
    for partition in ("platform", BIG_WEDDING):
        _back_up(engine, partition)
    target = make_database()
    engine.restore_to("platform", target, {}, provider="vault")

    def documents(dsn: str) -> tuple[int, str]:
        with psycopg.connect(dsn) as conn:
            return conn.execute("SELECT count(*), coalesce(md5(string_agg(md5(content), ',' ORDER BY id)), '') "
                                "FROM documents WHERE wedding_id = %s", (int(BIG_WEDDING),)).fetchone()

    def restoring() -> bool:
        with psycopg.connect(target) as conn:
            return bool(conn.execute("SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND "
                                     "application_name = 'wedbackup-restore' AND state = 'active'").fetchone())

    _kill_when(crash_env["env"], ["restore", BIG_WEDDING, target], restoring, "the restore was under way")
    assert wait_until(lambda: not restoring(), 15)
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM weddings WHERE id = %s", (int(BIG_WEDDING),)).fetchone() == (0,)
    assert documents(target) == (0, "")  # one transaction: nothing of the wedding was committed

    engine.restore_to(BIG_WEDDING, target, {}, provider="vault")
    assert documents(target) == documents(crash_env["source"])
    _assert_whole(crash_env, with_s3=False)
