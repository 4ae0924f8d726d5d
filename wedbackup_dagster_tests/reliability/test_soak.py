"""The seeded soak (`make reliability`): many weddings backed up through the real Dagster pipeline, over
several rounds, with every provider and the source / scratch / restore-target PostgreSQL behind a fault
proxy. Each round has four phases, each through its real Dagster job: backup (`backup_weddings`, which
verifies too), verification again (`reverify_weddings`), restores into new databases from each provider in
turn (`restore_wedding`) and one erasure (`erase_wedding`). Failed work is run again (bounded) until done.
The end state must be whole: every wedding backed up to the vault and three providers and restored from
one of them; every object at every provider a complete archive under its own hash that opens with its
wedding's key; every restore all-or-nothing and equal to its manifest; nothing left of an erased wedding;
no unfinished upload; catalogue and storage in agreement; no secret in anything the soak logged. Prints a
summary (faults by kind and phase, runs, outcomes) and writes it as text and JSON.

Knobs (environment): WEDBACKUP_SOAK_SEED, _WEDDINGS, _ROUNDS (at least this many), _FAULTS (then more
rounds until this many faults were injected), _RATE, _RESTORES (per round), _BATCH (weddings per run;
0: all), _MAX_RUNS (per phase and round), _BUDGET (seconds). WEDBACKUP_RELIABILITY_LONG=1 (`make
reliability LONG=1`) changes the defaults to the long run's: 24 weddings, rate 0.15, runs of 4 weddings
(each run again up to 20 times a round), 6 restores a round, rounds until 1,000 faults.
WEDBACKUP_RELIABILITY_OUT: the folder for soak-summary.txt / .json (default: pytest's base temp folder)."""
from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from wedbackup_dagster.shared import resources
from wedbackup_dagster.backups.launch import register_partitions, run_job_for
from wedbackup_dagster.backups.restore_job import TARGET_DSN_VARIABLE
from wedbackup_dagster.dev import demo_data
from wedbackup_dagster.core.postgres import load_snapshot as restore
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.storage.providers import ensure_targets
from wedbackup_dagster.core.formats.snapshot_stream import Manifest
from wedbackup_dagster.definitions import defs

from .audit import audit, direct_replicas
from .conftest import fault_proxies, via
from .faultproxy import FaultSchedule

pytestmark = [pytest.mark.reliability, pytest.mark.stack, pytest.mark.slow]

LONG = os.environ.get("WEDBACKUP_RELIABILITY_LONG", "").strip() not in ("", "0")


def _knob(name: str, short: str, long: str) -> str:
    return os.environ.get(f"WEDBACKUP_SOAK_{name}", long if LONG else short)


SEED = int(_knob("SEED", "9", "9"))
WEDDINGS = int(_knob("WEDDINGS", "20", "24"))
ROUNDS = int(_knob("ROUNDS", "2", "2"))  # at least this many rounds ...
FAULTS = int(_knob("FAULTS", "0", "1000"))  # ... and then more, until this many faults were injected
RATE = float(_knob("RATE", "0.06", "0.15"))
RESTORES = int(_knob("RESTORES", "2", "6"))  # restores into a new database per round
# Weddings per run (0: all in one). A step failing for one wedding skips the later steps of the whole run,
# so at the long run's fault rate a run of every wedding would hardly ever reach its verification.
BATCH = int(_knob("BATCH", "0", "4"))
TIME_BUDGET = float(_knob("BUDGET", "900", "5400"))  # seconds for the whole soak
MAX_ROUNDS = 200
# Runs of one phase in one round (and attempts of one restore or erasure). At the long run's rate the 9 MiB
# wedding needs many: its snapshot, uploads and verification each take several connections and requests.
MAX_RUNS_PER_ROUND = int(_knob("MAX_RUNS", "8", "20"))
RESTORE_FROM = ("s3", "gcs", "azure", "vault")  # restores take their copy from each in turn
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


class Tally:
    """What the soak did and saw: runs, failed steps, outcomes, faults per phase."""

    def __init__(self, proxies):  # noqa: ANN001
        self.proxies = proxies
        self.outcomes: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.phase_faults: dict[str, Counter[str]] = {}
        self.runs: list[str] = []
        self.messages: list[str] = []
        self.run_ok = 0

    def faults(self) -> Counter[str]:
        by_kind: Counter[str] = Counter()
        for proxy in self.proxies.values():
            by_kind.update(proxy.counts)
        return by_kind

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Faults injected while the block runs are counted as this phase's."""
        before = self.faults()
        try:
            yield
        finally:
            self.phase_faults.setdefault(name, Counter()).update(self.faults() - before)

    def record(self, run_id: str, success: bool, failures: list[str]) -> None:
        self.runs.append(run_id)
        self.run_ok += success
        for failure in failures:
            assert failure.strip(), "a failed step must say what failed"
            self.failures[failure.split(":", 1)[0]] += 1
            lines_of = failure.splitlines()
            self.messages.extend(line.strip()[:220] for line in lines_of[:1] + [
                line for line in lines_of[1:] if "wedding" in line or "caused by" in line])

    def done(self, what: str, attempt: int, n: int = 1) -> None:
        self.outcomes[f"{what}: first time" if attempt == 1 else f"{what}: failed, then completed by retry"] += n


def _now(cat: Catalogue):  # noqa: ANN202
    with cat.connect() as conn:
        return conn.execute("SELECT now() AS t").fetchone()["t"]


def _verified_since(cat: Catalogue, wedding: str, since) -> bool:  # noqa: ANN001
    backup = cat.latest_backup(wedding)
    with cat.connect() as conn:
        return backup is not None and conn.execute(
            "SELECT count(*) AS n FROM wedbackup.restores WHERE backup_id = %s AND ok AND at >= %s",
            (backup.id, since)).fetchone()["n"] > 0


def _run_until_done(tally: Tally, job: str, keys: list[str], instance, done, what: str,  # noqa: ANN001
                    deadline: float) -> list[str]:
    """Run `job` over the weddings not `done` yet, again and again (bounded); the ones never done."""
    pending, attempt = list(keys), 0
    while pending and attempt < MAX_RUNS_PER_ROUND and time.monotonic() < deadline:
        attempt += 1
        size = BATCH or len(pending)
        for batch in (pending[i:i + size] for i in range(0, len(pending), size)):
            for result in run_job_for(job, batch, instance=instance):
                tally.record(result.run_id, result.success, result.failures)
        still = [w for w in pending if not done(w)]
        tally.done(what, attempt, len(pending) - len(still))
        pending = still
    return pending


def _why(deadline: float) -> str:
    return " (the time budget ran out)" if time.monotonic() > deadline else f" after {MAX_RUNS_PER_ROUND} runs"


def _step_failures(result) -> list[str]:  # noqa: ANN001
    """Each failed step's own words; for an error that is not ours (a bare driver error), also its cause."""
    from wedbackup_dagster.backups.launch import _failure_text

    out = []
    for event in result.all_events:
        if event.event_type_value != "STEP_FAILURE":
            continue
        text, error = _failure_text(event), event.step_failure_data.error
        while error is not None and error.cause is not None:
            error = error.cause
            text += f"\n  caused by {error.cls_name}: {error.message.strip()[:300]}"
        out.append(text)
    return out


def _public_tables(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = 'public'").fetchone()[0]


def _restore_one(tally: Tally, instance, cat: Catalogue, stack, proxy, monkeypatch, wedding: str,  # noqa: ANN001
                 provider: str) -> None:
    """Restore the wedding into a new database through the PostgreSQL proxy until it succeeds. Every attempt
    is all-or-nothing (a failed one left no table, or — a lost COMMIT answer — a complete restore), and the
    successful one holds exactly its backup's manifest, checked straight at the server."""
    job = defs.resolve_job_def("restore_wedding")
    admin = stack.dsn("postgres")
    for attempt in range(1, MAX_RUNS_PER_ROUND + 1):
        name = f"soakr_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        direct = stack.dsn(name)
        try:
            monkeypatch.setenv(TARGET_DSN_VARIABLE, via(direct, proxy))
            result = job.execute_in_process(instance=instance, raise_on_error=False, run_config={"ops": {
                "restore_partition": {"config": {"partition": wedding, "mode": "target", "provider": provider}}}})
            tally.record(result.run_id, result.success, _step_failures(result))
            if not result.success:
                if _public_tables(direct):
                    # Only a restore whose COMMIT answer was lost may leave tables: then all of it.
                    restore.verify_restored(direct, Manifest.from_dict(cat.require_latest_backup(wedding).manifest)
                                            ).raise_if_failed()
                    tally.outcomes["restore: failed attempt had committed (answer lost), complete"] += 1
                continue
            sha = result.output_for_node("restore_partition")["archive_sha256"]
            with cat.connect() as conn:
                manifest = conn.execute("SELECT manifest FROM wedbackup.backups WHERE partition = %s AND "
                                        "archive_sha256 = %s", (wedding, sha)).fetchone()["manifest"]
            restore.verify_restored(direct, Manifest.from_dict(manifest)).raise_if_failed()
            tally.done("restore", attempt)
            return
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)))
    raise AssertionError(f"wedding {wedding}: restore from {provider} not done after {MAX_RUNS_PER_ROUND} attempts")


def _erase_one(tally: Tally, instance, wedding: str) -> None:  # noqa: ANN001
    job = defs.resolve_job_def("erase_wedding")
    for attempt in range(1, MAX_RUNS_PER_ROUND + 1):
        result = job.execute_in_process(instance=instance, raise_on_error=False, run_config={"ops": {
            "erase_wedding_backups": {"config": {"partition": wedding, "requested_by": "reliability soak"}}}})
        tally.record(result.run_id, result.success, _step_failures(result))
        if result.success:
            tally.done("erasure", attempt)
            return
    raise AssertionError(f"wedding {wedding}: erasure not complete after {MAX_RUNS_PER_ROUND} attempts")


def test_soak_under_random_provider_and_database_faults(stack, make_database, tmp_path, monkeypatch, capfd,
                                                         s3_bucket, gcs_bucket, azure_container, s3_client,
                                                         gcs_client, azure_service):
    started = time.monotonic()
    deadline = started + TIME_BUDGET
    env = stack.env()
    source, catalogue = make_database(), make_database()
    scratch_prefix = f"{restore.SCRATCH_PREFIX}soak{uuid.uuid4().hex[:6]}_"
    monkeypatch.setattr(restore, "SCRATCH_PREFIX", scratch_prefix)  # this soak's scratch databases, by name
    monkeypatch.setattr(resources, "make_replica", _tuned_make_replica(resources.make_replica))
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
        # Restores make few connections: their targets get a proxy of their own, hit more often and earlier.
        "postgres_restore": FaultSchedule(seed=SEED + 4, rate=min(1.0, RATE * 4), weights={"reset": 2, "stall": 1},
                                          stall_seconds=3, tcp_after=(0, 96 << 10)),
    }
    cat = Catalogue(catalogue)
    erased: list[str] = []
    unfinished: list[str] = []  # a phase that could not finish: reported after the summary is written
    never: list[str] = []  # the weddings it left
    round_no = 0
    with fault_proxies(env | settings, schedules) as (proxies, routed), dg.instance_for_test() as instance:
        for name, value in routed.items():
            monkeypatch.setenv(name, value)
        tally = Tally(proxies)
        keys = [k for k in register_partitions(instance, source) if k != "platform"]
        while round_no < ROUNDS or (sum(tally.faults().values()) < FAULTS and round_no < MAX_ROUNDS):
            if time.monotonic() > deadline or unfinished:
                break
            round_no += 1
            since = _now(cat)
            with tally.phase("backup"):
                left = _run_until_done(tally, "backup_weddings", keys, instance,
                                       lambda w: _complete(cat, w, since), "backup", deadline)
            if left:
                unfinished.append(f"round {round_no}: weddings {left} not backed up{_why(deadline)}")
                never += left
                break
            since = _now(cat)
            with tally.phase("verification"):
                left = _run_until_done(tally, "reverify_weddings", keys, instance,
                                       lambda w: _verified_since(cat, w, since), "verification", deadline)
            if left:
                unfinished.append(f"round {round_no}: weddings {left} not verified again{_why(deadline)}")
                never += left
                break
            with tally.phase("restore"):
                for i in range(RESTORES):
                    n = (round_no - 1) * RESTORES + i
                    _restore_one(tally, instance, cat, stack, proxies["postgres_restore"], monkeypatch,
                                 keys[n % len(keys)], RESTORE_FROM[n % len(RESTORE_FROM)])
            candidates = [k for k in keys if int(k) not in BIG]
            if len(keys) > WEDDINGS // 2 and candidates:
                victim = max(candidates, key=int)
                with tally.phase("erasure"):
                    _erase_one(tally, instance, victim)
                keys.remove(victim)
                erased.append(victim)
        faults = {name: dict(p.counts) for name, p in proxies.items()}
        requests = {name: p.requests for name, p in proxies.items()}
        entries = [e for run_id in tally.runs for e in instance.all_logs(run_id)]
        logs = [str(e) for e in entries]
        step_retries = Counter(e.step_key for e in entries
                               if e.dagster_event and e.dagster_event.event_type_value == "STEP_UP_FOR_RETRY")

    report = audit(engine, direct_replicas(engine, s3_client, gcs_client, azure_service),
                   scratch_prefix=scratch_prefix, admin_dsn=env["WEDBACKUP_SCRATCH_DSN"], erased=tuple(erased))
    captured = capfd.readouterr()
    texts = logs + [captured.out, captured.err]
    with cat.connect() as conn:
        texts += [str(r) for r in conn.execute("SELECT detail::text FROM wedbackup.restores UNION ALL "
                                               "SELECT detail::text FROM wedbackup.audit UNION ALL "
                                               "SELECT detail::text FROM wedbackup.erasures").fetchall()]
    secrets_found = {what: sum(t.count(value) for t in texts) for what, value in _secrets(env).items() if value}

    by_kind = tally.faults()
    seconds = time.monotonic() - started
    figures = {
        "seed": SEED, "weddings": WEDDINGS, "rounds": round_no, "fault_rate": RATE, "seconds": round(seconds),
        "faults_total": sum(by_kind.values()), "faults_by_kind": dict(sorted(by_kind.items())),
        "faults_by_proxy": faults, "requests_by_proxy": requests,
        "faults_by_phase": {p: dict(sorted(c.items())) for p, c in tally.phase_faults.items()},
        "runs": len(tally.runs), "runs_succeeded": tally.run_ok, "failed_steps": dict(tally.failures),
        "step_retries": dict(step_retries), "outcomes": dict(sorted(tally.outcomes.items())),
        "erased_weddings": len(erased), "objects_checked": dict(report.objects_checked),
        "key_backups_seen": dict(report.key_backups), "copies_checked": report.copies_checked,
        "corrupt_or_partial": len(report.problems), "multipart_uploads": report.multipart_uploads,
        "vault_temp_files": report.vault_temp_files, "azure_uncommitted_blobs": report.uncommitted_blobs,
        "s3_extra_versions": report.s3_extra_versions, "secrets_found": sum(secrets_found.values()),
        "secrets_by_kind": secrets_found, "log_texts": len(texts),
    }
    lines = [
        *[f"UNFINISHED: {u}" for u in unfinished],
        f"reliability soak{' (long)' if LONG else ''}: seed {SEED}, {WEDDINGS} weddings x {round_no} rounds, fault "
        f"rate {RATE:g} per request ({RATE * 1.5:g} per PostgreSQL connection, {min(1.0, RATE * 4):g} per restore "
        f"target connection), {seconds:.0f} s",
        "faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items()))
        + f" (total {sum(by_kind.values())})",
        *[f"  {name:8} {requests[name]:5} requests/connections, faults: "
          + (", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none") for name, c in faults.items()],
        "faults by phase: " + "; ".join(f"{p} {sum(c.values())} (" + ", ".join(
            f"{k} {v}" for k, v in sorted(c.items())) + ")" for p, c in tally.phase_faults.items()),
        f"runs: {len(tally.runs)} ({tally.run_ok} succeeded, {len(tally.runs) - tally.run_ok} failed and retried); "
        "failed steps: " + (", ".join(f"{k} {v}" for k, v in sorted(tally.failures.items())) or "none")
        + "; step attempts retried by Dagster's retry policy: "
        + (", ".join(f"{k} {v}" for k, v in sorted(step_retries.items())) or "none"),
        "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.outcomes.items()))
        + f", never completed {len(never)}",
        "objects checked: " + ", ".join(f"{k} {v}" for k, v in sorted(report.objects_checked.items()))
        + f"; catalogue copies checked {report.copies_checked}; erased weddings checked {report.erased_checked}; "
          f"corrupt or partial {len(report.problems)}; "
          f"unfinished multipart uploads {report.multipart_uploads}; vault temp files {report.vault_temp_files}; "
          f"azure uncommitted-only blobs {report.uncommitted_blobs}; s3 extra identical versions "
          f"{report.s3_extra_versions}",
        "secrets found: " + str(sum(secrets_found.values())) + " ("
        + ", ".join(f"{k} {v}" for k, v in secrets_found.items()) + f") in {len(texts)} log texts",
    ]
    lines += ["failure messages (a sample):", *[f"  {m}" for m in sorted(set(tally.messages))[:12]]]
    summary = "\n".join(lines)
    with capfd.disabled():
        print("\n" + summary)
    out = Path(os.environ.get("WEDBACKUP_RELIABILITY_OUT") or tmp_path.parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak-summary.txt").write_text(summary + "\n")
    (out / "soak-summary.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    assert not unfinished, f"{unfinished[0]}\n{summary}"
    assert report.ok(), "\n".join(report.problems[:20])
    assert sum(by_kind.values()) >= max(FAULTS, 1), f"only {sum(by_kind.values())} faults in the time budget\n{summary}"
    assert any("retry" in k for k in tally.outcomes), summary
    assert set(tally.phase_faults) >= {"backup", "verification", "restore"}, summary
    assert sum(secrets_found.values()) == 0, secrets_found
