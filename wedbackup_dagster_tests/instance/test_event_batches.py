"""Batched materializations on stock dagster-postgres: every event is stored and indexed as when written one by
one (per partition and as each asset's latest), in one batch write per group, and nothing is left buffered
when a group ends; without DAGSTER_EVENT_BATCH_SIZE the same events are written one at a time."""

import os

import dagster as dg
import pytest

from wedbackup_dagster.instance.event_batches import BATCH_SIZE_SETTING, in_batches

DUMP, ARCHIVE = dg.AssetKey("batch_probe_dump"), dg.AssetKey("batch_probe_archive")
WEDDINGS = [str(i) for i in range(1, 8)]


@dg.op(out={})
def seven_weddings(context: dg.OpExecutionContext):
    # Interleaved as the list ops produce them: each wedding's dump, then its archive.
    materializations = [dg.AssetMaterialization(key, partition=w, metadata={"wedding": w, "asset": key.path[-1]})
                        for w in WEDDINGS for key in (DUMP, ARCHIVE)]
    yield from in_batches(context, materializations, size=3)


@dg.job
def probe_job():
    seven_weddings()


def batch_writes(instance, monkeypatch) -> list[int]:
    """Spy on the real storage: the size of every batch it is asked to write."""
    storage = instance.event_log_storage
    sizes: list[int] = []
    original = storage.store_event_batch

    def store_event_batch(events):
        sizes.append(len(events))
        return original(events)

    monkeypatch.setattr(storage, "store_event_batch", store_event_batch)
    return sizes


def assert_all_recorded(instance):
    for key in (DUMP, ARCHIVE):
        records = instance.fetch_materializations(key, limit=100).records
        assert sorted(r.partition_key for r in records) == sorted(WEDDINGS)
        for r in records:
            assert r.asset_materialization.metadata["wedding"].value == r.partition_key
        assert instance.get_materialized_partitions(key) == set(WEDDINGS)
        # The asset index holds the last wedding's event as the asset's latest.
        latest = instance.get_latest_materialization_event(key)
        assert latest.asset_materialization.partition == WEDDINGS[-1]


def test_each_assets_materializations_are_written_in_groups(postgres_dagster_instance, monkeypatch):
    monkeypatch.setenv(BATCH_SIZE_SETTING, "100")
    sizes = batch_writes(postgres_dagster_instance, monkeypatch)
    assert probe_job.execute_in_process(instance=postgres_dagster_instance).success
    # Seven per asset in groups of three: 3 + 3 + 1, twice; a group of one is an ordinary single write.
    assert sorted(sizes) == [3, 3, 3, 3]
    assert_all_recorded(postgres_dagster_instance)


@pytest.mark.parametrize("setting", [None, "0"])
def test_without_the_setting_the_same_events_are_written_one_by_one(postgres_dagster_instance, monkeypatch,
                                                                     setting):
    if setting is None:
        monkeypatch.delenv(BATCH_SIZE_SETTING, raising=False)
    else:
        monkeypatch.setenv(BATCH_SIZE_SETTING, setting)
    sizes = batch_writes(postgres_dagster_instance, monkeypatch)
    assert probe_job.execute_in_process(instance=postgres_dagster_instance).success
    assert sizes == []
    assert_all_recorded(postgres_dagster_instance)


def test_a_smaller_deployment_setting_splits_a_group_and_still_flushes_it(postgres_dagster_instance, monkeypatch):
    monkeypatch.setenv(BATCH_SIZE_SETTING, "2")
    sizes = batch_writes(postgres_dagster_instance, monkeypatch)
    assert probe_job.execute_in_process(instance=postgres_dagster_instance).success
    # Per asset, groups of 3, 3 and 1 under a limit of two: each group of three is a batch of two, then its
    # end alone (an ordinary single write); nothing waits for a later group.
    assert sorted(sizes) == [2] * 4
    assert_all_recorded(postgres_dagster_instance)


def test_the_code_location_turns_batching_on_unless_the_deployment_chose(monkeypatch):
    from wedbackup_dagster.instance.event_batches import MATERIALIZATION_BATCH, enable_event_batching

    monkeypatch.delenv(BATCH_SIZE_SETTING, raising=False)
    enable_event_batching()

    assert os.environ[BATCH_SIZE_SETTING] == str(MATERIALIZATION_BATCH)
    monkeypatch.setenv(BATCH_SIZE_SETTING, "25")
    enable_event_batching()
    assert os.environ[BATCH_SIZE_SETTING] == "25"
