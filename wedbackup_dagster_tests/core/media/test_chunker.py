"""Chunking and keyed chunk ids: boundaries follow content (an insertion changes only nearby chunks), ids
depend on the wedding key, compression is used only when it pays."""
from __future__ import annotations

import io
import os
import random

from wedbackup_dagster.core.keys.keyring import SecretKey
from wedbackup_dagster.core.media.chunker import (
    CHUNK_MAX, CHUNK_MIN, MediaKeys, chunks, decompress, maybe_compress,
)


def _ids(keys: MediaKeys, data: bytes) -> list[bytes]:
    return [keys.chunk_id(bytes(c)) for c in chunks(keys, io.BytesIO(data))]


def test_chunks_cover_the_stream_within_bounds():
    keys = MediaKeys.of(SecretKey.generate("w1.a"))
    data = random.Random(1).randbytes(12 << 20)
    pieces = [bytes(c) for c in chunks(keys, io.BytesIO(data))]
    assert b"".join(pieces) == data
    assert all(len(p) <= CHUNK_MAX for p in pieces)
    assert all(len(p) >= CHUNK_MIN for p in pieces[:-1])
    assert 6 <= len(pieces) <= 40


def test_an_edit_near_the_start_keeps_most_chunks():
    keys = MediaKeys.of(SecretKey.generate("w1.a"))
    photo = random.Random(2).randbytes(8 << 20)
    edited = photo[:1000] + b"EXIF edited by the photographer" + photo[1000:]
    before, after = _ids(keys, photo), _ids(keys, edited)
    shared = len(set(before) & set(after))
    assert shared >= len(before) - 2, (shared, len(before))


def test_chunk_ids_and_boundaries_depend_on_the_wedding_key():
    data = random.Random(3).randbytes(6 << 20)
    a, b = MediaKeys.of(SecretKey.generate("w1.a")), MediaKeys.of(SecretKey.generate("w2.b"))
    assert set(_ids(a, data)).isdisjoint(_ids(b, data))
    sizes_a = [len(c) for c in chunks(a, io.BytesIO(data))]
    sizes_b = [len(c) for c in chunks(b, io.BytesIO(data))]
    assert sizes_a != sizes_b  # the gear seed comes from the key too
    assert "material" not in repr(a) and a.key_id in repr(a)


def test_compression_only_when_it_pays():
    noise = os.urandom(1 << 20)
    stored, compressed = maybe_compress(noise)
    assert not compressed and stored is noise
    text = b"guest list, table 4: Ana, Ben, Chloe\n" * 30000
    stored, compressed = maybe_compress(text)
    assert compressed and len(stored) < len(text) // 10
    assert decompress(stored, len(text)) == text
