"""Re-verification: verified_restore over a selection of weddings without re-dumping, in batched
multi-wedding runs, a failing wedding reported alone; `wedbackup verify` selecting what to re-verify."""
from __future__ import annotations

import datetime as dt

import dagster as dg
import pytest

from wedbackup_dagster.backups.constants import DB_DUMP, VERIFIED_RESTORE
from wedbackup_dagster.cli.app import build_parser
from wedbackup_dagster.cli.cmd_checks import batches, reverify, select_for_verify
from wedbackup_dagster.core.errors import WedbackupError
from wedbackup_dagster.core.policy.rules import CheckQueries

from .conftest import evaluations, make_fleet

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def big_fleet(stack):
    with make_fleet(stack, 20, through_dagster=False) as f:
        yield f


def test_reverify_twenty_weddings_in_batched_runs_without_new_dumps(big_fleet):
    instance, cat = big_fleet["instance"], big_fleet["catalogue"]
    # Runs follow the partitions' insertion order in the instance.
    weddings = [k for k in instance.get_dynamic_partitions("weddings") if k in set(big_fleet["weddings"])]
    assert len(weddings) == 20
    before = {w: cat.require_latest_backup(w).archive_sha256 for w in weddings}
    bad = weddings[9]
    with cat.connect() as conn:  # one wedding's manifest no longer matches its archive
        conn.execute("UPDATE wedbackup.backups SET manifest = jsonb_set(manifest, '{tables,0,rows}', "
                     "to_jsonb((manifest #>> '{tables,0,rows}')::int + 1)) WHERE partition = %s", (bad,))

    outcome = reverify(weddings, instance=instance, batch_size=8)

    runs = outcome["runs"]
    assert len(runs) == 3 and [(r.first, r.last) for r in runs][0] == (weddings[0], weddings[7])
    assert [r.success for r in runs] == [True, False, True]
    assert any(f"wedding {bad}:" in f for f in runs[1].failures)
    assert outcome["weddings_per_minute"] > 0
    print(f"\nreverify: {len(weddings)} weddings, {len(runs)} runs, {outcome['weddings_per_minute']} per minute")
    # No new dump: the same newest backups, no db_dump materialization, one restore each.
    assert {w: cat.require_latest_backup(w).archive_sha256 for w in weddings} == before
    assert instance.get_latest_materialization_event(DB_DUMP) is None
    for w in weddings:
        assert cat.restore_count(cat.require_latest_backup(w).id) == 1
    # Every other wedding of the failed run was still restored and materialized.
    for w in weddings[8:16]:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=VERIFIED_RESTORE, asset_partitions=[w]), limit=1).records
        assert bool(records) == (w != bad), w
    # The checks of the successful runs ran with them, per wedding; the failed run's were re-run after it.
    got = {}
    for r in [*runs, *outcome["check_runs"]]:
        got.update(evaluations(instance, r.run_id))
    assert got[("verified_restore", "three_two_one", weddings[0])].passed
    assert not got[("verified_restore", "restore_matches_manifest", bad)].passed
    assert got[("verified_restore", "restore_matches_manifest", weddings[10])].passed
    # --older-than 0 after this: only the failed wedding was never verified.
    verified = CheckQueries(cat).last_verified()
    assert select_for_verify(verified, older_than_days=1) == [bad]


def test_selection_rules_and_batches():
    verified = {"1": NOW - dt.timedelta(days=3), "2": NOW - dt.timedelta(hours=1), "10": None, "platform": NOW}
    assert select_for_verify(verified, all_=True) == ["1", "2", "10", "platform"]
    assert select_for_verify(verified, older_than_days=2, now=NOW) == ["1", "10"]
    assert select_for_verify(verified, weddings=["2", "2", "1"]) == ["2", "1"]
    with pytest.raises(WedbackupError, match="without a backup.*99"):
        select_for_verify(verified, weddings=["99"])
    assert batches(["3", "1", "2", "5"], ["platform", "1", "2", "3", "4", "5"], 2) == [["1", "2"], ["3", "5"]]


def test_verify_command_line():
    parser = build_parser()
    args = parser.parse_args(["verify", "--older-than", "7"])
    assert args.older_than == 7 and args.func.__name__ == "cmd_verify"
    assert parser.parse_args(["verify", "--wedding", "3", "4", "--batch-size", "50"]).wedding == ["3", "4"]
    with pytest.raises(SystemExit):
        parser.parse_args(["verify", "--all", "--wedding", "3"])
    with pytest.raises(SystemExit):
        parser.parse_args(["verify"])


def test_verify_command_runs_through_dagster(big_fleet, tmp_path, monkeypatch, capsys):
    from wedbackup_dagster.cli.app import main

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    cat = big_fleet["catalogue"]
    picked = big_fleet["weddings"][:2]
    counts = {w: cat.restore_count(cat.require_latest_backup(w).id) for w in picked}
    assert main(["verify", "--wedding", *picked]) == 0
    out = capsys.readouterr().out
    assert "re-verifying 2 partition(s)" in out and " ok" in out
    assert {w: cat.restore_count(cat.require_latest_backup(w).id) for w in picked} == {
        w: n + 1 for w, n in counts.items()}
    assert main(["verify", "--wedding", "99999"]) == 2
    assert "without a backup" in capsys.readouterr().err
