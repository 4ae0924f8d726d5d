"""Bad input and faults: hostile names kept exactly and never written outside the target; zero-byte files;
an object that changes or disappears while it is read is skipped with its reason, never a torn file marked
good; an unreadable object is named and the rest is backed up."""
from __future__ import annotations

import os

from wedbackup_dagster.core.media.backup import back_up_media
from wedbackup_dagster.core.media.restore import local_name, restore_media
from wedbackup_dagster.core.media.source import DirectorySource, S3Source, partition_of
from wedbackup_dagster.core.media.verify import verify_media

HOSTILE = [
    "weddings/12/../../../etc/escape.txt",
    "weddings/12/./dot/./name",
    "weddings/12/tab\there\x1b[31mred",
    "weddings/12/ünïcødé/写真 💍.jpg",
    "weddings/12/percent%2E%2E/100%.txt",
    "weddings/12//double-slash",
    "weddings/12/zero.bin",
]


def test_local_names_stay_inside_and_distinct():
    names = [local_name(p) for p in HOSTILE] + [local_name("weddings/12/%2E%2E/x")]
    assert len(set(names)) == len(names)
    for n in names:
        assert not n.startswith("/") and all(seg not in ("", ".", "..") for seg in n.split("/"))
        assert not any(ord(c) < 0x20 for c in n)
    assert local_name("weddings/12/ünïcødé/写真 💍.jpg") == "weddings/12/ünïcødé/写真 💍.jpg"


def test_control_characters_and_non_utf8_names_from_a_directory(media_world, tmp_path):
    world = media_world
    root = tmp_path / "media"
    folder = root / "weddings" / "3"
    folder.mkdir(parents=True)
    names = ["new\nline\r.txt", "bell\x07.jpg", os.fsdecode(b"latin1-\xe9t\xe9.jpg"), "..hidden", "zero"]
    for i, name in enumerate(names):
        (folder / name).write_bytes(b"" if name == "zero" else os.urandom(1000 + i))
    key = world.catalogue.wedding_key("3", world.keyring)
    result = back_up_media("3", DirectorySource(root), world.store, key)
    assert result.files == len(names) and not result.skipped
    resolve = lambda kid: world.catalogue.key_by_id(kid, world.keyring)  # noqa: E731
    out = tmp_path / "out"
    restore_media(world.store, "3", resolve, to_dir=out)
    for name in names:
        restored = out / "weddings" / "3" / local_name(name)
        assert restored.read_bytes() == (folder / name).read_bytes(), repr(name)
    assert (out / "weddings/3/..hidden").is_file()  # a name starting with dots is just a name


def test_layout():
    assert partition_of("weddings/12/a.jpg") == "12"
    assert partition_of("weddings/12") == "platform"
    assert partition_of("weddings/../a") == "platform"
    assert partition_of("weddings/platform/a") == "platform"
    assert partition_of("vendors/3/portfolio/a.jpg") == "platform"


def test_hostile_names_round_trip_through_s3(media_world):
    world = media_world
    contents = {path: (f"content of {path!r}".encode() if "zero" not in path else b"") for path in HOSTILE}
    for path, data in contents.items():
        world.s3.put_object(Bucket=world.bucket, Key=path, Body=data)
    key = world.catalogue.wedding_key("12", world.keyring)
    result = back_up_media("12", world.source, world.store, key)
    assert result.files == len(HOSTILE) and not result.skipped
    resolve = lambda kid: world.catalogue.key_by_id(kid, world.keyring)  # noqa: E731

    out = world.tmp / "target"
    restored = restore_media(world.store, "12", resolve, to_dir=out)
    assert restored.files == len(HOSTILE)
    assert {src for src, _ in restored.renamed} == {p for p in HOSTILE if local_name(p) != p}
    written = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert written == {local_name(p): d for p, d in contents.items()}
    assert not (world.tmp / "etc").exists()

    for path in HOSTILE:
        world.s3.delete_object(Bucket=world.bucket, Key=path)
    world.source.single_put_max = 30  # the parts path of objects over 5 GB, on these small ones
    restore_media(world.store, "12", resolve, to_bucket=world.source)  # exact names back in a bucket
    for path, data in contents.items():
        assert world.s3.get_object(Bucket=world.bucket, Key=path)["Body"].read() == data


class _RacingS3Source(S3Source):
    """The real bucket, with another writer overwriting one object and deleting another right after the
    listing saw them (what an upload racing the backup does)."""

    def __init__(self, inner: S3Source, overwrite: str, delete: str):
        super().__init__(inner.client, inner.bucket)
        self.overwrite, self.delete = overwrite, delete

    def list(self, partition=None):
        listed = list(super().list(partition))
        self.client.put_object(Bucket=self.bucket, Key=self.overwrite, Body=b"the photographer's new upload")
        self.client.delete_object(Bucket=self.bucket, Key=self.delete)
        yield from listed


def test_objects_changing_or_vanishing_during_the_backup_are_skipped_with_a_reason(media_world):
    world = media_world
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        world.s3.put_object(Bucket=world.bucket, Key=f"weddings/5/{name}", Body=os.urandom(300_000))
    source = _RacingS3Source(world.source, "weddings/5/a.jpg", "weddings/5/b.jpg")
    key = world.catalogue.wedding_key("5", world.keyring)
    result = back_up_media("5", source, world.store, key)
    reasons = {s.path: s.reason for s in result.skipped}
    assert set(reasons) == {"weddings/5/a.jpg", "weddings/5/b.jpg"}
    assert "changed" in reasons["weddings/5/a.jpg"] and "disappeared" in reasons["weddings/5/b.jpg"]
    assert result.files == 1
    resolve = lambda kid: world.catalogue.key_by_id(kid, world.keyring)  # noqa: E731
    assert verify_media(world.store, "5", resolve, "vault").ok
    # the next backup takes the new upload
    again = back_up_media("5", world.source, world.store, key)
    assert again.files == 2 and not again.skipped


class _AppendingDirectorySource(DirectorySource):
    """A real directory where a writer appends to one file while the backup is reading it."""

    def __init__(self, root, victim: str):
        super().__init__(root)
        self.victim = victim

    def open(self, obj):
        ctx = super().open(obj)
        if obj.path != self.victim:
            return ctx
        victim = self.root / obj.path

        class _Racing:
            def __enter__(inner):
                stream = ctx.__enter__()
                raw_read = stream._raw.read

                def read(n=-1):
                    data = raw_read(n)
                    with open(victim, "ab") as fh:  # the other writer
                        fh.write(b"more bytes")
                    return data

                stream._raw.read = read
                return stream

            def __exit__(inner, *exc):
                return ctx.__exit__(*exc)

        return _Racing()


def test_a_file_growing_while_read_is_not_marked_good_and_an_unreadable_one_is_named(media_world, tmp_path):
    world = media_world
    root = tmp_path / "media"
    (root / "weddings/9/docs").mkdir(parents=True)
    (root / "weddings/9/docs/contract.pdf").write_bytes(os.urandom(1 << 20))
    (root / "weddings/9/docs/zero.txt").write_bytes(b"")
    (root / "weddings/9/docs/growing.mov").write_bytes(os.urandom(3 << 20))
    os.mkfifo(root / "weddings/9/docs/pipe")  # not a regular file: never opened (it would block)
    os.symlink("/etc/passwd", root / "weddings/9/docs/link")
    # unreadable even for root: a name that is not a file any more by the time it is opened
    unreadable = root / "weddings/9/docs/unreadable.jpg"
    unreadable.write_bytes(b"x" * 10)
    source = _AppendingDirectorySource(root, "weddings/9/docs/growing.mov")
    listed = list(source.list("9"))
    unreadable.unlink()
    unreadable.mkdir()  # now a directory: open() fails with EISDIR

    class _Listed(type(source)):
        def list(self, partition=None):
            yield from listed

    source.__class__ = _Listed
    key = world.catalogue.wedding_key("9", world.keyring)
    result = back_up_media("9", source, world.store, key)
    reasons = {s.path: s.reason for s in result.skipped}
    assert "changed" in reasons.pop("weddings/9/docs/growing.mov")
    assert "unreadable.jpg" in reasons.pop("weddings/9/docs/unreadable.jpg")
    assert set(reasons) == {"weddings/9/docs/pipe", "weddings/9/docs/link"}
    resolve = lambda kid: world.catalogue.key_by_id(kid, world.keyring)  # noqa: E731
    out = restore_media(world.store, "9", resolve, to_dir=tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == ["contract.pdf", "zero.txt"]
    assert (tmp_path / "out/weddings/9/docs/zero.txt").read_bytes() == b""
    assert out.files == 2
