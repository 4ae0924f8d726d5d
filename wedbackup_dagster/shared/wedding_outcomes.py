"""The one model of "this wedding failed" in the wiring. A step covers many weddings; each either succeeded,
with the metadata of every asset it materialized, or failed, with the reason in our error's own words. The
backup assets and the list pipeline record their weddings here, record the successes and fail the step
naming the failures the same way; between the list pipeline's ops a step travels as `WeddingsOfStep`."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from ..core.errors import WedbackupError
from ..core.outcomes import WeddingFailure, describe_failures
from .partition_metadata import add_partition_metadata

PerAssetMetadata = dict[dg.AssetKey, dict[str, Any]]
# {"ok": [partition keys that succeeded], "failed": {partition key: reason}}: a step's weddings as the list
# pipeline hands them to its next op (WeddingOutcomes.as_step).
WeddingsOfStep = dict[str, Any]


@dataclass
class WeddingOutcomes:
    """The weddings of one step: `done` (key -> each asset's metadata) and `failed` (key -> reason)."""

    what: str  # the step in words, for its failure: "backup", "s3 upload", "verify"
    done: dict[str, PerAssetMetadata] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    recorded_before: int = 0  # weddings an earlier attempt of a retried step recorded (left as they are)

    def record(self, context: Any, key: str, outcome: Any, metadata_of: Callable[[Any], PerAssetMetadata]) -> None:
        """One wedding's outcome from the engine: its metadata, or (a WedbackupError) why it failed."""
        if isinstance(outcome, WedbackupError):
            context.log.error(str(outcome))
            self.failed[key] = str(outcome)
        else:
            self.done[key] = metadata_of(outcome)

    def fail_the_rest(self, context: Any, keys: Iterable[str], exc: WedbackupError) -> None:
        """A failure under a whole batch (the source connection lost): every wedding not yet recorded failed."""
        context.log.error(str(exc))
        self.failed.update({k: str(exc) for k in keys if k not in self.done and k not in self.failed})

    @property
    def ok(self) -> list[str]:
        return list(self.done)

    def materializations(self) -> list[dg.AssetMaterialization]:
        return [dg.AssetMaterialization(asset_key=asset_key, partition=key, metadata=metadata)
                for key, per_asset in self.done.items() for asset_key, metadata in per_asset.items()]

    def as_step(self) -> WeddingsOfStep:
        return {"ok": self.ok, "failed": dict(self.failed)}

    def failure(self) -> dg.Failure:
        """The step's failure: the core's text (how many of how many, one line per wedding)."""
        failures = [WeddingFailure(k, self.what, msg) for k, msg in self.failed.items()]
        return dg.Failure(description=describe_failures(self.what, failures,
                                                        succeeded=len(self.done) + self.recorded_before),
                          metadata={"failed_partitions": dg.MetadataValue.json(sorted(self.failed))})

    def finish_assets(self, context: dg.AssetExecutionContext, asset_keys: list[dg.AssetKey]) -> Iterator[Any]:
        """An asset step's results: every wedding's own metadata; the step fails naming the failed weddings."""
        yield from _finish(context, [self], asset_keys, whole_range=True)


def finish_providers(context: dg.AssetExecutionContext, outcomes: Mapping[dg.AssetKey, WeddingOutcomes], *,
                     whole_range: bool = True) -> Iterator[Any]:
    """`finish_assets` for a step whose assets each have their own outcomes (the replica step: one asset and
    one WeddingOutcomes per provider); `whole_range`: the step covered every partition of its run."""
    yield from _finish(context, list(outcomes.values()), list(outcomes), whole_range=whole_range)


def _finish(context: dg.AssetExecutionContext, outcomes: list[WeddingOutcomes], asset_keys: list[dg.AssetKey], *,
            whole_range: bool) -> Iterator[Any]:
    """When every wedding of every outcome succeeded and the step covered its run's whole range: one pass of
    partition metadata (one read of the run's range, partition_metadata.py) and one result per asset.
    Otherwise each success is recorded on its own (an output would mark every wedding of the run as
    materialized), then, if any wedding failed, one failure names every failed wedding under its step
    ("s3 upload failed for …"), so Dagster's retry and the UI show exactly what is missing."""
    failed = [o for o in outcomes if o.failed]
    if not failed and whole_range:
        add_partition_metadata(context, ((key, asset_key, metadata) for o in outcomes
                                         for key, per_asset in o.done.items()
                                         for asset_key, metadata in per_asset.items()))
        for asset_key in asset_keys:
            yield dg.MaterializeResult(asset_key=asset_key)
        return
    for o in outcomes:
        yield from o.materializations()
    if len(outcomes) == 1 and failed:
        raise failed[0].failure()
    if failed:
        failures = [o.failure() for o in failed]
        raise dg.Failure(description="\n".join(f.description or "" for f in failures),
                         metadata={"failed_partitions": dg.MetadataValue.json(
                                       sorted({k for o in failed for k in o.failed})),
                                   "failed_by_step": dg.MetadataValue.json({o.what: sorted(o.failed) for o in failed})})


def failure_of_steps(steps: Sequence[tuple[str, WeddingsOfStep]]) -> dg.Failure | None:
    """The list pipeline's end: one Failure naming every (step, wedding) that failed in any of its ops."""
    failures = {f"{what} {k}": msg for what, step in steps for k, msg in step["failed"].items()}
    if not failures:
        return None
    lines = "\n".join(f"- {k}: {msg}" for k, msg in sorted(failures.items()))
    return dg.Failure(description=f"{len(failures)} step(s) failed for the listed weddings:\n{lines}",
                      metadata={"failed": dg.MetadataValue.json(sorted(failures))})
