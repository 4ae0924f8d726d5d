"""Media benchmark (issue 19): chunk+hash+seal throughput of incompressible data on one core, the dedup
ratio on the demo media, the incremental backup of an unchanged large wedding, peak RSS for one huge file
(a generated stream, never on disk), the chunk index's memory (a changed file backed up in a wedding whose
catalogue holds few and millions of chunks, beside the old in-memory index's cost), and restic's figures on
the same files side by side in the same run (backup time, stored bytes, restore time)."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from wedbackup_dagster.dev.demo_media import BENCH, SMALL, DirectorySink, MediaScale, RandomStream, generate_media


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def throughput(megabytes: int) -> dict[str, Any]:
    """The whole per-byte path of a backup on one core: SHA-256 of the file, FastCDC, keyed BLAKE3, the
    compression sample, AES-256-GCM into a pack and the pack's SHA-256 (into memory: no disk, no network)."""
    from wedbackup_dagster.core.keys.keyring import SecretKey
    from wedbackup_dagster.core.media.chunker import MediaKeys, chunks, maybe_compress
    from wedbackup_dagster.core.media.packs import PackWriter
    from wedbackup_dagster.core.media.source import CheckedStream, SourceObject

    data = RandomStream(b"throughput", megabytes << 20).read()
    key = SecretKey.generate("bench.k")
    keys = MediaKeys.of(key)

    class _Null:
        def write(self, b: bytes) -> int:
            return len(b)

    cpu0, t0 = time.process_time(), time.perf_counter()
    stream = CheckedStream(io.BytesIO(data), SourceObject("f", len(data), None, None, None))
    writer = PackWriter(_Null(), key)
    for view in chunks(keys, stream):
        stored, compressed = maybe_compress(view)
        writer.add(keys.chunk_id(view), stored, len(view), compressed)
    writer.close()
    stream.finish()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"megabytes": megabytes, "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
            "mb_per_s_wall": round(megabytes * 1.048576 / wall, 1),
            "mb_per_s_per_core": round(megabytes * 1.048576 / cpu, 1), "target_mb_per_s_per_core": 200}


HUGE_FILE = """
import json, time
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.keys.keyring import load_master_keyring
from wedbackup_dagster.core.media.backup import back_up_media
from wedbackup_dagster.core.media.source import CheckedStream, SourceObject
from wedbackup_dagster.core.media.store import MediaStore
from wedbackup_dagster.dev.demo_media import RandomStream
import contextlib, os

SIZE = BYTES
class Generated:
    description = "generated"
    wedding_prefix = "weddings/"
    def list(self, partition=None):
        yield SourceObject("weddings/huge/ceremony.mov", SIZE, None, None, "0")
    @contextlib.contextmanager
    def open(self, obj):
        yield CheckedStream(RandomStream(b"huge", SIZE), obj)

catalogue = Catalogue(os.environ["BENCH_CATALOGUE_DSN"])
key = catalogue.wedding_key("huge", load_master_keyring(os.environ))
store = MediaStore(os.environ["BENCH_VAULT"], catalogue, {})
t = time.perf_counter()
r = back_up_media("huge", Generated(), store, key)
# VmHWM, not getrusage's ru_maxrss: Linux carries the parent's peak over fork into a child's ru_maxrss, so a
# child of a big benchmark process would report the parent's memory (1,075 MB, measured), not its own.
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": time.perf_counter() - t, "bytes": r.bytes, "packs": r.packs_written,
                  "peak_rss_mb": hwm / 1024}))
"""


def huge_file(dsn: str, vault: Path, gigabytes: int) -> dict[str, Any]:
    """One huge file, generated as a stream (never on disk): peak RSS of a fresh process doing only its backup."""
    huge = gigabytes << 30
    out = subprocess.run([sys.executable, "-c", HUGE_FILE.replace("BYTES", str(huge))], check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "BENCH_CATALOGUE_DSN": dsn, "BENCH_VAULT": str(vault)})
    found = json.loads(out.stdout.strip().splitlines()[-1])
    shutil.rmtree(vault, ignore_errors=True)
    return {"gigabytes": gigabytes, "seconds": round(found["seconds"], 1),
            "mb_per_s": round(huge / 1e6 / found["seconds"], 1), "peak_rss_mb": round(found["peak_rss_mb"], 1),
            "target_peak_rss_mb": 200}


CHANGED_FILE = """
import json, time, contextlib, os
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.keys.keyring import load_master_keyring
from wedbackup_dagster.core.media import backup
from wedbackup_dagster.core.media.source import CheckedStream, SourceObject
from wedbackup_dagster.core.media.store import MediaStore
from wedbackup_dagster.dev.demo_media import RandomStream

SIZE, PARTITION = BYTES, "PARTITION_ID"
class Generated:
    description = "generated"
    wedding_prefix = "weddings/"
    def list(self, partition=None):
        yield SourceObject(f"weddings/{PARTITION}/edited.mov", SIZE, None, None, str(time.time_ns()))
    @contextlib.contextmanager
    def open(self, obj):
        yield CheckedStream(RandomStream(obj.mtime.encode(), SIZE), obj)

catalogue = Catalogue(os.environ["BENCH_CATALOGUE_DSN"])
key = catalogue.wedding_key(PARTITION, load_master_keyring(os.environ))
store = MediaStore(os.environ["BENCH_VAULT"], catalogue, {})
lookups = 0
known_among = store.known_among
def counted(key_id, ids):
    global lookups
    lookups += 1
    return known_among(key_id, ids)
store.known_among = counted
t = time.perf_counter()
r = backup.back_up_media(PARTITION, Generated(), store, key)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": time.perf_counter() - t, "new_bytes": r.new_bytes, "lookups": lookups,
                  "peak_rss_mb": hwm / 1024}))
"""

OLD_INDEX = """
import json, os, time
import psycopg
def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024
with psycopg.connect(os.environ["BENCH_CATALOGUE_DSN"]) as conn:
    before = status("VmRSS")
    t = time.perf_counter()
    known = {r[0] for r in conn.execute("SELECT chunk_id FROM wedbackup.media_chunks WHERE key_id = %s",
                                         (os.environ["BENCH_KEY_ID"],))}
    seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "chunks": len(known), "peak_rss_mb": status("VmHWM"),
                  "index_mb": status("VmHWM") - before}))
"""


def _child(script: str, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def chunk_index(dsn: str, vault: Path, catalogue: Any, keyring: Any, *, chunks: int, megabytes: int) -> dict[str, Any]:
    """A changed file of `megabytes` backed up (fresh process each) in a wedding with no chunks yet and in one
    whose catalogue holds `chunks` chunk ids (synthetic rows: the backup's lookups cannot tell them from real
    ones), side by side; and, beside them, what the old in-memory index cost in a fresh process: every chunk id
    of the wedding loaded into a set before the first chunk was stored."""
    few, many = "index-few", "index-many"
    key = catalogue.wedding_key(many, keyring)
    catalogue.wedding_key(few, keyring)
    t = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO wedbackup.media_packs (pack_sha256, partition, key_id, size, blobs, raw_bytes) "
                     "VALUES (repeat('0', 64), %s, %s, 0, 0, 0)", (many, key.key_id))
        conn.execute("INSERT INTO wedbackup.media_chunks (key_id, chunk_id, pack_sha256, raw_bytes) "
                     "SELECT %s, encode(sha256(i::text::bytea), 'hex'), repeat('0', 64), 786432 "
                     "FROM generate_series(1, %s) i", (key.key_id, chunks))
    seed_seconds = time.perf_counter() - t
    script = CHANGED_FILE.replace("BYTES", str(megabytes << 20))
    env = {"BENCH_CATALOGUE_DSN": dsn, "BENCH_VAULT": str(vault)}
    old = _child(OLD_INDEX, {**env, "BENCH_KEY_ID": key.key_id})
    with_few = _child(script.replace("PARTITION_ID", few), env)
    with_many = _child(script.replace("PARTITION_ID", many), env)
    shutil.rmtree(vault, ignore_errors=True)
    return {"catalogue_chunks": chunks, "changed_file_mb": megabytes, "seed_seconds": round(seed_seconds, 1),
            "no_chunks": {k: round(v, 2) for k, v in with_few.items()},
            "many_chunks": {k: round(v, 2) for k, v in with_many.items()},
            "rss_growth_mb": round(with_many["peak_rss_mb"] - with_few["peak_rss_mb"], 1),
            "old_index_load": {k: round(v, 2) for k, v in old.items()}}


def _restic(args: list[str], repo: Path, env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(["restic", "-r", str(repo), "--quiet", *args], env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def run(*, quick: bool = False) -> dict[str, Any]:
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from wedbackup_dagster.core.keys.keyring import load_master_keyring
    from wedbackup_dagster.core.media.backup import back_up_media
    from wedbackup_dagster.core.media.restore import restore_media
    from wedbackup_dagster.core.media.source import DirectorySource
    from wedbackup_dagster.core.media.store import MediaStore

    admin = os.environ["WEDBACKUP_SCRATCH_DSN"]
    name = "wedbackup_bench_media_catalogue"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    dsn = make_conninfo(**{**conninfo_to_dict(admin), "dbname": name})
    result: dict[str, Any] = {"quick": quick, "throughput": throughput(128 if quick else 512)}
    tmp = Path(tempfile.mkdtemp(prefix="wedbackup-bench-media-"))
    try:
        catalogue = Catalogue(dsn)
        catalogue.migrate()
        keyring = load_master_keyring(os.environ)
        resolve = lambda kid: catalogue.key_by_id(kid, keyring)  # noqa: E731
        store = MediaStore(tmp / "vault", catalogue, {})
        # The demo media of a few weddings (and the platform's portfolios), on disk for both tools.
        source_dir = tmp / "source"
        weddings = ["1", "2"] if quick else ["1", "2", "3"]
        scale = SMALL if quick else BENCH
        demo = generate_media(DirectorySink(source_dir), weddings, seed=7, scale=scale)
        source = DirectorySource(source_dir)
        t = time.perf_counter()
        per = {p: back_up_media(p, source, store, catalogue.wedding_key(p, keyring)) for p in [*weddings, "platform"]}
        backup_seconds = time.perf_counter() - t
        stored = _dir_bytes(tmp / "vault")
        t = time.perf_counter()
        for p in per:
            restore_media(store, p, resolve, to_dir=tmp / "restored", provider="vault")
        restore_seconds = time.perf_counter() - t
        ok = all((tmp / "restored" / f.relative_to(source_dir)).read_bytes() == f.read_bytes()
                 for f in source_dir.rglob("*") if f.is_file())
        shutil.rmtree(tmp / "restored")
        result["demo_media"] = {
            "weddings": len(weddings), "files": demo["files"], "source_bytes": demo["bytes"],
            "new_bytes": sum(r.new_bytes for r in per.values()), "stored_bytes": stored,
            "dedup_ratio": round(demo["bytes"] / sum(r.new_bytes for r in per.values()), 3),
            "stored_ratio": round(demo["bytes"] / stored, 3),
            "backup_seconds": round(backup_seconds, 2), "restore_seconds": round(restore_seconds, 2),
            "restored_identical": ok,
            "per_partition": {p: {"files": r.files, "bytes": r.bytes, "new_bytes": r.new_bytes,
                                  "stored_bytes": r.stored_bytes, "packs": r.packs} for p, r in per.items()}}
        # restic on the same files: one repository for all of them (it dedups across weddings).
        env = {**os.environ, "RESTIC_PASSWORD": os.urandom(16).hex(), "RESTIC_CACHE_DIR": str(tmp / "restic-cache")}
        repo = tmp / "restic"
        _restic(["init"], repo, env)
        t = time.perf_counter()
        subprocess.run(["restic", "-r", str(repo), "--quiet", "backup", "."], cwd=source_dir, env=env, check=True,
                       capture_output=True)
        restic_backup = time.perf_counter() - t
        restic_restore = _restic(["restore", "latest", "--target", str(tmp / "restic-restored")], repo, env)
        result["restic"] = {"version": subprocess.run(["restic", "version"], capture_output=True, text=True)
                            .stdout.split()[1], "backup_seconds": round(restic_backup, 2),
                            "stored_bytes": _dir_bytes(repo), "restore_seconds": round(restic_restore, 2),
                            "dedup_ratio_stored": round(demo["bytes"] / _dir_bytes(repo), 3)}
        shutil.rmtree(tmp / "restic-restored", ignore_errors=True)
        # An unchanged large wedding backed up again: the listing and the previous snapshot, nothing else.
        big_dir = tmp / "big"
        big = MediaScale(photos=30 if quick else 150, documents=20, videos=0 if quick else 2, video_bytes=120 << 20,
                         vendors=0)
        big_info = generate_media(DirectorySink(big_dir), ["big"], seed=9, scale=big, platform=False)
        big_source = DirectorySource(big_dir)
        key = catalogue.wedding_key("big", keyring)
        t = time.perf_counter()
        first = back_up_media("big", big_source, store, key)
        first_seconds = time.perf_counter() - t
        t = time.perf_counter()
        again = back_up_media("big", big_source, store, key)
        incremental = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run(["restic", "-r", str(repo), "--quiet", "backup", "."], cwd=big_dir, env=env, check=True,
                       capture_output=True)
        restic_first = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run(["restic", "-r", str(repo), "--quiet", "backup", "."], cwd=big_dir, env=env, check=True,
                       capture_output=True)
        restic_again = time.perf_counter() - t
        result["unchanged_wedding"] = {
            "bytes": big_info["bytes"], "files": big_info["files"], "first_backup_seconds": round(first_seconds, 2),
            "first_backup_mb_per_s": round(big_info["bytes"] / 1e6 / first_seconds, 1),
            "incremental_seconds": round(incremental, 3), "unchanged": again.unchanged,
            "uploaded_bytes": again.stored_bytes, "target_seconds": 2.0,
            "restic_first_backup_seconds": round(restic_first, 2), "restic_incremental_seconds": round(restic_again, 3)}
        shutil.rmtree(big_dir)
        result["huge_file"] = huge_file(dsn, tmp / "vault-huge", 1 if quick else 5)
        result["chunk_index"] = chunk_index(dsn, tmp / "vault-index", catalogue, keyring,
                                            chunks=200_000 if quick else 2_000_000, megabytes=64 if quick else 256)
        catalogue.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    result.update({
        "media_chunk_hash_seal_mb_per_s_per_core": result["throughput"]["mb_per_s_per_core"],
        "media_dedup_ratio_demo": result["demo_media"]["dedup_ratio"],
        "media_incremental_unchanged_seconds": result["unchanged_wedding"]["incremental_seconds"],
        "media_huge_file_peak_rss_mb": result["huge_file"]["peak_rss_mb"],
        "media_chunk_index_rss_growth_mb": result["chunk_index"]["rss_growth_mb"],
    })
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(run(quick=parser.parse_args().quick), indent=2))
