"""Fixtures of the reliability tests: fault proxies in front of every stand-in of the running stack, and
the settings that point wedbackup at them instead of at the stand-ins. At the end of a session with
WEDBACKUP_RELIABILITY_OUT set, the soak's and the mutation loop's summaries written in it are joined into
reliability-summary.json / .txt there."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from urllib.parse import urlsplit

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .faultproxy import FaultProxy, FaultSchedule


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", int(parts.port or 80)


def _blob_endpoint(connection_string: str) -> str:
    for part in connection_string.split(";"):
        if part.startswith("BlobEndpoint="):
            return part[len("BlobEndpoint="):]
    raise AssertionError("the local Azure connection string has no BlobEndpoint")


def via(dsn: str, proxy: FaultProxy, connect_timeout: int = 5) -> str:
    """The DSN `dsn` reached through `proxy` (its host and port replaced)."""
    parts = conninfo_to_dict(dsn)
    parts.update(host="127.0.0.1", port=str(proxy.port), connect_timeout=str(connect_timeout))
    return make_conninfo(**parts)


@contextmanager
def fault_proxies(env: Mapping[str, str], schedules: Mapping[str, FaultSchedule], *,
                  pg_connect_timeout: int = 5) -> Iterator[tuple[dict[str, FaultProxy], dict[str, str]]]:
    """One proxy per stand-in named in `schedules` (s3, gcs, azure, postgres, postgres_restore) and the
    environment that sends wedbackup's traffic through them. The catalogue stays direct: it is the ledger
    the end state is checked against, and its own failure mode (a lost connection is reopened) is tested
    elsewhere."""
    upstream = {
        "s3": (_host_port(env["WEDBACKUP_S3_ENDPOINT_URL"]), "http"),
        "gcs": (_host_port(env["STORAGE_EMULATOR_HOST"]), "http"),
        "azure": (_host_port(_blob_endpoint(env["WEDBACKUP_AZURE_CONNECTION_STRING"])), "http"),
        "postgres": (_host_port("//" + conninfo_host(env["WEDBACKUP_SOURCE_DSN"])), "tcp"),
        # The same server, for restore targets only (their DSNs are made with `via`): its own faults and counts.
        "postgres_restore": (_host_port("//" + conninfo_host(env["WEDBACKUP_SOURCE_DSN"])), "tcp"),
    }
    with ExitStack() as stack:
        proxies = {name: stack.enter_context(FaultProxy(name, upstream[name][0], schedule, mode=upstream[name][1]))
                   for name, schedule in schedules.items()}
        routed: dict[str, str] = {}
        if "s3" in proxies:
            routed["WEDBACKUP_S3_ENDPOINT_URL"] = f"http://{proxies['s3'].address}"
        if "gcs" in proxies:
            routed["STORAGE_EMULATOR_HOST"] = f"http://{proxies['gcs'].address}"
        if "azure" in proxies:
            cs = env["WEDBACKUP_AZURE_CONNECTION_STRING"]
            host, port = upstream["azure"][0]
            routed["WEDBACKUP_AZURE_CONNECTION_STRING"] = cs.replace(f"{host}:{port}", proxies["azure"].address)
        if "postgres" in proxies:
            routed["WEDBACKUP_SOURCE_DSN"] = via(env["WEDBACKUP_SOURCE_DSN"], proxies["postgres"], pg_connect_timeout)
            routed["WEDBACKUP_SCRATCH_DSN"] = via(env["WEDBACKUP_SCRATCH_DSN"], proxies["postgres"],
                                                   pg_connect_timeout)
        yield proxies, routed


def conninfo_host(dsn: str) -> str:
    parts = conninfo_to_dict(dsn)
    return f"{parts.get('host') or '127.0.0.1'}:{parts.get('port') or 5432}"


_SESSION_STARTED = time.time()


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ANN001
    out = os.environ.get("WEDBACKUP_RELIABILITY_OUT")
    if not out:
        return
    fresh = {name: Path(out, f"{name}-summary") for name in ("soak", "mutations")
             if Path(out, f"{name}-summary.json").exists()
             and Path(out, f"{name}-summary.json").stat().st_mtime >= _SESSION_STARTED}  # this session's only
    if fresh:
        Path(out, "reliability-summary.json").write_text(json.dumps(
            {name: json.loads(base.with_suffix(".json").read_text()) for name, base in fresh.items()}, indent=2) + "\n")
        Path(out, "reliability-summary.txt").write_text(
            "\n".join(base.with_suffix(".txt").read_text() for base in fresh.values()))
