"""`wedbackup erase` and `wedbackup prune`, in-process against the real stack and a throw-away Dagster
home: erase refuses without --confirm (naming what it would destroy, destroying nothing), then erases
through a recorded Dagster run; prune --dry-run lists, prune deletes through a recorded run."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest

from wedbackup_dagster.cli.app import main
from wedbackup_dagster_tests.governance_fleet import back_up, make_governance_fleet  # noqa: F401 - fixture


@pytest.fixture
def fleet(make_governance_fleet, tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return make_governance_fleet(weddings=3)


def test_erase_refuses_without_confirm_then_erases_through_dagster(fleet, capsys):
    cat = fleet["catalogue"]
    back_up(fleet, "2")
    assert main(["erase", "--wedding", "2"]) == 1
    captured = capsys.readouterr()
    assert "refusing without --confirm" in captured.err
    assert "destroys 1 live key(s); deletes 1 backup(s), copies: azure 1, gcs 1, s3 1, vault 1" in captured.out
    assert cat.erasures() == [] and len(cat.backups_with_copies("2")) == 1

    assert main(["erase", "--wedding", "2", "--confirm", "--requested-by", "ticket-77"]) == 0
    out = capsys.readouterr().out
    assert "erased wedding 2" in out and "1 key(s) destroyed, 4 copies deleted, 0 locked" in out
    assert [(e["partition"], e["requested_by"]) for e in cat.erasures()] == [("2", "ticket-77")]
    assert {r.job_name for r in dg.DagsterInstance.get().get_runs()} == {"erase_wedding"}
    # Its row is still in the source, but `backup` will not take it again.
    assert main(["backup", "--wedding", "2"]) == 2
    assert "unknown wedding(s): '2' (not in the source database, or erased)" in capsys.readouterr().err
    assert main(["erase", "--wedding", "../x", "--confirm"]) == 2
    assert "../x" in capsys.readouterr().err


def test_prune_dry_run_lists_then_prune_deletes(fleet, capsys):
    cat = fleet["catalogue"]
    old, new = back_up(fleet, "1"), back_up(fleet, "1")
    with cat.connect() as conn:
        conn.execute("UPDATE wedbackup.backups SET snapshot_time = %s WHERE id = %s",
                     (datetime.now(timezone.utc) - timedelta(days=1000), old))
    assert main(["prune", "--dry-run", "--wedding", "1"]) == 0
    out = capsys.readouterr().out
    assert "would delete 1" in out and "older than every window" in out
    assert "dry run: 1 backup(s) to delete, 1 kept" in out
    assert "media: 0 snapshot(s) and 0 pack(s) to delete" in out  # no media backed up here
    assert len(cat.backups_with_copies("1")) == 2

    assert main(["prune"]) == 0
    assert "1 backup(s) deleted" in capsys.readouterr().out
    assert [b["id"] for b in cat.backups_with_copies("1")] == [new]
    assert {r.job_name for r in dg.DagsterInstance.get().get_runs()} == {"retention_sweep"}


def test_verify_skips_what_a_lock_kept_of_an_erased_wedding(make_governance_fleet, tmp_path, monkeypatch, capsys):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    fleet = make_governance_fleet(weddings=2, object_lock="governance")
    back_up(fleet, "1")
    back_up(fleet, "2")
    assert main(["erase", "--wedding", "2", "--confirm"]) == 0
    assert "1 locked" in capsys.readouterr().out
    assert len(fleet["catalogue"].backups_with_copies("2")) == 1  # the locked S3 copy, still catalogued
    assert main(["verify", "--all"]) == 0
    assert "re-verifying 1 partition(s)" in capsys.readouterr().out
