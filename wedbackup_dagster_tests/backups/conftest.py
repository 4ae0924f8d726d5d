"""Fixtures of the backups tests: a small fleet backed up through Dagster on the real stack (the pattern of
backups/test_pipeline.py) with helpers to read the per-partition check evaluations a run recorded; and, for
the schedule and sensors, a fresh migrated catalogue, a small source database (weddings and guests, with
updated_at) and a test Dagster instance — all real, wired through the environment."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import dagster as dg
import psycopg
import pytest

from wedbackup_dagster_tests.conftest import unique_name

from wedbackup_dagster.backups.launch import register_partitions, run_job_for
from wedbackup_dagster.dev import demo_data
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.storage.providers import ensure_targets


@pytest.fixture(scope="module")
def fleet(stack):
    """Twelve weddings (plus platform) backed up, replicated and verified by one batched run, shared by the
    tests of a module: each test damages its own weddings only (see the test module's map)."""
    with make_fleet(stack, 12, through_dagster=True) as f:
        yield f


@contextmanager
def make_fleet(stack, weddings: int, *, through_dagster: bool):
    """A source database of `weddings` weddings, a catalogue, a vault, one bucket per provider and a test
    Dagster instance with the partitions registered. through_dagster=True backs everything up with one
    backup_weddings run (checks included); False backs up and replicates with the engine directly (faster
    setup for tests about re-verification and inventory)."""
    import tempfile

    import boto3
    import psycopg
    from azure.storage.blob import BlobServiceClient
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    from psycopg import sql

    env = stack.env()
    names = [unique_name("t").replace("-", "_") for _ in range(2)]
    with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    source, catalogue = (stack.dsn(n) for n in names)
    bucket = unique_name("wb")
    s3 = boto3.client("s3", endpoint_url=env["WEDBACKUP_S3_ENDPOINT_URL"], region_name=env["WEDBACKUP_S3_REGION"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    storage.Client(project=env["WEDBACKUP_GCS_PROJECT"], credentials=AnonymousCredentials()).create_bucket(bucket)
    BlobServiceClient.from_connection_string(env["WEDBACKUP_AZURE_CONNECTION_STRING"]).create_container(bucket)
    with tempfile.TemporaryDirectory() as vault, pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "WEDBACKUP_SOURCE_DSN": source, "WEDBACKUP_CATALOGUE_DSN": catalogue, "WEDBACKUP_VAULT_DIR": vault,
            "WEDBACKUP_S3_BUCKET": bucket, "WEDBACKUP_GCS_BUCKET": bucket, "WEDBACKUP_AZURE_CONTAINER": bucket,
        }.items():
            mp.setenv(name, value)
        demo_data.generate(source, weddings=weddings, seed=5, document_bytes=256)
        engine = Engine.from_env()
        ensure_targets(engine.settings)
        try:
            with dg.instance_for_test() as instance:
                keys = register_partitions(instance, source)
                wanted = [k for k in keys if k != "platform"]
                run_id = None
                if through_dagster:
                    results = run_job_for("backup_weddings", wanted, instance=instance)
                    assert all(r.success for r in results), results
                    run_id = results[0].run_id
                else:
                    replicas = engine_replicas(engine.settings)
                    with engine.snapshot_session() as session:
                        for key in wanted:
                            engine.back_up(key, session)
                            for replica in replicas.values():
                                engine.replicate(key, replica)
                yield {"source": source, "catalogue": Catalogue(catalogue), "engine": engine, "instance": instance,
                       "weddings": wanted, "backup_run": run_id, "s3": s3}
        finally:
            engine.catalogue.close()
            with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
                for name in names:
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def evaluations(instance: dg.DagsterInstance, run_id: str) -> dict[tuple[str, str, str | None], Any]:
    """(asset, check, partition) -> the evaluation recorded in one run."""
    out = {}
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        ev = record.dagster_event.event_specific_data
        out[(ev.asset_key.to_user_string(), ev.check_name, ev.partition)] = ev
    return out


def run_checks(instance: dg.DagsterInstance, keys: list[str]) -> dict:
    """Run the check_weddings job over `keys`; every evaluation of every run, merged."""
    out: dict = {}
    from wedbackup_dagster.backups.launch import run_checks_for

    for result in run_checks_for(keys, instance=instance):
        out.update(evaluations(instance, result.run_id))
    return out


def engine_replicas(settings) -> dict:
    """The three replicas, built from settings as the engine's callers do (outside Dagster)."""
    from wedbackup_dagster.core.storage.replicas import AzureReplica, GCSReplica, S3Replica
    from wedbackup_dagster.core.storage.replicas.azure import azure_service_from
    from wedbackup_dagster.core.storage.replicas.gcs import gcs_client_from
    from wedbackup_dagster.core.storage.replicas.s3 import s3_client_from

    return {"s3": S3Replica(s3_client_from(settings.s3), settings.s3),
            "gcs": GCSReplica(gcs_client_from(settings.gcs), settings.gcs),
            "azure": AzureReplica(azure_service_from(settings.azure), settings.azure)}


SOURCE_SCHEMA = """
CREATE TABLE weddings (id bigint PRIMARY KEY, wedding_date date NOT NULL,
                       updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE guests (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                     wedding_id bigint NOT NULL REFERENCES weddings (id) ON DELETE CASCADE,
                     name text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON guests (wedding_id);
CREATE TABLE vendors (id bigint PRIMARY KEY, name text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
"""


@pytest.fixture
def source(stack, make_database, monkeypatch) -> str:
    dsn = make_database()
    monkeypatch.setenv("WEDBACKUP_SOURCE_DSN", dsn)
    with psycopg.connect(dsn) as conn:
        conn.execute(SOURCE_SCHEMA)
    return dsn


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst
