"""Standing verification's wiring on a real catalogue and a test instance: the exact run requests of the
daily check_weddings, the rolling re-verification's share (least recently verified first, overdue always in,
erased weddings left out), and the reverification_status check naming the overdue weddings."""
import datetime as dt

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from wedbackup_dagster.backups.reverify_list import RUN_SIZE, reverify_run_config
from wedbackup_dagster.backups.partitions import weddings_partitions
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.definitions import defs
from wedbackup_dagster.shared.resources import WedbackupEngineResource
from wedbackup_dagster.disaster.standing import (
    CHECK_RUN_SIZE,
    OVERDUE_TAG,
    REVERIFICATION_STATUS,
    REVERIFIED_CHECK,
    check_weddings_daily,
    rolling_reverification,
    time_between_ticks,
)

TICK = dt.datetime(2026, 12, 5, 2, 0, tzinfo=dt.timezone.utc)


def backed_up(catalogue: Catalogue, partition: str, verified_at: dt.datetime | None) -> None:
    """A backup of `partition`, restored successfully at `verified_at` (None: never restored)."""
    backup = catalogue.record_backup(partition=partition, archive_sha256=f"{int(partition or 0):064x}"
                                     if partition.isdigit() else "f" * 64, size=10, key_id="k",
                                     manifest={"snapshot_time": "2026-12-01T00:00:00+00:00", "txid": 1,
                                               "schema_fingerprint": "x", "tables": []})
    if verified_at is not None:
        catalogue.record_restore(backup.id, provider="s3", ok=True, seconds=0.1, detail={})
        with catalogue.connect() as conn:
            conn.execute("UPDATE wedbackup.restores SET at = %s WHERE backup_id = %s", (verified_at, backup.id))


def test_daily_checks_cover_every_wedding_in_ranges_of_at_most_a_thousand():
    with dg.instance_for_test() as instance:
        keys = ["platform", *(str(i) for i in range(1, 2501))]
        instance.add_dynamic_partitions(weddings_partitions.name, keys)
        requests = check_weddings_daily(dg.build_schedule_context(instance=instance, scheduled_execution_time=TICK))
        assert [(r.run_key, r.tags[ASSET_PARTITION_RANGE_START_TAG], r.tags[ASSET_PARTITION_RANGE_END_TAG])
                for r in requests] == [("check-weddings-20261205-0", "platform", "999"),
                                       ("check-weddings-20261205-1", "1000", "1999"),
                                       ("check-weddings-20261205-2", "2000", "2500")]
        assert CHECK_RUN_SIZE == 1000
        # Dagster resolves the ranges against the partitioned check_weddings job as its daemon does
        schedule = defs.resolve_schedule_def("check_weddings_daily")
        data = schedule.evaluate_tick(dg.build_schedule_context(instance=instance, scheduled_execution_time=TICK,
                                                                repository_def=defs.get_repository_def()))
        assert len(data.run_requests) == 3 and schedule.job_name == "check_weddings"
    with dg.instance_for_test() as empty:
        skip = check_weddings_daily(dg.build_schedule_context(instance=empty, scheduled_execution_time=TICK))
        assert isinstance(skip, dg.SkipReason)


def test_the_rolling_reverification_takes_its_share_least_recently_verified_first(catalogue):
    day = dt.timedelta(days=1)
    backed_up(catalogue, "platform", TICK - 2 * day)
    backed_up(catalogue, "1", None)  # never verified: overdue
    backed_up(catalogue, "2", TICK - 8 * day)  # out of the window: overdue
    for i in range(3, 601):  # verified 1..598 minutes ago
        backed_up(catalogue, str(i), TICK - dt.timedelta(minutes=601 - i))
    backed_up(catalogue, "700", None)
    catalogue.begin_erasure("700", "700", "test")  # erased: its keys are gone, never re-verified
    assert time_between_ticks("0 2 * * *", "Europe/London", TICK) == day
    with dg.instance_for_test() as instance, dg.build_schedule_context(
            instance=instance, scheduled_execution_time=TICK,
            resources={"wedbackup": WedbackupEngineResource()}) as context:
        requests = rolling_reverification(context)
    # 601 partitions over 7 daily ticks: share 86 — the two overdue, then platform, then 3, 4, ...
    expected = ["1", "2", "platform", *(str(i) for i in range(3, 86))]
    assert len(expected) == 86
    assert [(r.job_name, r.run_key, r.run_config, r.tags[OVERDUE_TAG]) for r in requests] == [
        ("reverify_wedding_list", "standing-reverify-20261205T0200-0", reverify_run_config(expected), "2")]
    assert RUN_SIZE >= 86


def test_the_check_fails_naming_the_weddings_not_reverified_within_the_window(catalogue, monkeypatch):
    now = dt.datetime.now(dt.timezone.utc)
    backed_up(catalogue, "platform", now - dt.timedelta(hours=1))
    backed_up(catalogue, "11", now - dt.timedelta(days=2))
    job = defs.resolve_job_def("reverification_status_job")
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance)
        check = result.get_asset_check_evaluations()[0]
        assert check.check_name == REVERIFIED_CHECK and check.passed
        backed_up(catalogue, "12", None)
        backed_up(catalogue, "13", now - dt.timedelta(days=9))
        result = job.execute_in_process(instance=instance)
        check = result.get_asset_check_evaluations()[0]
        assert not check.passed
        assert check.description == "2 of 4 partition(s) not re-verified within 7 day(s): 12, 13"
        assert check.metadata["overdue_weddings"].value == ["12", "13"]
        event = instance.get_latest_materialization_event(REVERIFICATION_STATUS)
        assert event.asset_materialization.metadata["overdue"].value == 2
