"""Replica upload throughput per provider stand-in: sealed-archive-like files (random bytes, as incompressible
as AES-GCM output) uploaded through the project's own replicas (S3Replica, GCSReplica, AzureReplica: checksum
computed, content-addressed key, provider checksum confirmed), to moto S3, the GCS emulator and Azurite of
the local stack. Stand-ins are not clouds: they run on this machine, with no network latency, no
bandwidth limit and their own (Python or Node) overheads, so these figures compare our client path
between providers and over time, not what AWS, Google or Azure would sustain.

Per provider and file size: MB/s of the best of `repeats` (fresh random content each time, so an upload
is never the "already present" no-op), and for many small files (a median wedding's archive) files/s."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any


def _random_file(folder: Path, size: int) -> tuple[Path, str]:
    path = folder / uuid.uuid4().hex
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 20))
            digest.update(block)
            fh.write(block)
            left -= len(block)
    return path, digest.hexdigest()


def _database(dsn: str, name: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    return make_conninfo(**{**conninfo_to_dict(dsn), "dbname": name})


def _replicas(env: dict[str, str], bucket: str, dsn: str) -> dict[str, Any]:
    from wedbackup_dagster.core.config import Settings
    from wedbackup_dagster.core.storage.replicas import (AzureReplica, GCSReplica, S3Replica, azure_service_from,
                                                         ensure_bucket, ensure_container, ensure_gcs_bucket,
                                                         gcs_client_from, s3_client_from)

    # Settings wants the databases too; nothing here connects to them.
    # (two names, since Settings refuses a catalogue in the source database).
    settings = Settings.from_env({**os.environ, **env, "WEDBACKUP_SOURCE_DSN": _database(dsn, "bench_source"),
                                  "WEDBACKUP_CATALOGUE_DSN": _database(dsn, "bench_catalogue"),
                                  "WEDBACKUP_S3_BUCKET": bucket, "WEDBACKUP_GCS_BUCKET": bucket,
                                  "WEDBACKUP_AZURE_CONTAINER": bucket})
    s3 = s3_client_from(settings.s3, {**os.environ, **env})
    gcs = gcs_client_from(settings.gcs)
    azure = azure_service_from(settings.azure)
    ensure_bucket(s3, settings.s3)
    ensure_gcs_bucket(gcs, settings.gcs)
    ensure_container(azure, settings.azure)
    return {"s3": S3Replica(s3, settings.s3), "gcs": GCSReplica(gcs, settings.gcs),
            "azure": AzureReplica(azure, settings.azure)}


def _upload(replica: Any, files: list[tuple[Path, str]]) -> float:
    started = time.perf_counter()
    for i, (path, sha256) in enumerate(files):
        size = path.stat().st_size
        record = replica.upload(path, partition=str(900_000 + i), sha256=sha256, size=size, metadata={})
        if record.already_present:
            raise RuntimeError(f"{replica.provider}: {path.name} was already present; the upload was not timed")
    return time.perf_counter() - started


def _cleanup(replicas: dict[str, Any]) -> None:
    for replica in replicas.values():
        for listed in list(replica.list()):
            replica.delete(listed.key)


def run(*, quick: bool = False, repeats: int = 2) -> dict[str, Any]:
    from wedbackup_dagster.dev.stack import Stack

    from .stand_ins import fresh_stand_ins

    stack = Stack.default()
    fresh_stand_ins(stack)
    env = stack.env()
    bucket = f"bench-replicas-{uuid.uuid4().hex[:8]}"
    replicas = _replicas(env, bucket, stack.dsn("postgres"))
    # 64 kB ≈ a median wedding's sealed archive; the large size crosses every client's multipart /
    # block threshold (S3 and GCS resumable/multipart, Azure blocks).
    large = (16 if quick else 128) << 20
    small_count = 20 if quick else 100
    sizes = {"large": large, "small": 64 << 10}
    result: dict[str, Any] = {"stand_ins": {"s3": "moto", "gcs": "gcp-storage-emulator", "azure": "Azurite"},
                              "large_file_mb": large / 1e6, "small_file_kb": 64, "small_files": small_count,
                              "repeats": repeats, "providers": {}}
    best: dict[str, dict[str, float]] = {p: {"large": float("inf"), "small": float("inf")} for p in replicas}
    with tempfile.TemporaryDirectory(prefix="wedbackup-bench-replicas-") as tmp:
        folder = Path(tmp)
        try:
            for _ in range(repeats):
                # Providers interleaved within each repeat, so drift on a shared machine hits them alike.
                for provider, replica in replicas.items():
                    files = [_random_file(folder, sizes["large"])]
                    best[provider]["large"] = min(best[provider]["large"], _upload(replica, files))
                    files = [_random_file(folder, sizes["small"]) for _ in range(small_count)]
                    best[provider]["small"] = min(best[provider]["small"], _upload(replica, files))
                    for path in folder.iterdir():
                        path.unlink()
        finally:
            _cleanup(replicas)
    for provider, seconds in best.items():
        result["providers"][provider] = {
            "large_mb_per_s": round(large / 1e6 / seconds["large"], 1),
            "small_files_per_s": round(small_count / seconds["small"], 1),
            "small_mb_per_s": round(small_count * sizes["small"] / 1e6 / seconds["small"], 2),
        }
    result["replica_upload_mb_per_s"] = {p: v["large_mb_per_s"] for p, v in result["providers"].items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, repeats=args.repeats), indent=2))


if __name__ == "__main__":
    main()
