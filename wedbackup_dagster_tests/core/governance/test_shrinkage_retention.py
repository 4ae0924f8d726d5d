"""Retention finds and holds sharp drops by itself, on the real stack with the engine (no Dagster, no check
ever run): a drop hidden behind later clean backups still holds the backup before it; a dry run records
nothing; once the flagged backup is pruned, a later backup compared with the same baseline is the same drop,
not a new flag; after the acknowledgement the held backup goes."""
from __future__ import annotations

from datetime import timedelta

import psycopg

from wedbackup_dagster.core.policy.backup_policy import Policy
from wedbackup_dagster.core.governance.retention import prune
from wedbackup_dagster_tests.governance_fleet import back_up, make_governance_fleet  # noqa: F401 - fixture


def backed_up_and_verified(fleet: dict, partition: str) -> int:
    backup_id = back_up(fleet, partition)
    fleet["engine"].verify(partition, fleet["replicas"])
    return backup_id


def shift(fleet: dict, backup_id: int, days: float) -> None:
    with fleet["catalogue"].connect() as conn:
        conn.execute("UPDATE wedbackup.backups SET snapshot_time = snapshot_time - %s, created_at = created_at - %s "
                     "WHERE id = %s", (timedelta(days=days), timedelta(days=days), backup_id))


def test_prune_holds_a_drop_hidden_behind_later_backups_until_acknowledged(make_governance_fleet):
    fleet = make_governance_fleet(weddings=2)
    cat, engine, replicas = fleet["catalogue"], fleet["engine"], fleet["replicas"]
    before = backed_up_and_verified(fleet, "1")
    with psycopg.connect(fleet["source"], autocommit=True) as conn:
        conn.execute("DELETE FROM guests WHERE wedding_id = 1")  # every guest gone (dietary rows cascade)
    dropped = backed_up_and_verified(fleet, "1")
    later = backed_up_and_verified(fleet, "1")  # compares clean with `dropped`: the drop hides behind it
    shift(fleet, before, 1002)
    shift(fleet, dropped, 1001)  # both out of every window: only a hold keeps one

    dry = prune(cat, engine.vault, replicas, Policy(), dry_run=True)
    assert [d.backup_id for d in dry.deletions] == [dropped]
    assert [h["backup_id"] for h in dry.held] == [before]
    assert f"rows dropped sharply in backup #{dropped} (ERROR)" in dry.held[0]["reason"]
    assert cat.shrinkage_flags() == []  # a dry run records nothing

    report = prune(cat, engine.vault, replicas, Policy())
    assert [d.backup_id for d in report.deletions] == [dropped]
    assert [b["id"] for b in cat.backups_with_copies("1")] == [before, later]
    [flag] = cat.shrinkage_flags()
    assert (flag["backup_id"], flag["baseline_id"], flag["previous_id"]) == (dropped, before, before)
    assert "public.guests" in flag["summary"] and flag["acknowledged_at"] is None
    with cat.connect() as conn:
        assert conn.execute("SELECT count(*) AS n FROM wedbackup.audit WHERE action = 'shrinkage-flagged'"
                            ).fetchone()["n"] == 1

    # `dropped` is gone: `later` now compares with `before` — the same drop, not a second flag.
    again = prune(cat, engine.vault, replicas, Policy())
    assert again.deletions == [] and [h["backup_id"] for h in again.held] == [before]
    assert len(cat.shrinkage_flags()) == 1

    assert [r["backup_id"] for r in cat.acknowledge_shrinkage("1", by="carol", backup_id=before)] == [dropped]
    final = prune(cat, engine.vault, replicas, Policy())
    assert [d.backup_id for d in final.deletions] == [before] and final.held == []
    assert [b["id"] for b in cat.backups_with_copies("1")] == [later]
    assert len(cat.shrinkage_flags()) == 1  # and no new flag once the baseline itself is gone
