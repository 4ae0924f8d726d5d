"""Disaster recovery on the real stack (core/disaster/): the demo platform backed up, verified and copied to
S3 (some weddings also to GCS), the source database dropped and the vault deleted, then `restore_all` into a
fresh database from the providers alone: every table equal to the source's (counts and ordered checksums);
resumed after a stop part-way without duplicates; a wedding whose every copy is damaged reported while the
others restore; a provider failing for one wedding served by the other; non-empty, source and catalogue
targets refused. Tests that only read the backups share one platform per module (`shared_platform`); those
that change them (damage a copy, erase a wedding, add a key-store backup) build their own (`platform`)."""
from __future__ import annotations

import contextlib
import os
import shutil

import boto3
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from wedbackup_dagster.core import disaster
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.errors import RestoreError
from wedbackup_dagster.core.storage.replicas import GCSReplica, S3Replica
from wedbackup_dagster.core.storage.providers import ensure_targets
from wedbackup_dagster.core.storage.replicas.gcs import gcs_client_from
from wedbackup_dagster.core.storage.replicas.s3 import client_config, s3_client_from
from wedbackup_dagster.dev.compare import table_sums

pytestmark = pytest.mark.stack

WEDDINGS = 6


def replicas_of(engine: Engine) -> dict:
    return {"s3": S3Replica(s3_client_from(engine.settings.s3, os.environ), engine.settings.s3),
            "gcs": GCSReplica(gcs_client_from(engine.settings.gcs), engine.settings.gcs)}


def _backed_up_then_lost(stack, dsns: dict[str, str]) -> dict:
    """The demo platform in `dsns["source"]`: every partition backed up, copied to S3 (the platform, weddings 1
    and 2 also to GCS) and verified; the expected table sums taken; then the source database dropped (an empty
    one of that name left for the clean-up) and the vault deleted."""
    engine = Engine.from_env()
    ensure_targets(engine.settings)
    replicas = replicas_of(engine)
    with psycopg.connect(dsns["source"]) as conn:
        ids = [str(r[0]) for r in conn.execute("SELECT id FROM weddings ORDER BY id")]
    partitions = ["platform"] + ids
    with engine.snapshot_session() as session:
        for p in partitions:
            engine.back_up(p, session)
    for p in partitions:
        engine.replicate(p, replicas["s3"])
        if p in ("platform", "1", "2"):
            engine.replicate(p, replicas["gcs"])
        engine.verify(p, replicas, provider="s3")
    expected = table_sums(dsns["source"])
    name = conninfo_to_dict(dsns["source"])["dbname"]
    with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    shutil.rmtree(engine.settings.vault_dir)
    return {"engine": engine, "replicas": replicas, "expected": expected, "weddings": ids, **dsns}


@pytest.fixture
def platform(demo_env, stack):
    """A platform of its own (`_backed_up_then_lost`), for a test that changes the backups: damages a copy,
    erases a wedding, writes a key-store backup."""
    built = _backed_up_then_lost(stack, demo_env(weddings=WEDDINGS, seed=4, document_bytes=128))
    yield built
    built["engine"].catalogue.close()


@pytest.fixture(scope="module")
def shared_platform(stack, tmp_path_factory):
    """The same platform built once for the tests of a module that only read its backups (each restores into
    databases of its own): its source, catalogue, vault and one bucket per provider set in the WEDBACKUP_*
    environment while the module's tests run."""
    from azure.storage.blob import BlobServiceClient
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from wedbackup_dagster.dev import demo_data
    from wedbackup_dagster_tests import secrets_guard
    from wedbackup_dagster_tests.conftest import temporary_database, unique_name

    env = stack.env()
    bucket = unique_name("wb")
    with contextlib.ExitStack() as cleanup, pytest.MonkeyPatch.context() as mp:
        source = cleanup.enter_context(temporary_database(stack, "src"))
        catalogue = cleanup.enter_context(temporary_database(stack, "cat"))
        for dsn in (source, catalogue):  # as make_database does: scanned for the stack's secrets before the drop
            cleanup.callback(secrets_guard.scan_database_before_drop, dsn, "the shared platform of " + __name__)
        s3 = boto3.client("s3", endpoint_url=env["WEDBACKUP_S3_ENDPOINT_URL"], region_name=env["WEDBACKUP_S3_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": env["WEDBACKUP_S3_REGION"]})
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        storage.Client(project=env["WEDBACKUP_GCS_PROJECT"], credentials=AnonymousCredentials()).create_bucket(bucket)
        BlobServiceClient.from_connection_string(env["WEDBACKUP_AZURE_CONNECTION_STRING"]).create_container(bucket)
        for name, value in {
            "WEDBACKUP_SOURCE_DSN": source, "WEDBACKUP_CATALOGUE_DSN": catalogue,
            "WEDBACKUP_VAULT_DIR": str(tmp_path_factory.mktemp("shared-platform") / "vault"),
            "WEDBACKUP_S3_BUCKET": bucket, "WEDBACKUP_GCS_BUCKET": bucket, "WEDBACKUP_AZURE_CONTAINER": bucket,
        }.items():
            mp.setenv(name, value)
        demo_data.generate(source, weddings=WEDDINGS, seed=4, document_bytes=128)
        built = _backed_up_then_lost(stack, {"source": source, "catalogue": catalogue})
        try:
            yield built
        finally:
            built["engine"].catalogue.close()


def s3_only(**kw) -> disaster.RestoreAllOptions:
    return disaster.RestoreAllOptions(providers=("s3",), jobs=3, **kw)


def test_the_whole_platform_back_from_s3_alone_equals_the_source(shared_platform, make_database):
    target = make_database()
    lines: list[str] = []
    report = disaster.restore_all(shared_platform["engine"], shared_platform["replicas"], target, s3_only(),
                                  progress=lines.append)
    assert report.complete, report.lines()
    assert report.restored_now == WEDDINGS + 1 and report.partitions_total == WEDDINGS + 1
    assert report.copies_used == {"s3": WEDDINGS + 1} and not report.failed and not report.foreign_key_problems
    assert report.rows > 0 and report.bytes > 0 and report.newest_point >= report.oldest_point
    assert all(report.phases[k] >= 0 for k in ("download", "decrypt", "load", "check"))
    assert report.phases["load"] > 0 and report.phases["download"] > 0
    assert any(line.startswith(f"restore --all: {WEDDINGS + 1} of {WEDDINGS + 1} weddings (100%)") for line in lines)
    # the platform's secondary indexes, foreign keys and triggers were built once, after the weddings' rows
    assert sum(line.startswith("built the platform's indexes, foreign keys and triggers") for line in lines) == 1
    assert table_sums(target) == shared_platform["expected"]
    with psycopg.connect(target) as conn:  # complete: nothing of wedbackup's own is left in the target
        assert conn.execute("SELECT to_regnamespace('wedbackup_restore')").fetchone()[0] is None
        # sequences are past the restored rows: a new guest gets a fresh id
        biggest = conn.execute("SELECT max(id) FROM guests").fetchone()[0]
        assert conn.execute("SELECT nextval(pg_get_serial_sequence('guests', 'id'))").fetchone()[0] > biggest


def test_a_stopped_run_resumes_without_redoing_or_duplicating(shared_platform, make_database):
    engine, target = shared_platform["engine"], make_database()
    stopped = disaster.restore_all(engine, shared_platform["replicas"], target, s3_only(stop_after=2))
    assert not stopped.complete and stopped.stopped
    with psycopg.connect(target) as conn:
        first = {r[0] for r in conn.execute("SELECT partition FROM wedbackup_restore.partitions")}
    assert "platform" in first and 3 <= len(first) < WEDDINGS + 1

    with pytest.raises(RestoreError, match=r"unfinished restore --all .*--resume"):
        disaster.restore_all(engine, shared_platform["replicas"], target, s3_only())
    resumed = disaster.restore_all(engine, shared_platform["replicas"], target, s3_only(resume=True))
    assert resumed.complete, resumed.lines()
    assert resumed.restored_before == len(first) and resumed.restored_now == WEDDINGS + 1 - len(first)
    assert table_sums(target) == shared_platform["expected"]  # nothing twice, nothing missing


def test_a_wedding_damaged_everywhere_is_reported_and_a_failing_provider_falls_back(platform, make_database,
                                                                                   s3_client):
    engine = platform["engine"]
    damaged, moved = platform["weddings"][-1], "1"
    bucket = engine.settings.s3.bucket
    for wedding in (damaged, moved):
        backup = engine.catalogue.latest_backup(wedding)
        copy = next(c for c in engine.catalogue.copies(backup.id) if c.provider == "s3")
        body = bytearray(s3_client.get_object(Bucket=bucket, Key=copy.object_key)["Body"].read())
        body[len(body) // 2] ^= 0x01
        s3_client.put_object(Bucket=bucket, Key=copy.object_key, Body=bytes(body))
    target = make_database()
    options = disaster.RestoreAllOptions(providers=disaster.copy_order("s3"), jobs=2)
    report = disaster.restore_all(engine, platform["replicas"], target, options)
    assert not report.complete and set(report.failed) == {damaged}
    assert f"wedding {damaged}" in "\n".join(report.lines()) and "s3:" in report.failed[damaged]
    assert report.copies_used == {"s3": WEDDINGS - 1, "gcs": 1}
    assert len(report.fallbacks) == 1 and report.fallbacks[0].startswith("wedding 1: s3:")
    assert report.fallbacks[0].endswith("restored from gcs")
    got, want = table_sums(target), platform["expected"]
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM weddings WHERE id = %s", (int(damaged),)).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM weddings").fetchone()[0] == WEDDINGS - 1
    assert got["public.vendors"] == want["public.vendors"]  # the platform partition is whole


def test_one_provider_lost_the_others_serve_and_what_only_it_held_is_named(shared_platform, make_database):
    """S3 is gone (nothing answers where it was): the platform and weddings 1 and 2 come from GCS, each fall-back
    in the report; the weddings S3 alone held are reported by name with S3's error, the others restored."""
    from dataclasses import replace

    engine = shared_platform["engine"]
    gone = replace(engine.settings.s3, endpoint_url="http://127.0.0.1:9")  # the discard port: refused at once
    lost = S3Replica(s3_client_from(gone, os.environ, config=client_config(connect_timeout=1, max_attempts=1)), gone)
    target = make_database()
    report = disaster.restore_all(engine, {"s3": lost, "gcs": shared_platform["replicas"]["gcs"]}, target,
                                  disaster.RestoreAllOptions(providers=disaster.copy_order("s3"), jobs=2))
    only_s3 = set(shared_platform["weddings"]) - {"1", "2"}
    assert not report.complete and set(report.failed) == only_s3
    assert all("s3:" in report.failed[w] for w in only_s3), report.failed
    assert report.copies_used == {"gcs": 3}
    assert sorted(line.split(":")[0] for line in report.fallbacks) == ["the platform partition", "wedding 1",
                                                                        "wedding 2"]
    assert all(line.endswith("restored from gcs") for line in report.fallbacks)
    # After three failures in a row S3 is tried last (copy_health.py), never skipped: the weddings only it
    # held still tried it, and failed naming it.
    assert len(report.tried_last) == 1 and report.tried_last[0].startswith("s3 tried last for "), report.tried_last
    assert any(line.startswith("  tried last: s3 tried last for ") for line in report.lines())
    assert not report.foreign_key_problems
    got, want = table_sums(target), shared_platform["expected"]
    assert got["public.vendors"] == want["public.vendors"]
    with psycopg.connect(target) as conn:
        assert {r[0] for r in conn.execute("SELECT id::text FROM weddings")} == {"1", "2"}


def test_a_provider_that_fails_mid_restore_moves_the_weddings_to_another_copy(shared_platform, make_database):
    """S3 (through a real fault proxy) serves the platform partition, then answers 503 to everything: weddings 1
    and 2 move to their GCS copies (each a fall-back in the report), the weddings S3 alone held are named with
    S3's error after every retry, and what was restored is exactly the source's."""
    from dataclasses import replace
    from urllib.parse import urlsplit

    from wedbackup_dagster_tests.reliability.faultproxy import FailingAfter

    engine = shared_platform["engine"]
    upstream = urlsplit(engine.settings.s3.endpoint_url)
    with FailingAfter("s3", (upstream.hostname, upstream.port), good=1, kind="http_503") as proxy:
        via = replace(engine.settings.s3, endpoint_url=f"http://{proxy.address}")
        failing = S3Replica(s3_client_from(via, os.environ, config=client_config(connect_timeout=1, max_attempts=1)),
                            via)
        target = make_database()
        report = disaster.restore_all(engine, {"s3": failing, "gcs": shared_platform["replicas"]["gcs"]}, target,
                                      disaster.RestoreAllOptions(providers=disaster.copy_order("s3"), jobs=2))
    assert proxy.counts["http_503"] > 0 and report.copies_used.get("s3") == 1  # the platform, before the failure
    only_s3 = set(shared_platform["weddings"]) - {"1", "2"}
    assert not report.complete and set(report.failed) == only_s3
    assert all("s3:" in report.failed[w] and "503" in report.failed[w] for w in only_s3), report.failed
    moved = [line for line in report.fallbacks if line.startswith(("wedding 1:", "wedding 2:"))]
    assert len(moved) == 2 and all("s3:" in line and line.endswith("restored from gcs") for line in moved)
    assert not report.foreign_key_problems
    got, want = table_sums(target), shared_platform["expected"]
    assert got["public.vendors"] == want["public.vendors"]
    with psycopg.connect(target) as conn:
        assert {r[0] for r in conn.execute("SELECT id::text FROM weddings")} == {"1", "2"}


def test_refuses_a_target_in_use_the_source_and_the_catalogue(shared_platform, make_database, stack):
    engine = shared_platform["engine"]
    busy = make_database()
    with psycopg.connect(busy) as conn:
        conn.execute("CREATE TABLE public.orders (id int)")
    with pytest.raises(RestoreError, match=r"is not empty: .*public\.orders"):
        disaster.restore_all(engine, shared_platform["replicas"], busy, s3_only())
    with pytest.raises(RestoreError, match=r"is not empty: .*public\.orders"):
        disaster.restore_all(engine, shared_platform["replicas"], busy, s3_only(resume=True))
    # The catalogue, however its DSN is written (another host spelling, extra options): refused by identity.
    parts = conninfo_to_dict(engine.settings.catalogue_dsn)
    other = make_conninfo(**{**parts, "host": "localhost" if parts.get("host") != "localhost" else "127.0.0.1",
                             "application_name": "x", "connect_timeout": "7"})
    with pytest.raises(RestoreError, match=r"is the catalogue database \(WEDBACKUP_CATALOGUE_DSN\)"):
        disaster.restore_all(engine, shared_platform["replicas"], other, s3_only())
    with pytest.raises(RestoreError, match=r"is the live source database") as err:
        disaster.restore_all(engine, shared_platform["replicas"], shared_platform["source"], s3_only())
    password = parts.get("password")
    assert not password or password not in str(err.value)


def test_after_a_catalogue_loss_the_platform_comes_back_from_s3_and_the_key_backup(platform, make_database):
    """Catalogue lost too: a new one rebuilt from S3 alone (wedding keys from the key-store backup sealed
    with the master key), then restore --all of the newest backups (verification history is not in storage)."""
    import dataclasses

    from wedbackup_dagster.core.keys.backup import back_up_key_store
    from wedbackup_dagster.core.catalogue.rebuild_from_storage import rebuild_from

    engine, replicas = platform["engine"], platform["replicas"]
    back_up_key_store(engine.settings, engine.catalogue, {"s3": replicas["s3"]}, engine.keyring)
    fresh = Engine(dataclasses.replace(engine.settings, catalogue_dsn=make_database()), engine.keyring)
    try:
        rebuilt = rebuild_from(replicas["s3"], fresh.catalogue, fresh.keyring)
        assert rebuilt.keys_restored == WEDDINGS + 1 and rebuilt.backups_added == WEDDINGS + 1, rebuilt.to_dict()
        plan = disaster.recovery_plan(fresh.catalogue, "source-lost")
        assert set(plan.missing) == {"platform", *platform["weddings"]}  # nothing verified in a rebuilt catalogue
        target = make_database()
        with pytest.raises(RestoreError, match="no verified backup"):
            disaster.restore_all(fresh, replicas, target, s3_only())
        restored = make_database()
        report = disaster.restore_all(fresh, replicas, restored, s3_only(include_unverified=True))
        assert report.complete, report.lines()
        assert table_sums(restored) == platform["expected"]
    finally:
        fresh.catalogue.close()


def test_insert_triggers_are_held_off_while_the_workers_load(demo_env, make_database):
    """A user trigger that fires on INSERT would change restored rows: each load holds it off (and the run
    says the workers queue on those tables), and it is enabled again afterwards."""
    source = demo_env(weddings=3, seed=8, document_bytes=64)["source"]
    with psycopg.connect(source) as conn:
        conn.execute("CREATE FUNCTION public.shout() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN NEW.first_name := upper(NEW.first_name) || '!'; RETURN NEW; END $$")
        conn.execute("CREATE TRIGGER shout BEFORE INSERT ON public.guests FOR EACH ROW EXECUTE FUNCTION public.shout()")
    engine = Engine.from_env()
    ensure_targets(engine.settings)
    try:
        with engine.snapshot_session() as session:
            for p in ("platform", "1", "2", "3"):
                engine.back_up(p, session)
        target, lines = make_database(), []
        report = disaster.restore_all(engine, {}, target, disaster.RestoreAllOptions(jobs=3, include_unverified=True),
                                      progress=lines.append)
        assert report.complete, report.lines()
        assert any("user triggers fire on INSERT (public.guests: shout)" in line for line in lines)
        assert table_sums(target) == table_sums(source)
        with psycopg.connect(target) as conn:
            assert conn.execute("SELECT tgenabled FROM pg_trigger WHERE tgname = 'shout'").fetchone()[0] == "O"
    finally:
        engine.catalogue.close()


def test_an_erased_wedding_stays_erased_after_restore_all(platform, make_database):
    """GDPR: wedding 2 erased after the backups. restore --all skips it (named) and removes it again from the
    platform partition's rows, which were backed up before the erasure."""
    from wedbackup_dagster.core.governance.erasure import erase_wedding

    engine = platform["engine"]
    erase_wedding(engine.catalogue, engine.vault, platform["replicas"], "2", requested_by="test")
    target = make_database()
    report = disaster.restore_all(engine, platform["replicas"], target, s3_only())
    assert report.complete and report.erased == ["2"] and report.partitions_total == WEDDINGS
    assert "erased, not restored: wedding 2" in "\n".join(report.lines())
    assert any("platform_audit" in line for line in report.erasures_reapplied)
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM weddings WHERE id = 2").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM platform_audit WHERE entity = 'wedding' AND entity_id::text = '2'"
                            ).fetchone()[0] == 0
