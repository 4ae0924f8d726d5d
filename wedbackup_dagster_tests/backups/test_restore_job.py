"""The `restore_wedding` job on the real stack: an in-place restore (dry run first) and a restore into
another database from a replica, with progress in the run's log and no DSN in Dagster's run storage."""
from __future__ import annotations

import os

import dagster as dg
import psycopg
import pytest

from wedbackup_dagster.backups.restore_job import TARGET_DSN_VARIABLE
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.storage.replicas import S3Replica
from wedbackup_dagster.core.storage.providers import ensure_targets
from wedbackup_dagster.core.storage.replicas.s3 import s3_client_from
from wedbackup_dagster.definitions import defs

pytestmark = pytest.mark.stack

GUESTS = "SELECT count(*), md5(coalesce(string_agg(g::text, '|' ORDER BY g.id), '')) FROM guests g WHERE wedding_id = 3"


@pytest.fixture
def backed_up(demo_env):
    source = demo_env(weddings=4, seed=2, document_bytes=64)["source"]
    engine = Engine.from_env()
    ensure_targets(engine.settings)
    for partition in ("platform", "3"):
        with engine.snapshot_session() as session:
            engine.back_up(partition, session)
        engine.replicate(partition, S3Replica(s3_client_from(engine.settings.s3, os.environ), engine.settings.s3))
        engine.verify(partition, {})
    with psycopg.connect(source) as conn:
        archived = conn.execute(GUESTS).fetchone()
        conn.execute("DELETE FROM guests WHERE id IN (SELECT id FROM guests WHERE wedding_id = 3 ORDER BY id LIMIT 2)")
    with dg.instance_for_test() as instance:
        yield {"source": source, "instance": instance, "archived": archived}
    engine.catalogue.close()


def execute(instance, config: dict):
    return defs.resolve_job_def("restore_wedding").execute_in_process(
        instance=instance, raise_on_error=False, run_config={"ops": {"restore_partition": {"config": config}}})


def messages(instance, run_id: str) -> list[str]:
    return [e.message for e in instance.all_logs(run_id) if e.message]


def test_in_place_dry_run_then_restore_through_dagster(backed_up):
    instance, source = backed_up["instance"], backed_up["source"]
    dry = execute(instance, {"partition": "3", "mode": "in_place", "dry_run": True})
    assert dry.success
    report = dry.output_for_node("restore_partition")
    guests = next(t for t in report["tables"] if t["table"] == "public.guests")
    assert (guests["add"], guests["remove"], guests["change"]) == (2, 0, 0)
    with psycopg.connect(source) as conn:
        assert conn.execute(GUESTS).fetchone() != backed_up["archived"]  # nothing written

    done = execute(instance, {"partition": "3", "mode": "in_place"})
    assert done.success
    with psycopg.connect(source) as conn:
        assert conn.execute(GUESTS).fetchone() == backed_up["archived"]
    log = messages(instance, done.run_id)
    assert any(m.startswith("public.guests:") and m.endswith("rows inserted") for m in log)
    assert any("recovery point" in m for m in log) and any("rows locked" in m for m in log)
    meta = next(e for e in instance.all_logs(done.run_id) if e.dagster_event and e.dagster_event.is_successful_output)
    metadata = meta.dagster_event.event_specific_data.metadata
    assert metadata["rows_added"].value == 2
    guests = next(r for r in metadata["tables"].records if r.data["table"] == "public.guests")
    assert (guests.data["add"], guests.data["remove"]) == (2, 0)


def test_restore_into_another_database_reads_its_dsn_from_the_environment(backed_up, make_database, monkeypatch):
    instance = backed_up["instance"]
    target = make_database()
    monkeypatch.setenv(TARGET_DSN_VARIABLE, target)
    assert execute(instance, {"partition": "platform"}).success  # the old config still works
    result = execute(instance, {"partition": "3", "provider": "s3"})
    assert result.success
    with psycopg.connect(target) as conn:
        assert conn.execute(GUESTS).fetchone() == backed_up["archived"]
    run = instance.get_run_by_id(result.run_id)
    password = target.split("@")[0].split(":")[-1]
    assert target not in str(run.run_config) and password not in str(run.run_config)
    assert all(password not in m for m in messages(instance, result.run_id))

    # No point before the time asked: the failure names the wedding and the time.
    failed = execute(instance, {"partition": "3", "as_of": "2000-01-01T00:00:00Z"})
    assert not failed.success
    error = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE")
    assert "wedding 3: has no backup at or before 2000-01-01T00:00:00+00:00" in \
        error.step_failure_data.user_failure_data.description


def test_a_target_restore_refuses_the_live_and_catalogue_databases(backed_up):
    """From the launchpad anyone can type a variable name: the source and the catalogue are never targets."""
    instance = backed_up["instance"]
    for variable in ("WEDBACKUP_SOURCE_DSN", "WEDBACKUP_CATALOGUE_DSN"):
        result = execute(instance, {"partition": "3", "target_dsn_env": variable})
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        assert variable in str(failure.step_failure_data.error)
