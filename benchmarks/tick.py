"""One backup-schedule tick over 100,000 weddings: synthetic rows in a catalogue's wedbackup.partitions and
wedbackup.backups, the same keys as dynamic partitions of a test Dagster instance, and the schedule
evaluated through Dagster (`evaluate_tick`, so Dagster's own overhead is counted); also a
wedding_discovery tick that finds nothing new over the same 100,000."""
from __future__ import annotations

import datetime as dt
import os
import random
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg

from wedbackup_dagster.core.catalogue.store import Catalogue


def seed_catalogue(catalogue_dsn: str, weddings: Iterable[tuple[str, dt.date | None, dt.datetime | None,
                                                                dt.datetime | None]]) -> None:
    """Rows of (partition, wedding_date, newest snapshot_time or None, source_updated_at or None), written
    with COPY: a synthetic catalogue for schedule tests and benchmarks (no archives behind the backups)."""
    Catalogue(catalogue_dsn).migrate()
    rows = list(weddings)
    with psycopg.connect(catalogue_dsn) as conn:
        with conn.cursor().copy("COPY wedbackup.partitions (partition, wedding_date, source_updated_at) "
                                "FROM STDIN") as copy:
            for partition, wedding_date, _, source_updated_at in rows:
                copy.write_row((partition, wedding_date, source_updated_at))
        with conn.cursor().copy("COPY wedbackup.backups (partition, archive_sha256, size, key_id, snapshot_time, "
                                "rows, raw_bytes, manifest) FROM STDIN") as copy:
            for partition, _, snapshot_time, _ in rows:
                if snapshot_time is not None:
                    copy.write_row((partition, uuid.uuid4().hex * 2, 1, f"{partition}.k", snapshot_time, 0, 0, "{}"))
        conn.execute("ANALYZE wedbackup.partitions")
        conn.execute("ANALYZE wedbackup.backups")


def synthetic_fleet(n: int, now: dt.datetime, seed: int = 7) -> list[tuple[str, dt.date | None, dt.datetime | None,
                                                                           dt.datetime | None]]:
    """platform + n weddings dated over ±18 months, backed up 0–30 h ago, a third changed since."""
    rng = random.Random(seed)
    rows: list[tuple[str, dt.date | None, dt.datetime | None, dt.datetime | None]] = [
        ("platform", None, now - dt.timedelta(hours=3), now - dt.timedelta(hours=4))]
    for i in range(1, n + 1):
        snap = now - dt.timedelta(minutes=rng.randint(0, 30 * 60))
        changed = rng.random() < 0.33
        rows.append((str(i), now.date() + dt.timedelta(days=rng.randint(-540, 540)), snap,
                     snap + dt.timedelta(minutes=1) if changed else snap - dt.timedelta(hours=1)))
    return rows


def run(weddings: int = 100_000) -> dict[str, Any]:
    import dagster as dg

    from wedbackup_dagster.backups.schedules import backup_schedule
    from wedbackup_dagster.backups.partitions import weddings_partitions
    from wedbackup_dagster.dev.stack import Stack
    from wedbackup_dagster.shared.resources import WedbackupEngineResource

    stack = Stack.default()
    saved = dict(os.environ)
    os.environ.update(stack.env())
    name = f"bench_tick_{uuid.uuid4().hex[:8]}"
    admin = stack.dsn("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # name is ours, made above from hex digits
    try:
        catalogue_dsn = stack.dsn(name)
        os.environ["WEDBACKUP_CATALOGUE_DSN"] = catalogue_dsn
        now = dt.datetime(2026, 6, 10, 12, 0, tzinfo=dt.timezone.utc)
        fleet = synthetic_fleet(weddings, now)
        t = time.perf_counter()
        seed_catalogue(catalogue_dsn, fleet)
        seed_seconds = time.perf_counter() - t
        with dg.instance_for_test() as instance:
            t = time.perf_counter()
            keys = [row[0] for row in fleet]
            for i in range(0, len(keys), 10_000):
                instance.add_dynamic_partitions(weddings_partitions.name, keys[i:i + 10_000])
            add_seconds = time.perf_counter() - t
            ctx = dg.build_schedule_context(instance=instance, scheduled_execution_time=now,
                                            resources={"wedbackup": WedbackupEngineResource()})
            t = time.perf_counter()
            with ctx:
                data = backup_schedule.evaluate_tick(ctx)
            tick_seconds = time.perf_counter() - t
            requests = data.run_requests or []
            # The same tick had it asked for one run per due wedding by partition_key (what Dagster
            # validates one lookup at a time): measured on a sample of 2,000 keys.
            from wedbackup_dagster.definitions import defs

            job = defs.resolve_job_def("backup_weddings")
            sample = keys[1:2001]
            t = time.perf_counter()
            for k in sample:
                dg.RunRequest(run_key=k, partition_key=k).with_resolved_tags_and_config(
                    target_definition=job, dynamic_partitions_requests=[], dynamic_partitions_store=instance)
            validate_2000 = time.perf_counter() - t
            sensors = _sensor_ticks(stack, instance, fleet)
        due = sum(int(r.tags["wedbackup/due_weddings"]) for r in requests)
        # What partition-range runs would have needed for the same due weddings (ranges over insertion
        # order, at most 4 not-due weddings carried per gap).
        due_keys = [k for r in requests for k in r.run_config["ops"]["snapshot_and_seal_list"]["config"]["weddings"]]
        ranges = batch_ranges(due_keys, keys, max_extra_per_gap=4, max_run_size=500)
        position = {k: i for i, k in enumerate(keys)}
        range_extra = sum(position[b] - position[a] + 1 - n for a, b, n in ranges)
        return {
            "weddings": weddings,
            "schedule_tick_seconds_100k": round(tick_seconds, 3),
            "run_requests": len(requests),
            "due_weddings_requested": due,
            "weddings_per_run": round(due / max(len(requests), 1), 1),
            "range_runs_instead": len(ranges),
            "range_runs_extra_weddings": range_extra,
            "covered_unchanged": _covered(catalogue_dsn),
            "validate_2000_partition_key_requests_seconds": round(validate_2000, 3),
            "add_dynamic_partitions_seconds": round(add_seconds, 3),
            "seed_catalogue_seconds": round(seed_seconds, 3),
            **sensors,
        }
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        os.environ.clear()
        os.environ.update(saved)


def batch_ranges(due: Iterable[str], ordered: Sequence[str], *, max_extra_per_gap: int,
                 max_run_size: int) -> list[tuple[str, str, int]]:
    """Cover the due keys with few ranges over `ordered` (the partitions' insertion order), as
    (first, last, due keys inside): a range may carry up to `max_extra_per_gap` not-due keys between
    two due ones (one batched wedding costs less than one more run) and spans at most `max_run_size`
    keys. Keys not in `ordered` are left out (not yet a Dagster partition)."""
    position = {k: i for i, k in enumerate(ordered)}
    points = sorted({position[k] for k in due if k in position})
    ranges: list[tuple[str, str, int]] = []
    if not points:
        return ranges
    start = prev = points[0]
    count = 1
    for p in points[1:]:
        if p - prev - 1 <= max_extra_per_gap and p - start + 1 <= max_run_size:
            prev, count = p, count + 1
            continue
        ranges.append((ordered[start], ordered[prev], count))
        start = prev = p
        count = 1
    ranges.append((ordered[start], ordered[prev], count))
    return ranges


def _sensor_ticks(stack: Any, instance: Any, fleet: list[tuple]) -> dict[str, float]:
    """wedding_discovery and change capture over the same weddings, in a throw-away source database
    (weddings with date and updated_at, guests): a full diff tick (cursor stale, every partition already
    known), a tick with nothing changed, and a change-capture tick after 100 guests changed."""
    import dagster as dg

    from wedbackup_dagster.backups.sensors import wedding_change_capture, wedding_discovery
    from wedbackup_dagster.shared.resources import WedbackupEngineResource

    def evaluate(sensor, **context):  # noqa: ANN001, ANN202
        with dg.build_sensor_context(resources={"wedbackup": WedbackupEngineResource()}, **context) as ctx:
            return sensor.evaluate_tick(ctx)

    name = f"bench_src_{uuid.uuid4().hex[:8]}"
    admin = stack.dsn("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # name is ours, made above from hex digits
    try:
        dsn = stack.dsn(name)
        os.environ["WEDBACKUP_SOURCE_DSN"] = dsn
        with psycopg.connect(dsn) as conn:
            conn.execute("CREATE TABLE weddings (id bigint PRIMARY KEY, wedding_date date NOT NULL, "
                         "updated_at timestamptz NOT NULL DEFAULT now())")
            conn.execute("CREATE TABLE guests (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, wedding_id bigint "
                         "NOT NULL REFERENCES weddings (id), name text, updated_at timestamptz NOT NULL DEFAULT now())")
            with conn.cursor().copy("COPY weddings (id, wedding_date, updated_at) FROM STDIN") as copy:
                for partition, wedding_date, _, _ in fleet[1:]:
                    copy.write_row((int(partition), wedding_date, "2026-01-01T00:00:00Z"))
            conn.execute("INSERT INTO guests (wedding_id, name, updated_at) SELECT id, 'g', '2026-01-01T00:00:00Z' "
                         "FROM weddings")
            conn.execute("CREATE INDEX ON guests (updated_at)")
            conn.execute("CREATE INDEX ON weddings (updated_at)")
            conn.execute("ANALYZE")
        out = {}
        t = time.perf_counter()
        data = evaluate(wedding_discovery, instance=instance, cursor="stale")
        out["sensor_tick_seconds_100k"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        evaluate(wedding_discovery, instance=instance, cursor=data.cursor)
        out["discovery_tick_unchanged_seconds_100k"] = round(time.perf_counter() - t, 3)
        with psycopg.connect(dsn) as conn:
            conn.execute("UPDATE guests SET name = 'changed', updated_at = now() WHERE wedding_id <= 100")
        t = time.perf_counter()
        evaluate(wedding_change_capture, instance=instance, cursor="2026-06-01T00:00:00+00:00")
        out["change_capture_tick_seconds_100k"] = round(time.perf_counter() - t, 3)
        return out
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _covered(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM wedbackup.partitions WHERE covered_at IS NOT NULL").fetchone()[0]


if __name__ == "__main__":
    import json

    print(json.dumps(run(int(os.environ.get("TICK_WEDDINGS", "100000"))), indent=2))
