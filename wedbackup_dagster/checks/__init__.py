"""Checks: every guarantee a visible Dagster asset check (3-2-1, archive integrity, replica checksum,
restore matches manifest, freshness) and the cross-provider backup_inventory."""

# Filled in by the checks modules; definitions.py adds whatever is listed here.
assets: list = []
asset_checks: list = []
jobs: list = []

from .inventory import backup_inventory, reconcile_inventory  # noqa: E402
from .check_jobs import check_weddings  # noqa: E402
from .wedding_checks import wedding_checks  # noqa: E402

assets.append(backup_inventory)
asset_checks.extend(wedding_checks)
jobs.extend([check_weddings, reconcile_inventory])
