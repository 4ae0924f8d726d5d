"""`wedbackup restore` and `wedbackup points`, run in-process against the real stack and a throw-away
Dagster home (the `cli_env` fixture of cli/test_app.py)."""
from __future__ import annotations

import json

import psycopg
import pytest

from wedbackup_dagster.cli.app import main
from wedbackup_dagster_tests.cli.test_app import cli_env  # noqa: F401  (a fixture)

GUESTS = "SELECT count(*), md5(coalesce(string_agg(g::text, '|' ORDER BY g.id), '')) FROM guests g WHERE wedding_id = 2"


@pytest.fixture
def backed_up(cli_env, capsys):  # noqa: F811
    assert main(["backup", "--wedding", "2"]) == 0
    with psycopg.connect(cli_env["source"]) as conn:
        archived = conn.execute(GUESTS).fetchone()
        conn.execute("DELETE FROM guests WHERE id = (SELECT min(id) FROM guests WHERE wedding_id = 2)")
    capsys.readouterr()
    return {**cli_env, "archived": archived}


def test_points_lists_the_recovery_points_newest_first(backed_up, capsys):
    assert main(["backup", "--wedding", "2"]) == 0
    capsys.readouterr()
    assert main(["points", "--wedding", "2"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("  20")]
    assert out.startswith("recovery points of wedding 2, newest first") and len(lines) == 2
    assert lines[0] > lines[1]  # ISO times sort as text: newest first
    assert all("azure,gcs,s3,vault" in line and "yes (" in line for line in lines)
    assert main(["points", "--wedding", "2", "--json"]) == 0
    points = json.loads(capsys.readouterr().out)
    assert [p["verified"] for p in points] == [True, True] and len(points[0]["archive_sha256"]) == 64
    assert points[0]["snapshot_time"] > points[1]["snapshot_time"]
    assert points[0]["copies"] == ["azure", "gcs", "s3", "vault"]
    assert main(["points", "--wedding", "4"]) == 1
    assert "wedding 4: no recovery points" in capsys.readouterr().out


def test_restore_in_place_with_a_dry_run_first(backed_up, capsys):
    source = backed_up["source"]
    assert main(["restore", "--wedding", "2", "--in-place", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "dry run: nothing written for 2" in captured.out
    guests = next(line for line in captured.out.splitlines() if line.strip().startswith("public.guests"))
    assert guests.split()[3:6] == ["1", "0", "0"]  # add, remove, change
    assert "rows read from the archive" in captured.err  # progress on stderr
    with psycopg.connect(source) as conn:
        assert conn.execute(GUESTS).fetchone() != backed_up["archived"]
    assert main(["restore", "--wedding", "2", "--in-place", "--lock-timeout", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "in_place" and report["totals"]["add"] >= 1
    with psycopg.connect(source) as conn:
        assert conn.execute(GUESTS).fetchone() == backed_up["archived"]


def test_restore_into_a_schema_and_as_of_a_time(backed_up, make_database, capsys):
    assert main(["restore", "--wedding", "2", "--into-schema", "wedding_2_then"]) == 0
    assert "restored 2" in capsys.readouterr().out
    with psycopg.connect(backed_up["source"]) as conn:
        assert conn.execute(GUESTS.replace("FROM guests", "FROM wedding_2_then.guests")).fetchone() == \
            backed_up["archived"]
    assert main(["restore", "--wedding", "2", "--into-schema", "wedding_2_then"]) == 1
    assert "schema wedding_2_then already exists" in capsys.readouterr().err
    target = make_database()
    assert main(["restore", "--platform", "--target-dsn", target]) == 1  # never backed up on its own here
    assert "the platform partition: has no backup" in capsys.readouterr().err
    assert main(["restore", "--wedding", "2", "--as-of", "2001-01-01T00:00:00+00:00", "--target-dsn", target]) == 1
    assert "wedding 2: has no backup at or before 2001-01-01T00:00:00+00:00" in capsys.readouterr().err
    # A schema in another database: one that has the platform's schema (here: its restored platform).
    assert main(["backup", "--platform"]) == 0
    assert main(["restore", "--platform", "--target-dsn", target]) == 0
    assert main(["restore", "--wedding", "2", "--into-schema", "w2", "--target-dsn", target]) == 0
    with psycopg.connect(target) as conn:
        assert conn.execute(GUESTS.replace("FROM guests", "FROM w2.guests")).fetchone() == backed_up["archived"]
        assert conn.execute("SELECT count(*) FROM public.guests").fetchone()[0] == 0


def test_bad_requests_are_refused_before_any_run(backed_up, capsys):
    assert main(["restore", "--wedding", "2", "--in-place", "--as-of", "2026-11-30 18:00"]) == 2
    assert "has no timezone" in capsys.readouterr().err
    assert main(["restore", "--platform", "--in-place"]) == 2
    assert "--in-place replaces one wedding's rows" in capsys.readouterr().err
    assert main(["restore", "--wedding", "2"]) == 2
    assert "--target-dsn DSN, --into-schema NAME or --in-place" in capsys.readouterr().err
    assert main(["restore", "--wedding", "2", "--in-place", "--into-schema", "x"]) == 2
