"""The wedbackup code location: every Dagster object of the project, domain by domain, wired to the shared
resources (shared/resources.py)."""
import dagster as dg

from . import changefeed, disaster, governance, key_store, media
from .backups.assets import backup_assets
from .backups.check_jobs import check_weddings
from .backups.checks import wedding_checks
from .backups.jobs import backup_weddings, reverify_weddings
from .backups.list_pipeline import backup_wedding_list
from .backups.restore_job import restore_wedding
from .backups.reverify_list import reverify_wedding_list, wedding_backfill_consolidation
from .backups.schedules import backup_schedule
from .backups.sensors import wedding_change_capture, wedding_discovery
from .backups.shrinkage_ack import acknowledge_shrinkage
from .instance.event_batches import enable_event_batching
from .instance.garbage_collection import settle_loaded_objects
from .providers.inventory_reconciliation import backup_inventory, reconcile_inventory
from .providers.sensors import provider_health, run_failure_alerts
from .shared.resources import build_resources

# Runs store their per-wedding materializations in batches (see instance/event_batches.py).
enable_event_batching()

defs = dg.Definitions(
    assets=[*backup_assets, backup_inventory, *disaster.asset_defs, *changefeed.asset_defs, *media.asset_defs],
    asset_checks=[*wedding_checks, *media.check_defs],
    jobs=[backup_weddings, reverify_weddings, restore_wedding, backup_wedding_list, reverify_wedding_list,
          check_weddings, acknowledge_shrinkage, reconcile_inventory, *governance.job_defs, *key_store.job_defs,
          *disaster.job_defs, *changefeed.job_defs, *media.job_defs],
    schedules=[backup_schedule, *governance.schedule_defs, *key_store.schedule_defs, *disaster.schedule_defs,
               *media.schedule_defs],
    sensors=[wedding_discovery, wedding_change_capture, wedding_backfill_consolidation, provider_health,
             run_failure_alerts, *key_store.sensor_defs, *changefeed.sensor_defs],
    resources=build_resources(),
)

# What the code location loaded lives as long as its process: kept out of the collector's traversal during
# runs (instance/garbage_collection.py).
settle_loaded_objects()
