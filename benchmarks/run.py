"""`make bench`: run the benchmarks and write benchmarks/results/latest.json plus a markdown table.
`--quick` (BENCH_QUICK=1) uses a smaller database so it finishes in a few minutes."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
from pathlib import Path

from . import big_wedding, change_feed, dagster_overhead, fleet, media, replicas, tick
from .fresh_process import run_part

RESULTS = Path(__file__).resolve().parent / "results"


def _overhead_rows(overhead: dict) -> list[str]:
    rows = []
    for size in overhead["sizes"].values():
        for v in size["variants"]:
            batching = f"batches of {v['event_batch_size']}" if v["event_batch_size"] else "one by one"
            rows.append(f"| Dagster overhead, {size['weddings']} weddings ({' + '.join(size['steps'])}), "
                        f"{v['storage']}, materializations {batching} | {v['overhead_ms_per_wedding']} ms/wedding "
                        f"({v['in_run_overhead_ms_per_wedding']} in the runs + {size['run_start_ms_per_wedding']} "
                        f"run start-up; {v['ratio_dagster_vs_plain']}x the plain engine); whole job (6 "
                        f"materializations) {v['full_job_overhead_ms_per_wedding']} ms |")
    return rows


def media_rows(m: dict) -> list[str]:
    d, r, u, h = m["demo_media"], m["restic"], m["unchanged_wedding"], m["huge_file"]
    return [
        f"| media chunk+hash+seal, incompressible, one core | {m['throughput']['mb_per_s_per_core']} MB/s of CPU "
        f"({m['throughput']['mb_per_s_wall']} MB/s wall) |",
        f"| media demo ({d['weddings']} weddings + platform, {d['source_bytes'] / 1e6:.0f} MB): wedbackup / restic "
        f"backup | {d['backup_seconds']} s / {r['backup_seconds']} s |",
        f"| media demo: stored bytes wedbackup (per wedding) / restic (across weddings) | "
        f"{d['stored_bytes'] / 1e6:.1f} MB ({d['stored_ratio']}x) / {r['stored_bytes'] / 1e6:.1f} MB "
        f"({r['dedup_ratio_stored']}x) |",
        f"| media demo: restore wedbackup / restic | {d['restore_seconds']} s / {r['restore_seconds']} s |",
        f"| media: unchanged {u['bytes'] / 1e6:.0f} MB wedding backed up again, wedbackup / restic | "
        f"{u['incremental_seconds']} s / {u['restic_incremental_seconds']} s |",
        f"| media: one {h['gigabytes']} GB file | {h['seconds']} s, peak RSS {h['peak_rss_mb']} MB |",
        *([f"| media: a changed {m['chunk_index']['changed_file_mb']} MB file, wedding with 0 / "
           f"{m['chunk_index']['catalogue_chunks']:,} chunks (the old in-memory index alone) | peak RSS "
           f"{m['chunk_index']['no_chunks']['peak_rss_mb']} / {m['chunk_index']['many_chunks']['peak_rss_mb']} MB "
           f"({m['chunk_index']['old_index_load']['index_mb']} MB) |"] if "chunk_index" in m else []),
    ]


def _save_partial(result: dict) -> None:
    (RESULTS / "latest.partial.json").write_text(json.dumps(result, indent=2, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    # One worker more than cores: while one waits on PostgreSQL's COPY, another compresses and seals.
    parser.add_argument("--workers", type=int, default=(os.cpu_count() or 2) + 1)
    args = parser.parse_args()
    # The full run matches issue 7's reference: 2,000 weddings, about 1 GB (contracts and documents
    # carry most of the bytes, as on the platform).
    weddings, document_bytes = (300, 16_000) if args.quick else (2000, 56_000)
    result = {
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "complete": False,
    }
    RESULTS.mkdir(exist_ok=True)
    # First, in a fresh process: the parts that measure peak memory (RSS is a lifetime peak, and forked
    # workers inherit it, so after the whole job they would report the whole job's peak).
    result["fleet"] = fleet.run(weddings=weddings, seed=7, document_bytes=document_bytes, workers=args.workers)
    _save_partial(result)
    # One very large wedding: latency and, above all, bounded memory (peak RSS of the worker process).
    result["single_wedding"] = big_wedding.run(megabytes=200 if args.quick else 1024)
    _save_partial(result)
    # The whole job through Dagster (`wedbackup backup --all`) against the scripted peer (pg_dump | zstd | age,
    # three uploads, restore test), side by side: on the demo database (`demo-data --weddings 2000`) and on
    # the fleet database below (about 1 GB). Each part's figures are saved as soon as it ends
    # (latest.partial.json), so an interrupted bench keeps what it measured.
    # These three parts each run in a new process, as the user's commands do (fresh_process.py).
    result["whole_job_demo"] = run_part("whole_job", "--weddings", str(300 if args.quick else 2000),
                                        "--document-bytes", "4096", "--label", "demo")
    result["whole_job_ratio_vs_peer_demo"] = result["whole_job_demo"]["whole_job_ratio_vs_peer"]
    _save_partial(result)
    result["whole_job_fleet"] = run_part("whole_job", "--weddings", str(weddings),
                                         "--document-bytes", str(document_bytes), "--label", "fleet")
    result["whole_job_ratio_vs_peer_fleet"] = result["whole_job_fleet"]["whole_job_ratio_vs_peer"]
    _save_partial(result)
    # Re-verify a fleet through Dagster in batched runs (verified_restore and its checks, no new dump).
    result["reverify"] = run_part("reverify", "--weddings", str(300 if args.quick else 2000), "--batch-size", "500")
    result["reverify_weddings_per_minute"] = result["reverify"]["reverify_weddings_per_minute"]
    result["reverify_runs"] = result["reverify"]["runs"]
    # The whole platform back from S3 alone (`restore --all`) against the peer's whole dump restored (issue 17).
    result["restore_all"] = run_part("restore_all", "--weddings", str(300 if args.quick else 2000),
                                     "--compare-deferred")
    result["restore_all_seconds"] = result["restore_all"]["restore_all_seconds"]
    result["restore_all_ratio_vs_peer"] = result["restore_all"]["restore_all_ratio_vs_peer"]
    _save_partial(result)
    # One backup-schedule tick, and the discovery / change-capture sensor ticks, over 100,000 weddings.
    result["tick"] = tick.run(weddings=100_000)
    _save_partial(result)
    # Dagster's cost per wedding in the schedule's batched list runs, against the same engine calls without
    # Dagster: production storage (dagster-postgres) with batched materializations, next to one-by-one
    # writes, the pooled event log and the local demo's SQLite.
    result["dagster_overhead"] = dagster_overhead.run(quick=args.quick)
    result["dagster_overhead_ms_per_wedding"] = result["dagster_overhead"]["dagster_overhead_ms_per_wedding"]
    _save_partial(result)
    # Upload throughput to the local stand-ins (not clouds: no network, their own overheads).
    result["replicas"] = replicas.run(quick=args.quick)
    result["replica_upload_mb_per_s"] = result["replicas"]["replica_upload_mb_per_s"]
    # The change feed (issue 18): sustained changes/s and lag under a write load, and a median wedding restored
    # to 12 hours (by volume) after its snapshot, next to the same snapshot restored without replay.
    result["change_feed"] = change_feed.run(weddings=100 if args.quick else 400, seconds=15 if args.quick else 30)
    cf = result["change_feed"]
    result["feed_sustained_changes_per_second"] = cf["feed_sustained_changes_per_second"]
    result["feed_lag_max_seconds"] = cf["lag_commit_to_sealed_max_seconds"]
    twelve_hours = "restore_median_wedding_12h_after_snapshot_seconds"
    result[twelve_hours] = cf[twelve_hours]
    # Wedding media (issue 19): chunk+hash+seal throughput, dedup on the demo media, an unchanged wedding's
    # incremental backup, peak RSS for one huge file, and restic on the same files in the same run.
    result["media"] = media.run(quick=args.quick)
    for key in ("media_chunk_hash_seal_mb_per_s_per_core", "media_dedup_ratio_demo",
                "media_incremental_unchanged_seconds", "media_huge_file_peak_rss_mb"):
        result[key] = result["media"][key]
    # The headline figures at the top level too, named as issue 7 asks for them.
    fl, single = result["fleet"], result["single_wedding"]
    result.update({
        "fleet_wall_ratio_vs_pg_dump_zstd_age": fl["fleet_wall_ratio_vs_pg_dump_zstd_age"],
        "fleet_wall_ratio_vs_pg_dump_custom": fl["fleet_wall_ratio_vs_pg_dump_custom"],
        "fleet_bytes_per_second": fl["fleet_bytes_per_second"],
        "fleet_peak_rss_mb_per_worker": fl["fleet"]["peak_rss_mb_per_worker"],
        "median_wedding_dump_seal_seconds": fl["median_wedding"]["dump_seal_seconds"],
        "median_wedding_verified_restore_seconds": fl["median_wedding"]["verified_restore_seconds"],
        "largest_wedding_dump_seal_seconds": single["dump_seal_seconds"],
        "largest_wedding_verified_restore_seconds": single["verified_restore_seconds"],
        "largest_wedding_peak_rss_mb": max(single["dump_seal_peak_rss_mb"], single["verified_restore_peak_rss_mb"]),
        "schedule_tick_seconds_100k": result["tick"]["schedule_tick_seconds_100k"],
        "sensor_tick_seconds_100k": result["tick"]["sensor_tick_seconds_100k"],
    })
    result["complete"] = True
    (RESULTS / "latest.json").write_text(json.dumps(result, indent=2, default=str))
    (RESULTS / "latest.partial.json").unlink(missing_ok=True)
    f = result["fleet"]
    table = "\n".join([
        "| figure | value |", "|---|---|",
        f"| database | {f['database']['weddings']} weddings, {f['database']['bytes'] / 1e6:.0f} MB |",
        f"| `pg_dump -Fp \\| zstd -3 \\| age` | {f['baseline_pg_dump_zstd_age_seconds']} s |",
        f"| `pg_dump -Fc` | {f['baseline_pg_dump_custom_seconds']} s |",
        f"| wedbackup fleet (dump+seal+vault, {f['fleet']['workers']} workers) | {f['fleet_seconds']} s |",
        f"| ratio vs pg_dump\\|zstd\\|age | {f['fleet_wall_ratio_vs_pg_dump_zstd_age']} |",
        f"| peak RSS per worker | {f['fleet']['peak_rss_mb_per_worker']} MB |",
        f"| median wedding ({f['median_wedding']['raw_bytes'] / 1e6:.1f} MB as COPY text): dump+seal / verified "
        f"restore | {f['median_wedding']['dump_seal_seconds']} s / "
        f"{f['median_wedding']['verified_restore_seconds']} s |",
        f"| largest wedding: {result['single_wedding']['wedding_bytes'] / 1e6:.0f} MB, dump+seal | "
        f"{result['single_wedding']['dump_seal_seconds']} s, peak RSS "
        f"{result['single_wedding']['dump_seal_peak_rss_mb']} MB |",
        f"| largest wedding: verified restore | {result['single_wedding']['verified_restore_seconds']} s, "
        f"peak RSS {result['single_wedding']['verified_restore_peak_rss_mb']} MB |",
        *(f"| whole job, {result[k]['database']['weddings']} weddings ({what}): wedbackup through Dagster / "
          f"scripted peer | {result[k]['wedbackup']['seconds']} s / {result[k]['peer']['seconds']} s = "
          f"{result[k]['whole_job_ratio_vs_peer']}x |"
          for k, what in (("whole_job_demo", "demo database"), ("whole_job_fleet", "fleet database"))),
        f"| re-verify {result['reverify']['weddings']} weddings through Dagster | "
        f"{result['reverify_weddings_per_minute']} weddings/min in {result['reverify_runs']} runs |",
        f"| restore --all from S3, {result['restore_all']['database']['weddings']} weddings / peer's whole dump "
        f"restored | {result['restore_all_seconds']} s / {result['restore_all']['peer_restore_seconds']} s = "
        f"{result['restore_all_ratio_vs_peer']}x (reading the DR pack; without it "
        f"{result['restore_all']['restore_all_without_pack_seconds']} s = "
        f"{result['restore_all']['restore_all_without_pack_ratio_vs_peer']}x) |",
        f"| backup schedule tick, 100k weddings | {result['tick']['schedule_tick_seconds_100k']} s "
        f"({result['tick']['run_requests']} runs for {result['tick']['due_weddings_requested']} due weddings) |",
        f"| wedding_discovery tick, 100k weddings | {result['tick']['sensor_tick_seconds_100k']} s |",
        *_overhead_rows(result["dagster_overhead"]),
        *(f"| {p} upload ({result['replicas']['stand_ins'][p]}) | {v['large_mb_per_s']} MB/s "
          f"({result['replicas']['large_file_mb']:.0f} MB file), {v['small_files_per_s']} files/s (64 kB) |"
          for p, v in result["replicas"]["providers"].items()),
        f"| change feed, {cf['weddings']} weddings, {cf['writers']} writers for {cf['load_seconds']} s: written / "
        f"captured | {cf['write_changes_per_second']} / {cf['feed_sustained_changes_per_second']} changes/s; "
        f"lag commit to sealed max {cf['lag_commit_to_sealed_max_seconds']} s, median "
        f"{cf['lag_commit_to_sealed_median_seconds']} s "
        f"(drain every {cf['drain_interval']} s) |",
        f"| median wedding restored 12 h after its snapshot ({cf['twelve_hours']['transactions']:,} transactions, "
        f"{cf['twelve_hours']['changes']:,} changes replayed) / the snapshot alone | "
        f"{cf['twelve_hours']['restore_to_12h_seconds']} s / {cf['twelve_hours']['restore_snapshot_only_seconds']} s |",
        *media_rows(result["media"]),
    ])
    (RESULTS / "latest.md").write_text(table + "\n")
    print(json.dumps(result, indent=2, default=str))
    print(table)


if __name__ == "__main__":
    main()
