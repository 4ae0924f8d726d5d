"""The retention_sweep job and its daily schedule through Dagster on the real stack."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg

from wedbackup_dagster.definitions import defs
from wedbackup_dagster.governance.retention_job import retention_sweep_schedule
from wedbackup_dagster_tests.governance_fleet import (  # noqa: F401 - fixtures
    back_up,
    governance_instance,
    make_governance_fleet,
)


def test_retention_sweep_deletes_an_expired_backup_everywhere(make_governance_fleet, governance_instance):
    fleet = make_governance_fleet(weddings=2)
    cat = fleet["catalogue"]
    old, new = back_up(fleet, "1"), back_up(fleet, "1")
    expired = datetime.now(timezone.utc) - timedelta(days=3 * 365)
    with cat.connect() as conn:
        conn.execute("UPDATE wedbackup.backups SET snapshot_time = %s WHERE id = %s", (expired, old))
    old_copies = cat.copies(old)

    job = defs.resolve_job_def("retention_sweep")
    dry = job.execute_in_process(instance=governance_instance, run_config={
        "ops": {"prune_backups": {"config": {"dry_run": True}}}})
    assert dry.success and {b["id"] for b in cat.backups_with_copies("1")} == {old, new}

    result = job.execute_in_process(instance=governance_instance)
    assert result.success
    [output] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    meta = output.event_specific_data.metadata
    assert meta["deleted"].value == 1 and meta["copies_deleted"].value == 4 and meta["copies_locked"].value == 0
    assert {b["id"] for b in cat.backups_with_copies("1")} == {new}
    for copy in old_copies:
        if copy.provider != "vault":
            assert fleet["replicas"][copy.provider].head(copy.object_key) is None


def test_the_sweep_is_scheduled_daily():
    assert retention_sweep_schedule.cron_schedule == "30 3 * * *"
    assert retention_sweep_schedule.job_name == "retention_sweep"
    assert retention_sweep_schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    [request] = retention_sweep_schedule.evaluate_tick(dg.build_schedule_context()).run_requests
    assert request.run_config in ({}, None)


def _media_generation(root, wedding: str, name: str, size: int, mtime_ns: int) -> bytes:
    import os

    data = os.urandom(size)
    path = root / "weddings" / wedding / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return data


def test_retention_sweep_prunes_media_and_collects_its_packs(make_governance_fleet, governance_instance, tmp_path):
    from wedbackup_dagster.core.media.backup import back_up_media
    from wedbackup_dagster.core.media.restore import restore_media
    from wedbackup_dagster.core.media.source import DirectorySource
    from wedbackup_dagster.core.media.store import MediaStore

    fleet = make_governance_fleet(weddings=2)
    engine, cat = fleet["engine"], fleet["catalogue"]
    store = MediaStore(engine.settings.vault_dir, engine.catalogue, fleet["replicas"])
    key = engine.catalogue.wedding_key("1", engine.keyring)
    root = tmp_path / "media"
    source = DirectorySource(root)
    # Three media backups of wedding 1 on one day ten days ago: b; then a (its own pack); then a replaced.
    # The policy keeps only that day's newest snapshot, so two snapshots go and so does a's first pack.
    t0 = (datetime.now(timezone.utc) - timedelta(days=10)).replace(hour=9, minute=0, second=0, microsecond=0)
    b = _media_generation(root, "1", "b.jpg", 1 << 20, 1)
    back_up_media("1", source, store, key, now=t0)
    _media_generation(root, "1", "a.jpg", 3 << 20, 2)
    back_up_media("1", source, store, key, now=t0 + timedelta(minutes=30))
    a = _media_generation(root, "1", "a.jpg", 3 << 20, 3)
    newest = back_up_media("1", source, store, key, now=t0 + timedelta(hours=1))
    for replica in fleet["replicas"].values():
        store.replicate("1", replica)
    with cat.connect() as conn:  # the packs are as old as their snapshots: past the grace period
        conn.execute("UPDATE wedbackup.media_packs SET created_at = %s", (t0,))
        packs = {r["pack_sha256"] for r in conn.execute("SELECT pack_sha256 FROM wedbackup.media_packs")}
    assert len(packs) == 3

    job = defs.resolve_job_def("retention_sweep")
    dry = job.execute_in_process(instance=governance_instance, run_config={
        "ops": {"prune_backups": {"config": {"dry_run": True}}}})
    [output] = [e for e in dry.all_events if e.event_type_value == "STEP_OUTPUT"]
    meta = output.event_specific_data.metadata
    assert meta["media_snapshots_deleted"].value == 2 and meta["media_packs_deleted"].value == 1
    assert len(store.snapshots("1")) == 3  # a dry run deletes nothing

    result = job.execute_in_process(instance=governance_instance)
    assert result.success
    [output] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    meta = output.event_specific_data.metadata
    assert meta["media_snapshots_deleted"].value == 2 and meta["media_packs_deleted"].value == 1
    assert meta["media_bytes_freed"].value > 3 << 20 and meta["media_failed"].value == 0
    assert [r.sha256 for r in store.snapshots("1")] == [newest.snapshot_sha256]
    with cat.connect() as conn:
        left = {r["pack_sha256"] for r in conn.execute("SELECT pack_sha256 FROM wedbackup.media_packs")}
    [gone] = packs - left
    assert not store.copies_of(gone) and not store.vault_path("1", "pack", gone).exists()
    for replica in fleet["replicas"].values():
        assert not any(gone in o.key for o in replica.list("media/weddings/1/")), replica.provider
    # What is kept restores, from a provider, byte for byte.
    out = tmp_path / "restored"
    restore_media(store, "1", engine.resolve_key, to_dir=out, provider="gcs")
    assert (out / "weddings/1/a.jpg").read_bytes() == a and (out / "weddings/1/b.jpg").read_bytes() == b

    # A pack younger than the grace period stays even when nothing needs it (a running backup's).
    with cat.connect() as conn:
        conn.execute("UPDATE wedbackup.media_packs SET created_at = now()")
    _media_generation(root, "1", "a.jpg", 3 << 20, 4)
    back_up_media("1", source, store, key, now=t0 + timedelta(hours=2))
    again = job.execute_in_process(instance=governance_instance)
    [output] = [e for e in again.all_events if e.event_type_value == "STEP_OUTPUT"]
    assert output.event_specific_data.metadata["media_snapshots_deleted"].value == 1
    assert output.event_specific_data.metadata["media_packs_deleted"].value == 0
