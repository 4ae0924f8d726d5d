"""`make bench`: run the benchmarks and write benchmarks/results/latest.json plus a markdown table.
`--quick` (BENCH_QUICK=1) uses a smaller database so it finishes in a few minutes."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
from pathlib import Path

from . import big_wedding, fleet

RESULTS = Path(__file__).resolve().parent / "results"


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
        "fleet": fleet.run(weddings=weddings, seed=7, document_bytes=document_bytes,
                             workers=args.workers),
    }
    # One very large wedding: latency and, above all, bounded memory (peak RSS of the worker process).
    result["single_wedding"] = big_wedding.run(megabytes=200 if args.quick else 1024)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(result, indent=2, default=str))
    f = result["fleet"]
    table = "\n".join([
        "| figure | value |", "|---|---|",
        f"| database | {f['database']['weddings']} weddings, {f['database']['bytes'] / 1e6:.0f} MB |",
        f"| `pg_dump -Fp \\| zstd -3 \\| age` | {f['baseline_pg_dump_zstd_age_seconds']} s |",
        f"| `pg_dump -Fc` | {f['baseline_pg_dump_custom_seconds']} s |",
        f"| wedbackup fleet (dump+seal+vault, {f['fleet']['workers']} workers) | {f['fleet_seconds']} s |",
        f"| ratio vs pg_dump\\|zstd\\|age | {f['fleet_wall_ratio_vs_pg_dump_zstd_age']} |",
        f"| peak RSS per worker | {f['fleet']['peak_rss_mb_per_worker']} MB |",
        f"| largest wedding: {result['single_wedding']['wedding_bytes'] / 1e6:.0f} MB, dump+seal | "
        f"{result['single_wedding']['dump_seal_seconds']} s, peak RSS "
        f"{result['single_wedding']['dump_seal_peak_rss_mb']} MB |",
        f"| largest wedding: verified restore | {result['single_wedding']['verified_restore_seconds']} s, "
        f"peak RSS {result['single_wedding']['verified_restore_peak_rss_mb']} MB |",
    ])
    (RESULTS / "latest.md").write_text(table + "\n")
    print(json.dumps(result, indent=2, default=str))
    print(table)


if __name__ == "__main__":
    main()
