"""Tests for the sealed archive format: round trips, stats, and that every kind of damage, truncation,
reordering or wrong key ends in an ArchiveError naming the archive, never in wrong plaintext."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wedbackup_dagster.core.formats.archive import (ArchiveHeader, ArchiveStats, ArchiveWriter, open_archive,
                                                    open_archive_bytes, read_header, seal_bytes)
from wedbackup_dagster.core.errors import (ArchiveCorrupt, ArchiveError, ArchiveKeyUnavailable, ArchiveNotRecognised,
                                           ArchiveTruncated, ArchiveUnsupportedVersion, ArchiveWrongKey, CryptoKeyError)
from wedbackup_dagster.core.keys.keyring import SecretKey, unwrap_key, wrap_key

REPO = Path(__file__).resolve().parents[3]
KEY = SecretKey("wedding-123.k1", bytes(range(32)))
OTHER_KEY_SAME_ID = SecretKey("wedding-123.k1", bytes(range(1, 33)))
NAME = "weddings/123/2024-06-01.wbk"
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def resolver(*keys: SecretKey):
    known = {k.key_id: k for k in keys}

    def resolve(key_id: str) -> SecretKey:
        if key_id not in known:
            raise CryptoKeyError(f"no wedding key {key_id!r} in the key store")
        return known[key_id]

    return resolve


RESOLVE = resolver(KEY)


def seal(data: bytes, *, key: SecretKey = KEY, chunk_size: int = 64, label=None, pieces: int = 1):
    out = io.BytesIO()
    with ArchiveWriter(out, wedding_key=key, chunk_size=chunk_size, label=label) as writer:
        step = max(1, len(data) // pieces)
        for off in range(0, len(data), step):
            writer.write(data[off : off + step])
    return out.getvalue(), writer.close()


def unseal(blob: bytes, resolve=RESOLVE, name: str = NAME) -> bytes:
    return open_archive_bytes(blob, name=name, resolve_key=resolve)


def read_collecting(blob: bytes, resolve=RESOLVE, name: str = NAME) -> tuple[bytes, BaseException | None]:
    """Plaintext released before any failure, and the failure. Any exception that is not the format's own
    (ArchiveError and its subclasses) escapes and fails the test."""
    got = bytearray()
    try:
        for piece in open_archive(io.BytesIO(blob), name=name, resolve_key=resolve):
            got += piece
    except ArchiveError as exc:
        return bytes(got), exc
    return bytes(got), None


def split(blob: bytes) -> tuple[bytes, list[bytes]]:
    """Header and sealed chunks, cut by the rules of docs/FORMAT.md."""
    header_len = struct.unpack(">I", blob[7:11])[0]
    chunk_size = read_header(io.BytesIO(blob), name=NAME).chunk_size
    body = blob[header_len:]
    step = chunk_size + 16
    return blob[:header_len], [body[i : i + step] for i in range(0, len(body), step)]


def data_key_of(blob: bytes, key: SecretKey = KEY) -> bytes:
    header, _ = split(blob)
    k = header[11]
    wlen = struct.unpack(">H", header[12 + k : 14 + k])[0]
    return unwrap_key(key, header[14 + k : 14 + k + wlen], b"wedbackup-archive-v1:" + header[12 : 12 + k])


def assert_names_archive_and_hides_keys(exc: BaseException, *secrets: bytes) -> None:
    assert isinstance(exc, ArchiveError)
    assert str(exc).startswith(f"archive {NAME}: ") and exc.archive == NAME
    for secret in (KEY.material, OTHER_KEY_SAME_ID.material, *secrets):
        for form in (secret.hex(), base64.b64encode(secret).decode(), repr(secret)[2:-1]):
            assert form not in str(exc)


def csv_rows(n: int) -> bytes:
    rng = random.Random(7)
    names = ["ana", "ben", "chloe", "dev", "ema"]
    return "".join(
        f"{i},{rng.choice(names)},{rng.choice(names)}@example.com,{rng.randint(0, 10**6)},table {rng.randint(1, 30)}\n"
        for i in range(n)
    ).encode()


def seal_raw(pieces: list[bytes], *, key: SecretKey = KEY, chunk_size: int, flags: list[int] | None = None) -> bytes:
    """An archive built straight from the FORMAT.md description, with chosen chunk plaintexts.
    Lets tests produce authenticated-but-wrong content that ArchiveWriter would never write."""
    data_key = os.urandom(32)
    kid = key.key_id.encode()
    wrapped = wrap_key(key, data_key, b"wedbackup-archive-v1:" + kid)
    prefix = os.urandom(7)
    body = (
        bytes([len(kid)]) + kid + struct.pack(">H", len(wrapped)) + wrapped + b"\x01" + prefix
        + struct.pack(">IH", chunk_size, 0)
    )
    header = b"WEDBAK\x01" + struct.pack(">I", 11 + len(body)) + body
    aead = AESGCM(data_key)
    flags = flags or [0] * (len(pieces) - 1) + [1]
    chunks = [aead.encrypt(prefix + struct.pack(">IB", i, f), p, header) for i, (p, f) in enumerate(zip(pieces, flags))]
    return header + b"".join(chunks)


def cut(stream: bytes, size: int) -> list[bytes]:
    pieces = [stream[i : i + size] for i in range(0, len(stream), size)] or [b""]
    return pieces


# Round trips


INPUTS = {
    "empty": b"",
    "one-byte": b"x",
    "chunk-size-zeros": bytes(64),
    "chunk-size-random": os.urandom(64),
    "chunk-plus-one": os.urandom(65),
    "random": os.urandom(5000),
    "csv": csv_rows(3000),
    "zeros-3MiB": bytes(3 << 20),
}
ROUND_TRIPS = [
    pytest.param(data, chunk_size, id=f"{name}-chunk{chunk_size}")
    for name, data in INPUTS.items()
    for chunk_size in (1, 64, 4096, 1 << 20)
    if chunk_size > 1 or len(data) < 10_000
]


@pytest.mark.parametrize("data, chunk_size", ROUND_TRIPS)
def test_round_trip(data, chunk_size):
    blob, stats = seal(data, chunk_size=chunk_size, pieces=3)
    assert unseal(blob) == data
    assert stats.raw_bytes == len(data)


def test_compressed_stream_exactly_filling_the_last_chunk():
    # Find an input whose zstd frame is an exact multiple of the chunk size, so the final chunk is
    # full-sized and only EOF says it is last.
    for n in range(200, 400):
        data = random.Random(n).randbytes(n)
        blob, stats = seal(data, chunk_size=64)
        if stats.compressed_bytes % 64 == 0:
            break
    else:
        pytest.fail("no input with an exactly chunk-aligned compressed size found")
    header, chunks = split(blob)
    assert all(len(c) == 80 for c in chunks) and len(chunks) == stats.chunks
    assert unseal(blob) == data

    with pytest.raises(ArchiveTruncated, match=f"truncated after chunk {len(chunks) - 2}"):
        unseal(header + b"".join(chunks[:-1]))
    with pytest.raises(ArchiveCorrupt, match=f"unexpected data after the final chunk \\(chunk {len(chunks) - 1}\\)"):
        unseal(blob + b"\x00")


def test_whole_buffer_helpers():
    data = csv_rows(100)
    blob, stats = seal_bytes(data, wedding_key=KEY, label={"wedding": "123"}, chunk_size=128)
    assert stats.sealed_bytes == len(blob) and stats.chunks > 1
    assert open_archive_bytes(blob, name=NAME, resolve_key=RESOLVE) == data


def test_many_small_writes_equal_one_write():
    data = csv_rows(2000)
    out = io.BytesIO()
    with ArchiveWriter(out, wedding_key=KEY, chunk_size=512) as writer:
        view = memoryview(data)
        for off in range(0, len(data), 37):
            writer.write(view[off : off + 37])
        writer.write(bytearray(b"tail"))
        writer.write(b"")
    assert unseal(out.getvalue()) == data + b"tail"


def test_stats_describe_the_file():
    data = csv_rows(5000)
    blob, stats = seal(data, chunk_size=1000, label={"wedding": "123"})
    header, chunks = split(blob)
    assert isinstance(stats, ArchiveStats)
    assert stats.sha256 == hashlib.sha256(blob).hexdigest()
    assert stats.sealed_bytes == len(blob)
    assert stats.raw_bytes == len(data)
    assert stats.chunks == len(chunks) == -(-stats.compressed_bytes // 1000)
    assert stats.compressed_bytes == len(blob) - len(header) - 16 * len(chunks)
    assert stats.compressed_bytes < len(data) / 2
    assert stats.key_id == KEY.key_id


def test_header_is_readable_without_a_key_and_holds_no_key():
    label = {"wedding": "123", "created": "2024-06-01T02:00:00Z", "couple": "Zoë & Ana"}
    blob, _ = seal(b"hello", chunk_size=4096, label=label)
    header = read_header(io.BytesIO(blob), name=NAME)
    assert header == ArchiveHeader(
        version=1, key_id=KEY.key_id, label=label, chunk_size=4096, compression="zstd", header_len=header.header_len
    )
    assert blob[: header.header_len].startswith(b"WEDBAK\x01")
    assert data_key_of(blob) not in blob and KEY.material not in blob
    reader = open_archive(io.BytesIO(blob), name=NAME, resolve_key=RESOLVE)
    assert reader.header == header


def test_each_archive_gets_fresh_data_key_and_nonce_prefix():
    a, _ = seal(b"same bytes")
    b, _ = seal(b"same bytes")
    assert a != b and data_key_of(a) != data_key_of(b)
    assert split(a)[0][-13:-6] != split(b)[0][-13:-6]


def test_read_in_small_pieces_and_reader_progress():
    data = csv_rows(1000)
    blob, stats = seal(data, chunk_size=256)
    reader = open_archive(io.BytesIO(blob), name=NAME, resolve_key=RESOLVE)
    assert not reader.complete
    got = bytearray()
    while piece := reader.read(7):
        assert len(piece) <= 7
        got += piece
    assert bytes(got) == data
    assert reader.complete and reader.chunks == stats.chunks and reader.plaintext_bytes == len(data)


def test_read_all_at_once():
    data = os.urandom(3000)
    blob, _ = seal(data, chunk_size=100)
    reader = open_archive(io.BytesIO(blob), name=NAME, resolve_key=RESOLVE)
    assert reader.read(10) + reader.read() == data


def test_highly_compressible_input_streams_in_bounded_pieces():
    # 256 MiB of zeros is ~8 KiB of zstd: without care one chunk would inflate to 256 MiB at once.
    size = 256 << 20
    out = io.BytesIO()
    with ArchiveWriter(out, wedding_key=KEY) as writer:
        block = bytes(1 << 22)
        for _ in range(size // len(block)):
            writer.write(block)
    blob = out.getvalue()
    assert len(blob) < 64 * 1024
    total = largest = 0
    for piece in open_archive(io.BytesIO(blob), name=NAME, resolve_key=RESOLVE):
        assert not piece.strip(b"\x00")
        total += len(piece)
        largest = max(largest, len(piece))
    assert total == size
    assert largest <= (9 * 128) << 10


def test_works_with_real_files(tmp_path):
    data = csv_rows(20000)
    path = tmp_path / "a.wbk"
    with open(path, "wb") as fh:
        with ArchiveWriter(fh, wedding_key=KEY, chunk_size=8192) as writer:
            writer.write(data)
    stats = writer.close()
    assert stats.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with open(path, "rb") as fh:
        assert b"".join(open_archive(fh, name=NAME, resolve_key=RESOLVE)) == data
    with open(path, "rb", buffering=0) as fh:
        assert b"".join(open_archive(fh, name=NAME, resolve_key=RESOLVE)) == data


# Writer behaviour


def test_writer_rejects_bad_arguments():
    for chunk_size in (0, -1, (64 << 20) + 1):
        with pytest.raises(ValueError):
            ArchiveWriter(io.BytesIO(), wedding_key=KEY, chunk_size=chunk_size)
    with pytest.raises(TypeError):
        ArchiveWriter(io.BytesIO(), wedding_key=KEY, label=["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="label"):
        ArchiveWriter(io.BytesIO(), wedding_key=KEY, label={"x": "y" * 20000})
    with pytest.raises(TypeError):
        ArchiveWriter(io.BytesIO(), wedding_key=KEY.material)  # type: ignore[arg-type]


def test_close_is_idempotent_and_write_after_close_fails():
    writer = ArchiveWriter(io.BytesIO(), wedding_key=KEY)
    writer.write(b"abc")
    assert writer.close() is writer.close()
    with pytest.raises(ValueError):
        writer.write(b"more")


def test_exception_inside_writer_leaves_a_truncated_archive():
    out = io.BytesIO()
    with pytest.raises(RuntimeError):
        with ArchiveWriter(out, wedding_key=KEY, chunk_size=4096) as writer:
            writer.write(os.urandom(300_000))
            raise RuntimeError("dump failed half-way")
    blob = out.getvalue()
    assert len(blob) > 100_000  # full chunks were streamed out before the failure
    with pytest.raises(ArchiveTruncated, match=r"truncated after chunk \d+") as info:
        unseal(blob)
    assert_names_archive_and_hides_keys(info.value, data_key_of(blob))
    with pytest.raises(ValueError):
        writer.close()


def test_writer_never_closed_is_truncated():
    out = io.BytesIO()
    writer = ArchiveWriter(out, wedding_key=KEY, chunk_size=4096)
    writer.write(os.urandom(300_000))
    with pytest.raises(ArchiveTruncated, match="truncated after chunk"):
        unseal(out.getvalue())
    with pytest.raises(ArchiveTruncated, match="no chunks"):
        unseal(seal_header_only())


def seal_header_only() -> bytes:
    out = io.BytesIO()
    ArchiveWriter(out, wedding_key=KEY).abort()
    return out.getvalue()


class FailingFile(io.BytesIO):
    def __init__(self, fail_after: int):
        super().__init__()
        self.fail_after = fail_after

    def write(self, data):
        if self.tell() + len(data) > self.fail_after:
            raise OSError("disk full")
        return super().write(data)


def test_io_error_while_writing_aborts_the_writer():
    out = FailingFile(fail_after=50_000)
    writer = ArchiveWriter(out, wedding_key=KEY, chunk_size=4096)
    with pytest.raises(OSError):
        writer.write(os.urandom(300_000))
    with pytest.raises(ValueError, match="aborted"):
        writer.close()
    with pytest.raises(ArchiveTruncated):
        unseal(out.getvalue())


# Keys


def test_wrong_wedding_key_is_reported_up_front():
    blob, _ = seal(b"secret guest list")
    with pytest.raises(ArchiveWrongKey, match=r"sealed with a different key \(key id 'wedding-123.k1'\)") as info:
        open_archive(io.BytesIO(blob), name=NAME, resolve_key=resolver(OTHER_KEY_SAME_ID))
    assert_names_archive_and_hides_keys(info.value, data_key_of(blob))


def test_unknown_key_id_names_archive_and_key_id():
    blob, _ = seal(b"x")
    with pytest.raises(ArchiveKeyUnavailable) as info:
        unseal(blob, resolve=resolver(SecretKey("someone-else", bytes(32))))
    assert "'wedding-123.k1'" in str(info.value) and "key store" in str(info.value)
    assert_names_archive_and_hides_keys(info.value)


# Damage


def test_not_an_archive():
    for junk in (b"", b"PK\x03\x04 a zip file", zstandard.ZstdCompressor().compress(b"hi"), b"WEDBAX\x01"):
        with pytest.raises(ArchiveNotRecognised, match="not a wedbackup archive"):
            unseal(junk)


def test_unsupported_version():
    blob, _ = seal(b"x")
    for version in (0, 2, 255):
        with pytest.raises(ArchiveUnsupportedVersion, match=f"format version {version} is not supported"):
            unseal(blob[:6] + bytes([version]) + blob[7:])


def test_truncated_header():
    blob, _ = seal(b"x", label={"wedding": "123"})
    header, _ = split(blob)
    for n in range(1, len(header)):
        with pytest.raises(ArchiveTruncated, match="truncated header"):
            unseal(blob[:n])
    with pytest.raises(ArchiveTruncated, match="truncated after the header"):
        unseal(header)


def test_every_single_byte_change_is_detected():
    data = csv_rows(60)
    blob, _ = seal(data, chunk_size=48, label={"wedding": "123"})
    header, chunks = split(blob)
    assert len(chunks) >= 5
    secret = data_key_of(blob)
    for offset in range(len(blob)):
        for mask in (0x01, 0x80):
            damaged = bytearray(blob)
            damaged[offset] ^= mask
            got, exc = read_collecting(bytes(damaged))
            assert exc is not None, f"flip at {offset} went unnoticed"
            assert_names_archive_and_hides_keys(exc, secret)
            assert data.startswith(got)
            if offset >= len(header):
                index = (offset - len(header)) // 64
                assert isinstance(exc, ArchiveCorrupt)
                assert f"chunk {index} failed authentication" in str(exc)


def test_header_damage_is_reported_by_field():
    blob, _ = seal(b"abc", label={"wedding": "123"})
    header, _ = split(blob)
    k = header[11]

    def flip(i: int) -> bytes:
        return blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1 :]

    with pytest.raises(ArchiveNotRecognised):
        unseal(flip(0))
    with pytest.raises(ArchiveUnsupportedVersion):
        unseal(flip(6))
    with pytest.raises(ArchiveCorrupt, match="header is malformed"):
        unseal(flip(10))  # header length
    with pytest.raises(ArchiveKeyUnavailable):
        unseal(flip(12))  # key id
    with pytest.raises(ArchiveWrongKey):
        unseal(flip(14 + k + 20))  # wrapped data key
    with pytest.raises(ArchiveCorrupt, match="unknown compression id"):
        unseal(flip(14 + k + 61))
    with pytest.raises(ArchiveCorrupt, match=r"chunk 0 failed authentication.*header"):
        unseal(flip(14 + k + 62))  # nonce prefix
    with pytest.raises(ArchiveCorrupt, match=r"chunk 0 failed authentication.*header"):
        unseal(flip(len(header) - 3))  # inside the label: still valid JSON, caught by authentication


def test_truncation_at_every_offset():
    data = csv_rows(40)
    blob, stats = seal(data, chunk_size=40)
    header, chunks = split(blob)
    boundaries = {len(header) + 56 * i: i - 1 for i in range(1, len(chunks))}
    for n in range(len(blob)):
        got, exc = read_collecting(blob[:n])
        assert isinstance(exc, ArchiveError), n
        assert data.startswith(got)
        if n in boundaries:
            assert isinstance(exc, ArchiveTruncated)
            assert f"truncated after chunk {boundaries[n]}" in str(exc)


@FUZZ
@given(data=st.binary(max_size=3000), chunk_size=st.integers(1, 300), cut_at=st.integers(0, 10**6))
def test_truncation_anywhere(data, chunk_size, cut_at):
    blob, _ = seal(data, chunk_size=chunk_size)
    n = cut_at % len(blob)
    got, exc = read_collecting(blob[:n])
    assert isinstance(exc, ArchiveError)
    assert data.startswith(got)


def test_reordered_duplicated_and_dropped_chunks():
    data = os.urandom(600)
    blob, _ = seal(data, chunk_size=100)
    header, chunks = split(blob)
    assert len(chunks) == 7
    swapped = header + b"".join([chunks[0], chunks[2], chunks[1], *chunks[3:]])
    with pytest.raises(ArchiveCorrupt, match="chunk 1 failed authentication"):
        unseal(swapped)
    duplicated = header + b"".join([*chunks[:3], chunks[2], *chunks[3:]])
    with pytest.raises(ArchiveCorrupt, match="chunk 3 failed authentication"):
        unseal(duplicated)
    dropped_middle = header + b"".join([*chunks[:3], *chunks[4:]])
    with pytest.raises(ArchiveCorrupt, match="chunk 3 failed authentication"):
        unseal(dropped_middle)
    dropped_last = header + b"".join(chunks[:-1])
    with pytest.raises(ArchiveTruncated, match="truncated after chunk 5"):
        unseal(dropped_last)
    last_moved_first = header + b"".join([chunks[-1], *chunks[:-1]])
    with pytest.raises(ArchiveCorrupt, match="chunk 0 failed authentication"):
        unseal(last_moved_first)


def test_a_failed_reader_keeps_failing():
    blob, _ = seal(os.urandom(1000), chunk_size=100)
    reader = open_archive(io.BytesIO(blob[:-5]), name=NAME, resolve_key=RESOLVE)
    with pytest.raises(ArchiveCorrupt):
        reader.read()
    for attempt in (lambda: next(reader), lambda: reader.read(10), lambda: list(reader)):
        with pytest.raises(ArchiveCorrupt):
            attempt()
    assert not reader.complete


def test_chunk_from_another_archive_is_rejected():
    data = os.urandom(300)
    a, _ = seal(data, chunk_size=100)
    b, _ = seal(data, chunk_size=100)
    header_a, chunks_a = split(a)
    _, chunks_b = split(b)
    with pytest.raises(ArchiveCorrupt, match="chunk 1 failed authentication"):
        unseal(header_a + chunks_a[0] + chunks_b[1] + b"".join(chunks_a[2:]))
    with pytest.raises(ArchiveCorrupt, match="chunk 0 failed authentication"):
        unseal(split(b)[0][:-7] + header_a[-7:] + b"".join(chunks_a))  # other header, same key id


def test_trailing_garbage():
    blob, _ = seal(os.urandom(250), chunk_size=100)
    for junk in (b"\x00", b"garbage" * 3, os.urandom(500), blob):
        got, exc = read_collecting(blob + junk)
        assert isinstance(exc, ArchiveCorrupt)
        assert len(got) <= 250


# Authenticated but malformed content (only a broken writer holding the key could produce these)


def test_authenticated_non_zstd_content_is_an_archive_error():
    with pytest.raises(ArchiveCorrupt, match="does not decompress"):
        unseal(seal_raw([b"this is not zstd at all"], chunk_size=64))


def test_authenticated_incomplete_frame_is_an_archive_error():
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(500))
    with pytest.raises(ArchiveCorrupt, match="ends early"):
        unseal(seal_raw(cut(frame[:-4], 64), chunk_size=64))


def test_authenticated_data_after_frame_is_an_archive_error():
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(b"hello" * 50)
    for extra in (b"junk", frame):
        with pytest.raises(ArchiveCorrupt, match="after the end of the compressed stream"):
            unseal(seal_raw(cut(frame + extra, 64), chunk_size=64))


def test_authenticated_bad_checksum_is_an_archive_error():
    frame = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(b"hello" * 50))
    frame[-1] ^= 0xFF
    with pytest.raises(ArchiveCorrupt, match="does not decompress"):
        unseal(seal_raw(cut(bytes(frame), 64), chunk_size=64))


def test_archive_built_from_the_format_description_opens():
    data = csv_rows(300)
    frame = zstandard.ZstdCompressor(level=9, write_checksum=True).compress(data)
    assert unseal(seal_raw(cut(frame, 128), chunk_size=128)) == data


def test_short_chunk_that_is_not_last_is_rejected():
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(200))
    pieces = [frame[:50], frame[50:]]
    with pytest.raises(ArchiveError):
        unseal(seal_raw(pieces, chunk_size=64, flags=[0, 1]))


# Fuzzing

MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 40)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
)


def mutate(blob: bytes, mutation) -> bytes:
    kind, where, arg = mutation
    b = bytearray(blob)
    if not b and kind != "insert":
        return blob
    i = where % (len(b) + (1 if kind == "insert" else 0))
    if kind == "flip":
        b[i] ^= arg
    elif kind == "insert":
        b[i:i] = arg
    elif kind == "delete":
        del b[i : i + arg]
    elif kind == "truncate":
        del b[i:]
    else:
        b[i : i + len(arg)] = arg
    return bytes(b)


@settings(FUZZ, max_examples=400)
@given(
    data=st.one_of(st.binary(max_size=2000), st.integers(0, 400).map(csv_rows)),
    chunk_size=st.sampled_from([1, 16, 64, 100, 4096]),
    mutations=st.lists(MUTATION, min_size=1, max_size=3),
    label=st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=3)),
)
def test_fuzzed_archives_fail_cleanly(data, chunk_size, mutations, label):
    blob, _ = seal(data, chunk_size=chunk_size, label=label)
    damaged = blob
    for m in mutations:
        damaged = mutate(damaged, m)
    got, exc = read_collecting(damaged)
    # Any exception other than ArchiveError escapes read_collecting and fails the test.
    assert data.startswith(got)
    if damaged != blob:
        assert isinstance(exc, ArchiveError)
        assert_names_archive_and_hides_keys(exc)
    else:
        assert exc is None and got == data


# docs/FORMAT.md


def reference_reader_source() -> str:
    text = (REPO / "docs" / "FORMAT.md").read_text()
    match = re.search(r"<!-- reference-reader -->\s*```python\n(.*?)```", text, re.S)
    assert match, "FORMAT.md lost its reference reader block"
    return match.group(1)


def run_reference_reader(tmp_path: Path, blob: bytes, key: SecretKey = KEY) -> subprocess.CompletedProcess:
    script = tmp_path / "wedbackup_open.py"
    script.write_text(reference_reader_source())
    archive = tmp_path / "a.wbk"
    archive.write_bytes(blob)
    env = {**os.environ, "WEDDING_KEY": base64.b64encode(key.material).decode()}
    return subprocess.run([sys.executable, str(script), str(archive)], capture_output=True, env=env, timeout=60)


def test_reference_reader_in_format_md_opens_archives(tmp_path):
    data = csv_rows(5000) + os.urandom(3000)
    blob, _ = seal(data, chunk_size=4096, label={"wedding": "123"})
    result = run_reference_reader(tmp_path, blob)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == data


def test_reference_reader_in_format_md_rejects_damage(tmp_path):
    blob, _ = seal(csv_rows(500), chunk_size=1024)
    header, chunks = split(blob)
    for damaged in (blob[:-1], header + b"".join(chunks[:-1]), blob + b"x", mutate(blob, ("flip", len(header) + 5, 1))):
        assert run_reference_reader(tmp_path, damaged).returncode != 0
    assert run_reference_reader(tmp_path, blob, key=OTHER_KEY_SAME_ID).returncode != 0


# --- loads_untrusted: the parser of every label, snapshot record, manifest and key backup -------------------

@pytest.mark.parametrize("text", [b"NaN", b"[Infinity]", b"[1e400]", b'"\\ud800"', b'"\xff"', b"{", b'{"a":1,}'])
def test_loads_untrusted_refuses_what_is_not_strict_json_with_a_json_error(text):
    from wedbackup_dagster.core.formats.archive import loads_untrusted

    with pytest.raises(json.JSONDecodeError):
        loads_untrusted(text)


def test_loads_untrusted_reads_bytes_and_text_alike_and_keeps_unicode_and_64_bit_integers():
    from wedbackup_dagster.core.formats.archive import loads_untrusted

    doc = {"name": "Zoë & Ana — 婚礼", "rows": 2**63 - 1, "bytes": 0, "ratio": 0.1, "tables": [{"n": None}]}
    encoded = json.dumps(doc, ensure_ascii=False)
    assert loads_untrusted(encoded.encode()) == doc
    assert loads_untrusted(encoded) == doc
    assert loads_untrusted(json.dumps(doc).encode()) == doc  # \u escapes too


def test_loads_untrusted_reads_an_integer_beyond_64_bits_as_a_float_which_the_record_checks_refuse():
    from wedbackup_dagster.core.formats.archive import loads_untrusted
    from wedbackup_dagster.core.formats.snapshot_stream import TABLE_END, Record, check_table_end

    assert isinstance(loads_untrusted(b'{"rows": 123456789012345678901234567890}')["rows"], float)
    end = Record(TABLE_END, b'{"rows": 123456789012345678901234567890, "bytes": 0, "sha256": "x"}', 9, "a.wbk")
    with pytest.raises(Exception, match="does not match its record"):
        check_table_end(end, 123456789012345678901234567890, 0, "x", what="wedding w", target="t", table="s.t",
                        done="read")
