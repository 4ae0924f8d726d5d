"""Re-verification benchmark: back up N weddings with the engine (setup, not timed), then re-verify them
all through Dagster — `reverify_weddings` (verified_restore and its checks, no new dump) in batched
multi-wedding runs, exactly as `wedbackup verify --all` does. Reports runs and weddings per minute."""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from typing import Any


def run(weddings: int = 200, *, batch_size: int = 100, seed: int = 7, document_bytes: int = 2048) -> dict[str, Any]:
    import boto3
    import dagster as dg
    import psycopg
    from azure.storage.blob import BlobServiceClient
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    from psycopg import sql

    from wedbackup_dagster.backups.launch import register_partitions
    from wedbackup_dagster.cli_checks import reverify
    from wedbackup_dagster.core import demo_data
    from wedbackup_dagster.core.engine import Engine
    from wedbackup_dagster.core.replicas import AzureReplica, GCSReplica, S3Replica
    from wedbackup_dagster.core.replicas.azure import azure_service_from
    from wedbackup_dagster.core.replicas.gcs import gcs_client_from
    from wedbackup_dagster.core.replicas.s3 import s3_client_from
    from wedbackup_dagster.core.stack import Stack

    stack = Stack.default()
    stack.up()
    env = stack.env()
    saved = dict(os.environ)
    tag = uuid.uuid4().hex[:8]
    names = [f"bench_reverify_src_{tag}", f"bench_reverify_cat_{tag}"]
    bucket = f"bench-reverify-{tag}"
    with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with tempfile.TemporaryDirectory() as vault:
            os.environ.update(env)
            os.environ.update({"WEDBACKUP_SOURCE_DSN": stack.dsn(names[0]),
                               "WEDBACKUP_CATALOGUE_DSN": stack.dsn(names[1]), "WEDBACKUP_VAULT_DIR": vault,
                               "WEDBACKUP_S3_BUCKET": bucket, "WEDBACKUP_GCS_BUCKET": bucket,
                               "WEDBACKUP_AZURE_CONTAINER": bucket})
            region = env["WEDBACKUP_S3_REGION"]
            s3 = boto3.client("s3", endpoint_url=env["WEDBACKUP_S3_ENDPOINT_URL"], region_name=region,
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
            s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
            gcs = storage.Client(project=env["WEDBACKUP_GCS_PROJECT"], credentials=AnonymousCredentials())
            gcs.create_bucket(bucket)
            azure = BlobServiceClient.from_connection_string(env["WEDBACKUP_AZURE_CONNECTION_STRING"])
            azure.create_container(bucket)
            demo_data.generate(stack.dsn(names[0]), weddings=weddings, seed=seed, document_bytes=document_bytes)
            engine = Engine.from_env()
            s = engine.settings
            replicas = [S3Replica(s3_client_from(s.s3), s.s3), GCSReplica(gcs_client_from(s.gcs), s.gcs),
                        AzureReplica(azure_service_from(s.azure), s.azure)]
            started = time.perf_counter()
            with dg.instance_for_test() as instance:
                keys = [k for k in register_partitions(instance, s.source_dsn) if k != "platform"]
                with engine.snapshot_session() as session:
                    for key in keys:
                        engine.back_up(key, session)
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
    finally:
        os.environ.clear()
        os.environ.update(saved)
        with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
            for name in names:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
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
    args = parser.parse_args()
    print(json.dumps(run(args.weddings, batch_size=args.batch_size), indent=2))


if __name__ == "__main__":
    main()
