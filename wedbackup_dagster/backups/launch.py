"""Launching backup work through Dagster from the command line: partitions registered, then one
in-process run per contiguous range of weddings, recorded in the instance like any other run. This module
reads the code location (definitions.py); nothing the code location loads imports it back."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from wedbackup_dagster.core.partitions import PLATFORM
from wedbackup_dagster.core.postgres.discovery import contiguous_ranges, wedding_ids
from .partitions import validated_keys, weddings_partitions


@dataclass
class LaunchResult:
    run_id: str
    first: str
    last: str
    success: bool
    failures: list[str]


def register_partitions(instance: dg.DagsterInstance, source_dsn: str, erased: frozenset[str] | set[str] = frozenset()
                        ) -> list[str]:
    """Add `platform` and every wedding of the source database as partitions (new ones only), except
    the `erased` weddings (GDPR erasure: never backed up again, even while still in the source)."""
    name = weddings_partitions.name
    known = set(instance.get_dynamic_partitions(name))
    wanted = [PLATFORM, *(w for w in wedding_ids(source_dsn) if w not in erased)]
    new = [k for k in validated_keys(wanted) if k not in known]
    for i in range(0, len(new), 1000):
        instance.add_dynamic_partitions(name, new[i:i + 1000])
    return wanted


@contextlib.contextmanager
def sigterm_kept() -> Iterator[None]:
    """Keep this process's SIGTERM disposition across an in-process Dagster run. Dagster maps SIGTERM to
    SIGINT's handler while a run goes (so a SIGTERM stops the run as an interrupt would) and leaves it mapped
    to SIGINT's original handler afterwards: in a shell's background job, where SIGINT is ignored, SIGTERM
    then stays ignored for the rest of the command and in every child it starts (`wedbackup changes drain
    --follow` under a backup in the same process would outlive `kill`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if saved is not None:  # None: set outside Python, nothing to put back
            signal.signal(signal.SIGTERM, saved)


def execute_in_process(job: dg.JobDefinition, **kwargs: Any) -> dg.ExecuteInProcessResult:
    """`job.execute_in_process(**kwargs)`, this process's SIGTERM disposition kept (sigterm_kept)."""
    with sigterm_kept():
        return job.execute_in_process(**kwargs)


def run_job_for(job_name: str, keys: list[str], *, instance: dg.DagsterInstance | None = None,
                run_config: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> list[LaunchResult]:
    from ..definitions import defs

    instance = instance or dg.DagsterInstance.get()
    job = defs.resolve_job_def(job_name)
    ordered = list(instance.get_dynamic_partitions(weddings_partitions.name))
    results = []
    for first, last in contiguous_ranges(validated_keys(keys), ordered):
        run_tags = dict(tags or {})
        if first == last:
            outcome = execute_in_process(job, instance=instance, partition_key=first, raise_on_error=False,
                                             run_config=run_config, tags=run_tags)
        else:
            run_tags.update({ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last})
            outcome = execute_in_process(job, instance=instance, raise_on_error=False, run_config=run_config,
                                             tags=run_tags)
        failures = [_failure_text(e) for e in outcome.all_events if e.event_type_value == "STEP_FAILURE"]
        results.append(LaunchResult(outcome.run_id, first, last, outcome.success, failures))
    return results


def run_checks_for(keys: list[str], *, instance: dg.DagsterInstance) -> list:
    """check_weddings over `keys`, one in-process run per contiguous range. Unlike run_job_for it always
    passes the range as tags (a job of checks only has no assets for Dagster to take a single partition key's
    definition from), so a range of one wedding is fine too."""
    from ..definitions import defs
    from .check_jobs import check_weddings

    job = defs.resolve_job_def(check_weddings.name)
    ordered = list(instance.get_dynamic_partitions(weddings_partitions.name))
    results = []
    for first, last in contiguous_ranges(validated_keys(keys), ordered):
        outcome = execute_in_process(job, instance=instance, raise_on_error=False, tags={
            ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last})
        failures = [_failure_text(e) for e in outcome.all_events if e.event_type_value == "STEP_FAILURE"]
        results.append(LaunchResult(outcome.run_id, first, last, outcome.success, failures))
    return results


def _failure_text(event: dg.DagsterEvent) -> str:
    """The step's own words: our Failure's description names the weddings and what went wrong."""
    data = event.step_failure_data
    if data.user_failure_data and data.user_failure_data.description:
        return f"{event.step_key}: {data.user_failure_data.description}"
    if data.error:
        return f"{event.step_key}: {data.error.message.strip()}"
    return event.message or event.step_key or "step failed"
