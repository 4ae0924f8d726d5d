"""Regression tests for what the soak found, each with one fault injected on purpose: a verification
whose download is cut short retries it instead of failing the wedding, and a scratch server that drops
the connection fails only that wedding, with an error naming it (not a bare driver error)."""
from __future__ import annotations

import dataclasses

import psycopg
import pytest

from wedbackup_dagster.dev import demo_data
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.errors import RestoreError
from wedbackup_dagster.core.storage.replicas import S3Replica, s3_client_from

from .conftest import fault_proxies
from .faultproxy import FaultSchedule

pytestmark = [pytest.mark.stack]


@pytest.fixture
def backed_up(stack, make_database, tmp_path, monkeypatch, s3_bucket, s3_client):
    source, catalogue = make_database(), make_database()
    for name, value in {"WEDBACKUP_SOURCE_DSN": source, "WEDBACKUP_CATALOGUE_DSN": catalogue,
                        "WEDBACKUP_VAULT_DIR": str(tmp_path / "vault"), "WEDBACKUP_S3_BUCKET": s3_bucket}.items():
        monkeypatch.setenv(name, value)
    demo_data.generate(source, weddings=2, seed=3, document_bytes=20_000)
    engine = Engine.from_env()
    with engine.snapshot_session() as session:
        engine.back_up("1", session)
    engine.replicate("1", S3Replica(s3_client, engine.settings.s3))
    return engine


def test_a_download_cut_short_is_retried_and_the_verification_passes(stack, backed_up, monkeypatch):
    engine = backed_up
    schedule = FaultSchedule(seed=1, rate=1.0, weights={"truncate": 1}, limit=1)
    with fault_proxies(stack.env(), {"s3": schedule}) as (proxies, routed):
        target = engine.settings.s3
        via_proxy = dataclasses.replace(target, endpoint_url=routed["WEDBACKUP_S3_ENDPOINT_URL"])
        proxied = S3Replica(s3_client_from(via_proxy, stack.env()), target)
        monkeypatch.setattr(engine, "download_attempts", 2)
        outcome = engine.verify("1", {"s3": proxied}, provider="s3")
        assert outcome.provider == "s3" and proxies["s3"].counts == {"truncate": 1}


def test_a_lost_scratch_connection_fails_the_wedding_by_name(stack, backed_up):
    engine = backed_up
    # Reset at the first byte: the scratch server's admin session is lost before CREATE DATABASE.
    schedule = FaultSchedule(seed=1, rate=1.0, weights={"reset": 1}, tcp_after=(0, 0))
    with fault_proxies(stack.env(), {"postgres": schedule}) as (proxies, routed):
        broken = Engine(dataclasses.replace(engine.settings, scratch_dsn=routed["WEDBACKUP_SCRATCH_DSN"]),
                        engine.keyring, engine.catalogue)
        with pytest.raises(RestoreError, match=r"wedding 1: the verification restore failed \(scratch server: "):
            broken.verify("1", {}, provider="vault")
        assert proxies["postgres"].counts["reset"] >= 1
    assert engine.catalogue.restore_count(engine.catalogue.require_latest_backup("1").id) == 1  # recorded, not ok



def test_a_connection_lost_mid_verification_reports_the_loss_itself(stack, backed_up):
    from psycopg.conninfo import conninfo_to_dict

    from wedbackup_dagster.core.postgres.load_snapshot import verify_restored
    from wedbackup_dagster.core.formats.snapshot_stream import Manifest

    engine = backed_up
    manifest = Manifest.from_dict(engine.catalogue.require_latest_backup("1").manifest)
    # The source holds exactly the rows the manifest describes: verify against it, cut after 16 KiB.
    schedule = FaultSchedule(seed=1, rate=1.0, weights={"reset": 1}, tcp_after=(16 << 10, 16 << 10))
    env = {**stack.env(), "WEDBACKUP_SOURCE_DSN": engine.settings.source_dsn}
    assert verify_restored(engine.settings.source_dsn, manifest).ok
    with fault_proxies(env, {"postgres": schedule}) as (_, routed):
        port = conninfo_to_dict(routed["WEDBACKUP_SOURCE_DSN"])["port"]
        assert port != conninfo_to_dict(env["WEDBACKUP_SOURCE_DSN"])["port"]  # through the proxy
        with pytest.raises(psycopg.OperationalError) as caught:
            verify_restored(routed["WEDBACKUP_SOURCE_DSN"], manifest)
    assert "the connection is closed" not in str(caught.value)  # the loss itself, not a ROLLBACK after it


def test_a_source_lost_mid_snapshot_is_a_snapshot_error_naming_the_database(stack, backed_up):
    from wedbackup_dagster.core.errors import SnapshotError

    engine = backed_up
    env = {**stack.env(), "WEDBACKUP_SOURCE_DSN": engine.settings.source_dsn}
    # Only the first connection (the snapshot session's own, opened before pg_dump's) is cut.
    schedule = FaultSchedule(seed=1, rate=1.0, weights={"reset": 1}, tcp_after=(16 << 10, 16 << 10), limit=1)
    with fault_proxies(env, {"postgres": schedule}) as (_, routed):
        cut = Engine(dataclasses.replace(engine.settings, source_dsn=routed["WEDBACKUP_SOURCE_DSN"]),
                     engine.keyring, engine.catalogue)
        with pytest.raises(SnapshotError, match=r"snapshot of database \w+ on 127\.0\.0\.1:\d+ failed: the "
                                                r"connection was lost"):
            with cut.snapshot_session() as session:
                cut.back_up_many(["1", "2"], session)
    assert list(engine.vault.root.glob("*/.incoming-*")) == []  # the half-sealed archives were removed
    assert engine.catalogue.latest_backup("2") is None
