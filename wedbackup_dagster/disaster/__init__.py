"""Disaster recovery in Dagster: `restore_platform` (the whole platform into an empty database, resumable), the
weekly `dr_drill` (job, schedule, and its `dr_drill_report` asset with checks), the daily `dr_pack` (job and
schedule: a DR pack at every provider), and standing verification (daily check_weddings and reconcile_inventory,
the rolling re-verification and its check). Thin wiring over core/disaster/.

definitions.py adds the objects listed here (named *_defs so they never clash with submodule names)."""
from .drill import dr_drill, dr_drill_report, dr_drill_schedule
from .pack_job import dr_pack, dr_pack_schedule
from .restore_platform_job import restore_platform
from .standing import (
    check_weddings_daily,
    reconcile_inventory_daily,
    reverification_status,
    reverification_status_daily,
    reverification_status_job,
    rolling_reverification,
)

asset_defs = [dr_drill_report, reverification_status]
job_defs = [restore_platform, dr_drill, dr_pack, reverification_status_job]
schedule_defs = [dr_drill_schedule, dr_pack_schedule, check_weddings_daily, reconcile_inventory_daily,
                 rolling_reverification, reverification_status_daily]
