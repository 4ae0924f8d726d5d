"""Dagster's overhead per wedding: the backup schedule's own way of launching work — batched runs of the
`backup_wedding_list` job (max_run_size weddings each, the NORMAL tier's 1,000), with the materializations
batched as the code location sets up (wedbackup_dagster/instance/event_batches.py), on the production
instance storage (dagster-postgres with wedbackup's event log, as deployments/ run it) — timed against the
very same engine calls made without Dagster (as benchmarks/fleet.py drives the core engine), in one
invocation, best of N.

overhead per wedding = (best Dagster wall − best plain wall) / weddings, plus the measured start-up of
one run's process (loading the code location, what the run launcher pays per run) spread over a run's
weddings. Every timed pass starts on an empty vault and empty buckets (the stand-ins slow down as they
fill), and the order of the passes reverses every repeat. What the runs cover is stated in the result
(`steps`): the verified restore (about 0.5 s of real work per wedding, one materialization) is left out
at both sizes, and at 10,000 weddings only dump+seal runs, so the benchmark fits in the bench's time; the
headline scales the measured cost to the whole job's six materializations per wedding
(`full_job_overhead_ms_per_wedding`). Next to production: stock dagster-postgres (what the Helm chart's
instance ConfigMap selects), the same writing materializations one by one (before batching), and the local
demo's SQLite."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wedbackup_dagster.instance.event_batches import MATERIALIZATION_BATCH

ROOT = Path(__file__).resolve().parent.parent
SEAL = "snapshot_and_seal_list"
PROVIDERS = ("s3", "gcs", "azure")
REPLICATE_OP = "replicate_list"  # the list pipeline's one upload op, every provider at once


def _instance(home: Path, storage: str, dsn: str | None):
    """A Dagster instance from the project's dagster.yaml with SQLite storage under `home` ("sqlite"), or
    the same file with stock dagster-postgres storage at `dsn` ("postgres"), or with the production storage
    there ("postgres-pooled": dagster-postgres with wedbackup's event log, wedbackup_dagster.instance.storage)."""
    import dagster as dg
    import yaml

    home.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    config.pop("storage", None)  # the local stack's choice (instance.storage.LocalStackStorage): set below
    text = yaml.safe_dump(config)
    url = json.dumps(dsn)
    if storage == "postgres":
        text += f"\nstorage:\n  postgres:\n    postgres_url: {url}\n"
    elif storage == "postgres-pooled":
        # As deployments/docker-compose/dagster.yaml: dagster-postgres with wedbackup's event log.
        text += ("\nstorage:\n  custom:\n    module: wedbackup_dagster.instance.storage\n"
                 f"    class: PooledPostgresStorage\n    config:\n      postgres_url: {url}\n")
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


def _drop_buckets(env: dict[str, str], name: str) -> None:
    """Delete `name` and everything in it at the three stand-ins (every S3 version)."""
    import boto3
    from azure.storage.blob import BlobServiceClient
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    s3 = boto3.client("s3", endpoint_url=env["WEDBACKUP_S3_ENDPOINT_URL"], region_name=env["WEDBACKUP_S3_REGION"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=name):
        doomed = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                  for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
        if doomed:
            s3.delete_objects(Bucket=name, Delete={"Objects": doomed, "Quiet": True})
    s3.delete_bucket(Bucket=name)
    bucket = storage.Client(project=env["WEDBACKUP_GCS_PROJECT"], credentials=AnonymousCredentials()).bucket(name)
    for blob in bucket.list_blobs():
        blob.delete()
    bucket.delete()
    BlobServiceClient.from_connection_string(env["WEDBACKUP_AZURE_CONNECTION_STRING"]).delete_container(name)


@contextlib.contextmanager
def fresh_targets(env: dict[str, str], providers: list[str], work: Path) -> Iterator[None]:
    """A new, empty vault and (with `providers`) new buckets for one timed pass, deleted after it (untimed).
    The stand-ins slow down as they fill (a second pass of 1,000 weddings ran 50 % slower than the first),
    so without this each pass would upload into fuller stand-ins than the one before it."""
    name = f"bench-overhead-{uuid.uuid4().hex[:8]}"
    vault = work / name
    os.environ.update({"WEDBACKUP_VAULT_DIR": str(vault), "WEDBACKUP_S3_BUCKET": name, "WEDBACKUP_GCS_BUCKET": name,
                       "WEDBACKUP_AZURE_CONTAINER": name})
    if providers:
        _buckets(env, name)
    try:
        yield
    finally:
        if providers:
            _drop_buckets(env, name)
        shutil.rmtree(vault, ignore_errors=True)


def plain(keys: list[str], run_size: int, providers: list[str]) -> float:
    """The same work as the Dagster runs, straight through the core engine: per run-sized chunk, one
    snapshot session and back_up_each, then the providers' uploads side by side as the upload op runs them
    (Engine.replicate_to_all; clients made once per chunk, as the ops' resources make them once per step)."""
    from wedbackup_dagster.core.engine import Engine
    from wedbackup_dagster.core.errors import WedbackupError
    from wedbackup_dagster.core.storage.replicas import (AzureReplica, GCSReplica, S3Replica, azure_service_from,
                                                         gcs_client_from, s3_client_from)

    started = time.perf_counter()
    for i in range(0, len(keys), run_size):
        chunk = keys[i:i + run_size]
        engine = Engine.from_env()
        with engine.snapshot_session() as session:
            ok = [k for k, o in engine.back_up_each(chunk, session) if not isinstance(o, WedbackupError)]
        if len(ok) != len(chunk):
            raise RuntimeError(f"plain run: {len(chunk) - len(ok)} wedding(s) failed")
        s = engine.settings
        make = {"s3": lambda: S3Replica(s3_client_from(s.s3), s.s3),
                "gcs": lambda: GCSReplica(gcs_client_from(s.gcs), s.gcs),
                "azure": lambda: AzureReplica(azure_service_from(s.azure), s.azure)}
        for provider, key, outcome in engine.replicate_to_all(ok, {p: make[p]() for p in providers}):
            if isinstance(outcome, WedbackupError):
                raise RuntimeError(f"plain run: {provider} upload of wedding {key} failed: {outcome}")
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

    from wedbackup_dagster.backups.list_pipeline import list_run_config
    from wedbackup_dagster.backups.constants import DB_DUMP, ENCRYPTED_ARCHIVE, REPLICA_KEYS
    from wedbackup_dagster.definitions import defs

    saved = os.environ.get("DAGSTER_EVENT_BATCH_SIZE")
    os.environ["DAGSTER_EVENT_BATCH_SIZE"] = str(event_batch_size)
    run_ids: list[str] = []
    started = time.perf_counter()
    try:
        for i in range(0, len(keys), run_size):
            chunk = keys[i:i + run_size]
            if mode == "list":
                job = defs.resolve_job_def("backup_wedding_list")
                result = job.execute_in_process(instance=instance, run_config=list_run_config(chunk),
                                                op_selection=[SEAL, *([REPLICATE_OP] if providers else [])])
            else:
                job = defs.resolve_job_def("backup_weddings")
                selection = [DB_DUMP, ENCRYPTED_ARCHIVE, *(REPLICA_KEYS[p] for p in providers)]
                result = job.execute_in_process(
                    instance=instance, asset_selection=selection,
                    tags={ASSET_PARTITION_RANGE_START_TAG: chunk[0], ASSET_PARTITION_RANGE_END_TAG: chunk[-1]})
            run_ids.append(result.run_id)
        seconds = time.perf_counter() - started
    finally:
        if saved is None:
            os.environ.pop("DAGSTER_EVENT_BATCH_SIZE", None)
        else:
            os.environ["DAGSTER_EVENT_BATCH_SIZE"] = saved
    # Counted after the clock stops: reading the runs back is not part of running them.
    return {"seconds": seconds, "events": sum(len(instance.all_logs(run_id)) for run_id in run_ids)}


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
# What the schedule's runs use in production: dagster-postgres with wedbackup's event log
# (deployments/docker-compose/dagster.yaml, wedbackup_dagster/instance/storage.py), the list job, and the
# batched materializations the code location turns on (wedbackup_dagster/instance/event_batches.py).
PRODUCTION: Variant = ("postgres-pooled", "list", MATERIALIZATION_BATCH)
STOCK: Variant = ("postgres", "list", MATERIALIZATION_BATCH)  # stock dagster-postgres (the Helm chart's)
LOCAL: Variant = ("sqlite", "list", MATERIALIZATION_BATCH)  # the local demo's dagster.yaml (SQLite)
BEFORE: Variant = ("postgres", "list", 0)  # stock dagster-postgres, materializations written one by one
# Materializations per wedding of the whole list job: db_dump, encrypted_archive, 3 replicas, verified_restore.
FULL_JOB_MATERIALIZATIONS = 6


def measure(weddings: int, *, providers: list[str], repeats: int, run_size: int, document_bytes: int,
            variants: list[Variant] = (PRODUCTION,), seed: int = 7) -> dict[str, Any]:
    """Per variant: the Dagster runs over every wedding against the plain engine, interleaved
    (plain, variant 1, variant 2, …, repeated), best of `repeats` each, on one generated database."""
    import psycopg
    from psycopg import sql

    from wedbackup_dagster.backups.launch import register_partitions
    from wedbackup_dagster.dev import demo_data
    from wedbackup_dagster.dev.stack import Stack

    stack = Stack.default()
    env = stack.env()
    saved = dict(os.environ)
    tag = uuid.uuid4().hex[:8]
    names = [f"bench_overhead_src_{tag}", f"bench_overhead_cat_{tag}"]
    names += [f"bench_overhead_dagster_{tag}_{i}" for i in range(len(variants))]
    with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    work = Path(tempfile.mkdtemp(prefix="wedbackup-overhead-"))
    instances = []
    try:
        os.environ.update(env)
        os.environ.update({"WEDBACKUP_SOURCE_DSN": stack.dsn(names[0]), "WEDBACKUP_CATALOGUE_DSN": stack.dsn(names[1])})
        os.environ.pop("DAGSTER_HOME", None)
        demo_data.generate(stack.dsn(names[0]), weddings=weddings, seed=seed, document_bytes=document_bytes)
        keys: list[str] = []
        for i, (storage, _, _) in enumerate(variants):
            instances.append(_instance(work / f"dagster_home_{i}", storage, stack.dsn(names[2 + i])))
            keys = [k for k in register_partitions(instances[-1], stack.dsn(names[0])) if k != "platform"]
        # Warm every path once (imports, first connections, the catalogue's keys), untimed, on a slice.
        warm = keys[:min(len(keys), 20)]
        with fresh_targets(env, providers, work):
            plain(warm, run_size, providers)
            for instance, (_, mode, batch) in zip(instances, variants):
                dagster_runs(instance, warm, run_size, providers, mode, batch)
        plains: list[float] = []
        dagsters: list[list[dict[str, Any]]] = [[] for _ in variants]
        # Each pass on empty targets; the order reverses every repeat (plain, A, B, then B, A, plain), so
        # whatever drift the shared machine has does not always favour the side that runs first.
        passes = [None, *range(len(variants))]
        for repeat in range(repeats):
            for which in passes if repeat % 2 == 0 else passes[::-1]:
                with fresh_targets(env, providers, work):
                    if which is None:
                        plains.append(plain(keys, run_size, providers))
                    else:
                        _, mode, batch = variants[which]
                        dagsters[which].append(dagster_runs(instances[which], keys, run_size, providers, mode, batch))
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
    materializations = 2 + len(providers)  # per wedding in these runs (the verified restore is left out)
    results = []
    for (storage, mode, batch), timed in zip(variants, dagsters):
        best = min(d["seconds"] for d in timed)
        in_run_ms = (best - best_plain) / weddings * 1000
        # Scaled to the whole job's six materializations as if each cost what this run's did on average
        # (the per-wedding and per-step costs scaled along with them: an overestimate, on purpose).
        full_job_ms = max(in_run_ms, 0) * FULL_JOB_MATERIALIZATIONS / materializations + start_ms
        results.append({
            "storage": storage, "job": "backup_wedding_list" if mode == "list" else "backup_weddings (range)",
            "event_batch_size": batch,
            "events_per_wedding": round(timed[0]["events"] / weddings, 2),
            "dagster_seconds": round(best, 2),
            "ratio_dagster_vs_plain": round(best / best_plain, 3),
            "in_run_overhead_ms_per_wedding": round(in_run_ms, 2),
            "overhead_ms_per_wedding": round(in_run_ms + start_ms, 2),
            "full_job_overhead_ms_per_wedding": round(full_job_ms, 2),
            "all_runs": [round(d["seconds"], 2) for d in timed],
        })
    return {
        "weddings": weddings,
        "steps": ["dump+seal", *(f"{p} upload" for p in providers)],
        "materializations_per_wedding": materializations,
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
    through dump+seal (quick: 100 and 1,000) — on the production storage (the headline), next to stock
    dagster-postgres (the Helm chart's), the same writing materializations one by one (before batching), and
    (small size only) the local demo's SQLite, measured side by side."""
    from wedbackup_dagster.core.policy.backup_policy import NORMAL, Policy

    run_size = Policy.from_env().tiers[NORMAL].max_run_size
    small, large = (100, 1000) if quick else (1000, 10_000)
    sizes = {
        str(small): measure(small, providers=list(PROVIDERS), repeats=2, run_size=run_size, document_bytes=2048,
                            variants=[PRODUCTION, STOCK, BEFORE, LOCAL]),
        str(large): measure(large, providers=[], repeats=2, run_size=run_size, document_bytes=256,
                            variants=[PRODUCTION, STOCK]),
    }

    def headline(variant: Variant, figure: str = "full_job_overhead_ms_per_wedding") -> float:
        storage, _, batch = variant
        return max(v[figure] for s in sizes.values() for v in s["variants"]
                   if (v["storage"], v["event_batch_size"]) == (storage, batch))

    return {
        # The largest over both sizes, scaled to the whole job's six materializations per wedding.
        "dagster_overhead_ms_per_wedding": headline(PRODUCTION),
        "dagster_overhead_ms_per_wedding_measured": headline(PRODUCTION, "overhead_ms_per_wedding"),
        "dagster_overhead_ms_per_wedding_unbatched": headline(BEFORE),
        "dagster_overhead_ms_per_wedding_stock_postgres": headline(STOCK),
        "dagster_overhead_ms_per_wedding_local_sqlite": max(
            v["full_job_overhead_ms_per_wedding"] for v in sizes[str(small)]["variants"] if v["storage"] == "sqlite"),
        "target_ms_per_wedding": 20, "sizes": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weddings", type=int, default=200)
    parser.add_argument("--providers", default="s3,gcs,azure", help="comma-separated, or empty for dump+seal only")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run-size", type=int, default=1000)
    parser.add_argument("--document-bytes", type=int, default=2048)
    parser.add_argument("--storage", default="postgres-pooled",
                        help="comma-separated: postgres-pooled (production: deployments/docker-compose), "
                             "postgres (stock dagster-postgres, the Helm chart's), sqlite (the local demo's)")
    parser.add_argument("--mode", choices=["list", "range"], default="list")
    parser.add_argument("--event-batch-size", type=int, default=MATERIALIZATION_BATCH,
                        help="DAGSTER_EVENT_BATCH_SIZE for the runs; 0 writes materializations one by one")
    args = parser.parse_args()
    providers = [p for p in args.providers.split(",") if p]
    variants = [(storage, args.mode, args.event_batch_size) for storage in args.storage.split(",")]
    print(json.dumps(measure(args.weddings, providers=providers, repeats=args.repeats, run_size=args.run_size,
                             document_bytes=args.document_bytes, variants=variants), indent=2))


if __name__ == "__main__":
    main()
