"""The pack format: what the writer writes the reader reads back, chunk by chunk; a pack is named by its
SHA-256; any damage, a wrong key or a swapped blob is an error naming the pack."""
from __future__ import annotations

import io
import os

import pytest

from wedbackup_dagster.core.keys.keyring import SecretKey
from wedbackup_dagster.core.media.chunker import MediaKeys, maybe_compress
from wedbackup_dagster.core.media.packs import PackError, PackReader, PackWriter, pack_sha256


def _pack(key: SecretKey, blobs: list[bytes]) -> tuple[bytes, list[bytes]]:
    keys = MediaKeys.of(key)
    out = io.BytesIO()
    writer = PackWriter(out, key)
    ids = []
    for blob in blobs:
        cid = keys.chunk_id(blob)
        stored, compressed = maybe_compress(blob)
        writer.add(cid, stored, len(blob), compressed)
        ids.append(cid)
    info = writer.close()
    data = out.getvalue()
    assert info.sha256 == pack_sha256(io.BytesIO(data)) and info.size == len(data)
    return data, ids


def test_round_trip_and_no_plaintext():
    key = SecretKey.generate("w7.k")
    blobs = [os.urandom(300_000), b"wedding menu " * 50_000, b""]
    data, ids = _pack(key, blobs)
    reader = PackReader(io.BytesIO(data), name="p", resolve_key=lambda kid: key)
    assert [reader.read_chunk(i) for i in ids] == blobs
    assert b"wedding menu" not in data


def test_wrong_key_is_refused():
    key = SecretKey.generate("w7.k")
    data, _ = _pack(key, [b"x" * 1000])
    with pytest.raises(PackError, match="does not open"):
        PackReader(io.BytesIO(data), name="p", resolve_key=lambda kid: SecretKey(kid, os.urandom(32)))


@pytest.mark.parametrize("where", ["header", "blob", "index", "trailer", "truncated"])
def test_damage_is_named(where):
    key = SecretKey.generate("w7.k")
    data, ids = _pack(key, [os.urandom(200_000), os.urandom(100_000)])
    raw = bytearray(data)
    spot = {"header": 20, "blob": 5000, "index": len(raw) - 60, "trailer": len(raw) - 3}.get(where)
    if where == "truncated":
        raw = raw[:-100]
    else:
        raw[spot] ^= 0x40
    with pytest.raises(PackError, match="'p'|p:") as info:
        reader = PackReader(io.BytesIO(bytes(raw)), name="p", resolve_key=lambda kid: key)
        for i in ids:
            reader.read_chunk(i)
    assert "p" in str(info.value)
