"""The wedbackup code location: every Dagster object of the project, wired to its resources."""
import dagster as dg

from . import automation, checks, disaster, governance, keys, media
from .backups.assets import backup_assets
from .backups.jobs import backup_weddings, reverify_weddings
from .backups.resources import build_resources
from .backups.restore_job import restore_wedding
from .event_batches import enable_event_batching

# Runs store their per-wedding materializations in batches (see event_batches.py).
enable_event_batching()

defs = dg.Definitions(
    assets=[*backup_assets, *checks.asset_defs, *disaster.asset_defs, *media.asset_defs],
    asset_checks=[*checks.check_defs, *media.check_defs],
    jobs=[backup_weddings, reverify_weddings, restore_wedding, *automation.job_defs, *checks.job_defs,
          *governance.job_defs, *keys.job_defs, *disaster.job_defs, *media.job_defs],
    schedules=[*automation.schedule_defs, *governance.schedule_defs, *keys.schedule_defs,
               *disaster.schedule_defs, *media.schedule_defs],
    sensors=[*automation.sensor_defs, *keys.sensor_defs],
    resources=build_resources(),
)
