"""`wedbackup restore --all` (through the `restore_platform` job), `wedbackup dr plan`, `dr kit` and `dr pack`,
against the real stack and a throw-away Dagster home (the `cli_env` fixture of cli/test_app.py): the whole demo
platform from S3 alone with the vault gone, a run killed with SIGKILL part-way and resumed, the runbooks of each
scenario, the master-key recovery kit, and DR packs published at the providers and read back."""
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


def test_restore_all_from_s3_reads_the_dr_pack_unless_told_not_to(backed_up, make_database, capsys):
    assert main(["dr", "pack", "--to", "s3", "--json"]) == 0
    published = json.loads(capsys.readouterr().out)["published"]["s3"]
    shutil.rmtree(os.environ["WEDBACKUP_VAULT_DIR"])
    target = make_database()
    assert main(["restore", "--all", "--target-dsn", target, "--from", "s3", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert f"  DR pack: s3:{published}, 5 wedding(s) read from it" in out, out
    assert table_sums(target) == backed_up["expected"]
    target = make_database()
    assert main(["restore", "--all", "--target-dsn", target, "--from", "s3", "--no-packs", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["complete"] and report["from_pack"] == 0 and report["pack"] == ""
    assert table_sums(target) == backed_up["expected"]


def test_dr_pack_publishes_every_weddings_newest_verified_archive_at_each_provider(backed_up, monkeypatch, capsys):
    """`dr pack`: a pack at every provider holding each wedding's newest verified archive (read back from the
    provider); a rebuild to one provider writes no segment again; a wedding without a verified backup is left to
    its own objects and named; a provider that cannot take the pack is named and the exit code is 1."""
    from wedbackup_dagster.core import disaster
    from wedbackup_dagster.core.config import Settings
    from wedbackup_dagster.core.disaster import packs
    from wedbackup_dagster.core.storage.providers import PROVIDERS, replica_for

    catalogue = Catalogue(os.environ["WEDBACKUP_CATALOGUE_DSN"])
    try:
        weddings = set(disaster.planned_partitions(catalogue)[0])  # every wedding, without the platform
        newest = {p: catalogue.latest_backup(p).archive_sha256 for p in weddings}
    finally:
        catalogue.close()
    assert weddings == {"1", "2", "3", "4", "5"}

    assert main(["dr", "pack", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["weddings"] == 5 and report["segments"] >= 1 and report["bytes"] > 0
    assert set(report["published"]) == set(PROVIDERS) and report["failed"] == {}
    assert report["left_out_count"] == 0 and report["uploaded"] == {p: report["segments"] for p in PROVIDERS}
    assert "DR pack: segment 1" in captured.err  # progress on stderr
    settings = Settings.from_env()
    for provider in PROVIDERS:
        pack, notes = packs.newest_pack(replica_for(provider, settings))
        assert notes == [] and pack.index_key == report["published"][provider]
        assert {e.partition: e.archive_sha256 for s in pack.segments for e in s.entries} == newest

    # Built again for S3 alone: nothing changed, so no segment is written again; only the new index is.
    assert main(["dr", "pack", "--to", "s3", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert set(again["published"]) == {"s3"} and again["published"]["s3"] != report["published"]["s3"]
    assert again["uploaded"] == {} and again["already_there"] == {"s3": report["segments"]}

    # Wedding 2's newest backup made unverified: the next pack leaves it to its own objects, naming it.
    catalogue = Catalogue(os.environ["WEDBACKUP_CATALOGUE_DSN"])
    try:
        with catalogue.connect() as conn:
            conn.execute("DELETE FROM wedbackup.restores WHERE backup_id = %s", (catalogue.latest_backup("2").id,))
            conn.execute("UPDATE wedbackup.copies SET verified_at = NULL WHERE backup_id = %s",
                         (catalogue.latest_backup("2").id,))
    finally:
        catalogue.close()
    assert main(["dr", "pack", "--to", "s3"]) == 0
    out = capsys.readouterr().out
    assert "DR pack " in out and ": 4 wedding archive(s) in " in out and "  s3: published " in out
    assert "gcs" not in out and "azure" not in out
    [left] = [line for line in out.splitlines() if "left to its own objects" in line]
    assert left.startswith("  left to its own objects: wedding 2: ") and "no verified backup" in left
    pack, _ = packs.newest_pack(replica_for("s3", settings))
    assert {e.partition for s in pack.segments for e in s.entries} == weddings - {"2"}

    # A provider that cannot take it (its container does not exist): named, the others published, exit 1.
    monkeypatch.setenv("WEDBACKUP_AZURE_CONTAINER", "no-such-container-for-dr-packs")
    assert main(["dr", "pack", "--to", "azure", "--to", "gcs"]) == 1
    out = capsys.readouterr().out
    assert "  gcs: published " in out and "  azure: NOT PUBLISHED: " in out and "s3" not in out
    assert backed_up["source"].split("@")[0].split(":")[-1] not in out  # no password printed
    with pytest.raises(SystemExit) as refused:
        main(["dr", "pack", "--to", "vault"])
    assert refused.value.code == 2
    assert "invalid choice: 'vault'" in capsys.readouterr().err
