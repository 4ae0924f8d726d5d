"""The `dr_drill` job on the real stack: the demo platform restored from S3 (never the vault) into a scratch
database that is dropped afterwards; its `dr_drill_report` asset shows the summary, phases and trend, and
its checks pass — then fail, naming the wedding, when that wedding's only provider copy is damaged."""
from __future__ import annotations

import os

import dagster as dg
import psycopg
import pytest

from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.storage.replicas import S3Replica
from wedbackup_dagster.core.storage.providers import ensure_targets
from wedbackup_dagster.core.storage.replicas.s3 import s3_client_from
from wedbackup_dagster.core.postgres.load_snapshot import SCRATCH_PREFIX
from wedbackup_dagster.definitions import defs

pytestmark = pytest.mark.stack


@pytest.fixture
def backed_up(demo_env):
    demo_env(weddings=3, seed=6, document_bytes=64)
    engine = Engine.from_env()
    ensure_targets(engine.settings)
    s3 = S3Replica(s3_client_from(engine.settings.s3, os.environ), engine.settings.s3)
    partitions = ["platform", "1", "2", "3"]
    with engine.snapshot_session() as session:
        for p in partitions:
            engine.back_up(p, session)
    for p in partitions:
        engine.replicate(p, s3)
        engine.verify(p, {"s3": s3}, provider="s3")
    with dg.instance_for_test() as instance:
        yield {"engine": engine, "instance": instance}
    engine.catalogue.close()


def drill(instance, **config):
    return defs.resolve_job_def("dr_drill").execute_in_process(
        instance=instance, raise_on_error=False,
        run_config={"ops": {"dr_drill_report": {"config": {"provider": "s3", "jobs": 2, "catalogue_lost": "never",
                                                           **config}}}})


def checks_of(result) -> dict:
    return {e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data
            for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}


def scratch_databases(engine: Engine) -> list[str]:
    with psycopg.connect(engine.settings.scratch_dsn) as conn:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                           (SCRATCH_PREFIX + "dr%",))]


def test_a_drill_restores_from_a_provider_reports_and_drops_its_scratch(backed_up, s3_client):
    engine, instance = backed_up["engine"], backed_up["instance"]
    os.rename(engine.settings.vault_dir, str(engine.settings.vault_dir) + ".away")  # never read by a drill
    result = drill(instance)
    assert result.success
    checks = checks_of(result)
    assert checks["drill_complete"].passed and checks["drill_rto_within_target"].passed
    materialization = result.asset_materializations_for_node("dr_drill_report")[0]
    meta = materialization.metadata
    assert meta["partitions_restored"].value == 4 and meta["complete"].value is True
    assert "# DR drill from s3" in meta["summary"].value and "| download |" in meta["summary"].value
    assert {r.data["phase"] for r in meta["phases"].records} == {"download", "decrypt", "load", "check"}
    assert scratch_databases(engine) == []

    # Wedding 2's only provider copy damaged, and a partition target nobody meets: both checks fail.
    backup = engine.catalogue.latest_backup("2")
    key = next(c for c in engine.catalogue.copies(backup.id) if c.provider == "s3").object_key
    bucket = engine.settings.s3.bucket
    body = bytearray(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3_client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    second = drill(instance, rto_target_seconds=0.0)
    assert second.success  # the drill ran; its checks say what is wrong
    checks = checks_of(second)
    assert not checks["drill_complete"].passed and "2:" in checks["drill_complete"].description
    assert not checks["drill_rto_within_target"].passed
    assert checks["drill_rto_within_target"].description.startswith("whole restore ")
    summary = second.asset_materializations_for_node("dr_drill_report")[0].metadata["summary"].value
    assert "INCOMPLETE" in summary and "| earlier drill |" in summary  # the trend shows the first drill
    assert scratch_databases(engine) == []


def test_a_drill_past_its_window_is_stopped_reported_and_its_scratch_dropped(backed_up):
    engine, instance = backed_up["engine"], backed_up["instance"]
    result = drill(instance, window_seconds=0.0)
    assert result.success
    checks = checks_of(result)
    assert not checks["drill_complete"].passed
    assert "stopped: ran past its window: 3 wedding(s) not started" in checks["drill_complete"].description
    meta = result.asset_materializations_for_node("dr_drill_report")[0].metadata
    assert meta["partitions_restored"].value == 1  # the platform only
    assert "**Stopped**: ran past its window" in meta["summary"].value
    assert scratch_databases(engine) == []


def test_the_catalogue_lost_drill_rebuilds_a_scratch_catalogue_from_the_provider_alone(backed_up):
    """The monthly variant: wedding keys come back from the provider's key-store backup with the master key,
    the archives from its listing; the live catalogue is not read for the restore, and nothing is left."""
    from wedbackup_dagster.core.keys.backup import back_up_key_store

    engine, instance = backed_up["engine"], backed_up["instance"]
    s3 = S3Replica(s3_client_from(engine.settings.s3, os.environ), engine.settings.s3)
    back_up_key_store(engine.settings, engine.catalogue, {"s3": s3}, engine.keyring)
    result = drill(instance, catalogue_lost="always")
    assert result.success
    assert checks_of(result)["drill_complete"].passed
    meta = result.asset_materializations_for_node("dr_drill_report")[0].metadata
    rebuilt = meta["catalogue_rebuilt"].value
    assert rebuilt["provider"] == "s3" and rebuilt["backups"] == 4 and rebuilt["wedding_keys"] == 4
    assert "catalogue-lost scenario: a scratch catalogue rebuilt from s3" in meta["summary"].value
    assert scratch_databases(engine) == []
    bad = drill(instance, catalogue_lost="sometimes")
    assert not bad.success
    failure = next(e for e in bad.all_events if e.event_type_value == "STEP_FAILURE")
    assert "catalogue_lost 'sometimes' is not one of monthly, always, never" in str(failure.step_failure_data.error)


def test_policy_settings_sample_the_weddings_and_report_rto_and_rpo_per_tier(backed_up, tmp_path, monkeypatch):
    """The policy file's drill section: a sample of one wedding (critical ones always in) plus the platform,
    from S3, a critical target nobody meets: the per-tier table and the failing check name them."""
    import datetime as dt

    from wedbackup_dagster.core.disaster import drill_sample
    from wedbackup_dagster.core.policy.backup_policy import Policy

    engine, instance = backed_up["engine"], backed_up["instance"]
    today = dt.datetime.now(dt.timezone.utc).date()
    # wedding 1 is tomorrow (critical), 2 and 3 months away (normal)
    engine.catalogue.sync_partitions([("platform", None), ("1", today + dt.timedelta(days=1)),
                                      ("2", today + dt.timedelta(days=100)), ("3", today + dt.timedelta(days=200))])
    dates = engine.catalogue.live_partitions()
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("drill:\n  sample: 1\n  provider: s3\n  critical_rto_target: 0.000001\n")
    monkeypatch.setenv("WEDBACKUP_POLICY_FILE", str(policy_file))
    policy = Policy.from_env()
    now = dt.datetime.now(dt.timezone.utc)
    assert drill_sample(["1", "2", "3"], dates, policy, 1, now) == frozenset({"1"})  # the critical one
    two = drill_sample(["1", "2", "3"], dates, policy, 2, now)
    assert "1" in two and len(two) == 2 and two == drill_sample(["1", "2", "3"], dates, policy, 2, now)
    result = defs.resolve_job_def("dr_drill").execute_in_process(
        instance=instance, raise_on_error=False,
        run_config={"ops": {"dr_drill_report": {"config": {"catalogue_lost": "never"}}}})
    assert result.success
    meta = result.asset_materializations_for_node("dr_drill_report")[0].metadata
    assert meta["provider"].value == "s3" and meta["sampled"].value == 1
    assert meta["partitions_restored"].value == 2 and meta["partitions_total"].value == 2
    tiers = {r.data["tier"]: r.data for r in meta["tiers"].records}
    assert set(tiers) == {"platform", "critical"} and tiers["critical"]["partitions"] == 1
    assert tiers["critical"]["rto_seconds"] >= tiers["critical"]["slowest_seconds"] > 0
    assert tiers["critical"]["rpo_hours"] >= 0
    assert "| tier | partitions |" in meta["summary"].value and "a sample of 1" in meta["summary"].value
    checks = checks_of(result)
    assert checks["drill_complete"].passed
    rto = checks["drill_rto_within_target"]
    assert not rto.passed and "over the target: 1" in rto.description
    assert scratch_databases(engine) == []
