"""A backup is not done, and its copies do not count for 3-2-1, until the wedding key that opens it is in a
key-store backup at the vault and a provider, however the backup was launched (issue 14, defect 9): the
command line's `backup` (run_job_for, no daemon, no sensor) and the list pipeline write one per run."""
from __future__ import annotations

import dagster as dg
import pytest

from wedbackup_dagster.backups.list_pipeline import list_run_config
from wedbackup_dagster.backups.launch import register_partitions, run_job_for
from wedbackup_dagster.backups.checks import three_two_one_outcomes
from wedbackup_dagster.core.policy import rules
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.keys.backup import back_up_key_store, keys_awaiting_backup
from wedbackup_dagster.core.keys.rotation import key_status
from wedbackup_dagster.core.storage.providers import ensure_targets
from wedbackup_dagster_tests.backups.conftest import engine_replicas


@pytest.fixture
def fleet(demo_env):
    dsns = demo_env(weddings=5, seed=3, document_bytes=128)
    engine = Engine.from_env()
    ensure_targets(engine.settings)
    with dg.instance_for_test() as instance:
        yield {"engine": engine, "instance": instance, "keys": register_partitions(instance, dsns["source"])}


def key_backup_copies(engine: Engine) -> dict[str, set[str]]:
    with engine.catalogue.connect() as conn:
        rows = conn.execute("SELECT k.sha256, c.provider FROM wedbackup.key_backups k JOIN "
                            "wedbackup.key_backup_copies c ON c.key_backup_id = k.id WHERE k.deleted_at IS NULL"
                            ).fetchall()
    out: dict[str, set[str]] = {}
    for r in rows:
        out.setdefault(r["sha256"], set()).add(r["provider"])
    return out


def test_a_command_line_backup_leaves_no_key_only_in_the_catalogue(fleet):
    engine, instance, keys = fleet["engine"], fleet["instance"], fleet["keys"]
    weddings = [k for k in keys if k != "platform"][:3]
    results = run_job_for("backup_weddings", weddings, instance=instance)  # what `wedbackup backup` runs
    assert all(r.success for r in results), results
    assert keys_awaiting_backup(engine.catalogue) == 0
    assert list(key_backup_copies(engine).values()) == [{"vault", "s3", "gcs", "azure"}]  # one per run
    outcomes = three_two_one_outcomes(engine, weddings)
    assert all(passed for passed, *_ in outcomes.values()), outcomes

    # The list pipeline (schedule, change capture): new keys, one more key backup in that run.
    from wedbackup_dagster.definitions import defs

    rest = [k for k in keys if k not in weddings]
    result = defs.resolve_job_def("backup_wedding_list").execute_in_process(run_config=list_run_config(rest),
                                                                            instance=instance)
    assert result.success
    assert keys_awaiting_backup(engine.catalogue) == 0
    assert len(key_backup_copies(engine)) == 2


def test_copies_do_not_count_while_the_key_lives_only_in_the_catalogue(fleet):
    engine = fleet["engine"]
    replicas = engine_replicas(engine.settings)
    with engine.snapshot_session() as session:
        engine.back_up("2", session)
    for replica in replicas.values():
        engine.replicate("2", replica)
    assert keys_awaiting_backup(engine.catalogue) == 1
    passed, message, _, _ = three_two_one_outcomes(engine, ["2"])["2"]
    assert not passed and rules.KEY_ONLY_IN_CATALOGUE in message and "0 verified copies" in message
    status = key_status(engine.catalogue, engine.keyring)
    assert status.keys_only_in_catalogue == 1
    assert any(line.startswith("wedding keys only in the catalogue: 1") for line in status.lines())

    # A key backup that reaches only the vault does not take it out of the catalogue alone.
    back_up_key_store(engine.settings, engine.catalogue, {}, engine.keyring)
    assert not three_two_one_outcomes(engine, ["2"])["2"][0]
    back_up_key_store(engine.settings, engine.catalogue, {"gcs": replicas["gcs"]}, engine.keyring)
    passed, message, _, _ = three_two_one_outcomes(engine, ["2"])["2"]
    assert passed, message
    assert key_status(engine.catalogue, engine.keyring).keys_only_in_catalogue == 0
    assert engine.back_up_new_keys(replicas) is None  # nothing left to do: one indexed count

