"""Disaster recovery in Dagster: `restore_platform` (the whole platform into an empty database, resumable) and
the weekly `dr_drill` (job, schedule, and its `dr_drill_report` asset with checks). Thin wiring over
core.disaster.

definitions.py adds the objects listed here (named *_defs so they never clash with submodule names)."""
from .drill import dr_drill, dr_drill_report, dr_drill_schedule
from .restore_platform_job import restore_platform

asset_defs = [dr_drill_report]
job_defs = [restore_platform, dr_drill]
schedule_defs = [dr_drill_schedule]
