"""The retention_sweep job and its daily schedule through Dagster on the real stack."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg

from wedbackup_dagster.definitions import defs
from wedbackup_dagster.governance.retention_job import retention_sweep_schedule
from wedbackup_dagster_tests.governance_fleet import (  # noqa: F401 - fixtures
    back_up,
    governance_instance,
    make_governance_fleet,
)


def test_retention_sweep_deletes_an_expired_backup_everywhere(make_governance_fleet, governance_instance):
    fleet = make_governance_fleet(weddings=2)
    cat = fleet["catalogue"]
    old, new = back_up(fleet, "1"), back_up(fleet, "1")
    expired = datetime.now(timezone.utc) - timedelta(days=3 * 365)
    with cat.connect() as conn:
        conn.execute("UPDATE wedbackup.backups SET snapshot_time = %s WHERE id = %s", (expired, old))
    old_copies = cat.copies(old)

    job = defs.resolve_job_def("retention_sweep")
    dry = job.execute_in_process(instance=governance_instance, run_config={
        "ops": {"prune_backups": {"config": {"dry_run": True}}}})
    assert dry.success and {b["id"] for b in cat.backups_with_copies("1")} == {old, new}

    result = job.execute_in_process(instance=governance_instance)
    assert result.success
    [output] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    meta = output.event_specific_data.metadata
    assert meta["deleted"].value == 1 and meta["copies_deleted"].value == 4 and meta["copies_locked"].value == 0
    assert {b["id"] for b in cat.backups_with_copies("1")} == {new}
    for copy in old_copies:
        if copy.provider != "vault":
            assert fleet["replicas"][copy.provider].head(copy.object_key) is None


def test_the_sweep_is_scheduled_daily():
    assert retention_sweep_schedule.cron_schedule == "30 3 * * *"
    assert retention_sweep_schedule.job_name == "retention_sweep"
    assert retention_sweep_schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    [request] = retention_sweep_schedule.evaluate_tick(dg.build_schedule_context()).run_requests
    assert request.run_config in ({}, None)
