"""The media snapshot: sealed with the wedding key, read back exactly (hostile paths included); damage,
truncation and a wrong key are errors naming it. Verification samples rotate through every file."""
from __future__ import annotations

import io

import pytest

from wedbackup_dagster.core.errors import ArchiveError
from wedbackup_dagster.core.keys.keyring import SecretKey
from wedbackup_dagster.core.media.snapshot import MediaFile, MediaSnapshot, Skipped, read_snapshot, write_snapshot
from wedbackup_dagster.core.media.verify import sample_files

PATHS = ["weddings/1/a.jpg", "weddings/1/../../x", "weddings/1/new\nline\x00", "weddings/1/\udce9t\udce9", "写真"]


def _snapshot() -> MediaSnapshot:
    files = [MediaFile(p, i, f"{i:064x}", "etag" if i else None, None, str(i), (f"{i:064x}",) * i)
             for i, p in enumerate(PATHS)]
    return MediaSnapshot("1", "2026-12-05T10:00:00+00:00", "s3://m/", files, [Skipped("weddings/1/b", "changed")])


def test_round_trip_keeps_every_path_exactly():
    key = SecretKey.generate("1.k")
    out = io.BytesIO()
    stats = write_snapshot(out, _snapshot(), key)
    assert stats.sealed_bytes == len(out.getvalue()) and b"a.jpg" not in out.getvalue()
    back = read_snapshot(io.BytesIO(out.getvalue()), name="snap", resolve_key=lambda kid: key)
    assert back == _snapshot()


@pytest.mark.parametrize("damage", ["flip", "truncate", "wrong-key"])
def test_damage_is_an_error_naming_the_snapshot(damage):
    key = SecretKey.generate("1.k")
    out = io.BytesIO()
    write_snapshot(out, _snapshot(), key)
    raw = bytearray(out.getvalue())
    resolve = lambda kid: key  # noqa: E731
    if damage == "flip":
        raw[-30] ^= 1
    elif damage == "truncate":
        raw = raw[:-40]
    else:
        resolve = lambda kid: SecretKey(kid, bytes(32))  # noqa: E731
    with pytest.raises(ArchiveError, match="snap"):
        read_snapshot(io.BytesIO(bytes(raw)), name="snap", resolve_key=resolve)


def test_samples_rotate_through_every_file():
    files = [MediaFile(f"f{i:02d}", 1, "0" * 64, None, None, None) for i in range(10)]
    seen = set()
    for round_ in range(4):
        picked = sample_files(files, 3, round_)
        assert len(picked) == 3
        seen |= {f.path for f in picked}
    assert seen == {f.path for f in files}
    assert sample_files(files, 0, 5) == files
