"""The seeded soak (`make reliability`): many weddings backed up through the real Dagster pipeline, over
several rounds, with every provider and the source / scratch PostgreSQL behind a fault proxy. Failed
weddings are run again (bounded) until done. The end state must be whole: every wedding backed up to the
vault and three providers and restored from one of them; every object at every provider a complete
archive under its own hash that opens with its wedding's key; no unfinished upload; catalogue and storage
in agreement; no secret in anything the soak logged. Prints a summary (faults by kind, runs, outcomes).

Knobs (environment): WEDBACKUP_SOAK_SEED, WEDBACKUP_SOAK_WEDDINGS, WEDBACKUP_SOAK_ROUNDS, WEDBACKUP_SOAK_RATE."""
from __future__ import annotations

import os
import time
import uuid
from collections import Counter

import dagster as dg
import psycopg
import pytest

from wedbackup_dagster.backups import assets
from wedbackup_dagster.backups.launch import register_partitions, run_job_for
from wedbackup_dagster.core import demo_data, restore
from wedbackup_dagster.core.catalogue import Catalogue
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.replicas import ensure_targets

from .audit import audit, direct_replicas
from .conftest import fault_proxies
from .faultproxy import FaultSchedule

pytestmark = [pytest.mark.reliability, pytest.mark.stack, pytest.mark.slow]

SEED = int(os.environ.get("WEDBACKUP_SOAK_SEED", "9"))
WEDDINGS = int(os.environ.get("WEDBACKUP_SOAK_WEDDINGS", "20"))
ROUNDS = int(os.environ.get("WEDBACKUP_SOAK_ROUNDS", "2"))
RATE = float(os.environ.get("WEDBACKUP_SOAK_RATE", "0.06"))
MAX_RUNS_PER_ROUND = 8
TIME_BUDGET = 600.0  # seconds for the whole soak; it normally takes a few minutes
PROVIDER_TIMEOUT = 2.0  # seconds; every stall lasts longer than that
BIG = {2: 6 << 20, 5: 9 << 20}  # weddings given a large document: S3 multipart, Azure blocks, GCS resumable
MiB = 1 << 20


def _tuned_make_replica(real):
    """The real replicas with part sizes small enough that the soak's archives exercise multipart (S3),
    staged blocks (Azure) and chunked ranged reads; GCS goes resumable above 8 MiB by itself."""

    def make(provider, settings, client):  # noqa: ANN001
        replica = real(provider, settings, client)
        if provider == "s3":
            replica.multipart_threshold = replica.part_size = 5 * MiB
        elif provider == "azure":
            replica.max_single_put_size = replica.max_block_size = replica.download_range_size = MiB
        elif provider == "gcs":
            replica.chunk_size = 4 * 256 * 1024
        return replica

    return make


def _add_big_documents(source: str, sizes: dict[int, int]) -> None:
    with psycopg.connect(source) as conn:
        for wedding, size in sizes.items():
            conn.execute("INSERT INTO documents (wedding_id, filename, mime, content) VALUES (%s, %s, %s, %s)",
                         (wedding, "scan.pdf", "application/pdf", os.urandom(size)))


def _complete(cat: Catalogue, wedding: str, since) -> bool:  # noqa: ANN001
    """Backed up this round, a copy in the vault and at all three providers, and restored from one."""
    backup = cat.latest_backup(wedding)
    if backup is None or backup.snapshot_time < since:
        return False
    if {c.provider for c in cat.copies(backup.id)} != {"vault", "s3", "gcs", "azure"}:
        return False
    with cat.connect() as conn:
        return conn.execute("SELECT count(*) AS n FROM wedbackup.restores WHERE backup_id = %s AND ok",
                            (backup.id,)).fetchone()["n"] > 0


def _secrets(env: dict[str, str]) -> dict[str, str]:
    master = env["WEDBACKUP_MASTER_KEY"].split(",")[0].split(":", 1)[1]
    account_key = next(p[len("AccountKey="):] for p in env["WEDBACKUP_AZURE_CONNECTION_STRING"].split(";")
                       if p.startswith("AccountKey="))
    password = psycopg.conninfo.conninfo_to_dict(env["WEDBACKUP_SOURCE_DSN"]).get("password") or ""
    return {"master key": master, "S3 secret": env["AWS_SECRET_ACCESS_KEY"], "Azure account key": account_key,
            "DB password": password}


def test_soak_under_random_provider_and_database_faults(stack, make_database, tmp_path, monkeypatch, capfd,
                                                         s3_bucket, gcs_bucket, azure_container, s3_client,
                                                         gcs_client, azure_service):
    started = time.monotonic()
    env = stack.env()
    source, catalogue = make_database(), make_database()
    scratch_prefix = f"{restore.SCRATCH_PREFIX}soak{uuid.uuid4().hex[:6]}_"
    monkeypatch.setattr(restore, "SCRATCH_PREFIX", scratch_prefix)  # this soak's scratch databases, by name
    monkeypatch.setattr(assets, "make_replica", _tuned_make_replica(assets.make_replica))
    settings = {"WEDBACKUP_SOURCE_DSN": source, "WEDBACKUP_CATALOGUE_DSN": catalogue,
                "WEDBACKUP_VAULT_DIR": str(tmp_path / "vault"), "WEDBACKUP_S3_BUCKET": s3_bucket,
                "WEDBACKUP_GCS_BUCKET": gcs_bucket, "WEDBACKUP_AZURE_CONTAINER": azure_container,
                "WEDBACKUP_PROVIDER_TIMEOUT": str(PROVIDER_TIMEOUT)}
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    demo_data.generate(source, weddings=WEDDINGS, seed=SEED, document_bytes=2048)
    _add_big_documents(source, {w: s for w, s in BIG.items() if w <= WEDDINGS})
    engine = Engine.from_env()
    ensure_targets(engine.settings)

    http = {"http_500": 2, "http_503": 2, "slowdown": 1, "http_429": 1, "reset": 2, "stall": 1, "truncate": 2}
    stall = PROVIDER_TIMEOUT + 1
    schedules = {  # S3 throttles with 503 SlowDown, GCS and Azure with 429
        "s3": FaultSchedule(seed=SEED, rate=RATE, weights={**http, "http_429": 0}, stall_seconds=stall),
        "gcs": FaultSchedule(seed=SEED + 1, rate=RATE, weights={**http, "slowdown": 0}, stall_seconds=stall),
        "azure": FaultSchedule(seed=SEED + 2, rate=RATE, weights={**http, "slowdown": 0}, stall_seconds=stall),
        "postgres": FaultSchedule(seed=SEED + 3, rate=RATE * 1.5, weights={"reset": 2, "stall": 1}, stall_seconds=3),
    }
    outcomes: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    runs: list[str] = []
    messages: list[str] = []
    run_ok = 0
    cat = Catalogue(catalogue)
    with fault_proxies(env | settings, schedules) as (proxies, routed), dg.instance_for_test() as instance:
        for name, value in routed.items():
            monkeypatch.setenv(name, value)
        keys = [k for k in register_partitions(instance, source) if k != "platform"]
        for round_no in range(1, ROUNDS + 1):
            with cat.connect() as conn:
                since = conn.execute("SELECT now() AS t").fetchone()["t"]
            pending, attempt = list(keys), 0
            while pending and attempt < MAX_RUNS_PER_ROUND and time.monotonic() - started < TIME_BUDGET:
                attempt += 1
                for result in run_job_for("backup_weddings", pending, instance=instance):
                    runs.append(result.run_id)
                    run_ok += result.success
                    for failure in result.failures:
                        failures[failure.split(":", 1)[0]] += 1
                        lines_of = failure.splitlines()
                        messages.extend(line.strip()[:220] for line in lines_of[:1] + [
                            line for line in lines_of[1:] if "wedding" in line])
                        assert failure.strip(), "a failed step must say what failed"
                still = [w for w in pending if not _complete(cat, w, since)]
                for w in set(pending) - set(still):
                    outcomes["backed up first time" if attempt == 1 else "failed, then completed by retry"] += 1
                pending = still
            assert not pending, f"round {round_no}: weddings {pending} not backed up after {attempt} runs"
        faults = {name: dict(p.counts) for name, p in proxies.items()}
        requests = {name: p.requests for name, p in proxies.items()}
        entries = [e for run_id in runs for e in instance.all_logs(run_id)]
        logs = [str(e) for e in entries]
        step_retries = Counter(e.step_key for e in entries
                               if e.dagster_event and e.dagster_event.event_type_value == "STEP_UP_FOR_RETRY")

    report = audit(engine, direct_replicas(engine, s3_client, gcs_client, azure_service),
                   scratch_prefix=scratch_prefix, admin_dsn=env["WEDBACKUP_SCRATCH_DSN"])
    captured = capfd.readouterr()
    texts = logs + [captured.out, captured.err]
    with cat.connect() as conn:
        texts += [str(r) for r in conn.execute("SELECT detail::text FROM wedbackup.restores UNION ALL "
                                               "SELECT detail::text FROM wedbackup.audit").fetchall()]
    secrets_found = {what: sum(t.count(value) for t in texts) for what, value in _secrets(env).items() if value}

    by_kind: Counter[str] = Counter()
    for counts in faults.values():
        by_kind.update(counts)
    lines = [
        f"reliability soak: seed {SEED}, {len(keys)} weddings x {ROUNDS} rounds, fault rate {RATE:g} per request "
        f"({RATE * 1.5:g} per PostgreSQL connection), {time.monotonic() - started:.0f} s",
        "faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items()))
        + f" (total {sum(by_kind.values())})",
        *[f"  {name:8} {requests[name]:5} requests/connections, faults: "
          + (", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none") for name, c in faults.items()],
        f"runs: {len(runs)} ({run_ok} succeeded, {len(runs) - run_ok} failed and retried); failed steps: "
        + (", ".join(f"{k} {v}" for k, v in sorted(failures.items())) or "none") + "; step attempts retried by "
        "Dagster's retry policy: " + (", ".join(f"{k} {v}" for k, v in sorted(step_retries.items())) or "none"),
        "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) + ", never completed 0",
        "objects checked: " + ", ".join(f"{k} {v}" for k, v in sorted(report.objects_checked.items()))
        + f"; catalogue copies checked {report.copies_checked}; corrupt or partial {len(report.problems)}; "
          f"unfinished multipart uploads {report.multipart_uploads}; vault temp files {report.vault_temp_files}; "
          f"azure uncommitted-only blobs {report.uncommitted_blobs}; s3 extra identical versions "
          f"{report.s3_extra_versions}",
        "secrets found: " + str(sum(secrets_found.values())) + " ("
        + ", ".join(f"{k} {v}" for k, v in secrets_found.items()) + f") in {len(texts)} log texts",
    ]
    lines += ["failure messages (a sample):", *[f"  {m}" for m in sorted(set(messages))[:12]]]
    summary = "\n".join(lines)
    with capfd.disabled():
        print("\n" + summary)
    (tmp_path.parent / "reliability-summary.txt").write_text(summary + "\n")
    assert report.ok(), "\n".join(report.problems[:20])
    assert sum(by_kind.values()) > 0 and outcomes["failed, then completed by retry"] > 0, summary
    assert sum(secrets_found.values()) == 0, secrets_found
