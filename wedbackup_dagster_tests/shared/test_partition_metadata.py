"""add_partition_metadata records on a range step's materializations exactly what add_asset_metadata
records, per partition, reading the run's range once; a key outside the range or an asset the step does
not materialize is refused by name. Also guards the Dagster internals it relies on (pinned dagster)."""
from __future__ import annotations

import dagster as dg
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from wedbackup_dagster.shared.partition_metadata import add_partition_metadata

PARTS = dg.DynamicPartitionsDefinition(name="pm_weddings")
KEYS = [str(i) for i in range(1, 8)]
A, B = dg.AssetKey("pm_a"), dg.AssetKey("pm_b")


def _defs(add):
    @dg.multi_asset(specs=[dg.AssetSpec(A, partitions_def=PARTS), dg.AssetSpec(B, partitions_def=PARTS)],
                    backfill_policy=dg.BackfillPolicy.single_run())
    def both(context):
        add(context)
        yield dg.MaterializeResult(asset_key=A)
        yield dg.MaterializeResult(asset_key=B)

    return dg.Definitions(assets=[both], jobs=[dg.define_asset_job("pm_job", selection=[both])])


def _metadata(key: str, asset: dg.AssetKey) -> dict:
    return {"wedding": dg.MetadataValue.text(key), "asset": dg.MetadataValue.text(asset.to_user_string()),
            "rows": dg.MetadataValue.int(len(key) * 7)}


def _run(add, first: str, last: str) -> tuple[bool, dict]:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(PARTS.name, KEYS)
        job = _defs(add).resolve_job_def("pm_job")
        result = job.execute_in_process(instance=instance, raise_on_error=False, tags={
            ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last})
        seen = {}
        for event in result.all_events:
            if event.event_type_value == "ASSET_MATERIALIZATION":
                m = event.event_specific_data.materialization
                seen[(m.partition, m.asset_key)] = dict(m.metadata)
        return result.success, seen


def test_each_partition_gets_its_own_metadata_as_with_add_asset_metadata():
    def ours(context):
        add_partition_metadata(context, ((k, a, _metadata(k, a)) for k in context.partition_keys for a in (A, B)))

    def dagsters(context):
        for k in context.partition_keys:
            for a in (A, B):
                context.add_asset_metadata(_metadata(k, a), asset_key=a, partition_key=k)

    ok, got = _run(ours, "2", "6")
    ok_ref, want = _run(dagsters, "2", "6")
    assert ok and ok_ref
    assert set(got) == {(k, a) for k in KEYS[1:6] for a in (A, B)}
    assert got == want
    assert got[("4", B)]["wedding"] == dg.MetadataValue.text("4")


def _refused(add, match: str) -> None:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(PARTS.name, KEYS)
        job = _defs(add).resolve_job_def("pm_job")
        with pytest.raises(dg.DagsterInvariantViolationError, match=match):
            job.execute_in_process(instance=instance, tags={ASSET_PARTITION_RANGE_START_TAG: "1",
                                                            ASSET_PARTITION_RANGE_END_TAG: "3"})


def test_a_partition_outside_the_range_is_refused_by_name():
    _refused(lambda context: add_partition_metadata(
        context, [("2", A, _metadata("2", A)), ("7", A, _metadata("7", A))]), "partition key '7'")


def test_an_asset_the_step_does_not_materialize_is_refused_by_name():
    _refused(lambda context: add_partition_metadata(context, [("2", dg.AssetKey("elsewhere"), {"x": 1})]),
             "elsewhere")
