"""Checks: every guarantee a visible Dagster asset check (3-2-1, archive integrity, replica checksum,
restore matches manifest, freshness) and the cross-provider backup_inventory.

definitions.py adds the objects listed here."""
from .check_jobs import check_weddings
from .inventory import backup_inventory, reconcile_inventory
from .wedding_checks import wedding_checks

asset_defs = [backup_inventory]
check_defs = list(wedding_checks)
job_defs = [check_weddings, reconcile_inventory]
