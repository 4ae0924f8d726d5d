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

Check evaluations (one per wedding and check) go the same way when the instance's event log stores them in
batches (storage.py's PooledPostgresEventLogStorage, the local stack's; Dagster's own PostgreSQL storage
refuses them and would fall back to single writes with a warning), and otherwise one by one as before. A
failed blocking evaluation always takes Dagster's own path, which fails the step after the others are
reported. The UI shows the same evaluation per wedding partition either way.

This uses Dagster's internal event API (`dagster._core.events`); the dagster version is pinned in
pyproject.toml and wedbackup_dagster_tests/instance/test_event_batches.py fails if that API changes."""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import dagster as dg
from dagster._core.events import DagsterEvent, DagsterEventBatchMetadata, DagsterEventType, generate_event_batch_id

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


def _stores_check_evaluations_in_batches(context: Any) -> bool:
    return bool(getattr(context.instance.event_log_storage, "stores_check_evaluations_in_batches", False))


def check_evaluations_in_batches(context: Any, evaluations: Iterable[dg.AssetCheckEvaluation],
                                 size: int = MATERIALIZATION_BATCH) -> Iterator[DagsterEvent | dg.AssetCheckEvaluation]:
    """What a check step (or an op logging a check's evaluations) yields for `evaluations`: step events
    stored in batches of at most `size` where the instance's storage can, else the evaluations themselves.
    A failed blocking evaluation is always yielded as itself, so Dagster fails the step as it does for one."""
    evaluations = list(evaluations)
    if not _stores_check_evaluations_in_batches(context) or not _batching_enabled():
        yield from evaluations
        return
    batched: list[dg.AssetCheckEvaluation] = []
    blocked: list[dg.AssetCheckEvaluation] = []
    for e in evaluations:
        fails_step = e.blocking and not e.passed and e.severity == dg.AssetCheckSeverity.ERROR
        (blocked if fails_step else batched).append(e)
    step = getattr(context, "op_execution_context", context).get_step_execution_context()
    for start in range(0, len(batched), size):
        batch = batched[start:start + size]
        batch_id = generate_event_batch_id()
        for i, evaluation in enumerate(batch):
            # Dagster's own message for the event (DagsterEvent.asset_check_evaluation), batched.
            message = (f"Asset check '{evaluation.check_name}' on '{evaluation.asset_key.to_user_string()}' "
                       + ("passed." if evaluation.passed else "did not pass.")
                       + ("" if evaluation.description is None else f" Description: '{evaluation.description}'"))
            yield DagsterEvent.from_step(DagsterEventType.ASSET_CHECK_EVALUATION, step, evaluation, message,
                                         DagsterEventBatchMetadata(batch_id, i == len(batch) - 1))
    yield from blocked


def log_check_evaluations(context: dg.OpExecutionContext, evaluations: Iterable[dg.AssetCheckEvaluation]) -> None:
    """`check_evaluations_in_batches` for an op that logs evaluations instead of yielding them."""
    for event in check_evaluations_in_batches(context, evaluations):
        if isinstance(event, dg.AssetCheckEvaluation):
            context.log_event(event)


def _batching_enabled() -> bool:
    try:
        return int(os.environ.get(BATCH_SIZE_SETTING, "0")) > 0
    except ValueError:
        return False
