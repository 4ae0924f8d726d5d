"""Wedding media in Dagster: `media_snapshot` → `media_s3_replica` / `media_gcs_replica` /
`media_azure_replica` → `verified_media`, partitioned by wedding like the row assets, with checks (integrity,
3-2-1, freshness), the `backup_media` job and its hourly schedule. The work is core/media's; definitions.py adds these."""
from .assets import media_assets
from .checks import media_checks
from .jobs import backup_media
from .schedules import media_schedule

asset_defs = list(media_assets)
check_defs = list(media_checks)
job_defs = [backup_media]
schedule_defs = [media_schedule]
