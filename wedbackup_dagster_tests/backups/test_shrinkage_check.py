"""The shrinkage check end to end on the real stack, through Dagster: three weddings backed up and verified;
most guests of one deleted, well over half of another's; a second backup run flags them (ERROR, WARN)
naming public.guests with its counts, per wedding partition, and records the flags; retention keeps the
pre-drop backups until `wedbackup ack` (or the acknowledge_shrinkage job) and deletes them after; the list
pipeline (backup_wedding_list) evaluates the check too."""
from __future__ import annotations


import dagster as dg
import psycopg
import pytest

from wedbackup_dagster.backups.constants import DB_DUMP
from wedbackup_dagster.backups.launch import run_job_for
from wedbackup_dagster.cli.app import main
from wedbackup_dagster.core.policy.backup_policy import Policy
from wedbackup_dagster.core.governance.retention import prune
from wedbackup_dagster.definitions import defs

from .conftest import engine_replicas, evaluations, make_fleet, run_checks

SHRINKAGE = dg.AssetCheckKey(DB_DUMP, "shrinkage")


@pytest.fixture(scope="module")
def fleet(stack):
    with make_fleet(stack, 3, through_dagster=True) as f:
        yield f


def keep_guests(source: str, wedding: str, fraction: float) -> tuple[int, int]:
    """Delete all but `fraction` of a wedding's guests (their dietary rows cascade): (before, after)."""
    with psycopg.connect(source, autocommit=True) as conn:
        before = conn.execute("SELECT count(*) FROM guests WHERE wedding_id = %s", (int(wedding),)).fetchone()[0]
        keep = int(before * fraction)
        conn.execute("DELETE FROM guests WHERE wedding_id = %s AND id NOT IN (SELECT id FROM guests "
                     "WHERE wedding_id = %s ORDER BY id LIMIT %s)", (int(wedding), int(wedding), keep))
    return before, keep


def age_backup(catalogue, backup_id: int, days: int) -> None:
    """Move a backup's snapshot out of every retention window (so only a hold can keep it)."""
    with catalogue.connect() as conn:
        conn.execute("UPDATE wedbackup.backups SET snapshot_time = snapshot_time - %s * interval '1 day', "
                     "created_at = created_at - %s * interval '1 day' WHERE id = %s", (days, days, backup_id))


def partition_status(instance, weddings: list[str]) -> dict[str, str]:
    infos = instance.event_log_storage.get_asset_check_partition_info([SHRINKAGE], partition_keys=weddings)
    return {i.partition_key: i.latest_execution_status.value for i in infos}


def test_a_sharp_drop_is_flagged_held_from_retention_until_acknowledged(fleet, capsys):
    instance, source, cat = fleet["instance"], fleet["source"], fleet["catalogue"]
    wiped, thinned, steady = fleet["weddings"]
    # The first run (the fixture's) had no earlier verified backup: the check passed, nothing to compare.
    first = evaluations(instance, fleet["backup_run"])
    assert first[("db_dump", "shrinkage", steady)].passed
    assert "no earlier verified backup" in first[("db_dump", "shrinkage", steady)].description
    baseline = {w: cat.require_latest_backup(w).id for w in fleet["weddings"]}

    g_before, g_after = keep_guests(source, wiped, 0.05)  # ≥ 95 % gone: ERROR
    t_before, t_after = keep_guests(source, thinned, 0.4)  # 60 % gone: WARN
    [run] = run_job_for("backup_weddings", fleet["weddings"], instance=instance)
    assert run.success, run.failures
    got = evaluations(instance, run.run_id)

    ev = got[("db_dump", "shrinkage", wiped)]
    assert not ev.passed and ev.severity == dg.AssetCheckSeverity.ERROR
    assert f"public.guests {g_before} → {g_after}" in ev.description
    assert f"against verified backup #{baseline[wiped]}" in ev.description and "wedbackup ack" in ev.description
    rows = {r.data["table"]: r.data for r in ev.metadata["tables"].records}
    assert (rows["public.guests"]["before"], rows["public.guests"]["after"]) == (g_before, g_after)
    assert rows["public.guests"]["flag"] == "error" and rows["public.weddings"]["flag"] == "-"
    assert ev.metadata["baseline_backup_id"].value == baseline[wiped]

    ev = got[("db_dump", "shrinkage", thinned)]
    assert not ev.passed and ev.severity == dg.AssetCheckSeverity.WARN
    assert f"public.guests {t_before} → {t_after} (-{(t_before - t_after) / t_before:.0%})" in ev.description
    assert got[("db_dump", "shrinkage", steady)].passed
    # Per wedding partition, as the UI's partition view shows it.
    assert partition_status(instance, fleet["weddings"]) == {wiped: "FAILED", thinned: "FAILED", steady: "SUCCEEDED"}

    flags = {f["partition"]: f for f in cat.shrinkage_flags(open_only=True)}
    assert set(flags) == {wiped, thinned} and flags[wiped]["level"] == "error"
    assert flags[wiped]["baseline_id"] == flags[wiped]["previous_id"] == baseline[wiped]

    # Retention: the pre-drop backups are out of every window, yet kept while the flags are open.
    for w in fleet["weddings"]:
        age_backup(cat, baseline[w], 1000)
    assert main(["prune", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: 1 backup(s) to delete" in out  # the steady wedding's old backup only
    assert f"backup #{baseline[wiped]}  held: rows dropped sharply in backup #" in out
    assert f"wedbackup ack --wedding {wiped}" in out
    engine = fleet["engine"]
    replicas = engine_replicas(engine.settings)
    # The retention job (as scheduled): its metadata lists what is held, and why.
    sweep = defs.resolve_job_def("retention_sweep").execute_in_process(
        instance=instance, run_config={"ops": {"prune_backups": {"config": {"dry_run": False}}}})
    assert sweep.success
    [meta] = [e.event_specific_data.metadata for e in sweep.all_events if e.event_type_value == "STEP_OUTPUT"]
    assert meta["deleted"].value == 1 and meta["backups_held"].value == 2  # the steady wedding's old backup
    held = meta["held"].value
    assert len(held) == 2 and all(any(h.startswith(f"{w}/#{baseline[w]}: held: rows dropped sharply in backup #")
                                      for h in held) for w in (wiped, thinned))
    assert baseline[steady] not in [b["id"] for b in cat.backups_with_copies(steady)]
    assert cat.backups_with_copies(wiped)[0]["id"] == baseline[wiped]

    # A person checks: `wedbackup ack` (CLI) for one wedding, the acknowledge_shrinkage job (UI) for the other.
    assert main(["ack", "--list"]) == 0
    assert "2 unacknowledged shrinkage flag(s)" in capsys.readouterr().out
    assert main(["ack", "--wedding", wiped]) == 2
    assert "needs --by" in capsys.readouterr().err
    assert main(["ack", "--wedding", wiped, "--by", "alice", "--note", "couple pruned the list"]) == 0
    assert f"wedding {wiped}: 1 flag(s) acknowledged by alice" in capsys.readouterr().out
    assert main(["ack", "--wedding", wiped, "--by", "alice"]) == 2
    assert "no unacknowledged shrinkage flag" in capsys.readouterr().err
    result = defs.resolve_job_def("acknowledge_shrinkage").execute_in_process(
        instance=instance, run_config={"ops": {"acknowledge_shrinkage_op": {"config": {
            "wedding": thinned, "by": "bob", "backup_id": flags[thinned]["backup_id"]}}}})
    assert result.success
    with cat.connect() as conn:
        audit = conn.execute("SELECT partition, detail FROM wedbackup.audit WHERE action = 'shrinkage-acknowledged' "
                             "ORDER BY id").fetchall()
    assert [(a["partition"], a["detail"]["by"]) for a in audit] == [(wiped, "alice"), (thinned, "bob")]
    assert audit[0]["detail"]["note"] == "couple pruned the list"

    # Acknowledged: the check passes saying who acknowledged, and retention may now delete the held backups.
    got = run_checks(instance, [wiped, thinned])
    ev = got[("db_dump", "shrinkage", wiped)]
    assert ev.passed and "acknowledged by alice" in ev.description
    report = prune(cat, engine.vault, replicas, Policy())
    assert sorted(d.backup_id for d in report.deletions) == sorted([baseline[wiped], baseline[thinned]])
    assert report.held == []


def test_the_list_pipeline_evaluates_the_check_per_wedding(fleet):
    instance, source = fleet["instance"], fleet["source"]
    steady = fleet["weddings"][2]
    keep_guests(source, steady, 0.0)  # every guest gone
    from wedbackup_dagster.backups.list_pipeline import list_run_config

    result = defs.resolve_job_def("backup_wedding_list").execute_in_process(
        instance=instance, run_config=list_run_config([steady]), raise_on_error=False)
    assert result.success
    ev = evaluations(instance, result.run_id)[("db_dump", "shrinkage", steady)]
    assert not ev.passed and ev.severity == dg.AssetCheckSeverity.ERROR and "(emptied)" in ev.description
    assert partition_status(instance, [steady]) == {steady: "FAILED"}
    assert [f["partition"] for f in fleet["catalogue"].shrinkage_flags(open_only=True)] == [steady]
