"""Media retention: snapshots pruned by the tier's rules, packs no kept snapshot needs collected everywhere
(never younger than the grace period), and what is kept still restores."""
from __future__ import annotations

import dataclasses
import os
from datetime import datetime, timedelta, timezone

from wedbackup_dagster.core.media.backup import back_up_media
from wedbackup_dagster.core.media.restore import restore_media
from wedbackup_dagster.core.media.retention import prune_media
from wedbackup_dagster.core.policy.backup_policy import Policy, RetentionRule


def test_prune_keeps_the_newest_and_collects_unreferenced_packs(media_world):
    world = media_world
    # Three backups, one pack each: b; then a (its own pack); then a replaced. Only a's first version's pack
    # is needed by no kept snapshot (a pack partly needed stays whole: packs are not rewritten).
    key = world.catalogue.wedding_key("8", world.keyring)
    t0 = datetime.now(timezone.utc)
    world.s3.put_object(Bucket=world.bucket, Key="weddings/8/b.jpg", Body=os.urandom(1 << 20))
    back_up_media("8", world.source, world.store, key, now=t0)
    world.s3.put_object(Bucket=world.bucket, Key="weddings/8/a.jpg", Body=os.urandom(3 << 20))
    back_up_media("8", world.source, world.store, key, now=t0 + timedelta(minutes=30))
    world.s3.put_object(Bucket=world.bucket, Key="weddings/8/a.jpg", Body=os.urandom(3 << 20))  # replaced
    newest = back_up_media("8", world.source, world.store, key, now=t0 + timedelta(hours=1))
    for replica in world.replicas.values():
        world.store.replicate("8", replica)
    assert len(world.store.snapshots("8")) == 3
    resolve = lambda kid: world.catalogue.key_by_id(kid, world.keyring)  # noqa: E731
    rule = RetentionRule(keep_all=timedelta(days=1), daily_days=0, weekly_weeks=0, monthly_months=0)
    policy = dataclasses.replace(Policy(), retention={t: rule for t in Policy().retention})
    later = t0 + timedelta(days=10)

    # Within the grace period no pack goes, even one nothing needs.
    young = prune_media(world.store, "8", policy, resolve, now=t0 + timedelta(hours=2), dry_run=True)
    assert young.deleted_packs == [] and not young.deleted_snapshots
    plan = prune_media(world.store, "8", policy, resolve, now=later, dry_run=True)
    assert len(plan.deleted_snapshots) == 2 and len(plan.deleted_packs) == 1 and plan.freed_bytes > 3 << 20
    assert len(world.store.snapshots("8")) == 3  # a dry run changes nothing

    done = prune_media(world.store, "8", policy, resolve, now=later)
    assert not done.failed and done.deleted_packs == plan.deleted_packs
    [kept] = world.store.snapshots("8")
    assert kept.sha256 == newest.snapshot_sha256
    gone = done.deleted_packs[0]
    assert not world.store.copies_of(gone)
    assert not any(gone in o.key for o in world.replicas["s3"].list("media/weddings/8/"))
    out = world.tmp / "after-prune"
    restore_media(world.store, "8", resolve, to_dir=out, provider="azure")
    assert (out / "weddings/8/b.jpg").stat().st_size == 1 << 20
