"""Fleet benchmark: back up every partition of a generated database through the real engine (snapshot,
zstd, AES-256-GCM, atomic vault write, catalogue), with N worker processes, next to
`pg_dump -Fp | zstd -3 | age` and `pg_dump -Fc` on the same database, in the same run; then the median
wedding's own dump+seal and verified-restore latency."""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql


def _pg_bin(tool: str) -> str:
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"), reverse=True):
        return str(candidate)
    return shutil.which(tool) or tool


def _pg_env(dsn: str) -> dict[str, str]:
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(dsn)
    return {**os.environ, "PGHOST": str(parts.get("host", "")), "PGPORT": str(parts.get("port", "5432")),
            "PGUSER": str(parts.get("user", "")), "PGPASSWORD": str(parts.get("password", "")),
            "PGDATABASE": str(parts.get("dbname", ""))}


def baseline_pg_dump_zstd_age(dsn: str, workdir: Path) -> dict[str, Any]:
    keyfile = workdir / "age.key"
    if not keyfile.exists():
        subprocess.run(["age-keygen", "-o", str(keyfile)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(keyfile)], check=True, capture_output=True,
                               text=True).stdout.strip()
    out = workdir / "baseline.sql.zst.age"
    started = time.perf_counter()
    subprocess.run(f"{_pg_bin('pg_dump')} -Fp | zstd -3 -q -c | age -r {recipient} > {out}", shell=True,
                   check=True, env=_pg_env(dsn))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes": out.stat().st_size}


def baseline_pg_dump_custom(dsn: str, workdir: Path) -> dict[str, Any]:
    out = workdir / "baseline.dump"
    started = time.perf_counter()
    subprocess.run([_pg_bin("pg_dump"), "-Fc", "-f", str(out)], check=True, env=_pg_env(dsn))
    return {"seconds": time.perf_counter() - started, "bytes": out.stat().st_size}


def _worker(args: tuple[dict[str, str], list[str]]) -> dict[str, Any]:
    env, keys = args
    os.environ.update(env)
    from wedbackup_dagster.core.engine import Engine

    engine = Engine.from_env()
    sealed = raw = 0
    started = time.perf_counter()
    weddings = [key for key in keys if key != "platform"]
    batch = int(os.environ.get("WEDBACKUP_BENCH_BATCH", engine.batch_size))
    with engine.snapshot_session() as session:
        outcomes = [engine.back_up("platform", session)] if "platform" in keys else []
        for start in range(0, len(weddings), batch):
            for key, outcome in engine.back_up_many(weddings[start:start + batch], session).items():
                if isinstance(outcome, Exception):
                    raise outcome
                outcomes.append(outcome)
        for outcome in outcomes:
            sealed += outcome.stats.sealed_bytes
            raw += outcome.stats.raw_bytes
    return {"seconds": time.perf_counter() - started, "sealed": sealed, "raw": raw, "partitions": len(keys),
            "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def fleet(env: dict[str, str], keys: list[str], workers: int) -> dict[str, Any]:
    slices = [keys[i::workers] for i in range(workers)]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(_worker, [(env, s) for s in slices]))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "workers": workers, "partitions": len(keys),
            "sealed_bytes": sum(p["sealed"] for p in parts), "raw_bytes": sum(p["raw"] for p in parts),
            "peak_rss_mb_per_worker": round(max(p["max_rss_kb"] for p in parts) / 1024, 1)}


def median_wedding(env: dict[str, str], repeats: int = 3) -> dict[str, Any]:
    """A median wedding's own latency: the wedding whose newest backup in the catalogue of `env` has the
    median raw size, backed up alone (dump+seal+vault) and then verified by a restore from the vault, one
    at a time as a single-wedding run does it; best of `repeats` each."""
    from wedbackup_dagster.core.engine import Engine

    with psycopg.connect(env["WEDBACKUP_CATALOGUE_DSN"]) as conn:
        sizes = conn.execute(
            "SELECT DISTINCT ON (partition) partition, raw_bytes FROM wedbackup.backups "
            "WHERE partition <> 'platform' ORDER BY partition, created_at DESC").fetchall()
    wedding, raw_bytes = sorted(sizes, key=lambda row: (row[1], row[0]))[len(sizes) // 2]
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        engine = Engine.from_env()
        dumps, restores = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            with engine.snapshot_session() as session:
                outcome = engine.back_up(wedding, session)
            dumps.append(time.perf_counter() - started)
            started = time.perf_counter()
            engine.verify(wedding, {}, provider="vault")
            restores.append(time.perf_counter() - started)
        engine.catalogue.close()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {"wedding": wedding, "raw_bytes": raw_bytes, "sealed_bytes": outcome.stats.sealed_bytes,
            "dump_seal_seconds": round(min(dumps), 3), "verified_restore_seconds": round(min(restores), 3),
            "all_runs": {"dump_seal": [round(d, 3) for d in dumps],
                         "verified_restore": [round(r, 3) for r in restores]}}


def prepare_database(admin_dsn: str, name: str, weddings: int, seed: int, document_bytes: int) -> tuple[str, dict]:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from wedbackup_dagster.dev import demo_data

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    parts = conninfo_to_dict(admin_dsn)
    parts["dbname"] = name
    dsn = make_conninfo(**parts)
    summary = demo_data.generate(dsn, weddings=weddings, seed=seed, document_bytes=document_bytes)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return dsn, summary


def run(*, weddings: int, seed: int, document_bytes: int, workers: int) -> dict[str, Any]:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from wedbackup_dagster.core.postgres.discovery import wedding_ids

    admin = os.environ["WEDBACKUP_SCRATCH_DSN"]
    dsn, summary = prepare_database(admin, "wedbackup_bench_source", weddings, seed, document_bytes)
    parts = conninfo_to_dict(admin)
    parts["dbname"] = "wedbackup_bench_catalogue"
    catalogue = make_conninfo(**parts)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS wedbackup_bench_catalogue WITH (FORCE)")
        conn.execute("CREATE DATABASE wedbackup_bench_catalogue")
    keys = ["platform", *wedding_ids(dsn)]
    db_bytes = summary.get("total_bytes") or summary.get("bytes") or 0
    with tempfile.TemporaryDirectory(prefix="wedbackup-bench-") as tmp:
        work = Path(tmp)
        env = {"WEDBACKUP_SOURCE_DSN": dsn, "WEDBACKUP_CATALOGUE_DSN": catalogue,
               "WEDBACKUP_VAULT_DIR": str(work / "vault")}
        # Warm the cache the same way for both sides: one untimed pass of each first.
        baseline_pg_dump_zstd_age(dsn, work)
        ours_warm = fleet(env, keys, workers)
        del ours_warm
        shutil.rmtree(work / "vault", ignore_errors=True)
        # Interleave the timed runs so drift on a shared machine hits both sides alike.
        base, ours = [], []
        for _ in range(2):
            base.append(baseline_pg_dump_zstd_age(dsn, work))
            shutil.rmtree(work / "vault", ignore_errors=True)
            ours.append(fleet(env, keys, workers))
        custom = baseline_pg_dump_custom(dsn, work)
        median = median_wedding(env)
    best_base = min(b["seconds"] for b in base)
    best_ours = min(o["seconds"] for o in ours)
    fleet_result = min(ours, key=lambda o: o["seconds"])
    return {
        "database": {"weddings": weddings, "partitions": len(keys), "bytes": db_bytes, "seed": seed,
                     "document_bytes": document_bytes},
        "baseline_pg_dump_zstd_age_seconds": round(best_base, 2),
        "baseline_pg_dump_zstd_age_bytes": base[0]["bytes"],
        "baseline_pg_dump_custom_seconds": round(custom["seconds"], 2),
        "fleet_seconds": round(best_ours, 2),
        "fleet": fleet_result,
        "fleet_wall_ratio_vs_pg_dump_zstd_age": round(best_ours / best_base, 3),
        "fleet_wall_ratio_vs_pg_dump_custom": round(best_ours / custom["seconds"], 3),
        "fleet_bytes_per_second": round(fleet_result["raw_bytes"] / best_ours),
        "median_wedding": median,
        "all_runs": {"baseline": [round(b["seconds"], 2) for b in base],
                     "fleet": [round(o["seconds"], 2) for o in ours]},
    }


if __name__ == "__main__":
    # `python -m benchmarks.fleet --median`: the median wedding alone, on the databases a full run leaves.
    import json
    import sys

    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    if sys.argv[1:] != ["--median"]:
        sys.exit("usage: python -m benchmarks.fleet --median (the fleet itself runs from benchmarks.run)")
    parts = conninfo_to_dict(os.environ["WEDBACKUP_SCRATCH_DSN"])
    with tempfile.TemporaryDirectory(prefix="wedbackup-bench-") as tmp:
        print(json.dumps(median_wedding({
            "WEDBACKUP_SOURCE_DSN": make_conninfo(**{**parts, "dbname": "wedbackup_bench_source"}),
            "WEDBACKUP_CATALOGUE_DSN": make_conninfo(**{**parts, "dbname": "wedbackup_bench_catalogue"}),
            "WEDBACKUP_VAULT_DIR": str(Path(tmp) / "vault")}), indent=2))
