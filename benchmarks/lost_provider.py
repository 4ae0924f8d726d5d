"""restore --all with S3 lost ahead of GCS: nothing listening where S3 was, the S3 replica built as restore
--all builds it (its timeouts and retries), `--from s3`. With the run's memory of failing locations
(core/disaster/copy_health.py: tried last after three failures in a row) against the same restore with it
never demoting (every wedding pays S3's retries before its GCS copy). Both must restore every partition.
Not part of `make bench`: `python -m benchmarks.lost_provider --weddings 100`."""
from __future__ import annotations

import argparse
import importlib
import os
import time
from dataclasses import replace
from typing import Any

from .fresh_process import write_result
from .restore_all import seal_copy_verify


def run(*, weddings: int, jobs: int) -> dict[str, Any]:
    import psycopg
    from psycopg import sql

    from wedbackup_dagster.core import disaster
    from wedbackup_dagster.core.disaster import copy_health
    from wedbackup_dagster.core.engine import Engine
    from wedbackup_dagster.core.storage.providers import ensure_targets, replica_for

    from .stand_ins import bench_environment

    # The module, not the package's function of the same name: its CopyHealth is swapped for the second run.
    restore_all_module = importlib.import_module("wedbackup_dagster.core.disaster.restore_all")
    out: dict[str, Any] = {"weddings": weddings, "jobs": jobs}
    with bench_environment("bench_lost_s3", weddings=weddings, seed=7, document_bytes=1024) as bench:
        engine = Engine.from_env()
        ensure_targets(engine.settings)
        s3, gcs = replica_for("s3", engine.settings, os.environ), replica_for("gcs", engine.settings, os.environ)
        with psycopg.connect(bench["source"]) as conn:
            partitions = ["platform", *(str(r[0]) for r in conn.execute("SELECT id FROM weddings ORDER BY id"))]
        seal_copy_verify(engine, {"s3": s3, "gcs": gcs}, partitions, verify_from="gcs")
        gone = replace(engine.settings, s3=replace(engine.settings.s3, endpoint_url="http://127.0.0.1:9"))
        lost = replica_for("s3", gone, os.environ)
        variants = (("with_copy_health", copy_health.CopyHealth),
                    ("never_demoting", lambda: copy_health.CopyHealth(failures_in_a_row=10 ** 9)))
        try:
            for label, health in variants:
                restore_all_module.CopyHealth = health
                target = f"bench_lost_s3_t_{time.time_ns()}"
                admin = bench["stack"].dsn("postgres")
                with psycopg.connect(admin, autocommit=True) as conn:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target)))
                try:
                    started = time.perf_counter()
                    report = disaster.restore_all(engine, {"s3": lost, "gcs": gcs}, bench["stack"].dsn(target),
                                                  disaster.RestoreAllOptions(providers=disaster.copy_order("s3"),
                                                                             jobs=jobs))
                    out[label] = {"seconds": round(time.perf_counter() - started, 1), "complete": report.complete,
                                  "copies_used": report.copies_used, "tried_last": len(report.tried_last)}
                finally:
                    with psycopg.connect(admin, autocommit=True) as conn:
                        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(target)))
        finally:
            restore_all_module.CopyHealth = copy_health.CopyHealth
            engine.catalogue.close()
    out["speedup"] = round(out["never_demoting"]["seconds"] / max(out["with_copy_health"]["seconds"], 0.1), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weddings", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    write_result(run(weddings=args.weddings, jobs=args.jobs), args.json_out)


if __name__ == "__main__":
    main()
