"""The job of the checks: run every wedding check over a selection of weddings without materializing
anything (the re-verification itself is backups.jobs.reverify_weddings; launch.run_checks_for runs it)."""
import dagster as dg

from .partitions import weddings_partitions
from .checks import wedding_checks

check_weddings = dg.define_asset_job(
    name="check_weddings",
    selection=dg.AssetSelection.checks(*wedding_checks),
    partitions_def=weddings_partitions,
    executor_def=dg.in_process_executor,
    description="Evaluate every per-wedding check (integrity, replica checksums, 3-2-1, restore, freshness) "
                "on the selected weddings, without taking or restoring backups.",
)
