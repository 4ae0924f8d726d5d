"""The wedbackup code location: every Dagster object of the project, wired to its resources."""
import dagster as dg

from . import automation, checks
from .backups.assets import backup_assets
from .backups.jobs import backup_weddings, reverify_weddings
from .backups.resources import build_resources
from .backups.restore_job import restore_wedding

defs = dg.Definitions(
    assets=[*backup_assets, *checks.assets],
    asset_checks=list(checks.asset_checks),
    jobs=[backup_weddings, reverify_weddings, restore_wedding, *automation.jobs, *checks.jobs],
    schedules=list(automation.schedules),
    sensors=list(automation.sensors),
    resources=build_resources(),
)
