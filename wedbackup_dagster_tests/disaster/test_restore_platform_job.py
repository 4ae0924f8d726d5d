"""The `restore_platform` job refuses, before reading anything, a target variable that names the source or the
catalogue (from the launchpad anyone can type one), an unset target variable and fewer than one worker."""
from __future__ import annotations

import dagster as dg
import pytest

from wedbackup_dagster.definitions import defs

pytestmark = pytest.mark.stack


def failure_of(config: dict) -> str:
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("restore_platform").execute_in_process(
            instance=instance, raise_on_error=False,
            run_config={"ops": {"restore_all_partitions": {"config": config}}})
    assert not result.success
    event = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return str(event.step_failure_data.error)


def test_restore_platform_refuses_bad_targets_before_any_work(stack, monkeypatch):
    for variable in ("WEDBACKUP_SOURCE_DSN", "WEDBACKUP_CATALOGUE_DSN"):
        assert variable in failure_of({"target_dsn_env": variable})
    monkeypatch.delenv("WEDBACKUP_RESTORE_TARGET_DSN", raising=False)
    assert "WEDBACKUP_RESTORE_TARGET_DSN" in failure_of({}) and "is not set" in failure_of({})
    monkeypatch.setenv("WEDBACKUP_RESTORE_TARGET_DSN", "postgresql://nobody@127.0.0.1:1/none")
    assert "jobs" in failure_of({"jobs": 0})
