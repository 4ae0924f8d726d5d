"""Jobs over the backup assets. They run in-process: one run covers many weddings, and starting a
process per step would cost more than backing up a typical wedding (see benchmarks/)."""
import dagster as dg

from .constants import DB_DUMP, ENCRYPTED_ARCHIVE, VERIFIED_RESTORE
from .partitions import weddings_partitions

# Backups carry the blocking integrity check (a damaged archive must never be replicated) and shrinkage (a
# sharp drop in rows is flagged, and its pre-drop backups held from retention, as the backup is taken); the
# other checks read the catalogue and providers and run in `check_weddings`, not on every backup.
ARCHIVE_INTEGRITY = dg.AssetCheckKey(ENCRYPTED_ARCHIVE, "archive_integrity")
SHRINKAGE = dg.AssetCheckKey(DB_DUMP, "shrinkage")

backup_weddings = dg.define_asset_job(
    name="backup_weddings",
    selection=dg.AssetSelection.groups("wedding_backups").without_checks()
    | dg.AssetSelection.checks(ARCHIVE_INTEGRITY, SHRINKAGE),
    partitions_def=weddings_partitions,
    executor_def=dg.in_process_executor,
    description="Snapshot, seal, replicate and verify the selected weddings.",
)

reverify_weddings = dg.define_asset_job(
    name="reverify_weddings",
    selection=dg.AssetSelection.assets(VERIFIED_RESTORE),
    partitions_def=weddings_partitions,
    executor_def=dg.in_process_executor,
    description="Restore and check existing backups again, without taking new ones.",
)
