"""Shared fixtures: the real local stack, brought up once per test session, and per-test isolation
(each test gets its own databases, buckets and containers, so tests never see each other's data)."""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator

import pytest

# The upload steps' retries pause 0.1 s, not 1 s (then doubling): tests of a refused or down provider retry the step
# three times, and the pauses were most of their time. Set before the Dagster definitions are imported; a test
# that sets its own value keeps it.
os.environ.setdefault("WEDBACKUP_UPLOAD_RETRY_DELAY", "0.1")

from wedbackup_dagster.core.catalogue.store import Catalogue  # noqa: E402 - after the setting above
from wedbackup_dagster.dev.stack import Stack

# After the session, nothing the suite wrote may hold a secret of the stack (see secrets_guard.py).
pytest_plugins = ["wedbackup_dagster_tests.secrets_guard", "pytester"]


# Under pytest-xdist (`make test` runs two workers) the controller brings the stack up once, before the workers
# start, and stops it after they have all finished if it started it: each worker then finds it up and leaves it,
# where a worker stopping a stack it had started would pull it from under the other.
_STARTED_FOR_WORKERS: list[Stack] = []


def _xdist_controller(config: pytest.Config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    if _xdist_controller(session.config):
        st = Stack.default()
        if not st.is_up():
            st.up()
            if not os.environ.get("WEDBACKUP_KEEP_STACK"):
                _STARTED_FOR_WORKERS.append(st)


def pytest_unconfigure(config: pytest.Config) -> None:
    # After pytest_sessionfinish, where the secrets guard has scanned the running database server.
    while _STARTED_FOR_WORKERS:
        _STARTED_FOR_WORKERS.pop().down()


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The running local stack. Reused when already up; stopped at the end only if this session started it."""
    st = Stack.default()
    was_up = st.is_up()
    st.up()
    saved = dict(os.environ)
    os.environ.update(st.env())
    try:
        yield st
    finally:
        from . import secrets_guard

        secrets_guard.scan_database_server(st)  # while the server still runs
        os.environ.clear()
        os.environ.update(saved)
        if not was_up and not os.environ.get("WEDBACKUP_KEEP_STACK"):
            st.down()


def unique_name(prefix: str) -> str:
    """Lower-case, DNS-safe, unique: valid as a database, bucket and container name."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def temporary_database(stack: Stack, prefix: str) -> Iterator[str]:
    """A new empty database for a module-scoped fixture (make_database is per test): its DSN, force-dropped
    afterwards."""
    import psycopg
    from psycopg import sql

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = stack.dsn("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield stack.dsn(name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def make_database(stack: Stack) -> Iterator[Callable[..., str]]:
    """Factory: `make_database(template=None) -> dsn` of a new empty database, dropped after the test."""
    import psycopg
    from psycopg import sql

    created: list[str] = []

    def make(template: str | None = None) -> str:
        name = unique_name("t").replace("-", "_")
        with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
            stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template:
                stmt = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                         sql.Identifier(template))
            conn.execute(stmt)
        created.append(name)
        return stack.dsn(name)

    yield make
    from . import secrets_guard

    for name in created:
        secrets_guard.scan_database_before_drop(stack.dsn(name), name)
    with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
        for name in created:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def s3_client(stack: Stack):
    import boto3

    env = stack.env()
    return boto3.client("s3", endpoint_url=env["WEDBACKUP_S3_ENDPOINT_URL"], region_name=env["WEDBACKUP_S3_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture
def s3_bucket(s3_client) -> str:
    """A fresh versioned S3 bucket on the moto stand-in."""
    name = unique_name("wb")
    s3_client.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3_client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


@pytest.fixture
def gcs_client(stack: Stack):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project=stack.env()["WEDBACKUP_GCS_PROJECT"], credentials=AnonymousCredentials())


@pytest.fixture
def gcs_bucket(gcs_client) -> str:
    name = unique_name("wb")
    gcs_client.create_bucket(name)
    return name


@pytest.fixture
def azure_service(stack: Stack):
    from azure.storage.blob import BlobServiceClient

    return BlobServiceClient.from_connection_string(stack.env()["WEDBACKUP_AZURE_CONNECTION_STRING"])


@pytest.fixture
def azure_container(azure_service) -> str:
    name = unique_name("wb")
    azure_service.create_container(name)
    return name


@pytest.fixture
def s3_lock_bucket(s3_client) -> str:
    """A fresh S3 bucket with Object Lock enabled (and so versioning) on the moto stand-in."""
    name = unique_name("wbl")
    s3_client.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"},
                            ObjectLockEnabledForBucket=True)
    return name


@pytest.fixture
def postgres_dagster_instance(tmp_path, make_database, monkeypatch):
    """A Dagster instance on stock dagster-postgres storage (what deployments/ runs) in a fresh database; its
    URL comes from the environment, as in a deployment, so no password lands in the dagster.yaml."""
    import dagster as dg

    monkeypatch.setenv("WEDBACKUP_TEST_DAGSTER_PG_URL", make_database())
    home = tmp_path / "dagster_home_pg"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "storage:\n  postgres:\n    postgres_url: {env: WEDBACKUP_TEST_DAGSTER_PG_URL}\n"
        "telemetry:\n  enabled: false\n")
    instance = dg.DagsterInstance.from_config(str(home))
    yield instance
    instance.dispose()


@pytest.fixture
def demo_env(stack, make_database, tmp_path, monkeypatch, s3_bucket, gcs_bucket, azure_container):
    """Factory: `demo_env(weddings=, seed=, document_bytes=, **extra)` -> {"source": dsn, "catalogue": dsn}. A
    fresh source database of demo weddings, an empty catalogue, a vault under tmp_path and this test's
    buckets, all set in the WEDBACKUP_* environment (with `extra` variables set or overriding)."""
    from wedbackup_dagster.dev import demo_data

    def make(*, weddings: int, seed: int, document_bytes: int, **extra: str) -> dict[str, str]:
        source, catalogue = make_database(), make_database()
        for name, value in {
            "WEDBACKUP_SOURCE_DSN": source, "WEDBACKUP_CATALOGUE_DSN": catalogue,
            "WEDBACKUP_VAULT_DIR": str(tmp_path / "vault"), "WEDBACKUP_S3_BUCKET": s3_bucket,
            "WEDBACKUP_GCS_BUCKET": gcs_bucket, "WEDBACKUP_AZURE_CONTAINER": azure_container, **extra,
        }.items():
            monkeypatch.setenv(name, value)
        demo_data.generate(source, weddings=weddings, seed=seed, document_bytes=document_bytes)
        return {"source": source, "catalogue": catalogue}

    return make


@pytest.fixture
def catalogue(stack, make_database, monkeypatch) -> Iterator[Catalogue]:
    """A fresh, migrated catalogue in its own database, set as WEDBACKUP_CATALOGUE_DSN, with the default
    policy (no WEDBACKUP_POLICY_FILE)."""
    dsn = make_database()
    monkeypatch.setenv("WEDBACKUP_CATALOGUE_DSN", dsn)
    monkeypatch.delenv("WEDBACKUP_POLICY_FILE", raising=False)
    cat = Catalogue(dsn)
    cat.migrate()
    yield cat
    cat.close()
