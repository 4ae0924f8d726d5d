"""The production dagster.yaml against the real PostgreSQL: a Dagster instance made from that file,
pointed at a fresh database, runs a real backup; its runs, materializations and pool slots are then
read back from PostgreSQL by a second instance, as the webserver and daemon of a deployment would."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict

from wedbackup_dagster.backups.constants import (AZURE_REPLICA, DB_DUMP, ENCRYPTED_ARCHIVE, GCS_REPLICA,
                                                 S3_REPLICA, VERIFIED_RESTORE)
from wedbackup_dagster.backups.launch import register_partitions, run_job_for
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.storage.providers import ensure_targets

from .conftest import COMPOSE_FILE, PRODUCTION_DAGSTER_YAML

POOLS = {"source_db", "upload", "scratch_restore"}


@pytest.fixture
def production_home(make_database, tmp_path, monkeypatch) -> Path:
    """A DAGSTER_HOME holding the production dagster.yaml byte for byte, its DAGSTER_POSTGRES_*
    variables pointing at a new database of the local PostgreSQL."""
    parts = conninfo_to_dict(make_database())
    for name, value in {"DAGSTER_POSTGRES_HOST": parts["host"], "DAGSTER_POSTGRES_PORT": str(parts["port"]),
                        "DAGSTER_POSTGRES_DB": parts["dbname"], "DAGSTER_POSTGRES_USER": parts["user"],
                        "DAGSTER_POSTGRES_PASSWORD": parts.get("password", "")}.items():
        monkeypatch.setenv(name, value)
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_COMPUTE_LOG_DIR", str(tmp_path / "compute-logs"))  # the image sets it
    # Unchanged, run launcher included: DagsterInstance loads its run launcher only when a run is
    # launched, and these runs execute in-process, so the DockerRunLauncher (which would need a Docker
    # engine, absent here) never launches anything. Nothing of the production file is swapped.
    shutil.copy(PRODUCTION_DAGSTER_YAML, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def storage_dsn() -> str:
    return psycopg.conninfo.make_conninfo(
        host=os.environ["DAGSTER_POSTGRES_HOST"], port=os.environ["DAGSTER_POSTGRES_PORT"],
        dbname=os.environ["DAGSTER_POSTGRES_DB"], user=os.environ["DAGSTER_POSTGRES_USER"],
        password=os.environ["DAGSTER_POSTGRES_PASSWORD"])


def test_production_instance_keeps_everything_in_postgres(production_home):
    from dagster_postgres import PostgresRunStorage, PostgresScheduleStorage

    from wedbackup_dagster.instance.storage import PooledPostgresEventLogStorage

    with dg.DagsterInstance.from_config(str(production_home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        # wedbackup's event log (batched per-wedding events), not stock dagster-postgres's.
        assert type(instance.event_log_storage) is PooledPostgresEventLogStorage
        assert instance.event_log_storage.stores_check_evaluations_in_batches
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        settings = instance.get_concurrency_config()
        assert settings.run_queue_config.max_concurrent_runs == 4
        assert {limit["key"] for limit in settings.run_queue_config.tag_concurrency_limits} >= {
            "dagster/backfill", "wedbackup/catchup"}
        assert settings.pool_config.default_pool_limit == 2
        # The file's DockerRunLauncher config is valid for dagster-docker: building the launcher checks
        # it (env_vars, network, container_kwargs) without talking to a Docker engine.
        from dagster_docker import DockerRunLauncher

        launcher = instance.run_launcher
        assert isinstance(launcher, DockerRunLauncher)
        assert launcher.networks == ["wedbackup"]
        assert "WEDBACKUP_MASTER_KEY_FILE" in launcher.env_vars
        assert launcher.container_kwargs["volumes"][0] == "wedbackup_vault:/var/lib/wedbackup/vault"


@pytest.fixture
def backup_setup(demo_env, production_home):
    source = demo_env(weddings=4, seed=5, document_bytes=256)["source"]
    ensure_targets(Engine.from_env().settings)
    return {"source": source, "home": production_home}


def test_backup_run_and_its_materializations_are_read_back_from_postgres(backup_setup):
    home = backup_setup["home"]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        keys = register_partitions(instance, backup_setup["source"])
        results = run_job_for("backup_weddings", keys, instance=instance)
    assert len(results) == 1 and results[0].success, results
    run_id = results[0].run_id

    # A second instance from the same file: what the webserver or the daemon of a deployment sees.
    with dg.DagsterInstance.from_config(str(home)) as reader:
        runs = reader.get_runs(dg.RunsFilter(run_ids=[run_id]))
        assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS]
        assert runs[0].job_name == "backup_weddings"
        assert set(reader.get_dynamic_partitions("weddings")) == set(keys)
        for asset_key in (DB_DUMP, ENCRYPTED_ARCHIVE, S3_REPLICA, GCS_REPLICA, AZURE_REPLICA, VERIFIED_RESTORE):
            records = reader.fetch_materializations(dg.AssetRecordsFilter(asset_key=asset_key), limit=100).records
            assert {r.partition_key for r in records} == set(keys), asset_key
            assert {r.run_id for r in records} == {run_id}
        archive = reader.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=ENCRYPTED_ARCHIVE, asset_partitions=[keys[1]]), limit=1).records[0]
        assert len(archive.asset_materialization.metadata["archive_sha256"].value) == 64

    # And they are rows of that PostgreSQL database, not of some local SQLite file.
    with psycopg.connect(storage_dsn()) as conn:
        assert conn.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,)).fetchone() == ("SUCCESS",)
        materialized = conn.execute(
            "SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = 'ASSET_MATERIALIZATION'",
            (run_id,)).fetchone()[0]
        assert materialized == 6 * len(keys)
    assert not list(home.glob("**/*.db")), "the production instance must not fall back to SQLite"


def test_compose_pool_service_sets_each_pool_limit_in_postgres(production_home):
    """The one-shot `dagster-pools` service's own command, run with its default limits against the
    production instance: each pool gets its own slot count in Dagster's PostgreSQL."""
    service = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["dagster-pools"]
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    limits = {}
    for name, value in service["environment"].items():
        if name.startswith("POOL_"):
            # "${WEDBACKUP_POOL_SOURCE_DB:-2}" -> its default, as docker-compose would resolve it unset.
            limits[name] = value.rsplit(":-", 1)[1].rstrip("}")
    script = service["command"][0].replace("$$", "$")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **limits, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with dg.DagsterInstance.from_config(str(production_home)) as instance:
        slots = {pool: instance.event_log_storage.get_concurrency_info(pool).slot_count for pool in POOLS}
    assert slots == {"source_db": 2, "upload": 2, "scratch_restore": 1}
