"""The `wedbackup` command line, run in-process against the real stack and a throw-away Dagster home."""
from __future__ import annotations

import dagster as dg
import psycopg
import pytest

from wedbackup_dagster.cli.app import main


@pytest.fixture
def cli_env(demo_env, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    source = demo_env(weddings=5, seed=3, document_bytes=128, DAGSTER_HOME=str(home))["source"]
    return {"source": source, "home": home}


def test_backup_then_restore_round_trip_is_recorded_in_dagster(cli_env, make_database, capfd):
    assert main(["backup", "--all"]) == 0
    shown = capfd.readouterr()
    # Progress while the run goes (weddings done of the total, rate, ETA), and the whole job's time.
    assert "verified restore: 6 of 6 weddings (100%)" in shown.err and "whole job" in shown.out
    target = make_database()
    assert main(["restore", "--platform", "--target-dsn", target]) == 0
    assert main(["restore", "--wedding", "2", "--target-dsn", target, "--from", "azure"]) == 0
    with psycopg.connect(target) as conn, psycopg.connect(cli_env["source"]) as src:
        query = "SELECT count(*), md5(string_agg(g::text, '|' ORDER BY g.id)) FROM guests g WHERE wedding_id = 2"
        assert conn.execute(query).fetchone() == src.execute(query).fetchone()
        assert conn.execute("SELECT count(*) FROM guests WHERE wedding_id <> 2").fetchone()[0] == 0
    instance = dg.DagsterInstance.get()  # DAGSTER_HOME is the throw-away home
    runs = instance.get_runs()
    assert {r.job_name for r in runs} == {"backup_weddings", "restore_wedding"}
    out = capfd.readouterr().out
    assert "restored 2" in out
    assert cli_env["source"].split("@")[0].split(":")[-1] not in out  # no password printed


def test_unknown_wedding_is_named(cli_env, capsys):
    assert main(["backup", "--wedding", "424242"]) == 2
    assert "424242" in capsys.readouterr().err


def test_restore_without_a_backup_is_a_clear_error(cli_env, make_database, capsys):
    assert main(["restore", "--wedding", "1", "--target-dsn", make_database()]) == 1
    err = capsys.readouterr().err
    assert "wedding 1" in err and "no backup" in err


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`wedbackup stack env | head -0`: the closed pipe ends the command with 141 (128 + SIGPIPE), as `ls`
    would, not with a BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    env = {**os.environ, "WEDBACKUP_STATE_DIR": str(tmp_path / "state")}
    done = subprocess.run([sys.executable, "-c", "import sys; from wedbackup_dagster.cli.app import main; "
                           "sys.exit(main(['stack', 'env']))"], stdout=write, stderr=subprocess.PIPE, text=True,
                          env=env, timeout=120)
    os.close(write)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
