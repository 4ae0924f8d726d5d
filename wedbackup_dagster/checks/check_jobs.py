"""Jobs of the checks: run every wedding check over a selection of weddings without materializing
anything (the re-verification itself is backups.jobs.reverify_weddings)."""
import dagster as dg

from ..backups.partitions import validated_keys, weddings_partitions
from .wedding_checks import wedding_checks

check_weddings = dg.define_asset_job(
    name="check_weddings",
    selection=dg.AssetSelection.checks(*wedding_checks),
    partitions_def=weddings_partitions,
    executor_def=dg.in_process_executor,
    description="Evaluate every per-wedding check (integrity, replica checksums, 3-2-1, restore, freshness) "
                "on the selected weddings, without taking or restoring backups.",
)


def run_checks_for(keys: list[str], *, instance: dg.DagsterInstance) -> list:
    """check_weddings over `keys`, one in-process run per contiguous range. Unlike launch.run_job_for it always
    passes the range as tags (a job of checks only has no assets for Dagster to take a single partition key's
    definition from), so a range of one wedding is fine too."""
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from ..backups.launch import LaunchResult, _failure_text
    from wedbackup_dagster.core.postgres.discovery import contiguous_ranges
    from ..definitions import defs

    job = defs.resolve_job_def(check_weddings.name)
    ordered = list(instance.get_dynamic_partitions(weddings_partitions.name))
    results = []
    for first, last in contiguous_ranges(validated_keys(keys), ordered):
        outcome = job.execute_in_process(instance=instance, raise_on_error=False, tags={
            ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last})
        failures = [_failure_text(e) for e in outcome.all_events if e.event_type_value == "STEP_FAILURE"]
        results.append(LaunchResult(outcome.run_id, first, last, outcome.success, failures))
    return results
