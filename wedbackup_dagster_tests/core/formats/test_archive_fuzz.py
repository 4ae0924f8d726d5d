"""Fuzzing the whole read path with hypothesis, on a real wedding's sealed archive: random and
structure-aware mutations (bit flips, truncations, insertions, header fields, chunk swaps, duplicates,
drops, chunks from another archive) either fail with the format's own error naming the archive, or read
back exactly the original. Streams re-sealed with the right key after damage (a broken writer, or
someone holding the key) fail with SnapshotFormatError, or restore all-or-nothing and match their own
manifest. Deterministic (derandomize) and bounded, so CI is stable."""
from __future__ import annotations

import io
import struct
import uuid

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from wedbackup_dagster.dev import demo_data
from wedbackup_dagster.core.formats import snapshot_stream
from wedbackup_dagster.core.postgres import load_snapshot as restore
from wedbackup_dagster.core.formats.archive import seal_bytes
from wedbackup_dagster.core.errors import ArchiveError, CryptoKeyError, SnapshotFormatError, WedbackupError
from wedbackup_dagster.core.keys.keyring import SecretKey
from wedbackup_dagster.core.formats.snapshot_stream import DATA, FRAME_HEADER_SIZE, MAGIC, MANIFEST, Manifest
from wedbackup_dagster.core.postgres.snapshot import SnapshotSession

from wedbackup_dagster_tests.conftest import temporary_database
from wedbackup_dagster_tests.core.formats.test_archive import read_collecting

KEY = SecretKey("fuzz-7.k1", bytes(range(32)))
NAME = "vault:7/fuzzed"
CHUNK = 2048
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def resolve(key_id: str) -> SecretKey:
    if key_id != KEY.key_id:
        raise CryptoKeyError(f"no wedding key {key_id!r}")
    return KEY


@pytest.fixture(scope="module")
def wedding(stack):
    """One real wedding's snapshot stream (demo data, small documents) and its manifest."""
    with temporary_database(stack, "fuzz") as dsn:
        demo_data.generate(dsn, weddings=2, seed=3, document_bytes=64)
        out = io.BytesIO()
        with SnapshotSession(dsn) as session:
            manifest = session.snapshot("1", out)
        yield out.getvalue(), manifest


@pytest.fixture(scope="module")
def sealed(wedding):
    stream, _ = wedding
    blob, stats = seal_bytes(stream, wedding_key=KEY, label={"partition": "7"}, chunk_size=CHUNK)
    other, _ = seal_bytes(stream, wedding_key=KEY, label={"partition": "7"}, chunk_size=CHUNK)
    assert stats.chunks >= 3, "the fuzzed archive should span several chunks"
    return blob, other


# ---------------------------------------------------------------------------------- mutations

def header_fields(blob: bytes) -> dict[str, tuple[int, str]]:
    """Offset and struct format of every header field (docs/FORMAT.md)."""
    k = blob[11]
    w = struct.unpack(">H", blob[12 + k:14 + k])[0]
    return {"version": (6, ">B"), "header_len": (7, ">I"), "key_id_len": (11, ">B"), "key_id": (12, ">B"),
            "wrapped_len": (12 + k, ">H"), "wrapped": (14 + k, ">B"), "compression": (14 + k + w, ">B"),
            "nonce_prefix": (15 + k + w, ">B"), "chunk_size": (22 + k + w, ">I"), "label_len": (26 + k + w, ">H")}


def split(blob: bytes) -> tuple[bytes, list[bytes]]:
    header_len = struct.unpack(">I", blob[7:11])[0]
    offset, fmt = header_fields(blob)["chunk_size"]
    size = struct.unpack(fmt, blob[offset:offset + 4])[0] + 16
    if not 16 < size <= (64 << 20) + 16:
        raise struct.error("chunk size field damaged")
    body = blob[header_len:]
    return blob[:header_len], [body[i:i + size] for i in range(0, len(body), size)]


INTERESTING_U32 = [0, 1, 11, 12, 255, 1 << 16, (1 << 16) + 1, 64 << 20, (64 << 20) + 1, (1 << 31), (1 << 32) - 1]

BYTE_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 4096)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("append"), st.just(0), st.binary(min_size=1, max_size=64)),
)
HEADER_MUTATION = st.tuples(
    st.just("field"),
    st.sampled_from(["version", "header_len", "key_id_len", "key_id", "wrapped_len", "wrapped", "compression",
                     "nonce_prefix", "chunk_size", "label_len"]),
    st.one_of(st.sampled_from(INTERESTING_U32), st.integers(0, (1 << 32) - 1)))
CHUNK_MUTATION = st.one_of(
    st.tuples(st.just("swap"), st.integers(0, 1000), st.integers(0, 1000)),
    st.tuples(st.just("duplicate"), st.integers(0, 1000), st.integers(0, 1000)),
    st.tuples(st.just("drop"), st.integers(0, 1000), st.just(0)),
    st.tuples(st.just("foreign"), st.integers(0, 1000), st.just(0)),  # the same chunk of another archive
)
MUTATION = st.one_of(BYTE_MUTATION, HEADER_MUTATION, CHUNK_MUTATION)


def mutate(blob: bytes, mutation, other: bytes) -> bytes:
    kind, a, b = mutation
    data = bytearray(blob)
    if kind == "field":
        try:
            offset, fmt = header_fields(blob)[a]
        except (IndexError, struct.error):
            return blob  # an earlier mutation already wrecked the header: nothing left to aim at
        size = struct.calcsize(fmt)
        data[offset:offset + size] = struct.pack(fmt, b % (1 << (8 * size)))
        return bytes(data)
    if kind in ("swap", "duplicate", "drop", "foreign"):
        try:
            header, chunks = split(blob)
            _, their = split(other)
        except (IndexError, struct.error):
            return blob
        if not chunks:
            return blob
        i = a % len(chunks)
        if kind == "swap":
            j = b % len(chunks)
            chunks[i], chunks[j] = chunks[j], chunks[i]
        elif kind == "duplicate":
            chunks.insert(b % (len(chunks) + 1), chunks[i])
        elif kind == "drop":
            del chunks[i]
        elif i < len(their):
            chunks[i] = their[i]
        return header + b"".join(chunks)
    if kind == "append":
        return blob + b
    if not data:
        return blob if kind != "insert" else b
    i = a % (len(data) + (1 if kind == "insert" else 0))
    if kind == "flip":
        data[i] ^= b
    elif kind == "overwrite":
        data[i:i + len(b)] = b
    elif kind == "insert":
        data[i:i] = b
    elif kind == "delete":
        del data[i:i + b]
    else:
        del data[i:]
    return bytes(data)


def read_through(blob: bytes) -> tuple[bytes, BaseException | None]:
    """What a consumer sees: the plaintext released before any failure, and the failure (test_archive's
    reader, with this module's key and archive name)."""
    return read_collecting(blob, resolve=resolve, name=NAME)


def assert_clean_error(exc: BaseException) -> None:
    assert isinstance(exc, ArchiveError)
    assert str(exc).startswith(f"archive {NAME}:"), str(exc)
    assert KEY.material.hex() not in str(exc) and repr(KEY.material) not in str(exc)


# --------------------------------------------------------------------------------------- tests

@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_mutated_archives_fail_with_the_formats_error_or_read_back_exactly(sealed, wedding, mutations):
    blob, other = sealed
    stream, manifest = wedding
    damaged = blob
    for m in mutations:
        damaged = mutate(damaged, m, other)
    got, exc = read_through(damaged)
    # Released plaintext is always genuine: a prefix of the original stream.
    assert stream.startswith(got)
    if exc is None:
        # Only an archive that reads to its very end is complete, and then it is exactly the original.
        assert got == stream
        assert snapshot_stream.read_manifest([got], name=NAME).tables == manifest.tables
    else:
        assert_clean_error(exc)
        assert damaged != blob


def test_the_structure_aware_mutations_do_reach_every_error_class(sealed):
    # The fuzzer above is only as good as its mutations: each kind must hit its own failure.
    from wedbackup_dagster.core import errors

    blob, other = sealed
    cases = {
        ("field", "version", 2): errors.ArchiveUnsupportedVersion,
        ("field", "header_len", (1 << 32) - 1): errors.ArchiveCorrupt,
        ("field", "chunk_size", (1 << 32) - 1): errors.ArchiveCorrupt,
        ("field", "chunk_size", 64 << 20): errors.ArchiveCorrupt,  # valid size, so chunk 0 fails its tag
        ("field", "wrapped", 0x55): errors.ArchiveWrongKey,
        ("field", "key_id", ord("x")): errors.ArchiveKeyUnavailable,
        ("truncate", 3, 0): errors.ArchiveTruncated,
        ("overwrite", 0, b"GARBAGE"): errors.ArchiveNotRecognised,
        ("swap", 0, 1): errors.ArchiveCorrupt,
        ("duplicate", 1, 1): errors.ArchiveCorrupt,
        ("drop", 0, 0): errors.ArchiveCorrupt,
        ("foreign", 1, 0): errors.ArchiveCorrupt,
        ("append", 0, b"x"): errors.ArchiveCorrupt,
    }
    for mutation, expected in cases.items():
        got, exc = read_through(mutate(blob, mutation, other))
        assert isinstance(exc, expected), (mutation, exc)
        assert_clean_error(exc)
    _, chunks = split(blob)
    header, _ = split(blob)
    _, exc = read_through(header + b"".join(chunks[:-1]))  # cut at a chunk boundary
    assert isinstance(exc, errors.ArchiveTruncated)


# A snapshot stream damaged *before* sealing: it authenticates, so only the stream's own checks stand
# between it and a restore. Record-level mutations aim at the framing.

DEEP_JSON = b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}"  # past json's recursion limit (was a RecursionError)
RECORD_MUTATION = st.one_of(
    BYTE_MUTATION,
    st.tuples(st.just("length"), st.integers(0, 1000), st.sampled_from([0, 1, 1 << 20, (1 << 20) + 1, 1 << 40,
                                                                        (1 << 64) - 1])),
    st.tuples(st.just("drop-record"), st.integers(0, 1000), st.just(0)),
    st.tuples(st.just("repeat-record"), st.integers(0, 1000), st.just(0)),
    st.tuples(st.just("json"), st.integers(0, 1000), st.sampled_from([b"[]", b"{}", b"null", b'{"tables": 5}',
                                                                      b'{"schema": 1, "name": [], "columns": "x"}',
                                                                      b'{"partition": {"a": 1}}', b"\xff\xfe",
                                                                      DEEP_JSON])),
)


def records(stream: bytes) -> list[tuple[int, int]]:
    """(offset, total length) of every record of a valid stream."""
    out, pos = [], len(MAGIC)
    while pos < len(stream):
        length = int.from_bytes(stream[pos + 1:pos + FRAME_HEADER_SIZE], "big")
        out.append((pos, FRAME_HEADER_SIZE + length))
        pos += FRAME_HEADER_SIZE + length
    return out


def mutate_stream(stream: bytes, original: bytes, mutation) -> bytes:
    kind, a, b = mutation
    if kind not in ("length", "drop-record", "repeat-record", "json"):
        return mutate(stream, mutation, stream)
    spans = records(original)
    if len(stream) != len(original):
        return mutate(stream, ("flip", a, 1), stream)  # spans are those of the original stream only
    pos, size = spans[a % len(spans)]
    if kind == "length":
        return stream[:pos + 1] + b.to_bytes(8, "big") + stream[pos + FRAME_HEADER_SIZE:]
    if kind == "drop-record":
        return stream[:pos] + stream[pos + size:]
    if kind == "repeat-record":
        return stream[:pos + size] + stream[pos:pos + size] + stream[pos + size:]
    kind_byte = stream[pos:pos + 1]
    if kind_byte == DATA:
        return stream
    return stream[:pos] + kind_byte + len(b).to_bytes(8, "big") + b + stream[pos + size:]


@FUZZ
@given(mutations=st.lists(RECORD_MUTATION, min_size=1, max_size=2))
def test_streams_damaged_before_sealing_fail_with_snapshot_format_error(wedding, mutations):
    stream, manifest = wedding
    damaged = stream
    for m in mutations:
        damaged = mutate_stream(damaged, stream, m)
    blob, _ = seal_bytes(damaged, wedding_key=KEY, chunk_size=CHUNK)
    got, exc = read_through(blob)
    assert exc is None and got == damaged  # it authenticates: the archive layer cannot tell
    try:
        parsed = snapshot_stream.read_manifest([got[i:i + 777] for i in range(0, len(got), 777)], name=NAME)
    except SnapshotFormatError as err:
        assert str(err).startswith(f"archive {NAME}:")
        return
    # Parsed cleanly: then it is a well-formed stream, its manifest a Manifest whose tables are sane.
    assert isinstance(parsed, Manifest)
    for t in parsed.tables:
        assert isinstance(t.rows, int) and isinstance(t.sha256, str) and isinstance(t.columns, list)


@pytest.fixture(scope="module")
def restore_target(stack):
    """An empty database to restore into, re-made only after a restore that committed."""
    admin = stack.dsn("postgres")
    made: list[str] = []

    def fresh() -> str:
        name = f"fuzzr_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        made.append(name)
        return stack.dsn(name)

    holder = {"dsn": fresh()}
    holder["fresh"] = fresh
    yield holder
    with psycopg.connect(admin, autocommit=True) as conn:
        for name in made:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def public_relations(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
                            "ON n.oid = c.relnamespace WHERE n.nspname = 'public'").fetchone()[0]


@settings(FUZZ, max_examples=15)
@given(mutations=st.lists(RECORD_MUTATION, min_size=1, max_size=2))
def test_damaged_streams_restore_all_or_nothing_and_match_their_manifest(restore_target, wedding, mutations):
    stream, manifest = wedding
    damaged = stream
    for m in mutations:
        damaged = mutate_stream(damaged, stream, m)
    target = restore_target["dsn"]
    pieces = [damaged[i:i + 4096] for i in range(0, len(damaged), 4096)]
    try:
        restore.restore_snapshot(pieces, target, create_schema=True, name=NAME)
    except WedbackupError:
        assert public_relations(target) == 0  # nothing was committed
        return
    restore_target["dsn"] = restore_target["fresh"]()
    # It committed: then the stream was well-formed and the target holds exactly what its manifest says.
    restored = snapshot_stream.read_manifest([damaged], name=NAME)
    restore.verify_restored(target, restored).raise_if_failed()


def test_junk_after_the_manifest_is_refused_by_a_restore(restore_target, wedding):
    # Found by the fuzzer above: restore_snapshot stopped reading at the manifest.
    stream, _ = wedding
    for junk in (b"\x00", MANIFEST + (0).to_bytes(8, "big"), b"D" + (3).to_bytes(8, "big") + b"x\ty"):
        with pytest.raises(SnapshotFormatError, match="after the manifest|cannot follow manifest"):
            restore.restore_snapshot([stream + junk], restore_target["dsn"], create_schema=True, name=NAME)
        assert public_relations(restore_target["dsn"]) == 0


def replace_record(stream: bytes, kind: bytes, payload: bytes) -> bytes:
    for pos, size in records(stream):
        if stream[pos:pos + 1] == kind:
            return stream[:pos] + kind + len(payload).to_bytes(8, "big") + payload + stream[pos + size:]
    raise AssertionError(f"no {kind!r} record")


@pytest.mark.parametrize("payload", [b'{"tables": 5}', b'{"tables": [{"rows": "7"}]}', b'{"tables": [1]}',
                                     b'{"tables": []}', b"[]", b'{"tables": [{"schema": "public", "name": "x", '
                                     b'"columns": [], "rows": true, "bytes": 1, "sha256": "", "select_sql": ""}]}',
                                     DEEP_JSON])
def test_a_garbled_manifest_is_a_snapshot_format_error_not_a_type_error(wedding, payload):
    # Regression: Manifest.from_dict used to raise KeyError/TypeError on an authenticated but garbled manifest.
    stream, _ = wedding
    with pytest.raises(SnapshotFormatError, match=f"archive {NAME}: manifest record at offset"):
        snapshot_stream.read_manifest([replace_record(stream, MANIFEST, payload)], name=NAME)


@pytest.mark.parametrize("kind, payload", [
    (b"H", b'{"format": "wedbackup-snapshot", "version": 1}'),
    (b"H", b'{"format": "wedbackup-snapshot", "version": 1, "partition": "../x", "schema_fingerprint": "a"}'),
    (b"H", b'{"format": "wedbackup-snapshot", "version": 1, "partition": "1", "schema_fingerprint": "a", '
           b'"foreign_keys": [{"schema": 1}]}'),
    (b"T", b'{"schema": "public", "name": ["weddings"], "columns": ["id"]}'),
    (b"T", b'{"schema": "public", "name": "weddings", "columns": []}'),
])
def test_a_garbled_header_or_table_record_is_refused_before_any_write(restore_target, wedding, kind, payload):
    # Regression: restore_snapshot used to index these records' fields directly (KeyError, TypeError).
    stream, _ = wedding
    with pytest.raises(SnapshotFormatError, match=f"archive {NAME}:"):
        restore.restore_snapshot([replace_record(stream, kind, payload)], restore_target["dsn"],
                                 create_schema=True, name=NAME)
    assert public_relations(restore_target["dsn"]) == 0
