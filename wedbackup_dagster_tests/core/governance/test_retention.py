"""The retention executor on the real stack: backups with faked snapshot times point at real uploaded
objects; prune deletes exactly the planned ones on every provider and in the vault, then their rows, audits
every deletion, leaves the kept ones whole, and reports (not crashes on) a copy S3 refuses under Object Lock."""
from __future__ import annotations

from datetime import datetime, timezone

from wedbackup_dagster.core.policy.backup_policy import Policy
from wedbackup_dagster.core.governance.retention import prune
from wedbackup_dagster_tests.governance_fleet import back_up, make_governance_fleet  # noqa: F401 - fixture

NOW = datetime(2026, 6, 15, 10, 0, tzinfo=timezone.utc)
UTC = timezone.utc

# snapshot time -> kept? (policy defaults, clock Europe/London)
HISTORY = {
    datetime(2026, 6, 15, 9, 0, tzinfo=UTC): True,     # newest (and younger than 48 h)
    datetime(2026, 6, 11, 8, 0, tzinfo=UTC): False,    # same day as the next one, older
    datetime(2026, 6, 11, 20, 0, tzinfo=UTC): True,    # newest of its day (and of ISO week 24)
    datetime(2025, 12, 10, 12, 0, tzinfo=UTC): False,  # December 2025, not its month's newest
    datetime(2025, 12, 20, 12, 0, tzinfo=UTC): True,   # newest of December 2025
    datetime(2024, 1, 1, 12, 0, tzinfo=UTC): False,    # older than every window
}


def fake_history(fleet: dict, partition: str, times: list[datetime]) -> dict[datetime, int]:
    ids = {}
    for when in times:
        backup_id = back_up(fleet, partition)
        with fleet["catalogue"].connect() as conn:
            conn.execute("UPDATE wedbackup.backups SET snapshot_time = %s, created_at = %s WHERE id = %s",
                         (when, when, backup_id))
        ids[when] = backup_id
    return ids


def object_exists(fleet: dict, provider: str, key: str) -> bool:
    return fleet["replicas"][provider].head(key) is not None


def test_prune_deletes_exactly_what_the_policy_says_everywhere(make_governance_fleet, monkeypatch):
    from wedbackup_dagster.core.governance import retention

    monkeypatch.setattr(retention, "PARTITIONS_PER_PASS", 1)  # one partition per pass: passes add up
    fleet = make_governance_fleet(weddings=3)
    cat, engine, replicas = fleet["catalogue"], fleet["engine"], fleet["replicas"]
    ids = fake_history(fleet, "2", sorted(HISTORY))
    # Two old backups of another wedding: the older goes, the newer is its newest and stays.
    other = fake_history(fleet, "3", [datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC)])
    lone = fake_history(fleet, "1", [datetime(2023, 1, 1, tzinfo=UTC)])  # a lone backup is its newest
    copies = {i: {c.provider: c for c in cat.copies(i)} for i in ids.values()}
    assert all(set(c) == {"vault", "s3", "gcs", "azure"} for c in copies.values())

    everything = set(ids.values()) | set(other.values()) | set(lone.values())
    planned = prune(cat, engine.vault, replicas, Policy(), now=NOW, dry_run=True)
    doomed = {ids[t] for t, keep in HISTORY.items() if not keep} | {other[datetime(2024, 1, 1, tzinfo=UTC)]}
    assert {d.backup_id for d in planned.deletions} == doomed
    assert planned.kept == 3 + 1  # of the partitions with more than one backup
    assert {b["id"] for b in cat.backups_with_copies()} == everything  # a dry run deletes nothing

    report = prune(cat, engine.vault, replicas, Policy(), now=NOW)
    assert {d.backup_id for d in report.deletions} == doomed
    assert all(d.forgotten and sorted(d.deleted) == ["azure", "gcs", "s3", "vault"] for d in report.deletions)
    assert {b["id"] for b in cat.backups_with_copies()} == everything - doomed
    for backup_id, by_provider in copies.items():
        gone = backup_id in doomed
        for provider, copy in by_provider.items():
            if provider == "vault":  # the vault copy's checksum is the archive's SHA-256
                assert (engine.vault.get("2", copy.checksum) is None) == gone
            else:
                assert object_exists(fleet, provider, copy.object_key) is not gone, (provider, backup_id)
            if provider == "s3" and gone:
                assert replicas["s3"].versions(copy.object_key) == []
    with cat.connect() as conn:
        audited = conn.execute("SELECT detail FROM wedbackup.audit WHERE action = 'prune' ORDER BY id").fetchall()
    assert sorted(a["detail"]["backup_id"] for a in audited) == sorted(doomed)
    assert all(a["detail"]["reason"] for a in audited)
    # A second sweep finds nothing more to delete; a kept backup still restores.
    assert prune(cat, engine.vault, replicas, Policy(), now=NOW).deletions == []
    engine.verify("2", replicas, provider="gcs")


def test_a_locked_copy_is_refused_and_reported_by_prune(make_governance_fleet):
    fleet = make_governance_fleet(weddings=2, object_lock="compliance")
    cat, engine, replicas = fleet["catalogue"], fleet["engine"], fleet["replicas"]
    ids = fake_history(fleet, "1", [datetime(2024, 1, 1, tzinfo=UTC), datetime(2026, 6, 15, 9, tzinfo=UTC)])
    old = ids[datetime(2024, 1, 1, tzinfo=UTC)]
    [s3_copy] = [c for c in cat.copies(old) if c.provider == "s3"]

    report = prune(cat, engine.vault, replicas, Policy(), now=NOW)
    [deletion] = report.deletions
    assert deletion.backup_id == old and sorted(deletion.deleted) == ["azure", "gcs", "vault"]
    assert set(deletion.locked) == {"s3"} and deletion.locked["s3"] > NOW and not deletion.failed
    assert not deletion.forgotten  # the row stays: the catalogue still points at the locked copy
    assert object_exists(fleet, "s3", s3_copy.object_key)
    row = next(r for r in cat.backups_with_copies("1") if r["id"] == old)
    assert [c["provider"] for c in row["copies"]] == ["s3"]
    assert row["copies"][0]["locked_until"] is not None and row["copies"][0]["lock_mode"] == "compliance"
    assert report.summary()["copies_locked"] == 1
    with cat.connect() as conn:
        [audit] = conn.execute("SELECT detail FROM wedbackup.audit WHERE action = 'prune'").fetchall()
    assert set(audit["detail"]["locked"]) == {"s3"}
