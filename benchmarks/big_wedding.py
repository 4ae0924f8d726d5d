"""Single-wedding benchmark: dump+seal and restore latency, and peak RSS, for one very large wedding
(about 1 GB of rows, mostly document bytes) — memory must stay bounded whatever a wedding's size."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import psycopg
from psycopg import sql


def _measure_child(code: str, env: dict[str, str]) -> dict[str, Any]:
    """Run `code` in a fresh interpreter (so peak RSS is this work's alone); it prints one JSON line."""
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


BACKUP = """
import json, resource, time
from wedbackup_dagster.core.engine import Engine
e = Engine.from_env()
t = time.perf_counter()
with e.snapshot_session() as s:
    o = e.back_up(WEDDING, s)
print(json.dumps({"seconds": time.perf_counter() - t, "raw_bytes": o.stats.raw_bytes,
                  "sealed_bytes": o.stats.sealed_bytes,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

RESTORE = """
import json, resource, time
from wedbackup_dagster.core.engine import Engine
e = Engine.from_env()
t = time.perf_counter()
v = e.verify(WEDDING, {}, provider="vault")
print(json.dumps({"seconds": time.perf_counter() - t, "restore_seconds": v.restore_seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(*, megabytes: int) -> dict[str, Any]:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from wedbackup_dagster.dev import demo_data

    admin = os.environ["WEDBACKUP_SCRATCH_DSN"]
    parts = conninfo_to_dict(admin)
    names = {"source": "wedbackup_bench_big", "catalogue": "wedbackup_bench_big_catalogue"}
    dsns = {}
    with psycopg.connect(admin, autocommit=True) as conn:
        for role, name in names.items():
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            dsns[role] = make_conninfo(**{**parts, "dbname": name})
    demo_data.generate(dsns["source"], weddings=3, seed=1, document_bytes=256)
    # 64 KiB per row, half of it incompressible hex: `megabytes` MB of document rows for wedding 1.
    rows = megabytes * 16
    with psycopg.connect(dsns["source"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO documents (wedding_id, filename, mime, content, uploaded_at) "
            "SELECT 1, 'scan-' || i || '.pdf', 'application/pdf', "
            "convert_to(repeat(md5(i::text), 1024) || (SELECT string_agg(md5(random()::text || g || i), '') "
            "FROM generate_series(1, 1024) g), 'UTF8'), now() FROM generate_series(1, %s) i", (rows,))
        size = conn.execute("SELECT pg_total_relation_size('documents')").fetchone()[0]
    with tempfile.TemporaryDirectory(prefix="wedbackup-big-") as vault:
        env = {"WEDBACKUP_SOURCE_DSN": dsns["source"], "WEDBACKUP_CATALOGUE_DSN": dsns["catalogue"],
               "WEDBACKUP_VAULT_DIR": vault}
        backup = _measure_child(BACKUP.replace("WEDDING", '"1"'), env)
        restore = _measure_child(RESTORE.replace("WEDDING", '"1"'), env)
    return {"wedding_bytes": size, "dump_seal_seconds": round(backup["seconds"], 2),
            "dump_seal_peak_rss_mb": round(backup["peak_rss_mb"], 1), "raw_bytes": backup["raw_bytes"],
            "sealed_bytes": backup["sealed_bytes"], "verified_restore_seconds": round(restore["seconds"], 2),
            "verified_restore_peak_rss_mb": round(restore["peak_rss_mb"], 1),
            "self_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
