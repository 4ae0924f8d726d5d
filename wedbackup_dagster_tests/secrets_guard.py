"""Pytest plugin (loaded by conftest.py): after the whole session, no secret of the local stack — the
master key, the S3 secret, the Azure account key or any SAS token, the database password — may appear in
anything the suite wrote. Searched with wedbackup_dagster_tests/secretscan.py:

* every Dagster instance a test made (`dg.instance_for_test`: its SQLite event log, run storage and
  compute logs), just before the instance's temporary directory is deleted;
* every catalogue database a test made (`make_database`), just before it is dropped (also for the raw bytes
  of its own wedding keys), and at the end every database on the test PostgreSQL (schema `wedbackup`, and
  Dagster's PostgreSQL storage tables if any);
* every file under pytest's temporary directory, the stack's DAGSTER_HOME and the stack's logs;
* every test's captured stdout, stderr and log records, including what tests read with capsys/capfd.

A finding fails the session (exit status 1) and is listed by where it was and which secret it was,
never by value. `WEDBACKUP_SECRETS_GUARD=0` turns it off (e.g. while debugging a single test)."""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from wedbackup_dagster_tests.secretscan import Finding, SecretScanner, scan_server, secret_parts, wedding_key_secrets

DAGSTER_TABLES = ("event_logs", "runs", "run_tags", "job_ticks", "kvs", "secondary_indexes")


class Guard:
    def __init__(self) -> None:
        self.findings: set[Finding] = set()
        self.counts = {"outputs": 0, "dagster instances": 0, "databases": 0, "files": 0}
        self._scanner: SecretScanner | None = None
        self._env: dict[str, str] = {}
        self._loaded = False
        self.current_test = "the session"
        self.server_scanned = False
        self.in_worker = False  # a pytest-xdist worker: its test reports are scanned by the controller
        self._lock = threading.Lock()

    @property
    def scanner(self) -> SecretScanner | None:
        """The stack's secrets, once they exist (the session's `stack` fixture makes them on first up)."""
        if not self._loaded:
            from wedbackup_dagster.dev.stack import Stack

            stack = Stack.default()
            if stack.secrets_file.exists():
                self._env = stack.env()
                self._scanner = SecretScanner(secret_parts(self._env))
                self._loaded = True
        return self._scanner

    def add(self, findings: list[Finding]) -> None:
        with self._lock:
            self.findings.update(findings)

    def text(self, where: str, data: Any) -> None:
        if self.scanner is not None and data:
            self.counts["outputs"] += 1
            self.add(self.scanner.scan_text(where, data if isinstance(data, (str, bytes)) else str(data)))

    def tree(self, root: Path, what: str) -> None:
        if self.scanner is not None and root.exists():
            found, files = self.scanner.scan_tree(root)
            self.counts["files"] += files
            self.add([Finding(f"{what}: {f.where}", f.secret) for f in found])

    def database(self, dsn: str, what: str) -> None:
        if self.scanner is not None:
            scanner = self.scanner.with_secrets(wedding_key_secrets(dsn, self._env))  # a catalogue's own keys
            found, _ = scanner.scan_database(dsn, label=what, schemas=["wedbackup"], tables=DAGSTER_TABLES)
            self.counts["databases"] += 1
            self.add(found)


GUARD = Guard()


def enabled() -> bool:
    return os.environ.get("WEDBACKUP_SECRETS_GUARD", "1") != "0"


def scan_database_before_drop(dsn: str, name: str) -> None:
    """Called by conftest's make_database before it drops a test's database."""
    if enabled():
        GUARD.database(dsn, f"{name} (made by {GUARD.current_test})")


def _wrap_instance_for_test() -> None:
    import dagster as dg

    original = dg.instance_for_test
    if getattr(original, "_secrets_guard", False):
        return

    @contextlib.contextmanager
    def instance_for_test(*args, **kwargs):
        with original(*args, **kwargs) as instance:
            try:
                yield instance
            finally:
                # Before the temporary directory goes: event log, runs, compute logs, schedules.
                GUARD.counts["dagster instances"] += 1
                GUARD.tree(Path(instance.root_directory), f"Dagster instance of {GUARD.current_test}")

    instance_for_test._secrets_guard = True  # type: ignore[attr-defined]
    dg.instance_for_test = instance_for_test


def _wrap_readouterr() -> None:
    from _pytest.capture import CaptureFixture

    original = CaptureFixture.readouterr
    if getattr(original, "_secrets_guard", False):
        return

    def readouterr(self):  # noqa: ANN001 - pytest's own signature
        result = original(self)
        GUARD.text(f"output of {GUARD.current_test} (read by the test)", f"{result.out}\n{result.err}")
        return result

    readouterr._secrets_guard = True  # type: ignore[attr-defined]
    CaptureFixture.readouterr = readouterr


def pytest_configure(config: pytest.Config) -> None:
    GUARD.in_worker = hasattr(config, "workerinput")
    if enabled():
        _wrap_instance_for_test()
        _wrap_readouterr()


def pytest_runtest_setup(item: pytest.Item) -> None:
    GUARD.current_test = item.nodeid


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not enabled() or GUARD.in_worker:  # the controller receives the same report and scans it once
        return
    for name, content in (("stdout", report.capstdout), ("stderr", report.capstderr), ("log", report.caplog)):
        GUARD.text(f"captured {name} of {report.nodeid}", content)  # each phase repeats the earlier ones


def scan_database_server(stack: Any) -> None:
    """Every database on the stack's PostgreSQL (schema wedbackup, Dagster's tables). Called by the `stack`
    fixture before it stops a stack it started, and at the end of the session if it has not run yet."""
    scanner = GUARD.scanner
    if not enabled() or scanner is None or GUARD.server_scanned:
        return
    import psycopg

    try:
        found, _ = scan_server(stack.dsn("postgres"), scanner, schemas=["wedbackup"], tables=DAGSTER_TABLES)
    except psycopg.OperationalError:
        return  # not running: said in the summary
    GUARD.add(found)
    GUARD.counts["databases"] += 1
    GUARD.server_scanned = True


def final_scan(session: pytest.Session) -> None:
    scanner = GUARD.scanner
    if scanner is None:
        return  # no stack, no secrets: nothing could leak
    from wedbackup_dagster.dev.stack import Stack

    stack = Stack.default()
    scan_database_server(stack)
    basetemp = session.config._tmp_path_factory.getbasetemp() if hasattr(session.config, "_tmp_path_factory") \
        else None
    if basetemp is not None:
        GUARD.tree(Path(basetemp), "pytest's temporary files")
    GUARD.tree(Path(stack.dagster_home), "DAGSTER_HOME")
    GUARD.tree(Path(stack.log_dir), "the local stack's logs")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist's controller, as a worker ends: what the worker's guard found and counted (the Dagster
    instances and outputs it scanned) joins this session's, reported and failing the run below."""
    shipped = getattr(node, "workeroutput", {}).get("secrets_guard")
    if shipped:
        GUARD.findings.update(shipped["findings"])
        for what, n in shipped["counts"].items():
            GUARD.counts[what] = GUARD.counts.get(what, 0) + n


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: the controller scans the server and the files, and reports
        if enabled():
            workeroutput["secrets_guard"] = {"findings": [str(f) for f in GUARD.findings],
                                             "counts": dict(GUARD.counts)}
        return
    if not enabled() or GUARD.scanner is None:
        return
    final_scan(session)
    counts = ", ".join(f"{n} {what}" for what, n in GUARD.counts.items())
    if not GUARD.server_scanned:
        counts += "; the database server was not running at the end, so not scanned as a whole"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if GUARD.findings:
        lines = [f"\nSECRETS FOUND: {len(GUARD.findings)} (scanned {counts}; values not shown)"]
        lines += [f"  - {f}" for f in sorted(GUARD.findings, key=str)]
        if reporter is not None:
            reporter.write_line("\n".join(lines), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif reporter is not None:
        reporter.write_line(f"\nsecrets scan: 0 secrets found (scanned {counts})")
