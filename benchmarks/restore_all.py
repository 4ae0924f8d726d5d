"""The whole platform brought back, side by side on the same database: the demo database (`demo-data --weddings
2000`, as benchmarks/whole_job.py builds it) backed up by wedbackup (every partition sealed, copied to S3,
verified, then the nightly DR pack built: core/disaster/packs.py) and by the peer (`pg_dump -Fp | zstd -3 |
age`); then the source dropped and the vault deleted, and `restore --all --from s3` into a new database — with
the pack (the default), and without it (every wedding from its own object), alternating — timed against the
peer's restore of its whole dump (`age -d | zstd -d | psql`). The peer runs before and after wedbackup (drift on
a shared machine hits both); its best run is the reference. Both restored databases are compared table by table
with the source (counts and ordered checksums). Also timed: every archive fetched from S3 once and nothing else
(the floor the S3 service's per-request cost sets without a pack); the like-for-like case, the source lost with
the vault intact (`restore --all --from vault`, local files as the peer's); and the peer's own S3 path (its dump
downloaded from S3, then restored). From the measured seconds per wedding: an estimate for a 100,000-wedding
platform on N workers against the 4-hour objective. Prints JSON."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from wedbackup_dagster.dev.compare import table_sums

from .fresh_process import write_result

OBJECTIVE_SECONDS = 4 * 3600.0
PLATFORM_WEDDINGS = 100_000


def back_up_to_s3(engine: Any, replica: Any, partitions: list[str]) -> dict[str, float]:
    """Every partition sealed into the vault, copied to S3 and verified from S3 (what restore --all
    restores: each partition's newest verified backup); then a key-store backup to S3."""
    from wedbackup_dagster.core.keys.backup import back_up_key_store

    timings = seal_copy_verify(engine, {"s3": replica}, partitions, verify_from="s3")
    back_up_key_store(engine.settings, engine.catalogue, {"s3": replica}, engine.keyring)
    return timings


def seal_copy_verify(engine: Any, replicas: dict[str, Any], partitions: list[str], *, verify_from: str
                     ) -> dict[str, float]:
    """Every partition sealed into the vault, copied to each of `replicas` and verified from `verify_from`;
    any wedding's failure raises. Returns the seconds of each phase."""
    def all_done(outcomes: Any) -> None:
        for _, outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome

    timings = {}
    t0 = time.perf_counter()
    with engine.snapshot_session() as session:
        all_done(engine.back_up_each(partitions, session))
    timings["backup_seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    for replica in replicas.values():
        all_done(engine.replicate_each(partitions, replica))
    timings["upload_seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    all_done(engine.verify_each(partitions, {verify_from: replicas[verify_from]}, provider=verify_from))
    timings["verify_seconds"] = round(time.perf_counter() - t0, 1)
    return timings


def s3_get_only(engine: Any, replica: Any, threads: int) -> float:
    """Seconds to fetch every partition's newest archive from S3 once — the same client and call as restore
    --all's fetchers (Engine.download_copy, SHA-256 checked), on as many threads, with nothing else: no
    decrypt, no load. The part of restore_all_seconds that the S3 service's per-request cost sets (the stand-in,
    moto, spends a few ms of its own CPU per GET on this machine's two cores)."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from wedbackup_dagster.core import disaster

    points = [ps[0] for ps in disaster.all_recovery_points(engine.catalogue).values()]
    backups = engine.catalogue.backups_by_sha([p.archive_sha256 for p in points], manifests=False)
    copies = engine.catalogue.copies_of([b.id for b in backups.values()])
    keys = [(b, c.object_key) for b in backups.values() for c in copies.get(b.id, []) if c.provider == "s3"]

    def fetch(backup_and_key: tuple[Any, str]) -> None:
        with tempfile.SpooledTemporaryFile(max_size=4 << 20) as tmp:
            engine.download_copy(replica, backup_and_key[1], tmp, backup_and_key[0])

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(fetch, keys))
    return time.perf_counter() - started


def peer_restore(bench: dict[str, Any], work: Path, dump: Path) -> float:
    """`age -d | zstd -d | psql` of the whole dump into a new database: seconds."""
    import psycopg
    from psycopg import sql

    from .fleet import _pg_bin, _pg_env

    admin = bench["stack"].dsn("postgres")
    scratch = f"peer_restore_all_{time.time_ns()}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(scratch)))
    try:
        started = time.perf_counter()
        subprocess.run(f"age -d -i {work / 'age.key'} {dump} | zstd -d -q -c | "
                       f"{_pg_bin('psql')} -q -v ON_ERROR_STOP=1 -o /dev/null", shell=True, check=True,
                       env=_pg_env(bench["stack"].dsn(scratch)))
        seconds = time.perf_counter() - started
        bench.setdefault("peer_sums", table_sums(bench["stack"].dsn(scratch)))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(scratch)))
    return seconds


def peer_from_s3(bench: dict[str, Any], work: Path, dump: Path, client: Any, bucket: str) -> float:
    """The peer's S3 path: its whole dump (uploaded once beforehand) downloaded from S3 to a local file, then
    restored as peer_restore does: seconds for both."""
    local = work / "peer_from_s3.sql.zst.age"
    started = time.perf_counter()
    client.download_file(bucket, PEER_DUMP_KEY, str(local))
    downloaded = time.perf_counter() - started
    try:
        return downloaded + peer_restore(bench, work, local)
    finally:
        local.unlink(missing_ok=True)


PEER_DUMP_KEY = "peer/baseline.sql.zst.age"


def estimate(seconds: float, weddings: int, jobs: int) -> dict[str, Any]:
    """A 100,000-wedding platform on N workers, from the measured worker-seconds per wedding (the whole
    run's wall time times its workers, over its weddings: pessimistic where the workers overlapped
    waiting on the network or the database)."""
    per_wedding = seconds * jobs / max(1, weddings)
    out = {}
    for n in (4, 8, 16, 32):
        est = per_wedding * PLATFORM_WEDDINGS / n
        out[str(n)] = {"seconds": round(est), "hours": round(est / 3600, 2), "within_4h": est <= OBJECTIVE_SECONDS}
    return {"worker_seconds_per_wedding": round(per_wedding, 4), "workers": out,
            "workers_needed_for_4h": max(1, int(-(-per_wedding * PLATFORM_WEDDINGS // OBJECTIVE_SECONDS)))}


def run(*, weddings: int, seed: int = 7, document_bytes: int = 4096, jobs: int = 4,
        compare_deferred: bool = False, compare_get: bool = False) -> dict[str, Any]:
    """`compare_deferred`: restore --all also with the platform's post-data built before the weddings (as before
    it was deferred), the two variants alternating (deferred, before, before, deferred), best of two each.
    `compare_get`: also with S3 downloads through boto3's get_object instead of the lean GET (s3_lean.py), the
    GETs alone and restore --all each (lean, boto3, boto3, lean), best of two each."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict

    from wedbackup_dagster.core import disaster
    from wedbackup_dagster.core.disaster import pack_build
    from wedbackup_dagster.core.engine import Engine
    from wedbackup_dagster.core.storage.replicas import S3Replica
    from wedbackup_dagster.core.storage.providers import ensure_targets
    from wedbackup_dagster.core.storage.replicas.s3 import s3_client_from

    from .fleet import baseline_pg_dump_zstd_age
    from .stand_ins import bench_environment

    with bench_environment("bench_restore_all", weddings=weddings, seed=seed,
                           document_bytes=document_bytes) as bench:
        work = Path(bench["work"])
        engine = Engine.from_env()
        try:
            ensure_targets(engine.settings)
            s3 = S3Replica(s3_client_from(engine.settings.s3, os.environ), engine.settings.s3)
            with psycopg.connect(bench["source"]) as conn:
                ids = [str(r[0]) for r in conn.execute("SELECT id FROM weddings ORDER BY id")]
            setup = back_up_to_s3(engine, s3, ["platform", *ids])
            # The nightly DR pack (core/disaster/packs.py): every wedding's newest verified archive in a few
            # objects, read by restore --all from S3 in tens of requests instead of one per wedding.
            t0 = time.perf_counter()
            pack = pack_build.build_pack(engine, {"s3": s3})
            setup["dr_pack_seconds"] = round(time.perf_counter() - t0, 2)
            setup["dr_pack"] = {"weddings": pack.weddings, "segments": pack.segments, "bytes": pack.bytes,
                                "ok": pack.ok}
            expected = table_sums(bench["source"])
            dumped = baseline_pg_dump_zstd_age(bench["source"], work)
            dump = work / "baseline.sql.zst.age"
            bench["s3"].upload_file(str(dump), bench["bucket"], PEER_DUMP_KEY)
            peers = [peer_restore(bench, work, dump)]
            peers_from_s3 = [peer_from_s3(bench, work, dump, bench["s3"], bench["bucket"])]
            # The disaster: the source database and the vault are gone; S3 alone is left.
            stack = bench["stack"]
            name = conninfo_to_dict(bench["source"])["dbname"]
            with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))  # dropped by the env

            def restore_once(defer: bool, copy_from: str = "s3", replica: Any = s3,
                             use_packs: bool = True) -> tuple[float, Any, bool]:
                target_name = f"bench_restore_all_target_{time.time_ns()}"
                with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target_name)))
                try:
                    started = time.perf_counter()
                    report = disaster.restore_all(engine, {"s3": replica}, stack.dsn(target_name),
                                                  disaster.RestoreAllOptions(providers=disaster.copy_order(copy_from),
                                                                             jobs=jobs, defer_post_data=defer,
                                                                             packs=use_packs))
                    seconds = time.perf_counter() - started
                    return seconds, report, table_sums(stack.dsn(target_name)) == expected
                finally:
                    with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:
                        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(target_name)))

            # The source lost, the vault intact: the like-for-like case (local files, as the peer's dump).
            from_vault = [restore_once(True, "vault") for _ in range(2)]
            # Then the vault is lost too: S3 alone is left.
            shutil.rmtree(engine.settings.vault_dir)
            from wedbackup_dagster.core.disaster.batches import FETCHERS_PER_LOADER

            get_only = s3_get_only(engine, s3, jobs * FETCHERS_PER_LOADER)
            runs: dict[bool, list[tuple[float, Any, bool]]] = {True: [], False: []}
            for defer in ((True, False, False, True) if compare_deferred else (True,)):
                runs[defer].append(restore_once(defer))
            # Without the pack, every wedding from its own object (as before packs), alternating with the pack.
            without_pack = [restore_once(True, use_packs=False)]
            runs[True].append(restore_once(True))
            without_pack.append(restore_once(True, use_packs=False))
            by_get: dict[str, Any] = {}
            if compare_get:  # the same client and target, downloads through boto3's get_object
                boto3_get = S3Replica(s3.client, engine.settings.s3, lean_get=False)
                lean_gets = [get_only]
                by_get = {"boto3_get_only": [s3_get_only(engine, boto3_get, jobs * FETCHERS_PER_LOADER)]}
                by_get["boto3_get_only"].append(s3_get_only(engine, boto3_get, jobs * FETCHERS_PER_LOADER))
                lean_gets.append(s3_get_only(engine, s3, jobs * FETCHERS_PER_LOADER))
                get_only = min(lean_gets)
                by_get["lean_get_only"] = lean_gets
                by_get["boto3_restores"] = [restore_once(True, replica=boto3_get) for _ in range(2)]
                runs[True].append(restore_once(True))
            seconds, report, equal = min(runs[True], key=lambda r: r[0])
            loose_seconds, loose_report, _ = min(without_pack, key=lambda r: r[0])
            peers.append(peer_restore(bench, work, dump))
            peers_from_s3.append(peer_from_s3(bench, work, dump, bench["s3"], bench["bucket"]))
            peer_equal = bench.get("peer_sums") == expected
        finally:
            engine.catalogue.close()
    best = min(peers)
    vault_seconds, vault_report, vault_equal = min(from_vault, key=lambda r: r[0])
    variants = {}
    if compare_deferred:
        for defer, label in ((True, "post_data_after_weddings"), (False, "post_data_before_weddings")):
            variants[label] = {"seconds": [round(r[0], 2) for r in runs[defer]],
                               "load_phase": [r[1].phases["load"] for r in runs[defer]],
                               "complete_and_equal": all(r[1].complete and r[2] for r in runs[defer]),
                               "ratio_vs_peer": round(min(r[0] for r in runs[defer]) / best, 2)}
    get_variants = {}
    if compare_get:
        boto3_best = min(by_get["boto3_restores"], key=lambda r: r[0])
        get_variants = {
            "boto3_get_restore_all_seconds": [round(r[0], 2) for r in by_get["boto3_restores"]],
            "boto3_get_ratio_vs_peer": round(boto3_best[0] / best, 2),
            "boto3_get_complete_and_equal": all(r[1].complete and r[2] for r in by_get["boto3_restores"]),
            "boto3_get_phases": boto3_best[1].phases,
            "lean_get_restore_all_seconds": [round(r[0], 2) for r in runs[True]],
            "boto3_get_only_seconds": [round(x, 2) for x in by_get["boto3_get_only"]],
            "lean_get_only_seconds": [round(x, 2) for x in by_get["lean_get_only"]],
        }
    return {
        "database": {"weddings": weddings, "partitions": len(ids) + 1, "seed": seed, "document_bytes": document_bytes,
                     "rows": report.rows, "archive_bytes": report.bytes, "peer_dump_bytes": dumped["bytes"]},
        "setup": setup,
        "restore_all_seconds": round(seconds, 2),
        "restore_all_jobs": jobs,
        "restore_all_complete": report.complete,
        "restore_all_tables_equal_source": equal,
        "restore_all_phases": report.phases,
        "peer_restore_seconds": round(best, 2),
        "peer_runs": [round(p, 2) for p in peers],
        "peer_tables_equal_source": peer_equal,
        "restore_all_ratio_vs_peer": round(seconds / best, 2),
        "restore_all_runs": [round(r[0], 2) for r in runs[True]],
        "restore_all_from_pack": report.from_pack,
        # The same restore with packs=False: every wedding's archive from its own object (one GET each)
        "restore_all_without_pack_seconds": round(loose_seconds, 2),
        "restore_all_without_pack_runs": [round(r[0], 2) for r in without_pack],
        "restore_all_without_pack_ratio_vs_peer": round(loose_seconds / best, 2),
        "restore_all_without_pack_complete_and_equal": all(r[1].complete and r[2] for r in without_pack),
        "restore_all_without_pack_phases": loose_report.phases,
        # Every archive fetched from S3 once and nothing else (s3_get_only): the floor the S3 service sets
        "s3_get_only_seconds": round(get_only, 2),
        "s3_get_only_ratio_vs_peer": round(get_only / best, 2),
        # The source lost, the vault intact (restore --all --from vault): local files on both sides
        "restore_all_from_vault_seconds": round(vault_seconds, 2),
        "restore_all_from_vault_runs": [round(r[0], 2) for r in from_vault],
        "restore_all_from_vault_ratio_vs_peer": round(vault_seconds / best, 2),
        "restore_all_from_vault_complete_and_equal": all(r[1].complete and r[2] for r in from_vault),
        "restore_all_from_vault_phases": vault_report.phases,
        # The peer's own S3 path: its dump downloaded from S3, then restored (best of two)
        "peer_from_s3_seconds": round(min(peers_from_s3), 2),
        "peer_from_s3_runs": [round(p, 2) for p in peers_from_s3],
        "restore_all_variants": variants,
        # With --compare-get: S3 downloads through boto3's get_object (before s3_lean.py) in the same run
        "restore_all_get_paths": get_variants,
        "load_average": os.getloadavg(),
        "estimate_100k": estimate(seconds, len(ids) + 1, jobs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weddings", type=int, default=2000)
    parser.add_argument("--document-bytes", type=int, default=4096)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--compare-deferred", action="store_true",
                        help="also restore with the platform's indexes and foreign keys built before the weddings")
    parser.add_argument("--compare-get", action="store_true",
                        help="also restore with S3 downloads through boto3's get_object instead of the lean GET")
    parser.add_argument("--json-out", help="also write the figures to this file (fresh_process.py)")
    args = parser.parse_args()
    write_result(run(weddings=args.weddings, document_bytes=args.document_bytes, jobs=args.jobs,
                     compare_deferred=args.compare_deferred, compare_get=args.compare_get), args.json_out)


if __name__ == "__main__":
    main()
