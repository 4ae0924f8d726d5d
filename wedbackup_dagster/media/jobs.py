"""The media job: snapshot, replicate and verify the selected weddings' media, in one in-process run."""
import dagster as dg

from ..backups.partitions import weddings_partitions
from .constants import GROUP

backup_media = dg.define_asset_job(
    name="backup_media",
    selection=dg.AssetSelection.groups(GROUP),
    partitions_def=weddings_partitions,
    executor_def=dg.in_process_executor,
    description="Back up, replicate and verify the selected weddings' media (WEDBACKUP_MEDIA_SOURCE).",
)
