"""Re-verification benchmark: back up N weddings with the engine (setup, not timed), then re-verify them
all through Dagster — `reverify_weddings` (verified_restore and its checks, no new dump) in batched
multi-wedding runs, exactly as `wedbackup verify --all` does. Reports runs and weddings per minute."""
from __future__ import annotations

import argparse
import time
from typing import Any

from .fresh_process import write_result


def run(weddings: int = 200, *, batch_size: int = 100, seed: int = 7, document_bytes: int = 2048) -> dict[str, Any]:
    from wedbackup_dagster.backups.launch import register_partitions
    from wedbackup_dagster.cli.cmd_checks import reverify
    from wedbackup_dagster.core.engine import Engine
    from wedbackup_dagster.core.storage.replicas import AzureReplica, GCSReplica, S3Replica
    from wedbackup_dagster.core.storage.replicas.azure import azure_service_from
    from wedbackup_dagster.core.storage.replicas.gcs import gcs_client_from
    from wedbackup_dagster.core.storage.replicas.s3 import s3_client_from

    from .stand_ins import bench_environment, dagster_instance

    with bench_environment("bench_reverify", weddings=weddings, seed=seed, document_bytes=document_bytes) as bench:
        engine = Engine.from_env()
        s = engine.settings
        replicas = [S3Replica(s3_client_from(s.s3), s.s3), GCSReplica(gcs_client_from(s.gcs), s.gcs),
                    AzureReplica(azure_service_from(s.azure), s.azure)]
        started = time.perf_counter()
        with dagster_instance(bench) as instance:
            keys = [k for k in register_partitions(instance, s.source_dsn) if k != "platform"]
            with engine.snapshot_session() as session:
                for key, _ in engine.back_up_each(keys, session):
                    for replica in replicas:
                        engine.replicate(key, replica)
            setup_seconds = time.perf_counter() - started
            outcome = reverify(keys, instance=instance, batch_size=batch_size)
            # Where the time went: seconds per step, summed over the runs (restores vs. check evaluations).
            steps: dict[str, float] = {}
            for r in outcome["runs"]:
                for stat in instance.get_run_step_stats(r.run_id):
                    if stat.end_time and stat.start_time:
                        steps[stat.step_key] = steps.get(stat.step_key, 0.0) + stat.end_time - stat.start_time
        engine.catalogue.close()
    runs = outcome["runs"]
    return {
        "weddings": weddings,
        "batch_size": batch_size,
        "runs": len(runs),
        "failed_runs": sum(not r.success for r in runs),
        "reverify_seconds": round(outcome["seconds"], 1),
        "reverify_weddings_per_minute": outcome["weddings_per_minute"],
        "setup_backup_seconds": round(setup_seconds, 1),
        "step_seconds": {k: round(v, 1) for k, v in sorted(steps.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weddings", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--json-out", help="also write the figures to this file (fresh_process.py)")
    args = parser.parse_args()
    write_result(run(args.weddings, batch_size=args.batch_size), args.json_out)


if __name__ == "__main__":
    main()
