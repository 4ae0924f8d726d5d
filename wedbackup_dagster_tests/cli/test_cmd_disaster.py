"""`wedbackup restore --all` (through the `restore_platform` job) and `wedbackup dr plan`, against the real stack
and a throw-away Dagster home (the `cli_env` fixture of cli/test_app.py): the whole demo platform from S3 alone
with the vault gone, a run killed with SIGKILL part-way and resumed, and the runbooks of each scenario."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from wedbackup_dagster.cli.app import main
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.dev.compare import table_sums
from wedbackup_dagster_tests.cli.test_app import cli_env  # noqa: F401  (a fixture)

WORKTREE = Path(__file__).resolve().parents[2]


@pytest.fixture
def backed_up(cli_env, capsys):  # noqa: F811
    assert main(["backup", "--all"]) == 0  # every partition: vault, S3, GCS, Azure, verified
    capsys.readouterr()
    return {**cli_env, "expected": table_sums(cli_env["source"])}


def test_restore_all_from_s3_with_the_vault_gone(backed_up, make_database, capsys):
    shutil.rmtree(os.environ["WEDBACKUP_VAULT_DIR"])
    target = make_database()
    assert main(["restore", "--all", "--target-dsn", target, "--from", "s3", "--jobs", "2", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["complete"] and report["copies_used"] == {"s3": 6} and report["restored_now"] == 6
    assert set(report["phases"]) == {"download", "decrypt", "load", "check"}
    assert report["newest_point"] and report["oldest_point"] and report["rows"] > 0
    assert "restore --all: 6 of 6 weddings (100%)" in captured.err and "/min" in captured.err  # progress
    assert table_sums(target) == backed_up["expected"]
    password = target.split("@")[0].split(":")[-1]
    assert password not in captured.out + captured.err
    runs = dg.DagsterInstance.get().get_runs()
    run = next(r for r in runs if r.job_name == "restore_platform")
    assert password not in str(run.run_config) and target not in str(run.run_config)

    # Running it again into the now-full target is refused, naming what is there.
    assert main(["restore", "--all", "--target-dsn", target]) == 1
    assert "is not empty: " in capsys.readouterr().err
    # The source, however its DSN is written, is refused.
    other_spelling = backed_up["source"].replace("127.0.0.1", "localhost") + "?application_name=x"
    assert main(["restore", "--all", "--target-dsn", other_spelling]) == 1
    assert "is the live source database" in capsys.readouterr().err


def test_a_killed_restore_all_resumes_without_duplicates(backed_up, make_database, capsys):
    target = make_database()
    env = {**os.environ, "PYTHONPATH": str(WORKTREE)}
    proc = subprocess.Popen([sys.executable, "-m", "wedbackup_dagster.cli.app", "restore", "--all", "--target-dsn",
                             target, "--jobs", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    blocker = None
    try:
        deadline = time.monotonic() + 120
        with psycopg.connect(target, autocommit=True) as watch:
            while time.monotonic() < deadline and proc.poll() is None:
                made = watch.execute("SELECT to_regclass('wedbackup_restore.partitions')").fetchone()[0]
                n = made and watch.execute("SELECT count(*) FROM wedbackup_restore.partitions").fetchone()[0]
                if n and n >= 2:  # the platform and one wedding committed
                    break
                time.sleep(0.01)
            # Hold the next weddings back (they all write guests), then kill the run as a crash would.
            blocker = psycopg.connect(target)
            blocker.execute("LOCK TABLE public.guests IN ACCESS EXCLUSIVE MODE")
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            blocker.rollback()
            done = watch.execute("SELECT count(*) FROM wedbackup_restore.partitions").fetchone()[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        if blocker is not None:
            blocker.close()
    assert proc.returncode == -signal.SIGKILL
    # The platform and 6 weddings: killed after the platform and at least one wedding (weddings commit a batch
    # at a time), before the last.
    assert 2 <= done < 7, "the run was not stopped part-way"
    assert main(["restore", "--all", "--target-dsn", target]) == 1
    assert "unfinished restore --all" in capsys.readouterr().err
    assert main(["restore", "--all", "--target-dsn", target, "--resume", "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    # the killed run had deferred the platform's indexes and foreign keys: the resumed one read them again
    # from the platform's archive and built them
    assert "built the platform's indexes, foreign keys and triggers" in err
    assert report["complete"] and report["restored_before"] == done and report["restored_now"] == 6 - done
    assert table_sums(target) == backed_up["expected"]  # nothing twice, nothing missing


def test_dr_plan_per_scenario_names_missing_and_stale(backed_up, capsys):
    assert main(["dr", "plan", "--scenario", "source-lost"]) == 0
    out = capsys.readouterr().out
    assert "wedbackup restore --all --target-dsn" in out and "MISSING" not in out and "expected duration" in out

    assert main(["dr", "plan", "--scenario", "catalogue-lost", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert any(s.startswith("wedbackup catalogue rebuild --from ") for s in plan["steps"])
    assert plan["partitions"] == 6 and sum(plan["uses"].values()) == 6 and plan["estimate_seconds"] is not None

    # Wedding 3's copies survive only in the vault; wedding 2 has a newer backup no restore verified yet.
    catalogue = Catalogue(os.environ["WEDBACKUP_CATALOGUE_DSN"])
    try:
        with catalogue.connect() as conn:
            conn.execute("DELETE FROM wedbackup.copies c USING wedbackup.backups b WHERE b.id = c.backup_id "
                         "AND b.partition = '3' AND c.provider <> 'vault'")
    finally:
        catalogue.close()
    assert main(["backup", "--wedding", "2"]) == 0  # its copies are verified by that run: make it unverified
    catalogue = Catalogue(os.environ["WEDBACKUP_CATALOGUE_DSN"])
    try:
        newest = catalogue.latest_backup("2")
        with catalogue.connect() as conn:
            conn.execute("DELETE FROM wedbackup.restores WHERE backup_id = %s", (newest.id,))
            conn.execute("UPDATE wedbackup.copies SET verified_at = NULL WHERE backup_id = %s", (newest.id,))
    finally:
        catalogue.close()
    capsys.readouterr()
    assert main(["dr", "plan", "--scenario", "vault-lost", "--json"]) == 1
    plan = json.loads(capsys.readouterr().out)
    assert set(plan["missing"]) == {"3"} and "no verified copy at s3, gcs, azure" in plan["missing"]["3"]
    assert set(plan["stale"]) == {"2"} and "older" in plan["stale"]["2"]
    assert main(["dr", "plan", "--scenario", "provider-lost:gcs"]) == 0  # the vault still holds wedding 3
    assert "copies used, in order: vault, s3, azure" in capsys.readouterr().out
    assert main(["dr", "plan", "--scenario", "provider-lost:dropbox"]) == 2
    assert "provider-lost:s3" in capsys.readouterr().err


def test_the_master_key_file_lost_on_the_machine_comes_back_from_the_recovery_kit(backed_up, tmp_path, monkeypatch,
                                                                                  capsys):
    """The kit: a sealed copy of the master key file kept off the machine, and the sheet `dr kit` prints (ids,
    fingerprints, locations: no secret). The machine's file lost, the kit's copy is proved against the newest
    key-store backup at S3 and put back; no command prints the key."""
    from wedbackup_dagster.core.keys.keyring import MASTER_KEY_ENV, MASTER_KEY_FILE_ENV, generate_master_key_text

    text = os.environ.get(MASTER_KEY_ENV) or Path(os.environ[MASTER_KEY_FILE_ENV]).read_text()
    # The machine's key file, and the kit's copy (in real life: a password manager or a sealed envelope).
    machine, kit = tmp_path / "etc" / "master.key", tmp_path / "kit" / "master.key"
    try:
        machine.parent.mkdir()
        machine.write_text(text)
        monkeypatch.delenv(MASTER_KEY_ENV, raising=False)
        monkeypatch.setenv(MASTER_KEY_FILE_ENV, str(machine))
        kit.parent.mkdir()
        kit.write_text(text)
        assert main(["keys", "backup"]) == 0
        capsys.readouterr()
        assert main(["dr", "kit", "--json"]) == 0
        sheet = json.loads(capsys.readouterr().out)
        fingerprint = sheet["master_keys"][0]["fingerprint"]
        assert sheet["newest_key_backup"]["copies"] and len(fingerprint) == 16

        machine.unlink()  # lost
        assert main(["dr", "kit", "--check", str(kit), "--from", "s3"]) == 0
        out = capsys.readouterr().out
        assert f"fingerprint {fingerprint}" in out and "open the newest key-store backup at s3" in out
        wrong = tmp_path / "wrong.key"
        wrong.write_text(generate_master_key_text(sheet["master_keys"][0]["id"]))
        assert main(["dr", "kit", "--check", str(wrong), "--from", "s3"]) == 2
        err = capsys.readouterr().err
        assert "s3:" in err and "keys/" in err
        for secret in (text.strip(), wrong.read_text().strip()):
            assert secret.split(":", 1)[1] not in out + err

        machine.write_text(kit.read_text())  # put back: everything works again
        assert main(["dr", "plan", "--scenario", "source-lost"]) == 0
        assert main(["dr", "kit"]) == 0
        assert f"fingerprint {fingerprint}" in capsys.readouterr().out
    finally:  # no key file may outlive the test (the secrets guard scans pytest's temporary files)
        for path in (machine, kit, tmp_path / "wrong.key"):
            path.unlink(missing_ok=True)
