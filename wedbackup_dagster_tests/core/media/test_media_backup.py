"""The issue's "done when", on the real stack: the demo media of a set of weddings (and the platform's) is
backed up and copied to the vault, S3, GCS and Azure; a second backup of unchanged media uploads nothing;
the source bucket is emptied and every file comes back byte-identical from S3 alone; after erasure nothing
of the wedding's media is readable."""
from __future__ import annotations

import hashlib
import io

import pytest

from wedbackup_dagster.core.governance.erasure import erase_wedding
from wedbackup_dagster.core.errors import RestoreError
from wedbackup_dagster.core.media.backup import back_up_media
from wedbackup_dagster.core.media.packs import PackError, PackReader
from wedbackup_dagster.core.media.restore import restore_media
from wedbackup_dagster.core.media.source import partition_of
from wedbackup_dagster.core.media.verify import verify_media
from wedbackup_dagster.core.storage.vault import Vault
from wedbackup_dagster.dev.demo_media import S3Sink, generate_media, platform_media, wedding_media

from .conftest import TEST_SCALE

WEDDINGS = ["12", "14"]


def _expected(seed: int = 7) -> dict[str, str]:
    """SHA-256 of every demo file, from the generator itself: an independent path from the backup."""
    out = {}
    items = [i for w in WEDDINGS for i in wedding_media(w, seed, TEST_SCALE)] + list(platform_media(seed, TEST_SCALE))
    for path, content in items:
        data = content if isinstance(content, bytes) else content.read()
        out[path] = hashlib.sha256(data).hexdigest()
    return out


def _bucket_digests(world) -> dict[str, str]:
    out = {}
    for page in world.s3.get_paginator("list_objects_v2").paginate(Bucket=world.bucket):
        for item in page.get("Contents", []):
            body = world.s3.get_object(Bucket=world.bucket, Key=item["Key"])["Body"].read()
            out[item["Key"]] = hashlib.sha256(body).hexdigest()
    return out


def _back_up_everything(world) -> dict:
    results = {}
    for partition in [*WEDDINGS, "platform"]:
        key = world.catalogue.wedding_key(partition, world.keyring)
        results[partition] = back_up_media(partition, world.source, world.store, key)
        results[partition].uploaded = {name: world.store.replicate(partition, replica)
                                       for name, replica in world.replicas.items()}
    return results


def test_back_up_empty_the_source_restore_from_s3_alone_then_erase(media_world):
    world = media_world
    generate_media(S3Sink(world.s3, world.bucket), WEDDINGS, seed=7, scale=TEST_SCALE)
    expected = _expected()
    assert _bucket_digests(world) == expected

    first = _back_up_everything(world)
    for partition in WEDDINGS:
        r = first[partition]
        assert r.files == len([p for p in expected if partition_of(p) == partition])
        assert not r.skipped and not r.unchanged
        # the couple's two uploads of the photographer's photo cost nothing; the edit costs little
        assert r.new_bytes < r.read_bytes - 2 * (2 << 20), (r.new_bytes, r.read_bytes)
        assert r.packs >= 1
    assert first["platform"].new_bytes < first["platform"].read_bytes  # the shared stock photo, once
    assert all(n > 0 for n, _ in first["12"].uploaded.values())
    copies = world.store.copies("12")
    assert {c["provider"] for c in copies} == {"vault", "s3", "gcs", "azure"}

    second = _back_up_everything(world)
    for partition, r in second.items():
        assert r.unchanged and r.read_bytes == 0 and r.stored_bytes == 0, partition
        assert r.uploaded == {"s3": (0, 0), "gcs": (0, 0), "azure": (0, 0)}, partition
        assert r.snapshot_sha256 == first[partition].snapshot_sha256

    # The source is lost.
    for key in list(expected):
        world.s3.delete_object(Bucket=world.bucket, Key=key)
    assert _bucket_digests(world) == {}

    for partition in [*WEDDINGS, "platform"]:
        resolve = lambda kid: world.catalogue.key_by_id(kid, world.keyring)  # noqa: E731
        result = restore_media(world.store, partition, resolve, to_bucket=world.source, provider="s3")
        assert result.locations == {"s3": result.locations["s3"]} and not result.damaged
    assert _bucket_digests(world) == expected

    # Erasure (the real one): the key is shredded and the media deleted everywhere. A copy kept elsewhere
    # (taken before, as an immutable copy or an attacker would) opens no more.
    kept = []
    for copy in world.store.copies("12"):
        if copy["kind"] == "pack" and copy["provider"] == "s3":
            buf = io.BytesIO()
            world.replicas["s3"].download(copy["object_key"], buf)
            kept.append(buf)
    assert kept
    report = erase_wedding(world.catalogue, Vault(world.settings.vault_dir), world.replicas, "12", requested_by="test")
    assert report.complete and report.keys_shredded == 1
    resolve = lambda kid: world.catalogue.key_by_id(kid, world.keyring)  # noqa: E731
    with pytest.raises(RestoreError, match="no media snapshot"):
        restore_media(world.store, "12", resolve, to_dir=world.tmp / "after-erasure")
    for name, replica in world.replicas.items():
        assert not list(replica.list("media/weddings/12/")), name
    assert not (world.settings.vault_dir / "media.d" / "12").exists()
    for buf in kept:
        with pytest.raises(PackError, match="not available"):
            PackReader(buf, name="kept copy", resolve_key=resolve)
    # wedding 14 is untouched
    assert verify_media(world.store, "14", resolve, "azure").ok


def test_restore_to_a_directory_takes_another_copy_of_a_damaged_pack(media_world):
    world = media_world
    generate_media(S3Sink(world.s3, world.bucket), ["12"], seed=3, scale=TEST_SCALE, platform=False)
    key = world.catalogue.wedding_key("12", world.keyring)
    back_up_media("12", world.source, world.store, key)
    for replica in world.replicas.values():
        world.store.replicate("12", replica)
    resolve = lambda kid: world.catalogue.key_by_id(kid, world.keyring)  # noqa: E731

    # Damage one pack in the vault (one bit) and delete it at GCS.
    pack = next(c for c in world.store.copies("12") if c["kind"] == "pack" and c["provider"] == "vault")
    path = world.store.vault_path("12", "pack", pack["object_sha256"])
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    gcs_key = world.store.copies_of(pack["object_sha256"])["gcs"]["object_key"]
    world.replicas["gcs"].delete(gcs_key)

    bad = verify_media(world.store, "12", resolve, "vault")
    assert not bad.ok and any(pack["object_sha256"] in p and "vault" in p for p in bad.problems)
    missing = verify_media(world.store, "12", resolve, "gcs")
    assert not missing.ok and any(pack["object_sha256"] in p for p in missing.problems)
    assert verify_media(world.store, "12", resolve, "s3").ok

    result = restore_media(world.store, "12", resolve, to_dir=world.tmp / "out")
    assert any("vault" in d and pack["object_sha256"] in d for d in result.damaged)
    assert result.locations.get("s3", 0) >= 1
    for path_, content in wedding_media("12", 3, TEST_SCALE):
        data = content if isinstance(content, bytes) else content.read()
        restored = (world.tmp / "out" / path_).read_bytes()
        assert restored == data, path_

    # only one file, chosen by a glob, from Azure alone
    one = restore_media(world.store, "12", resolve, to_dir=world.tmp / "one", path_glob="*/documents/doc-001.txt",
                        provider="azure")
    assert one.files == 1 and [p.name for p in (world.tmp / "one").rglob("*") if p.is_file()] == ["doc-001.txt"]
    with pytest.raises(RestoreError, match="no intact copy"):
        restore_media(world.store, "12", resolve, to_dir=world.tmp / "gcs-only", provider="gcs")


def test_a_changed_file_uploads_only_its_new_chunks(media_world):
    world = media_world
    generate_media(S3Sink(world.s3, world.bucket), ["7"], seed=5, scale=TEST_SCALE, platform=False)
    key = world.catalogue.wedding_key("7", world.keyring)
    first = back_up_media("7", world.source, world.store, key)
    photo = "weddings/7/photographer/IMG_0001.jpg"
    data = world.s3.get_object(Bucket=world.bucket, Key=photo)["Body"].read()
    world.s3.put_object(Bucket=world.bucket, Key=photo, Body=data[:100] + b"new caption" + data[100:])
    world.s3.put_object(Bucket=world.bucket, Key="weddings/7/new/zero.bin", Body=b"")
    second = back_up_media("7", world.source, world.store, key)
    assert not second.unchanged and second.files == first.files + 1
    assert second.read_bytes == len(data) + len(b"new caption")
    assert 0 < second.new_bytes < 2 << 20  # the first chunk or two of one photo, not the photo
    assert second.snapshot_sha256 != first.snapshot_sha256


def test_repeated_chunks_are_stored_once_across_lookup_batches_and_packs(media_world, monkeypatch):
    """New chunks are decided in catalogue lookup batches (no in-memory index of the wedding): a chunk
    repeated within one batch, after a pack was closed mid-batch, in a later batch or in another file is
    stored once, and everything restores byte-identical."""
    import os

    from wedbackup_dagster.core.media import backup
    from wedbackup_dagster.core.media.chunker import CHUNK_MAX

    world = media_world
    # Small packs and large batches, so that a pack closes in the middle of a batch holding repeats.
    monkeypatch.setattr(backup, "PACK_TARGET_BYTES", 6 << 20)
    monkeypatch.setattr(backup, "LOOKUP_BATCH_BYTES", 40 << 20)
    block = os.urandom(CHUNK_MAX + (1 << 20))  # > one chunk's maximum: cut the same way wherever it repeats
    video = os.urandom(4 << 20) + block * 12
    world.s3.put_object(Bucket=world.bucket, Key="weddings/9/video.mov", Body=video)
    world.s3.put_object(Bucket=world.bucket, Key="weddings/9/copy of video.mov", Body=video)
    key = world.catalogue.wedding_key("9", world.keyring)
    result = backup.back_up_media("9", world.source, world.store, key)
    assert result.read_bytes == 2 * len(video)
    # The unique bytes, give or take the chunk boundaries where the random part meets the blocks.
    unique = (4 << 20) + len(block)
    assert unique - CHUNK_MAX <= result.new_bytes <= unique + 2 * CHUNK_MAX, (result.new_bytes, unique)
    assert result.packs_written == 2  # the first closed mid-batch, at 6 MiB
    with world.catalogue.connect() as conn:
        stored = conn.execute("SELECT sum(raw_bytes) AS b FROM wedbackup.media_chunks WHERE key_id = %s",
                              (key.key_id,)).fetchone()
    assert stored["b"] == result.new_bytes  # each chunk once
    out = world.tmp / "repeated"
    restore_media(world.store, "9", lambda kid: world.catalogue.key_by_id(kid, world.keyring), to_dir=out)
    assert (out / "weddings/9/video.mov").read_bytes() == video
    assert (out / "weddings/9/copy of video.mov").read_bytes() == video
