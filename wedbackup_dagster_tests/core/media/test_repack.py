"""Repacking on the real stack: a pack mostly garbage after pruning has its live chunks rewritten into a new
pack, recorded at every location before the old one is deleted; a provider failing the upload keeps the old
pack in use; and the threshold setting is validated."""
from __future__ import annotations

import dataclasses
import os
from datetime import datetime, timedelta, timezone

import pytest

from wedbackup_dagster.core.errors import ConfigError
from wedbackup_dagster.core.media.backup import back_up_media
from wedbackup_dagster.core.media.repack import DEFAULT_REPACK_BELOW, MEDIA_REPACK_BELOW_ENV, repack_threshold
from wedbackup_dagster.core.media.restore import restore_media
from wedbackup_dagster.core.media.retention import prune_media
from wedbackup_dagster.core.policy.backup_policy import Policy, RetentionRule


def test_the_threshold_setting():
    assert repack_threshold({}) == DEFAULT_REPACK_BELOW == 0.5
    assert repack_threshold({MEDIA_REPACK_BELOW_ENV: "0"}) == 0.0
    assert repack_threshold({MEDIA_REPACK_BELOW_ENV: " 0.25 "}) == 0.25
    for bad in ("1", "1.5", "-0.1", "half", "nan"):
        with pytest.raises(ConfigError, match=MEDIA_REPACK_BELOW_ENV):
            repack_threshold({MEDIA_REPACK_BELOW_ENV: bad})


def test_a_mostly_garbage_pack_is_repacked_only_once_its_replacement_is_everywhere(media_world):
    from wedbackup_dagster.core.errors import ReplicaError

    world = media_world
    key = world.catalogue.wedding_key("8", world.keyring)
    t0 = datetime.now(timezone.utc)
    b = os.urandom(1 << 20)
    world.s3.put_object(Bucket=world.bucket, Key="weddings/8/a.jpg", Body=os.urandom(3 << 20))
    world.s3.put_object(Bucket=world.bucket, Key="weddings/8/b.jpg", Body=b)
    first = back_up_media("8", world.source, world.store, key, now=t0)  # one pack: a and b
    world.s3.delete_object(Bucket=world.bucket, Key="weddings/8/a.jpg")
    back_up_media("8", world.source, world.store, key, now=t0 + timedelta(minutes=30))  # b only, no new pack
    for replica in world.replicas.values():
        world.store.replicate("8", replica)
    assert first.packs_written == 1
    [old] = _packs(world)
    resolve = lambda kid: world.catalogue.key_by_id(kid, world.keyring)  # noqa: E731
    rule = RetentionRule(keep_all=timedelta(days=1), daily_days=0, weekly_weeks=0, monthly_months=0)
    policy = dataclasses.replace(Policy(), retention={t: rule for t in Policy().retention})
    later = t0 + timedelta(days=10)

    # A quarter of the pack is live: under 0.5 it is rewritten, under 0.2 it is not.
    assert prune_media(world.store, "8", policy, resolve, now=later, dry_run=True, repack_below=0.2).repacked == []
    plan = prune_media(world.store, "8", policy, resolve, now=later, dry_run=True, repack_below=0.5)
    assert plan.repacked == [old] and plan.repacked_live_bytes == 1 << 20 and plan.deleted_packs == []

    # A provider that fails the new pack's upload: the old pack stays in use, whole, everywhere.
    good_gcs = world.store.replicas["gcs"]

    class Failing:
        """The real GCS replica, except that uploads fail."""

        def __getattr__(self, name):
            return getattr(good_gcs, name)

        def upload(self, *args, **kwargs):
            raise ReplicaError("gcs", kwargs.get("key"), "upload refused (test)")

    world.store.replicas["gcs"] = Failing()
    failed = prune_media(world.store, "8", policy, resolve, now=later, repack_below=0.5)
    assert failed.repacked == [] and failed.failed and "gcs" in " ".join(failed.failed)
    assert len(world.store.copies_of(old)) == 4 and _chunk_packs(world) == {old}
    world.store.replicas["gcs"] = good_gcs

    done = prune_media(world.store, "8", policy, resolve, now=later, repack_below=0.5)
    assert done.repacked == [old] and not done.failed and done.repack_freed_bytes > 2 << 20
    [new] = _chunk_packs(world)
    assert new != old and not world.store.copies_of(old)
    assert set(world.store.copies_of(new)) == {"vault", "s3", "gcs", "azure"}
    assert not world.store.vault_path("8", "pack", old).exists()
    assert not any(old in o.key for o in world.replicas["azure"].list("media/weddings/8/"))
    for provider in ("vault", "s3", "gcs", "azure"):
        out = world.tmp / f"after-repack-{provider}"
        restore_media(world.store, "8", resolve, to_dir=out, provider=provider)
        assert (out / "weddings/8/b.jpg").read_bytes() == b and not (out / "weddings/8/a.jpg").exists()


def _packs(world) -> list[str]:
    with world.catalogue.connect() as conn:
        return [r["pack_sha256"] for r in conn.execute("SELECT pack_sha256 FROM wedbackup.media_packs "
                                                       "WHERE partition = '8' ORDER BY created_at")]


def _chunk_packs(world) -> set[str]:
    with world.catalogue.connect() as conn:
        return {r["pack_sha256"] for r in conn.execute("SELECT DISTINCT pack_sha256 FROM wedbackup.media_chunks")}
