"""Per-wedding materializations written to Dagster's event log in batches, not one by one.

A `backup_wedding_list` run records six materializations per wedding (dump, archive, three replicas,
verified restore). Stored one at a time, each costs its own INSERT, a second serialization of the event for
the asset index and that index's transaction (on stock dagster-postgres, two new connections): most of
what Dagster adds per wedding (benchmarks/dagster_overhead.py, README "Benchmarks").

Dagster buffers events that carry a `DagsterEventBatchMetadata` when `DAGSTER_EVENT_BATCH_SIZE` > 0 (its own
partition-range runs use this), and dagster-postgres writes such a buffer with one multi-row INSERT and
one index transaction. The list ops hand each asset's materializations over in groups of at most
`MATERIALIZATION_BATCH`, the last of a group marked as the batch's end, so a group is stored the moment
it is complete and nothing waits in a buffer. dagster-postgres indexes only the last event of a batch as
the asset's latest, so a group never mixes assets. Without the setting (or on SQLite, whose storage loops)
the same events are stored one by one: slower, never wrong.

This uses Dagster's internal event API (`dagster._core.events`); the dagster version is pinned in
pyproject.toml and wedbackup_dagster_tests/instance/test_event_batches.py fails if that API changes."""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import dagster as dg
from dagster._core.events import DagsterEvent, DagsterEventBatchMetadata, generate_event_batch_id

# Events per INSERT: large enough that a run's writes are a few statements per asset, small enough that
# a crashed run loses at most this many weddings' records from the Dagster UI (the catalogue has them all).
MATERIALIZATION_BATCH = 100
BATCH_SIZE_SETTING = "DAGSTER_EVENT_BATCH_SIZE"


def enable_event_batching() -> None:
    """Turns Dagster's batched event writes on in this process (the run worker loads the code location),
    unless the deployment has set `DAGSTER_EVENT_BATCH_SIZE` itself."""
    os.environ.setdefault(BATCH_SIZE_SETTING, str(MATERIALIZATION_BATCH))


def in_batches(context: dg.OpExecutionContext, materializations: Iterable[dg.AssetMaterialization],
               size: int = MATERIALIZATION_BATCH) -> Iterator[DagsterEvent]:
    """The op's step events for `materializations`, grouped by asset in batches of at most `size`: yield
    them from the op in place of the materializations."""
    by_asset: dict[dg.AssetKey, list[dg.AssetMaterialization]] = {}
    for materialization in materializations:
        by_asset.setdefault(materialization.asset_key, []).append(materialization)
    step = context.get_step_execution_context()
    for group in by_asset.values():
        for start in range(0, len(group), size):
            batch = group[start:start + size]
            batch_id = generate_event_batch_id()
            for i, materialization in enumerate(batch):
                # Creating the event logs it: the instance buffers it under batch_id and stores the
                # whole batch when the event marked is_end arrives.
                yield DagsterEvent.asset_materialization(
                    step, materialization, DagsterEventBatchMetadata(batch_id, i == len(batch) - 1))
