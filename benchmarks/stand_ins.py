"""A throw-away benchmark environment on the local stack: a demo source database, an empty catalogue, a
vault directory and one bucket/container per provider stand-in, set in the WEDBACKUP_* environment for
the duration and dropped afterwards (the databases; the stand-ins' buckets live in memory).

Each environment starts on freshly started stand-ins (`fresh_stand_ins`): they keep every object they were
sent in memory, and after an earlier part of `make bench` had filled them (about 6 GB by the whole-job
fleet part) they slowed the later parts' uploads and downloads, which measured the stand-ins' fill and
not our code."""
from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any


def fresh_stand_ins(stack: Any) -> None:
    """Restart the S3, GCS and Azure stand-ins the stack started (PostgreSQL stays): empty, as a part of
    the bench found them when run alone. Stand-ins this stack did not start (no pid recorded) are left."""
    with stack.locked():  # another process restarting them meanwhile would find the ports half taken
        for name in ("s3", "gcs", "azure"):
            if stack.recorded_pid(name) is not None:
                stack.stop_service(name)
        stack.up(("s3", "gcs", "azure"))


@contextlib.contextmanager
def bench_environment(prefix: str, *, weddings: int, seed: int, document_bytes: int) -> Iterator[dict[str, Any]]:
    """Yields {"stack", "env", "source", "catalogue", "vault", "bucket", "s3", "gcs", "azure", "summary",
    "dagster_pg_url"}
    (the clients are the providers' own SDK clients, for peers that upload without wedbackup)."""
    import boto3
    import psycopg
    from azure.storage.blob import BlobServiceClient
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    from psycopg import sql

    from wedbackup_dagster.dev import demo_data
    from wedbackup_dagster.dev.stack import Stack

    stack = Stack.default()
    stack.up()
    fresh_stand_ins(stack)
    env = stack.env()
    saved = dict(os.environ)
    tag = uuid.uuid4().hex[:8]
    # source, catalogue, and the Dagster instance's storage (dagster-postgres, as `wedbackup backup` uses
    # on the stack and production uses): see dagster_instance() below.
    names = [f"{prefix}_src_{tag}", f"{prefix}_cat_{tag}", f"{prefix}_dag_{tag}"]
    bucket = f"{prefix.replace('_', '-')}-{tag}"
    with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with tempfile.TemporaryDirectory(prefix=f"{prefix}-") as work:
            vault = os.path.join(work, "vault")
            os.environ.update(env)
            os.environ.update({"WEDBACKUP_SOURCE_DSN": stack.dsn(names[0]),
                               "WEDBACKUP_CATALOGUE_DSN": stack.dsn(names[1]), "WEDBACKUP_VAULT_DIR": vault,
                               "WEDBACKUP_S3_BUCKET": bucket, "WEDBACKUP_GCS_BUCKET": bucket,
                               "WEDBACKUP_AZURE_CONTAINER": bucket})
            region = env["WEDBACKUP_S3_REGION"]
            s3 = boto3.client("s3", endpoint_url=env["WEDBACKUP_S3_ENDPOINT_URL"], region_name=region,
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
            s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
            gcs = storage.Client(project=env["WEDBACKUP_GCS_PROJECT"], credentials=AnonymousCredentials())
            gcs.create_bucket(bucket)
            azure = BlobServiceClient.from_connection_string(env["WEDBACKUP_AZURE_CONNECTION_STRING"])
            azure.create_container(bucket)
            summary = demo_data.generate(stack.dsn(names[0]), weddings=weddings, seed=seed,
                                         document_bytes=document_bytes)
            yield {"stack": stack, "env": env, "source": stack.dsn(names[0]), "catalogue": stack.dsn(names[1]),
                   "vault": vault, "work": work, "bucket": bucket, "s3": s3, "gcs": gcs, "azure": azure,
                   "summary": summary, "dagster_pg_url": stack.dsn(names[2])}
    finally:
        os.environ.clear()
        os.environ.update(saved)
        with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
            for name in names:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def dagster_instance(bench: dict[str, Any]) -> Iterator[Any]:
    """A throw-away Dagster instance on the bench's own PostgreSQL database, with the storage `wedbackup
    backup` uses on the local stack (the project's dagster.yaml: instance/storage.py: LocalStackStorage, i.e.
    dagster-postgres with a pooled event log), not a temporary SQLite instance (SQLite stores every event
    with its own commit)."""
    import dagster as dg

    variable = "WEDBACKUP_BENCH_DAGSTER_PG_URL"
    os.environ[variable] = bench["dagster_pg_url"]
    storage = {"custom": {"module": "wedbackup_dagster.instance.storage", "class": "LocalStackStorage",
                          "config": {"postgres_url_env": variable}}}
    try:
        with dg.instance_for_test(overrides={"storage": storage}) as instance:
            yield instance
    finally:
        os.environ.pop(variable, None)
