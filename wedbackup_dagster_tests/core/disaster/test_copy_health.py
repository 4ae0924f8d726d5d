"""restore --all's memory of failing copy locations (core/disaster/copy_health.py): pure, no stack."""
from wedbackup_dagster.core.disaster.copy_health import CopyHealth


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_location_failing_three_times_in_a_row_is_tried_last_never_skipped():
    health = CopyHealth(failures_in_a_row=3, cool_down=60, clock=Clock())
    order = ("s3", "gcs", "azure")
    for _ in range(2):
        health.failed("s3", "connection refused")
        assert health.order(order) == (order, [])  # two failures: still first
    health.failed("s3", "connection refused")
    moved, notes = health.order(order)
    assert moved == ("gcs", "azure", "s3")  # still there: a wedding whose other copies fail still tries it
    assert notes == ["s3: tried last: 3 failures in a row, the last: connection refused"]
    assert health.order(("s3",)) == (("s3",), ["s3: tried last: 3 failures in a row, the last: connection refused"])
    assert health.lines() == ["s3 tried last for 2 wedding(s) after 3 failures in a row (the last: connection refused)"]


def test_a_success_between_failures_resets_the_count():
    health = CopyHealth(failures_in_a_row=3, clock=Clock())
    for outcome in ("fail", "fail", "ok", "fail", "fail"):
        health.failed("gcs", "503") if outcome == "fail" else health.succeeded("gcs")
    assert health.order(("gcs", "azure")) == (("gcs", "azure"), [])
    assert health.lines() == []


def test_after_the_cool_down_one_wedding_tries_it_in_its_place_and_a_success_puts_it_back():
    clock = Clock()
    health = CopyHealth(failures_in_a_row=1, cool_down=60, clock=clock)
    health.failed("s3", "refused")
    assert health.order(("s3", "gcs"))[0] == ("gcs", "s3")
    clock.now += 61
    assert health.order(("s3", "gcs")) == (("s3", "gcs"), [])  # the probe
    assert health.order(("s3", "gcs"))[0] == ("gcs", "s3")  # the others meanwhile: still last
    health.failed("s3", "refused again")  # the probe failed: another cool-down
    clock.now += 30
    assert health.order(("s3", "gcs"))[0] == ("gcs", "s3")
    clock.now += 31
    assert health.order(("s3", "gcs"))[0] == ("s3", "gcs")  # probe again
    health.succeeded("s3")
    assert health.order(("s3", "gcs")) == (("s3", "gcs"), [])
    assert health.order(("s3", "gcs")) == (("s3", "gcs"), [])
