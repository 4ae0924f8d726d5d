"""Automation: backups that run by themselves — the prioritized backup schedule, and sensors for wedding
discovery, change capture, provider health and run failures. Thin Dagster wiring over core.policy etc."""

# Filled in by the automation modules; definitions.py adds whatever is listed here.
schedules: list = []
sensors: list = []
jobs: list = []

# Part A: the prioritized backup schedule; wedding discovery and change capture. Importing the submodule
# `schedules` rebinds this package's name `schedules` to it, so the list is kept aside and put back.
_schedule_list = schedules
from .batch_job import backup_wedding_list  # noqa: E402
from .discovery import wedding_change_capture, wedding_discovery  # noqa: E402
from .schedules import backup_schedule  # noqa: E402

schedules = _schedule_list
schedules.append(backup_schedule)
sensors.extend([wedding_discovery, wedding_change_capture])
jobs.append(backup_wedding_list)

# Part B: provider health (canaries, catch-up replica runs) and run-failure alerts.
from .health import provider_health, run_failure_alerts  # noqa: E402

sensors.extend([provider_health, run_failure_alerts])
