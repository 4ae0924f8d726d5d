"""The media schedule: every hour, one batched run of `backup_media` over every partition, when
WEDBACKUP_MEDIA_SOURCE is set. The source's listing decides what changed: an unchanged wedding costs a
listing and writes nothing, so a full pass is cheap."""
import datetime as dt
import os

import dagster as dg

from ..backups.partitions import weddings_partitions
from .jobs import backup_media

MEDIA_SOURCE_ENV = "WEDBACKUP_MEDIA_SOURCE"
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def media_requests(keys: list[str], when: dt.datetime, source: str | None) -> list[dg.RunRequest] | dg.SkipReason:
    if not source:
        return dg.SkipReason(f"{MEDIA_SOURCE_ENV} is not set: media is not backed up")
    if not keys:
        return dg.SkipReason("no wedding partitions registered yet")
    return [dg.RunRequest(run_key=f"media-{when:%Y%m%dT%H%M}", tags={RANGE_START: keys[0], RANGE_END: keys[-1]})]


@dg.schedule(name="media_schedule", cron_schedule="17 * * * *", job=backup_media,
             default_status=dg.DefaultScheduleStatus.RUNNING,
             description="Hourly, when WEDBACKUP_MEDIA_SOURCE is set: back up, replicate and verify every "
                         "partition's media in one batched run (unchanged media costs a listing).")
def media_schedule(context: dg.ScheduleEvaluationContext):
    keys = list(context.instance.get_dynamic_partitions(weddings_partitions.name))
    when = context.scheduled_execution_time or dt.datetime.now(dt.timezone.utc)
    return media_requests(keys, when, os.environ.get(MEDIA_SOURCE_ENV))
