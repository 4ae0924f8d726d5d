"""Dagster's overhead per wedding: the backup schedule's own way of launching work — batched runs of the
`backup_wedding_list` job (max_run_size weddings each, the NORMAL tier's 500) on an instance made from
the project's dagster.yaml — timed against the very same engine calls made without Dagster (as
benchmarks/fleet.py drives the core engine), interleaved in one invocation, best of N.

overhead per wedding = (best Dagster wall − best plain wall) / weddings, plus the measured start-up of
one run's process (loading the code location, what the run launcher pays per run) spread over a run's
weddings. What the runs cover is stated in the result (`steps`): the verified restore (about 0.5 s of
real work per wedding, one materialization) is left out at both sizes, and at 10,000 weddings only
dump+seal runs, so the benchmark fits in the bench's time; Dagster's cost per materialization is the same
whichever step yields it. Measured on the project's SQLite storage, on dagster-postgres, and on
dagster-postgres with wedbackup's pooled event log (wedbackup_dagster/instance_storage.py)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SEAL = "snapshot_and_seal_list"
REPLICA_OPS = {"s3": "s3_replica_list", "gcs": "gcs_replica_list", "azure": "azure_replica_list"}


def _instance(home: Path, storage: str, dsn: str | None):
    """A Dagster instance from the project's dagster.yaml (storage "sqlite": SQLite under DAGSTER_HOME), or
    the same file with dagster-postgres storage at `dsn` ("postgres"), or with its event log holding a
    pooled connection ("postgres-pooled", wedbackup_dagster.instance_storage)."""
    import dagster as dg

    home.mkdir(parents=True, exist_ok=True)
    text = (ROOT / "dagster.yaml").read_text()
    url = json.dumps(dsn)
    if storage == "postgres":
        text += f"\nstorage:\n  postgres:\n    postgres_url: {url}\n"
    elif storage == "postgres-pooled":
        # dagster-postgres's run and schedule storage, and its event log holding a pooled connection.
        for part, module, cls in (("run_storage", "dagster_postgres.run_storage", "PostgresRunStorage"),
                                  ("schedule_storage", "dagster_postgres.schedule_storage", "PostgresScheduleStorage"),
                                  ("event_log_storage", "wedbackup_dagster.instance_storage",
                                   "PooledPostgresEventLogStorage")):
            text += f"\n{part}:\n  module: {module}\n  class: {cls}\n  config:\n    postgres_url: {url}\n"
    (home / "dagster.yaml").write_text(text)
    return dg.DagsterInstance.from_config(str(home))


def _buckets(env: dict[str, str], name: str) -> None:
    import boto3
    from azure.storage.blob import BlobServiceClient
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    region = env["WEDBACKUP_S3_REGION"]
    s3 = boto3.client("s3", endpoint_url=env["WEDBACKUP_S3_ENDPOINT_URL"], region_name=region,
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region})
    storage.Client(project=env["WEDBACKUP_GCS_PROJECT"], credentials=AnonymousCredentials()).create_bucket(name)
    BlobServiceClient.from_connection_string(env["WEDBACKUP_AZURE_CONNECTION_STRING"]).create_container(name)


def plain(keys: list[str], run_size: int, providers: list[str]) -> float:
    """The same work as the Dagster runs, straight through the core engine: per run-sized chunk, one
    snapshot session and back_up_each, then each provider's uploads (clients made once per chunk, as
    the ops' resources make them once per step)."""
    from wedbackup_dagster.core.engine import Engine
    from wedbackup_dagster.core.errors import WedbackupError
    from wedbackup_dagster.core.replicas import (
        AzureReplica,
        GCSReplica,
        S3Replica,
        azure_service_from,
        gcs_client_from,
        s3_client_from,
    )

    started = time.perf_counter()
    for i in range(0, len(keys), run_size):
        chunk = keys[i:i + run_size]
        engine = Engine.from_env()
        with engine.snapshot_session() as session:
            ok = [k for k, o in engine.back_up_each(chunk, session) if not isinstance(o, WedbackupError)]
        if len(ok) != len(chunk):
            raise RuntimeError(f"plain run: {len(chunk) - len(ok)} wedding(s) failed")
        s = engine.settings
        for provider in providers:
            replica = {"s3": lambda: S3Replica(s3_client_from(s.s3), s.s3),
                       "gcs": lambda: GCSReplica(gcs_client_from(s.gcs), s.gcs),
                       "azure": lambda: AzureReplica(azure_service_from(s.azure), s.azure)}[provider]()
            for key in ok:
                engine.replicate(key, replica)
        engine.catalogue.close()
    return time.perf_counter() - started


def dagster_runs(instance: Any, keys: list[str], run_size: int, providers: list[str], mode: str = "list",
                 event_batch_size: int = 0) -> dict[str, Any]:
    """Batched runs of `run_size` weddings, in process on `instance` (what the run worker does once the
    launcher has started it). mode "list": `backup_wedding_list` (the schedule's job), the ops of
    `providers` selected; its ops yield one AssetMaterialization per wedding and asset. mode "range": the
    `backup_weddings` asset job over a partition range (keys contiguous), whose per-partition
    materializations come from one output per asset (metadata via add_asset_metadata): the only events
    Dagster 1.13 writes in batches when DAGSTER_EVENT_BATCH_SIZE > 0."""
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from wedbackup_dagster.automation.batch_job import list_run_config
    from wedbackup_dagster.backups.constants import DB_DUMP, ENCRYPTED_ARCHIVE, REPLICA_KEYS
    from wedbackup_dagster.definitions import defs

    saved = os.environ.get("DAGSTER_EVENT_BATCH_SIZE")
    os.environ["DAGSTER_EVENT_BATCH_SIZE"] = str(event_batch_size)
    events = 0
    started = time.perf_counter()
    try:
        for i in range(0, len(keys), run_size):
            chunk = keys[i:i + run_size]
            if mode == "list":
                job = defs.resolve_job_def("backup_wedding_list")
                result = job.execute_in_process(instance=instance, run_config=list_run_config(chunk),
                                                op_selection=[SEAL, *(REPLICA_OPS[p] for p in providers)])
            else:
                job = defs.resolve_job_def("backup_weddings")
                selection = [DB_DUMP, ENCRYPTED_ARCHIVE, *(REPLICA_KEYS[p] for p in providers)]
                result = job.execute_in_process(
                    instance=instance, asset_selection=selection,
                    tags={ASSET_PARTITION_RANGE_START_TAG: chunk[0], ASSET_PARTITION_RANGE_END_TAG: chunk[-1]})
            events += len(instance.all_logs(result.run_id))
    finally:
        if saved is None:
            os.environ.pop("DAGSTER_EVENT_BATCH_SIZE", None)
        else:
            os.environ["DAGSTER_EVENT_BATCH_SIZE"] = saved
    return {"seconds": time.perf_counter() - started, "events": events}


def run_start_seconds(repeats: int = 2) -> float:
    """One run's process start-up, as the run launcher pays it: a new interpreter loading the code
    location (best of `repeats`)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import wedbackup_dagster.definitions"], check=True, cwd=ROOT)
        best = min(best, time.perf_counter() - t)
    return best


Variant = tuple[str, str, int]  # (storage, mode, DAGSTER_EVENT_BATCH_SIZE)
PROJECT = ("sqlite", "list", 0)  # what the schedule does today: the project's dagster.yaml, the list job


def measure(weddings: int, *, providers: list[str], repeats: int, run_size: int, document_bytes: int,
            variants: list[Variant] = (PROJECT,), seed: int = 7) -> dict[str, Any]:
    """Per variant: the Dagster runs over every wedding against the plain engine, interleaved
    (plain, variant 1, variant 2, …, repeated), best of `repeats` each, on one generated database."""
    import psycopg
    from psycopg import sql

    from wedbackup_dagster.backups.launch import register_partitions
    from wedbackup_dagster.core import demo_data
    from wedbackup_dagster.core.stack import Stack

    stack = Stack.default()
    env = stack.env()
    saved = dict(os.environ)
    tag = uuid.uuid4().hex[:8]
    names = [f"bench_overhead_src_{tag}", f"bench_overhead_cat_{tag}"]
    names += [f"bench_overhead_dagster_{tag}_{i}" for i in range(len(variants))]
    bucket = f"bench-overhead-{tag}"
    with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    work = Path(tempfile.mkdtemp(prefix="wedbackup-overhead-"))
    instances = []
    try:
        os.environ.update(env)
        os.environ.update({"WEDBACKUP_SOURCE_DSN": stack.dsn(names[0]), "WEDBACKUP_CATALOGUE_DSN": stack.dsn(names[1]),
                           "WEDBACKUP_VAULT_DIR": str(work / "vault"), "WEDBACKUP_S3_BUCKET": bucket,
                           "WEDBACKUP_GCS_BUCKET": bucket, "WEDBACKUP_AZURE_CONTAINER": bucket})
        os.environ.pop("DAGSTER_HOME", None)
        if providers:
            _buckets(env, bucket)
        demo_data.generate(stack.dsn(names[0]), weddings=weddings, seed=seed, document_bytes=document_bytes)
        keys: list[str] = []
        for i, (storage, _, _) in enumerate(variants):
            instances.append(_instance(work / f"dagster_home_{i}", storage, stack.dsn(names[2 + i])))
            keys = [k for k in register_partitions(instances[-1], stack.dsn(names[0])) if k != "platform"]
        # Warm every path once (imports, first connections, the catalogue's keys), untimed, on a slice.
        warm = keys[:min(len(keys), 20)]
        plain(warm, run_size, providers)
        for instance, (_, mode, batch) in zip(instances, variants):
            dagster_runs(instance, warm, run_size, providers, mode, batch)
        plains: list[float] = []
        dagsters: list[list[dict[str, Any]]] = [[] for _ in variants]
        for _ in range(repeats):
            plains.append(plain(keys, run_size, providers))
            for i, (instance, (_, mode, batch)) in enumerate(zip(instances, variants)):
                dagsters[i].append(dagster_runs(instance, keys, run_size, providers, mode, batch))
        start = run_start_seconds()
    finally:
        for instance in instances:
            instance.dispose()
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(work, ignore_errors=True)
        with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
            for name in names:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    best_plain = min(plains)
    runs = -(-weddings // run_size)
    start_ms = start * runs / weddings * 1000
    results = []
    for (storage, mode, batch), timed in zip(variants, dagsters):
        best = min(d["seconds"] for d in timed)
        in_run_ms = (best - best_plain) / weddings * 1000
        results.append({
            "storage": storage, "job": "backup_wedding_list" if mode == "list" else "backup_weddings (range)",
            "event_batch_size": batch,
            "events_per_wedding": round(timed[0]["events"] / weddings, 2),
            "dagster_seconds": round(best, 2),
            "ratio_dagster_vs_plain": round(best / best_plain, 3),
            "in_run_overhead_ms_per_wedding": round(in_run_ms, 2),
            "overhead_ms_per_wedding": round(in_run_ms + start_ms, 2),
            "all_runs": [round(d["seconds"], 2) for d in timed],
        })
    return {
        "weddings": weddings,
        "steps": ["dump+seal", *(f"{p} upload" for p in providers)],
        "document_bytes": document_bytes,
        "run_size": run_size,
        "runs": runs,
        "repeats": repeats,
        "plain_seconds": round(best_plain, 2),
        "plain_all_runs": [round(p, 2) for p in plains],
        "run_start_seconds": round(start, 2),
        "run_start_ms_per_wedding": round(start_ms, 2),
        "variants": results,
    }


def run(*, quick: bool = False) -> dict[str, Any]:
    """Two fleet sizes — 1,000 weddings through dump+seal and the three uploads, and 10,000 small weddings
    through dump+seal (quick: 100 and 1,000) — each with the project's storage (the headline figure)
    next to PostgreSQL storage, plain and with the pooled event log, measured side by side."""
    from wedbackup_dagster.core.policy import NORMAL, Policy

    run_size = Policy.from_env().tiers[NORMAL].max_run_size
    small, large = (100, 1000) if quick else (1000, 10_000)
    variants = [PROJECT, ("postgres", "list", 0), ("postgres-pooled", "list", 0)]
    sizes = {
        str(small): measure(small, providers=list(REPLICA_OPS), repeats=2, run_size=run_size, document_bytes=2048,
                            variants=variants),
        # Plain dagster-postgres costs what SQLite does (see the small size): left out of the large one.
        str(large): measure(large, providers=[], repeats=1, run_size=run_size, document_bytes=256,
                            variants=[PROJECT, ("postgres-pooled", "list", 0)]),
    }

    def headline(storage: str) -> float:
        return max(v["overhead_ms_per_wedding"] for s in sizes.values() for v in s["variants"]
                   if v["storage"] == storage)

    return {"dagster_overhead_ms_per_wedding": headline("sqlite"),
            "dagster_overhead_ms_per_wedding_postgres": headline("postgres"),
            "dagster_overhead_ms_per_wedding_postgres_pooled": headline("postgres-pooled"),
            "target_ms_per_wedding": 20, "sizes": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weddings", type=int, default=200)
    parser.add_argument("--providers", default="s3,gcs,azure", help="comma-separated, or empty for dump+seal only")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run-size", type=int, default=500)
    parser.add_argument("--document-bytes", type=int, default=2048)
    parser.add_argument("--storage", default="sqlite",
                        help="comma-separated: sqlite (the project's), postgres, postgres-pooled")
    parser.add_argument("--mode", choices=["list", "range"], default="list")
    parser.add_argument("--event-batch-size", type=int, default=0)
    args = parser.parse_args()
    providers = [p for p in args.providers.split(",") if p]
    variants = [(storage, args.mode, args.event_batch_size) for storage in args.storage.split(",")]
    print(json.dumps(measure(args.weddings, providers=providers, repeats=args.repeats, run_size=args.run_size,
                             document_bytes=args.document_bytes, variants=variants), indent=2))


if __name__ == "__main__":
    main()
