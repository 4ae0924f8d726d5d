"""Each wedding's own metadata on a partition-range step's materializations, added in one pass.

A step over a range of weddings (`backup_weddings` from `wedbackup backup --all`) ends with one output per
asset, and Dagster turns it into one materialization per wedding carrying the metadata added for that
partition with `context.add_asset_metadata(..., partition_key=...)`. That public call checks, on every
call, that the partition is in the run's range by reading the run's partition keys from the instance
(two `has_dynamic_partition` queries and the list of every wedding): at 2,000 weddings and six assets
that is 12,000 × 3 queries, each returning up to 2,000 keys — the largest per-wedding cost of the step
after the event writes (profile in README, Benchmarks).

`add_partition_metadata` makes the same check once per step (every key must be one of the step's
partition keys, else the same DagsterInvariantViolationError names it) and records the metadata exactly
as `add_asset_metadata` does, building the step's metadata accumulator once rather than once per wedding.
It uses Dagster's internals (`StepExecutionContext._metadata_accumulator`, `OutputMetadataAccumulator`,
`AssetMetadataHandle`); dagster is pinned in pyproject.toml and wedbackup_dagster_tests/
test_partition_metadata.py fails if that changes."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import dagster as dg


def add_partition_metadata(context: dg.AssetExecutionContext,
                           items: Iterable[tuple[str, dg.AssetKey, Mapping[str, Any]]]) -> None:
    """For each (partition key, asset key, metadata): what `context.add_asset_metadata(metadata,
    asset_key=asset_key, partition_key=partition_key)` records, with the range read once."""
    step = context.op_execution_context.get_step_execution_context()
    assets_def = step.assets_def
    if assets_def is None or assets_def.partitions_def is None:
        raise dg.DagsterInvariantViolationError("partition metadata outside a partitioned asset step")
    from dagster._core.execution.context.metadata_logging import AssetMetadataHandle, OutputMetadataAccumulator

    targeted = frozenset(context.partition_keys)
    accumulator = step._metadata_accumulator  # noqa: SLF001 - see the module's docstring
    # One new accumulator for the whole batch: its own `with_additional_asset_metadata` copies every handle
    # recorded so far on each call, quadratic in the weddings of the step (2.8 s of a 2,000-wedding job).
    merged = dict(accumulator.per_output_metadata)
    for partition_key, asset_key, metadata in items:
        if asset_key not in assets_def.keys:
            raise dg.DagsterInvariantViolationError(
                f"Attempted to add metadata for asset key '{asset_key}' that is not being materialized.")
        if partition_key not in targeted:
            raise dg.DagsterInvariantViolationError(
                f"Attempted to add metadata for partition key '{partition_key}' that is not being targeted.")
        handle = AssetMetadataHandle(asset_key=asset_key, partition_key=partition_key)
        merged[handle] = {**merged.get(handle, {}), **metadata}
    step._metadata_accumulator = OutputMetadataAccumulator(per_output_metadata=merged)  # noqa: SLF001
