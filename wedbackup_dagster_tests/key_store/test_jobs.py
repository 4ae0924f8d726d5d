"""The key jobs in Dagster on the real stack: `key_store_backup` writes a key backup once and then finds it
current (what the sensor asks), `rotate_keys` re-wraps every wedding key and replaces the key backups."""
from __future__ import annotations

import base64

import dagster as dg
import psycopg

from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.keys.backup import key_backup_is_current
from wedbackup_dagster.core.keys.keyring import MasterKeyring, SecretKey
from wedbackup_dagster.definitions import defs
from wedbackup_dagster_tests.core.keys.test_backup import back_up, engine, replicas_of
from wedbackup_dagster.shared.resources import WedbackupEngineResource


def _metadata(result, op: str) -> dict:
    [materialization] = [e for e in result.events_for_node(op) if e.event_type_value == "STEP_OUTPUT"]
    return {k: getattr(v, "value", v) for k, v in materialization.event_specific_data.metadata.items()}


def test_key_store_backup_job_then_rotate_keys_job(engine, monkeypatch):
    back_up(engine, ["1", "2"], replicas_of(engine))
    instance = dg.DagsterInstance.ephemeral()
    catalogue = Catalogue(engine.settings.catalogue_dsn)
    assert key_backup_is_current(catalogue, engine.keyring)[0] is False

    job = defs.resolve_job_def("key_store_backup")
    first = job.execute_in_process(instance=instance)
    assert first.success
    meta = _metadata(first, "back_up_key_store_op")
    assert meta["wedding_keys"] == 2 and meta["copies"] == "azure, gcs, s3, vault" and not meta["skipped"]
    assert key_backup_is_current(catalogue, engine.keyring)[0] is True
    again = _metadata(job.execute_in_process(instance=instance), "back_up_key_store_op")
    assert again["key_backup_sha256"] == meta["key_backup_sha256"] and again["skipped"]

    old, new = engine.keyring.current, SecretKey.generate("master-job")
    monkeypatch.setenv("WEDBACKUP_MASTER_KEY", ",".join(
        f"{k.key_id}:{base64.b64encode(k.material).decode()}" for k in (new, old)))
    assert key_backup_is_current(catalogue, MasterKeyring([new, old]))[0] is False  # sealed with the old key
    rotated = defs.resolve_job_def("rotate_keys").execute_in_process(instance=instance)
    assert rotated.success
    meta = _metadata(rotated, "rotate_master_key_op")
    assert meta["rewrapped"] == 2 and meta["master_key_id"] == "master-job"
    with psycopg.connect(engine.settings.catalogue_dsn) as conn:
        assert conn.execute("SELECT DISTINCT master_key_id FROM wedbackup.wedding_keys").fetchall() == [("master-job",)]
        assert conn.execute("SELECT master_key_id FROM wedbackup.key_backups WHERE deleted_at IS NULL"
                            ).fetchall() == [("master-job",)]
    assert key_backup_is_current(catalogue, MasterKeyring([new]))[0] is True


def test_sensor_asks_for_a_key_backup_only_when_a_backup_run_made_a_new_key(engine):
    from wedbackup_dagster.key_store import key_store_backup_after_backups

    instance = dg.DagsterInstance.ephemeral()

    @dg.op
    def noop():
        return None

    @dg.job
    def finished():
        noop()

    run = finished.execute_in_process(instance=instance)
    event = next(e for e in run.all_events if e.event_type_value == "PIPELINE_SUCCESS")

    def evaluate():
        with dg.build_run_status_sensor_context(
                sensor_name="key_store_backup_after_backups", dagster_event=event, dagster_instance=instance,
                dagster_run=run.dagster_run, resources={"wedbackup": WedbackupEngineResource()}) as context:
            return key_store_backup_after_backups(context)

    replicas = replicas_of(engine)
    back_up(engine, ["1"], replicas)
    asked = evaluate()
    assert isinstance(asked, dg.RunRequest) and asked.run_key.startswith("keys-")
    assert evaluate().run_key == asked.run_key  # same key set, same run key: Dagster launches it once
    defs.resolve_job_def("key_store_backup").execute_in_process(instance=instance)
    assert isinstance(evaluate(), dg.SkipReason)
    back_up(engine, ["2"], replicas)  # a new wedding key
    again = evaluate()
    assert isinstance(again, dg.RunRequest) and again.run_key != asked.run_key
