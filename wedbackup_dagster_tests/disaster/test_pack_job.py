"""The `dr_pack` job on the real stack: run in-process, it publishes a DR pack at S3, GCS and Azure holding each
wedding's newest verified archive (read back at each provider with packs.newest_pack), leaves an unverified
wedding to its own objects and counts it, and says so in metadata a person reads; a provider that cannot take the
pack fails the run naming it while the others are published. Its schedule, daily at 03:00 and on by default,
takes its time, zone and status from the policy file's `dr_pack` settings when the code location loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from wedbackup_dagster.core.disaster import packs
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.storage.providers import PROVIDERS, ensure_targets, replica_for
from wedbackup_dagster.definitions import defs

WORKTREE = Path(__file__).resolve().parents[2]


@pytest.fixture
def backed_up(demo_env):
    """Three weddings and the platform in the vault and at every provider; weddings 1 and 2 verified, 3 not."""
    demo_env(weddings=3, seed=11, document_bytes=64)
    engine = Engine.from_env()
    ensure_targets(engine.settings)
    replicas = {p: replica_for(p, engine.settings) for p in PROVIDERS}
    with engine.snapshot_session() as session:
        for p in ("platform", "1", "2", "3"):
            engine.back_up(p, session)
    for p in ("platform", "1", "2", "3"):
        for replica in replicas.values():
            engine.replicate(p, replica)
    for p in ("platform", "1", "2"):
        engine.verify(p, replicas, provider="s3")
    with dg.instance_for_test() as instance:
        yield {"engine": engine, "replicas": replicas, "instance": instance}
    engine.catalogue.close()


def run_dr_pack(instance):
    return defs.resolve_job_def("dr_pack").execute_in_process(instance=instance, raise_on_error=False)


def step_metadata(result) -> dict:
    for event in result.all_events:
        if event.event_type_value in ("STEP_OUTPUT", "STEP_FAILURE"):
            data = event.event_specific_data
            metadata = data.metadata if event.event_type_value == "STEP_OUTPUT" else data.user_failure_data.metadata
            return {k: v.value for k, v in metadata.items()}
    raise AssertionError("the step left no metadata")


@pytest.mark.stack
def test_the_job_publishes_a_pack_at_every_provider_and_says_so(backed_up):
    engine, replicas = backed_up["engine"], backed_up["replicas"]
    result = run_dr_pack(backed_up["instance"])
    assert result.success
    meta = step_metadata(result)
    assert meta["weddings"] == 2 and meta["segments"] >= 1 and meta["bytes"] > 0
    assert meta["published"] == "azure, gcs, s3" and meta["failed"] == "none"
    assert meta["left_out"] == 1 and list(meta["left_out_weddings"]) == ["3"]
    assert "no verified backup" in meta["left_out_weddings"]["3"]
    rows = {r.data["provider"]: r.data for r in meta["providers"].records}
    assert set(rows) == set(PROVIDERS)
    assert all(r["published"] and r["failed"] == "" and r["segments_written"] == meta["segments"]
               for r in rows.values())
    assert "2 wedding archive(s)" in meta["summary"]
    newest = {p: engine.catalogue.latest_backup(p).archive_sha256 for p in ("1", "2")}
    for provider, replica in replicas.items():
        pack, notes = packs.newest_pack(replica)
        assert notes == [] and pack.index_key == rows[provider]["published"]
        assert {e.partition: e.archive_sha256 for s in pack.segments for e in s.entries} == newest
    # The build is in the audit trail, as the drills and restores are.
    with engine.catalogue.connect() as conn:
        audit = conn.execute("SELECT detail FROM wedbackup.audit WHERE action = 'dr-pack'").fetchall()
    assert len(audit) == 1 and audit[0]["detail"]["weddings"] == 2


@pytest.mark.stack
def test_a_provider_that_cannot_take_the_pack_fails_the_run_naming_it(backed_up, monkeypatch):
    replicas = backed_up["replicas"]
    assert run_dr_pack(backed_up["instance"]).success
    before = {p: packs.newest_pack(r)[0].index_key for p, r in replicas.items()}
    monkeypatch.setenv("WEDBACKUP_AZURE_CONTAINER", "no-such-container-for-dr-packs")
    result = run_dr_pack(backed_up["instance"])
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    description = failure.step_failure_data.user_failure_data.description
    assert description.startswith("DR pack not published everywhere (azure: ") and "ContainerNotFound" in description
    meta = step_metadata(result)
    assert meta["published"] == "gcs, s3" and meta["failed"] == "azure"
    assert {r.data["provider"]: r.data["failed"] for r in meta["providers"].records}["azure"]
    # S3 and GCS have the new pack (with the old one kept beside it); Azure keeps the one it had.
    for provider in ("s3", "gcs"):
        assert packs.newest_pack(replicas[provider])[0].index_key not in (before[provider], "")
    assert packs.newest_pack(replicas["azure"])[0].index_key == before["azure"]


def test_the_schedule_is_daily_and_on_by_default():
    schedule = defs.resolve_schedule_def("dr_pack_schedule")
    assert schedule.job_name == "dr_pack"
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 3 * * *", "Europe/London")
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING


def test_the_schedule_takes_its_time_zone_and_status_from_the_policy_file(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("dr_pack:\n  cron: '15 2 * * 1-5'\n  timezone: America/New_York\n  enabled: false\n")
    code = ("import json\nfrom wedbackup_dagster.definitions import defs\n"
            "s = defs.resolve_schedule_def('dr_pack_schedule')\n"
            "print(json.dumps([s.cron_schedule, s.execution_timezone, s.default_status.value]))")
    env = {**os.environ, "PYTHONPATH": str(WORKTREE), "WEDBACKUP_POLICY_FILE": str(policy)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert json.loads(out.strip().splitlines()[-1]) == ["15 2 * * 1-5", "America/New_York", "STOPPED"]
    policy.write_text("dr_pack:\n  enabled: maybe\n")
    failed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert failed.returncode != 0 and "policy.yaml.dr_pack.enabled" in failed.stderr
