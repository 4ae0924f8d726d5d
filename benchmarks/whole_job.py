"""The whole job, side by side on the same database and stand-ins: wedbackup through Dagster exactly as
`wedbackup backup --all` runs it (partitions registered, then `backup_weddings`: dump, seal, vault, S3,
GCS and Azure uploads, verified restore, checks) against the job a user would script instead:
`pg_dump -Fp | zstd -3 | age`, the file uploaded to S3, GCS and Azure, then the whole dump restored into a
scratch database as the restore test. The peer runs before and after wedbackup (drift on a shared machine
hits both); its best run is the reference."""
from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path
from typing import Any

from .fresh_process import write_result


def peer(bench: dict[str, Any], work: Path) -> dict[str, float]:
    """The scripted peer's three parts, timed: dump+compress+encrypt, three uploads, restore test."""
    import psycopg
    from psycopg import sql

    from .fleet import _pg_bin, _pg_env, baseline_pg_dump_zstd_age

    dump = baseline_pg_dump_zstd_age(bench["source"], work)
    path = work / "baseline.sql.zst.age"
    bucket, key = bench["bucket"], f"peer/{time.time_ns()}.sql.zst.age"
    started = time.perf_counter()
    bench["s3"].upload_file(str(path), bucket, key, ExtraArgs={"ChecksumAlgorithm": "SHA256"})
    bench["gcs"].bucket(bucket).blob(key).upload_from_filename(str(path))
    with open(path, "rb") as fh:
        bench["azure"].get_blob_client(bucket, key).upload_blob(fh, overwrite=True)
    uploads = time.perf_counter() - started
    admin = bench["stack"].dsn("postgres")
    scratch = f"peer_restore_{time.time_ns()}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(scratch)))
    try:
        started = time.perf_counter()
        env = _pg_env(bench["stack"].dsn(scratch))
        subprocess.run(f"age -d -i {work / 'age.key'} {path} | zstd -d -q -c | "
                       f"{_pg_bin('psql')} -q -v ON_ERROR_STOP=1 -o /dev/null", shell=True, check=True, env=env)
        restore = time.perf_counter() - started
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(scratch)))
    return {"dump_seconds": round(dump["seconds"], 2), "upload_seconds": round(uploads, 2),
            "restore_test_seconds": round(restore, 2),
            "seconds": round(dump["seconds"] + uploads + restore, 2), "bytes": dump["bytes"]}


def wedbackup_whole_job(bench: dict[str, Any]) -> dict[str, Any]:
    """`wedbackup backup --all`, timed from partition registration to the last run's end, on a Dagster
    instance stored in PostgreSQL as on the stack (`wedbackup backup`) and in production."""
    from wedbackup_dagster.backups.launch import register_partitions, run_job_for
    from wedbackup_dagster.cli.cmd_backup import QUIET
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from wedbackup_dagster.core.config import Settings
    from wedbackup_dagster.core.storage.providers import ensure_targets

    from .stand_ins import dagster_instance

    settings = Settings.from_env()
    with dagster_instance(bench) as instance:
        started = time.perf_counter()
        catalogue = Catalogue(settings.catalogue_dsn)
        catalogue.migrate()
        keys = register_partitions(instance, settings.source_dsn, catalogue.erased_partitions())
        ensure_targets(settings)
        results = run_job_for("backup_weddings", keys, instance=instance, run_config=QUIET)
        seconds = time.perf_counter() - started
        steps: dict[str, float] = {}
        for r in results:
            for stat in instance.get_run_step_stats(r.run_id):
                if stat.end_time and stat.start_time:
                    steps[stat.step_key] = steps.get(stat.step_key, 0.0) + stat.end_time - stat.start_time
        catalogue.close()
    return {"seconds": round(seconds, 1), "partitions": len(keys), "runs": len(results),
            "failed_runs": sum(not r.success for r in results),
            "step_seconds": {k: round(v, 1) for k, v in sorted(steps.items())}}


def run(*, weddings: int, seed: int, document_bytes: int, label: str) -> dict[str, Any]:
    from .stand_ins import bench_environment

    with bench_environment(f"bench_whole_{label}", weddings=weddings, seed=seed,
                           document_bytes=document_bytes) as bench:
        work = Path(bench["work"])
        peers = [peer(bench, work)]
        ours = wedbackup_whole_job(bench)
        peers.append(peer(bench, work))
        summary = bench["summary"]
    best = min(peers, key=lambda p: p["seconds"])
    return {
        "database": {"weddings": weddings, "seed": seed, "document_bytes": document_bytes,
                     "bytes": summary.get("total_bytes") or summary.get("bytes"),
                     # `demo-data`'s own time to make it (a figure here, not a timed test)
                     "generate_seconds": summary.get("seconds")},
        "peer": best, "peer_runs": [p["seconds"] for p in peers],
        "wedbackup": ours,
        "whole_job_ratio_vs_peer": round(ours["seconds"] / best["seconds"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weddings", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--document-bytes", type=int, default=4096)
    parser.add_argument("--label", default="cli", help="names the benchmark's databases and bucket")
    parser.add_argument("--json-out", help="also write the figures to this file (fresh_process.py)")
    args = parser.parse_args()
    write_result(run(weddings=args.weddings, seed=args.seed, document_bytes=args.document_bytes, label=args.label),
                 args.json_out)


if __name__ == "__main__":
    main()
