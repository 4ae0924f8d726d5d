"""Change-feed benchmark (issue 18): the feed's sustained changes per second and its lag under a write load,
and the seconds to restore a median wedding to a point 12 hours after its snapshot.

- Write load: `writers` threads change random weddings (inserts, updates, deletes, child rows) for `seconds`,
  while a drainer runs one pass every `interval` seconds, as `wedbackup changes drain --follow` does. Lag is
  measured per pass as the time from a transaction's commit to the end of the pass that sealed it (the worst
  and the median over passes), and as `now - captured up to` when each pass ends. Side by side, the server's
  own decoding of a comparable window (`pg_logical_slot_peek_binary_changes` alone, nothing decoded, routed or
  sealed) gives the floor.
- 12 hours after the snapshot, simulated by volume: the median wedding (by rows) gets one transaction every
  10 s for 12 h, i.e. 4,320 transactions (one to three row changes each: guests, dietary rows, the wedding),
  written as fast as the server takes them, drained, then restored to the end into an empty database;
  side by side, the same snapshot restored without replay."""
from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
import uuid
from typing import Any

TWELVE_HOURS_OF_TRANSACTIONS = 12 * 3600 // 10


def _step(conn, rng: random.Random, weddings: list[str], n: int) -> int:
    w = rng.choice(weddings)
    r = rng.random()
    if r < 0.3:
        (gid,) = conn.execute("INSERT INTO guests (wedding_id, first_name, last_name) VALUES (%s, %s, 'Bench') "
                              "RETURNING id", (w, f"g{n}")).fetchone()
        conn.execute("INSERT INTO guest_dietary (guest_id, requirement, severity) VALUES (%s, 'gluten', 2)", (gid,))
        return 2
    if r < 0.7:
        return conn.execute("UPDATE guests SET meal_choice = %s WHERE id = (SELECT id FROM guests WHERE wedding_id = "
                            "%s ORDER BY id DESC LIMIT 1)", (f"m{n}", w)).rowcount
    if r < 0.85:
        return conn.execute("DELETE FROM guest_dietary WHERE id = (SELECT d.id FROM guest_dietary d JOIN guests g ON "
                            "g.id = d.guest_id WHERE g.wedding_id = %s LIMIT 1)", (w,)).rowcount
    return conn.execute("UPDATE weddings SET venue = %s WHERE id = %s", (f"v{n}", w)).rowcount


def _load(source: str, weddings: list[str], seconds: float, writers: int, seed: int) -> dict[str, Any]:
    import psycopg

    stop = threading.Event()
    counts = [0] * writers
    txns = [0] * writers

    def writer(i: int) -> None:
        rng = random.Random(seed + i)
        with psycopg.connect(source, autocommit=True) as conn:
            while not stop.is_set():
                with conn.transaction():
                    counts[i] += _step(conn, rng, weddings, txns[i])
                txns[i] += 1

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(writers)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return {"transactions": sum(txns), "changes": sum(counts)}


def run(weddings: int = 200, *, seconds: float = 20.0, writers: int = 2, interval: float = 2.0, seed: int = 7,
        document_bytes: int = 2048) -> dict[str, Any]:
    import psycopg

    from wedbackup_dagster.core.changefeed import slot as slots
    from wedbackup_dagster.core.changefeed.drain import ChangeFeed
    from wedbackup_dagster.core.engine import Engine
    from wedbackup_dagster.core.postgres.restore_wedding import RecoveryRequest, recover

    from .stand_ins import bench_environment

    slot = f"bench_feed_{uuid.uuid4().hex[:8]}"
    with bench_environment("bench_feed", weddings=weddings, seed=seed, document_bytes=document_bytes) as b:
        source = b["source"]
        engine = Engine.from_env()
        feed = ChangeFeed.from_settings(engine.settings, engine.keyring, engine.catalogue, slot=slot)
        try:
            feed.start()
            keys = [str(i) for i in range(1, weddings + 1)]
            with engine.snapshot_session() as session:  # setup, not timed
                outcomes = dict(engine.back_up_each(keys, session))

            # ---- sustained changes per second and lag under a write load ----
            passes: list[dict[str, Any]] = []
            done = threading.Event()

            def drainer() -> None:
                while not done.is_set():
                    started = time.monotonic()
                    r = feed.drain()
                    with psycopg.connect(source, autocommit=True) as conn:
                        (now,) = conn.execute("SELECT clock_timestamp()").fetchone()
                    oldest = min((s["first_commit"] for s in r.segments.values()), default=None)
                    passes.append({"seconds": r.seconds, "changes": r.changes, "transactions": r.transactions,
                                   "commit_to_sealed_max": (now - oldest).total_seconds() if oldest else 0.0,
                                   "captured_lag": (now - r.covered_until).total_seconds()})
                    done.wait(max(0.0, interval - (time.monotonic() - started)))

            d = threading.Thread(target=drainer, daemon=True)
            d.start()
            load_started = time.monotonic()
            written = _load(source, keys, seconds, writers, seed)
            load_seconds = time.monotonic() - load_started
            done.set()
            d.join()
            final = feed.drain()  # whatever the last pass left
            captured = sum(p["changes"] for p in passes) + final.changes
            drain_seconds = sum(p["seconds"] for p in passes) + final.seconds
            # The floor: the server decoding a comparable window, nothing else.
            _load(source, keys, min(5.0, seconds), writers, seed + 100)
            with psycopg.connect(source, autocommit=True) as conn:
                t0 = time.monotonic()
                (raw,) = conn.execute("SELECT count(*) FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
                                      "'proto_version', '1', 'publication_names', %s)",
                                      (slot, slots.publication_name(slot))).fetchone()
                raw_seconds = time.monotonic() - t0
            floor = feed.drain()

            # ---- a median wedding restored 12 hours (by volume) after its snapshot ----
            rows = sorted((o.manifest and sum(t["rows"] for t in o.manifest["tables"]), k)
                          for k, o in outcomes.items() if hasattr(o, "manifest"))
            median = rows[len(rows) // 2][1]
            with engine.snapshot_session() as session:
                engine.back_up(median, session)
            with psycopg.connect(source, autocommit=True) as conn:
                (snap_end,) = conn.execute("SELECT clock_timestamp()").fetchone()
                rng = random.Random(seed)
                t0 = time.monotonic()
                changes_12h = 0
                for n in range(TWELVE_HOURS_OF_TRANSACTIONS):
                    with conn.transaction():
                        changes_12h += _step(conn, rng, [median], n)
                write_12h = time.monotonic() - t0
                (at,) = conn.execute("SELECT clock_timestamp()").fetchone()
            time.sleep(0.01)
            drained_12h = feed.drain()
            targets = []
            for _ in range(2):
                name = f"bench_feed_target_{uuid.uuid4().hex[:8]}"
                with psycopg.connect(b["stack"].dsn("postgres"), autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')
                targets.append(name)
            try:
                t0 = time.monotonic()
                report = recover(engine, RecoveryRequest(partition=median, mode="target", as_of=at,
                                                         include_unverified=True), {},
                                 target_dsn=b["stack"].dsn(targets[0]))
                to_12h = time.monotonic() - t0
                t0 = time.monotonic()
                recover(engine, RecoveryRequest(partition=median, mode="target", as_of=snap_end,
                                                include_unverified=True), {}, target_dsn=b["stack"].dsn(targets[1]))
                snapshot_only = time.monotonic() - t0
            finally:
                with psycopg.connect(b["stack"].dsn("postgres"), autocommit=True) as conn:
                    for name in targets:
                        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            with psycopg.connect(source, autocommit=True) as conn:
                slots.drop_slot(conn, slot)
            engine.catalogue.close()
    lags = [p["commit_to_sealed_max"] for p in passes if p["transactions"]]
    return {
        "weddings": weddings, "writers": writers, "load_seconds": round(load_seconds, 2), "drain_interval": interval,
        "written": written,
        "write_changes_per_second": round(written["changes"] / load_seconds, 1),
        "captured_changes": captured,
        "drain_passes": len(passes),
        "feed_changes_per_second_of_drain_time": round(captured / drain_seconds, 1) if drain_seconds else None,
        "feed_sustained_changes_per_second": round(captured / load_seconds, 1),
        "lag_commit_to_sealed_max_seconds": round(max(lags), 2) if lags else None,
        "lag_commit_to_sealed_median_seconds": round(statistics.median(lags), 2) if lags else None,
        "captured_lag_max_seconds": round(max(p["captured_lag"] for p in passes), 2) if passes else None,
        "floor_server_decoding": {"messages": raw, "seconds": round(raw_seconds, 3),
                                  "drain_of_the_same_window_seconds": floor.seconds,
                                  "changes": floor.changes},
        "twelve_hours": {"wedding": median, "transactions": TWELVE_HOURS_OF_TRANSACTIONS, "changes": changes_12h,
                         "write_seconds": round(write_12h, 2), "drain_seconds": drained_12h.seconds,
                         "replayed_changes": (report.replay or {}).get("changes"),
                         "restore_to_12h_seconds": round(to_12h, 2),
                         "restore_snapshot_only_seconds": round(snapshot_only, 2)},
        "restore_median_wedding_12h_after_snapshot_seconds": round(to_12h, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weddings", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args()
    print(json.dumps(run(args.weddings, seconds=args.seconds, writers=args.writers, interval=args.interval),
                     indent=2, default=str))


if __name__ == "__main__":
    main()
