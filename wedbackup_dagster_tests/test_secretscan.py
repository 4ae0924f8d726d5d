"""The secrets scanner (wedbackup_dagster_tests/secretscan.py) and the session's secrets guard (secrets_guard.py): planted
secrets are found in text, files, SQLite and PostgreSQL (text, jsonb and bytea columns, odd table names),
named by where and which, never by value; and a test session that leaks one fails. So the scan that
ends every `make test` cannot pass by finding nothing to look at."""
from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import textwrap
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from wedbackup_dagster_tests.secretscan import MIN_SECRET, SecretScanner, scan_server, secret_parts

REPO = Path(__file__).resolve().parents[1]
MASTER = base64.b64encode(bytes(range(32))).decode()
SECRETS = {
    "WEDBACKUP_SOURCE_DSN": "postgresql://app:s3cr3t-Pa%24%24word@db.example:5432/platform",
    "WEDBACKUP_MASTER_KEY": f"prod-2:{MASTER}, prod-1:{base64.b64encode(bytes(32)).decode()}",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
    "WEDBACKUP_AZURE_CONNECTION_STRING": "BlobEndpoint=https://acct.blob.core.windows.net/;"
                                         "SharedAccessSignature=sv=2022-11-02&ss=b&sig=Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA%3D%3D",
}


@pytest.fixture(autouse=True)
def _planted_files_removed(tmp_path):
    # Files planted here hold (fake) secrets: the session's own guard scans pytest's temporary directory.
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def scanner() -> SecretScanner:
    return SecretScanner(secret_parts(SECRETS))


def test_secret_parts_are_the_values_and_the_pieces_that_leak_alone():
    parts = secret_parts(SECRETS)
    assert parts["WEDBACKUP_SOURCE_DSN password"] == "s3cr3t-Pa$$word"
    assert parts["WEDBACKUP_MASTER_KEY #1 (prod-2)"] == MASTER
    assert parts["WEDBACKUP_MASTER_KEY #1 (prod-2) as hex"] == bytes(range(32)).hex()
    assert "sig=" in parts["WEDBACKUP_AZURE_CONNECTION_STRING SharedAccessSignature"]
    assert parts["WEDBACKUP_AZURE_CONNECTION_STRING SAS signature"].startswith("Zm9v")
    assert "AWS_ACCESS_KEY_ID" not in parts  # an identifier, not a secret
    assert all(len(v) >= MIN_SECRET for v in parts.values())


def test_text_findings_name_the_secret_and_place_never_the_value():
    s = scanner()
    assert s.scan_text("x", "nothing to see: postgresql://app:***@db.example/platform, sig=***") == []
    found = s.scan_text("run log", f"connecting with password s3cr3t-Pa%24%24word, key {MASTER[:-1]}")
    # The URL-encoded password counts; a master key cut short does not.
    assert [str(f) for f in found] == ["WEDBACKUP_SOURCE_DSN password found in run log"]
    assert "s3cr3t" not in str(found)
    assert s.scan_text("alert", "GET /c/b?sv=1&sig=QUJDREVGR0hJSktMTU5PUFFS")[0].secret.startswith("a SAS token")
    hexed = s.scan_text("dump", bytes(range(32)).hex().encode())
    assert [f.secret for f in hexed] == ["WEDBACKUP_MASTER_KEY #1 (prod-2) as hex"]


def test_files_are_read_in_blocks_without_missing_a_secret_on_a_boundary(tmp_path):
    s = scanner()
    secret = SECRETS["AWS_SECRET_ACCESS_KEY"]
    big = tmp_path / "deep" / "compute.log"
    big.parent.mkdir()
    big.write_bytes(b"x" * ((1 << 20) - 10) + secret.encode() + b"y" * 100)
    (tmp_path / "clean.txt").write_text("all quiet")
    (tmp_path / "link").symlink_to(big)  # not followed: found once, at its real path
    found, files = s.scan_tree(tmp_path)
    assert files == 2
    assert [(f.where, f.secret) for f in found] == [(str(big), "AWS_SECRET_ACCESS_KEY")]


def test_a_dagster_style_sqlite_event_log_is_searched(tmp_path):
    db = tmp_path / "runs.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE event_logs (id integer primary key, event text)")
        conn.execute("INSERT INTO event_logs (event) VALUES (?)",
                     (json.dumps({"message": f"step failed: AccountKey missing; SAS {SECRETS['WEDBACKUP_AZURE_CONNECTION_STRING'].split('=', 2)[2]}"}),))
    found, _ = scanner().scan_tree(tmp_path)
    assert {f.secret for f in found} >= {"WEDBACKUP_AZURE_CONNECTION_STRING SAS signature"}


def test_every_text_json_and_bytea_column_of_a_database_is_searched(make_database):
    dsn = make_database()
    weird = 'we"ird; DROP TABLE x'
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA wedbackup")
        conn.execute("CREATE TABLE wedbackup.audit (id int, detail jsonb, note varchar(200), blob bytea, n int)")
        conn.execute(sql.SQL("CREATE TABLE wedbackup.{} ({} text)").format(sql.Identifier(weird),
                                                                           sql.Identifier("col'umn")))
        conn.execute("CREATE TABLE public.elsewhere (t text)")
        conn.execute("INSERT INTO wedbackup.audit VALUES (1, %s, 'fine', %s, 2), (2, '{}', %s, NULL, 3)",
                     (json.dumps({"dsn": SECRETS["WEDBACKUP_SOURCE_DSN"]}), MASTER.encode(), "ok"))
        conn.execute(sql.SQL("INSERT INTO wedbackup.{} VALUES (%s)").format(sql.Identifier(weird)),
                     (f"key={SECRETS['AWS_SECRET_ACCESS_KEY']}",))
        conn.execute("INSERT INTO public.elsewhere VALUES (%s)", (SECRETS["AWS_SECRET_ACCESS_KEY"],))
    s = scanner()
    found, searched = s.scan_database(dsn, label="cat", schemas=["wedbackup"])
    got = {(f.where, f.secret) for f in found}
    assert ("database cat, wedbackup.audit.detail", "WEDBACKUP_SOURCE_DSN password") in got
    assert ("database cat, wedbackup.audit.blob", "WEDBACKUP_MASTER_KEY #1 (prod-2)") in got
    assert (f"database cat, wedbackup.{weird}.col'umn", "AWS_SECRET_ACCESS_KEY") in got
    assert not any("elsewhere" in w or "note" in w for w, _ in got)
    assert searched == 4  # detail, note, blob, col'umn: not the int columns
    everywhere, _ = s.scan_database(dsn, label="cat")
    assert ("database cat, public.elsewhere.t", "AWS_SECRET_ACCESS_KEY") in {(f.where, f.secret) for f in everywhere}
    # Across the server, by database name.
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    admin = psycopg.conninfo.make_conninfo(dsn, dbname="postgres")
    on_server, _ = scan_server(admin, s, databases=[name], schemas=["wedbackup"])
    assert {f.where for f in on_server} == {w.replace("database cat", f"database {name}") for w, _ in got}


def test_a_session_that_leaks_a_stack_secret_fails_and_says_where(stack, pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    pytester.makepyfile(test_leaky=textwrap.dedent("""
        from wedbackup_dagster.dev.stack import Stack

        def test_prints_the_database_password():
            print("connecting as", Stack.default().local_secrets()["db_password"])

        def test_quiet(capsys):
            print("postgresql://wedbackup:***@127.0.0.1/x")
            assert "***" in capsys.readouterr().out
    """))
    args = ["-p", "wedbackup_dagster_tests.secrets_guard", "-p", "no:cacheprovider", "-q"]
    leaky = pytester.runpytest_subprocess(*args, timeout=300)
    out = leaky.stdout.str()
    assert leaky.ret == 1, out
    assert "2 passed" in out and "SECRETS FOUND: 1" in out
    assert "test_leaky.py::test_prints_the_database_password" in out and "password" in out
    assert stack.local_secrets()["db_password"] not in out

    pytester.makepyfile(test_leaky="def test_quiet():\n    print('nothing secret')\n")
    clean = pytester.runpytest_subprocess(*args, timeout=300)
    assert clean.ret == 0, clean.stdout.str()
    assert "secrets scan: 0 secrets found" in clean.stdout.str()


def test_under_xdist_a_leak_only_a_worker_saw_fails_the_session(stack, pytester, monkeypatch):
    """`make test` runs two pytest-xdist workers: output a test read with capsys is scanned in its worker, never
    reaches the controller's reports, and must still fail the whole session, named."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    pytester.makepyfile(test_leaky=textwrap.dedent("""
        from wedbackup_dagster.dev.stack import Stack

        def test_reads_the_database_password(capsys):
            print("connecting as", Stack.default().local_secrets()["db_password"])
            assert "connecting as" in capsys.readouterr().out

        def test_prints_the_database_password():
            print("connecting as", Stack.default().local_secrets()["db_password"])

        def test_quiet():
            print("nothing secret")
    """))
    args = ["-p", "wedbackup_dagster_tests.secrets_guard", "-p", "no:cacheprovider", "-q", "-n", "2"]
    leaky = pytester.runpytest_subprocess(*args, timeout=300)
    out = leaky.stdout.str()
    assert leaky.ret == 1, out
    # Each leak once: the printed one from the report the controller received (its worker leaves reports to it),
    # the one read with capsys from the worker's own scan.
    assert "3 passed" in out and "SECRETS FOUND: 2" in out, out
    assert "test_leaky.py::test_reads_the_database_password" in out
    assert "test_leaky.py::test_prints_the_database_password" in out
    assert stack.local_secrets()["db_password"] not in out


def test_the_guard_reads_every_dagster_test_instance_before_it_is_deleted(stack):
    import dagster as dg

    from wedbackup_dagster_tests import secrets_guard

    secret = stack.local_secrets()["s3_secret"]

    @dg.op
    def leaky(context):
        context.log.info(f"uploading with {secret}")  # into the run's event log only: the console is quiet

    @dg.job
    def leaky_job():
        leaky()

    before = set(secrets_guard.GUARD.findings)
    with dg.instance_for_test() as instance:
        root = instance.root_directory
        leaky_job.execute_in_process(instance=instance, run_config={
            "loggers": {"console": {"config": {"log_level": "CRITICAL"}}}})
    new = set(secrets_guard.GUARD.findings) - before
    # Take the planted finding back out, so this session's own guard still speaks only of real leaks.
    secrets_guard.GUARD.findings -= new
    assert new, "the guard did not scan the Dagster instance"
    assert all(f.secret == "AWS_SECRET_ACCESS_KEY" and root in f.where for f in new)
    assert any(f.where.startswith("Dagster instance of ") for f in new)
    assert not os.path.exists(root)


def test_more_secrets_than_a_select_can_probe_are_still_found(make_database):
    """2,000 wedding keys (a 2,000-wedding catalogue) make more probes than PostgreSQL's 1,664 columns: the
    table is streamed and searched instead of failing the scan."""
    import secrets as random_secrets

    many = {f"wedding key {i}": random_secrets.token_hex(16) for i in range(2000)}
    dsn = make_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA wedbackup")
        conn.execute("CREATE TABLE wedbackup.audit (id int, detail text)")
        conn.execute("INSERT INTO wedbackup.audit VALUES (1, 'fine'), (2, %s)", (f"x{many['wedding key 1234']}y",))
    found, searched = SecretScanner(many).scan_database(dsn, label="cat", schemas=["wedbackup"])
    assert searched == 1 and {f.secret for f in found} == {"wedding key 1234"}
