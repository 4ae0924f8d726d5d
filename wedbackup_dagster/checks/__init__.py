"""Checks: every guarantee a visible Dagster asset check (3-2-1, archive integrity, replica checksum,
restore matches manifest, freshness) and the cross-provider backup_inventory."""

# Filled in by the checks modules; definitions.py adds whatever is listed here.
assets: list = []
asset_checks: list = []
jobs: list = []
