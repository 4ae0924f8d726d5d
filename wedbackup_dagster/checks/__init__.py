"""Checks: every guarantee a visible Dagster asset check (3-2-1, archive integrity, replica checksum,
restore matches manifest, freshness, shrinkage), the cross-provider backup_inventory, and the job that
acknowledges a flagged drop in rows.

definitions.py adds the objects listed here."""
from .check_jobs import check_weddings
from .inventory import backup_inventory, reconcile_inventory
from .shrinkage_ack import acknowledge_shrinkage
from .wedding_checks import wedding_checks

asset_defs = [backup_inventory]
check_defs = list(wedding_checks)
job_defs = [check_weddings, reconcile_inventory, acknowledge_shrinkage]
