"""Automation: backups that run by themselves — the prioritized backup schedule, and sensors for wedding
discovery, change capture, provider health and run failures. Thin Dagster wiring over core.policy.backup_policy etc.

definitions.py adds the objects listed here (named *_defs so they never clash with submodule names)."""
from .batch_job import backup_wedding_list
from .discovery import wedding_change_capture, wedding_discovery
from .health import provider_health, run_failure_alerts
from .reverify_list import reverify_wedding_list, wedding_backfill_consolidation
from .schedules import backup_schedule

schedule_defs = [backup_schedule]
sensor_defs = [wedding_discovery, wedding_change_capture, provider_health, run_failure_alerts,
               wedding_backfill_consolidation]
job_defs = [backup_wedding_list, reverify_wedding_list]
