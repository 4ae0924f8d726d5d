"""The sealed archive format: zstd-compressed bytes cut into AES-256-GCM chunks (STREAM construction)
behind an authenticated header. Streaming writer and reader; the byte layout is in docs/FORMAT.md."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator

import orjson
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from wedbackup_dagster.core.errors import (ArchiveCorrupt, ArchiveError, ArchiveKeyUnavailable, ArchiveNotRecognised,
                                           ArchiveTruncated, ArchiveUnsupportedVersion, ArchiveWrongKey, CryptoKeyError)
from wedbackup_dagster.core.keys.keyring import SecretKey, is_valid_key_id, new_data_key, unwrap_key, wrap_key

MAGIC = b"WEDBAK"
FORMAT_VERSION = 1
COMPRESSION_ZSTD = 1
DATA_KEY_CONTEXT_PREFIX = b"wedbackup-archive-v1:"

DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 1
# Readers allocate one chunk (plus a byte) up front, so the header may not ask for more than this.
MAX_CHUNK_SIZE = 64 << 20
MAX_HEADER_BYTES = 64 * 1024
MAX_LABEL_BYTES = 16 * 1024
TAG_BYTES = 16
NONCE_PREFIX_BYTES = 7
MAX_CHUNKS = 1 << 32

_PREAMBLE = struct.Struct(">6sBI")  # magic, version, header_len
_NONCE = struct.Struct(">7sIB")  # prefix, chunk counter, last flag
_COMPRESSION_NAMES = {COMPRESSION_ZSTD: "zstd"}


def data_key_context(key_id: str) -> bytes:
    return DATA_KEY_CONTEXT_PREFIX + key_id.encode("ascii")


@dataclass(frozen=True)
class ArchiveStats:
    raw_bytes: int
    compressed_bytes: int
    sealed_bytes: int
    sha256: str
    chunks: int
    key_id: str


@dataclass(frozen=True)
class ArchiveHeader:
    """What the header says. It is not authenticated until the first chunk opens: treat the label
    as a hint for people, not as a fact, until the archive has been read through."""

    version: int
    key_id: str
    label: dict[str, Any] | None
    chunk_size: int
    compression: str
    header_len: int


@dataclass(frozen=True)
class _ParsedHeader:
    header: ArchiveHeader
    raw: bytes
    wrapped_data_key: bytes
    nonce_prefix: bytes


def _encode_header(key_id: str, wrapped: bytes, nonce_prefix: bytes, chunk_size: int, label: bytes) -> bytes:
    kid = key_id.encode("ascii")
    body = b"".join(
        (
            struct.pack(">B", len(kid)),
            kid,
            struct.pack(">H", len(wrapped)),
            wrapped,
            struct.pack(">B", COMPRESSION_ZSTD),
            nonce_prefix,
            struct.pack(">IH", chunk_size, len(label)),
            label,
        )
    )
    return _PREAMBLE.pack(MAGIC, FORMAT_VERSION, _PREAMBLE.size + len(body)) + body


def _write_all(fileobj: BinaryIO, data: bytes) -> None:
    written = fileobj.write(data)
    # Raw (unbuffered) files may accept only part of a write; buffered ones return the full length.
    if written is not None and written < len(data):
        view = memoryview(data)
        while written < len(data):
            n = fileobj.write(view[written:])
            if not n:
                raise OSError("short write while sealing archive")
            written += n


class ArchiveWriter:
    """Seals bytes into an archive written to `fileobj`. Memory stays at about two chunks plus the
    compressor's window however much is written. Until close() writes the last-flagged chunk the
    output reads as truncated, so an interrupted backup can never pass for a complete one."""

    def __init__(
        self,
        fileobj: BinaryIO,
        *,
        wedding_key: SecretKey,
        label: dict[str, Any] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        level: int = 3,
    ):
        if not isinstance(wedding_key, SecretKey):
            raise TypeError("wedding_key must be a SecretKey")
        if not isinstance(chunk_size, int) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}")
        if label is None:
            label_bytes = b""
        else:
            if not isinstance(label, dict):
                raise TypeError("label must be a dict (it is stored as a JSON object)")
            label_bytes = json.dumps(label, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
            if len(label_bytes) > MAX_LABEL_BYTES:
                raise ValueError(f"label is {len(label_bytes)} bytes as JSON; at most {MAX_LABEL_BYTES} allowed")

        data_key = new_data_key()
        wrapped = wrap_key(wedding_key, data_key, data_key_context(wedding_key.key_id))
        self._nonce_prefix = os.urandom(NONCE_PREFIX_BYTES)
        self._header = _encode_header(wedding_key.key_id, wrapped, self._nonce_prefix, chunk_size, label_bytes)
        self._aead = AESGCM(data_key)
        self._chunker = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=0).chunker(
            chunk_size=chunk_size
        )
        self._fileobj = fileobj
        self._key_id = wedding_key.key_id
        self._sha = hashlib.sha256()
        # The newest full chunk is held back: only close() knows whether it is the last one.
        self._pending: bytes | None = None
        self._counter = 0
        self._raw = 0
        self._compressed = 0
        self._sealed = 0
        self._state = "open"
        self._stats: ArchiveStats | None = None
        self._emit(self._header)

    @property
    def key_id(self) -> str:
        return self._key_id

    def _emit(self, data: bytes) -> None:
        _write_all(self._fileobj, data)
        self._sha.update(data)
        self._sealed += len(data)

    def _seal(self, plaintext: bytes, last: bool) -> None:
        if self._counter >= MAX_CHUNKS:
            raise ValueError("archive exceeds 2**32 chunks; use a larger chunk_size")
        nonce = _NONCE.pack(self._nonce_prefix, self._counter, 1 if last else 0)
        self._emit(self._aead.encrypt(nonce, plaintext, self._header))
        self._counter += 1
        self._compressed += len(plaintext)

    def _push(self, chunk: bytes) -> None:
        if self._pending is not None:
            self._seal(self._pending, last=False)
        self._pending = chunk

    def _check_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"archive writer is {self._state}")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._check_open()
        try:
            for chunk in self._chunker.compress(data):
                self._push(chunk)
        except BaseException:
            # The compressor or the file may now be mid-way through something; never finish this archive.
            self.abort()
            raise
        n = memoryview(data).nbytes
        self._raw += n
        return n

    def close(self) -> ArchiveStats:
        """Flush, write the last-flagged chunk, and return the stats. Calling it again returns them again."""
        if self._state == "closed" and self._stats is not None:
            return self._stats
        self._check_open()
        try:
            for chunk in self._chunker.finish():
                self._push(chunk)
            final, self._pending = self._pending, None
            self._seal(final if final is not None else b"", last=True)
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        self._release()
        self._stats = ArchiveStats(
            raw_bytes=self._raw,
            compressed_bytes=self._compressed,
            sealed_bytes=self._sealed,
            sha256=self._sha.hexdigest(),
            chunks=self._counter,
            key_id=self._key_id,
        )
        return self._stats

    def abort(self) -> None:
        """Stop without writing the final chunk: what was written stays unreadable (truncated)."""
        if self._state == "open":
            self._state = "aborted"
            self._release()

    def _release(self) -> None:
        self._pending = None
        self._aead = None  # type: ignore[assignment]
        self._chunker = None  # type: ignore[assignment]

    def __enter__(self) -> "ArchiveWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _read_full(fileobj: BinaryIO, view: memoryview) -> int:
    """Fill `view` from the file, returning fewer bytes only at end of file."""
    total = 0
    readinto = getattr(fileobj, "readinto", None)
    while total < len(view):
        if readinto is not None:
            n = readinto(view[total:])
        else:
            data = fileobj.read(len(view) - total)
            n = len(data) if data else 0
            view[total : total + n] = data or b""
        if not n:
            break
        total += n
    return total


def _read_exact(fileobj: BinaryIO, size: int) -> bytes:
    buf = bytearray(size)
    got = _read_full(fileobj, memoryview(buf))
    return bytes(buf[:got])


class _Fields:
    """Cursor over the variable part of a v1 header; any overrun means the header is malformed."""

    def __init__(self, data: bytes, name: str, start: int):
        self._data, self._name, self.pos = data, name, start

    def take(self, size: int, what: str) -> bytes:
        end = self.pos + size
        if end > len(self._data):
            raise ArchiveCorrupt(self._name, f"header is malformed: {what} runs past the declared header length")
        value = self._data[self.pos : end]
        self.pos = end
        return value

    def uint(self, fmt: str, what: str) -> int:
        s = struct.Struct(">" + fmt)
        return s.unpack(self.take(s.size, what))[0]


def loads_untrusted(data: bytes | str) -> Any:
    """json.loads for bytes an attacker may have written (archive labels, snapshot records, manifests,
    key backups), parsed by orjson: restore --all and verification parse every wedding's header, table
    records and manifest, and the standard library's parser was a fifth of restore --all's own CPU.

    Anything orjson refuses is a json.JSONDecodeError (orjson's error is one), a ValueError like any other
    malformed JSON: broken syntax, NaN or Infinity, invalid UTF-8 or a lone surrogate escape, and JSON nested
    deeper than 1,024 levels (reported as nested too deeply; the standard parser raised RecursionError there,
    which no format handler caught). An integer beyond 64 bits is read as a float, which every field a
    restore relies on refuses as the wrong type (snapshot_stream's checks)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise json.JSONDecodeError("nested too deeply", "", 0) from None
        raise


def _read_parsed_header(fileobj: BinaryIO, name: str) -> _ParsedHeader:
    preamble = _read_exact(fileobj, _PREAMBLE.size)
    if not preamble:
        raise ArchiveNotRecognised(name, "not a wedbackup archive (the file is empty)")
    if preamble[: len(MAGIC)] != MAGIC[: len(preamble)]:
        raise ArchiveNotRecognised(name, "not a wedbackup archive (the file does not start with WEDBAK)")
    if len(preamble) <= len(MAGIC):
        raise ArchiveTruncated(name, f"truncated header: the file ends after {len(preamble)} bytes")
    version = preamble[len(MAGIC)]
    if version != FORMAT_VERSION:
        raise ArchiveUnsupportedVersion(
            name,
            f"format version {version} is not supported (this wedbackup reads version {FORMAT_VERSION}; "
            "a newer wedbackup probably wrote it)",
        )
    if len(preamble) < _PREAMBLE.size:
        raise ArchiveTruncated(name, f"truncated header: the file ends after {len(preamble)} bytes")
    _, _, header_len = _PREAMBLE.unpack(preamble)
    if not _PREAMBLE.size < header_len <= MAX_HEADER_BYTES:
        raise ArchiveCorrupt(name, f"header is malformed: declared length {header_len} is impossible")
    rest = _read_exact(fileobj, header_len - _PREAMBLE.size)
    raw = preamble + rest
    if len(raw) < header_len:
        raise ArchiveTruncated(name, f"truncated header: {len(raw)} of {header_len} header bytes present")

    fields = _Fields(raw, name, _PREAMBLE.size)
    key_id_bytes = fields.take(fields.uint("B", "key id length"), "key id")
    key_id = key_id_bytes.decode("ascii", "replace")
    if not is_valid_key_id(key_id):
        raise ArchiveCorrupt(name, "header is malformed: the key id is not a valid key id")
    wrapped = fields.take(fields.uint("H", "wrapped key length"), "wrapped data key")
    compression = fields.uint("B", "compression id")
    if compression not in _COMPRESSION_NAMES:
        raise ArchiveCorrupt(name, f"header is malformed: unknown compression id {compression}")
    nonce_prefix = fields.take(NONCE_PREFIX_BYTES, "nonce prefix")
    chunk_size = fields.uint("I", "chunk size")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ArchiveCorrupt(name, f"header is malformed: chunk size {chunk_size} is out of range")
    label_bytes = fields.take(fields.uint("H", "label length"), "label")
    if fields.pos != header_len:
        raise ArchiveCorrupt(name, "header is malformed: its fields do not add up to the declared length")
    label: dict[str, Any] | None = None
    if label_bytes:
        try:
            label = loads_untrusted(label_bytes.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ArchiveCorrupt(name, "header is malformed: the label is not valid JSON") from None
        if not isinstance(label, dict):
            raise ArchiveCorrupt(name, "header is malformed: the label is not a JSON object")
    header = ArchiveHeader(
        version=version,
        key_id=key_id,
        label=label,
        chunk_size=chunk_size,
        compression=_COMPRESSION_NAMES[compression],
        header_len=header_len,
    )
    return _ParsedHeader(header=header, raw=raw, wrapped_data_key=wrapped, nonce_prefix=nonce_prefix)


def read_header(fileobj: BinaryIO, *, name: str) -> ArchiveHeader:
    """Parse the header without any key. The result is unauthenticated (see ArchiveHeader)."""
    return _read_parsed_header(fileobj, name).header


# zstd frame structure, just enough to find block boundaries (RFC 8878 section 3.1.1).
_ZSTD_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_BLOCKS_PER_CALL = 8
_FCS_BYTES = (0, 2, 4, 8)
_DICT_ID_BYTES = (0, 1, 2, 4)
_S_FRAME, _S_BLOCK, _S_DONE, _S_LOST = range(4)


class _BlockCutter:
    """Splits the compressed stream so the decoder gets at most a few zstd blocks per call.

    decompressobj() returns everything a call produces at once, and a 4-byte RLE block regenerates
    128 KiB, so one 1 MiB chunk of very compressible data could inflate to gigabytes in one call.
    A block never regenerates more than 128 KiB, so feeding a bounded number of blocks per call
    bounds memory. If the structure is not understood the cutter gives up (no more cuts) and the
    decoder itself reports the problem."""

    def __init__(self) -> None:
        self._state = _S_FRAME
        self._want = 5  # frame magic + frame header descriptor
        self._partial = bytearray()
        self._skip = 0
        self._checksum_bytes = 0
        self._blocks = 0

    def cuts(self, piece: memoryview) -> list[int]:
        """Offsets inside `piece` at which to split it before feeding the decoder."""
        cuts: list[int] = []
        pos, n = 0, len(piece)
        while pos < n:
            if self._skip:
                step = min(self._skip, n - pos)
                pos += step
                self._skip -= step
                continue
            state = self._state
            if state >= _S_DONE:
                break
            start = pos if not self._partial else -1
            need = self._want - len(self._partial)
            if need <= n - pos and start >= 0:
                struct_bytes = bytes(piece[pos : pos + need])
                pos += need
            else:
                take = min(need, n - pos)
                self._partial += piece[pos : pos + take]
                pos += take
                if len(self._partial) < self._want:
                    break
                struct_bytes = bytes(self._partial)
                self._partial.clear()
            if state == _S_FRAME:
                self._parse_frame_start(struct_bytes)
            else:
                if self._blocks >= _ZSTD_BLOCKS_PER_CALL and start > 0:
                    cuts.append(start)
                    self._blocks = 0
                self._blocks += 1
                self._parse_block_header(struct_bytes)
        return cuts

    def _parse_frame_start(self, data: bytes) -> None:
        if data[:4] != _ZSTD_FRAME_MAGIC or data[4] & 0x08:
            self._state = _S_LOST
            return
        fhd = data[4]
        single_segment = (fhd >> 5) & 1
        fcs_flag = fhd >> 6
        fcs = _FCS_BYTES[fcs_flag] if fcs_flag else single_segment
        self._checksum_bytes = 4 if fhd & 0x04 else 0
        self._skip = (0 if single_segment else 1) + _DICT_ID_BYTES[fhd & 0x03] + fcs
        self._state, self._want = _S_BLOCK, 3

    def _parse_block_header(self, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        last, block_type, size = value & 1, (value >> 1) & 3, value >> 3
        if block_type == 3:
            self._state = _S_LOST
            return
        self._skip = 1 if block_type == 1 else size
        if last:
            self._skip += self._checksum_bytes
            self._state = _S_DONE


class ArchiveReader:
    """Streams the plaintext of an archive. Construction reads the header and opens the data key,
    so a wrong or unknown key fails immediately; iteration yields decompressed pieces.

    Every piece comes from chunks that have already been authenticated, but a later chunk can still
    fail: a consumer has only a valid copy once iteration finishes without an ArchiveError (see
    `complete`). Anything it did with earlier pieces must be undoable."""

    def __init__(
        self,
        fileobj: BinaryIO,
        *,
        name: str,
        resolve_key: Callable[[str], SecretKey],
    ):
        self.name = name
        parsed = _read_parsed_header(fileobj, name)
        self.header = parsed.header
        key_id = parsed.header.key_id
        try:
            wedding_key = resolve_key(key_id)
        except CryptoKeyError as exc:
            raise ArchiveKeyUnavailable(name, f"wedding key {key_id!r} is not available: {exc}") from None
        if not isinstance(wedding_key, SecretKey):
            raise TypeError(f"resolve_key({key_id!r}) returned {type(wedding_key).__name__}, not a SecretKey")
        try:
            data_key = unwrap_key(wedding_key, parsed.wrapped_data_key, data_key_context(key_id))
        except CryptoKeyError:
            raise ArchiveWrongKey(
                name,
                f"sealed with a different key (key id {key_id!r}): the data key does not open with the "
                f"wedding key given for {key_id!r}, or the header was tampered with",
            ) from None
        self._aead = AESGCM(data_key)
        self._fileobj = fileobj
        self._raw = parsed.raw
        self._prefix = parsed.nonce_prefix
        self._chunk_size = parsed.header.chunk_size
        self._pieces = self._generate()
        self._leftover = memoryview(b"")
        self._failure: ArchiveError | None = None
        self.plaintext_bytes = 0
        self.chunks = 0
        self.complete = False

    def __iter__(self) -> "ArchiveReader":
        return self

    def __next__(self) -> bytes:
        # A failed stream must keep failing: a caller that retries must not mistake it for a clean end.
        if self._failure is not None:
            raise self._failure
        try:
            return next(self._pieces)
        except ArchiveError as exc:
            self._failure = exc
            raise

    def read(self, size: int = -1) -> bytes:
        """File-like access; like iteration, errors surface as ArchiveError part-way through."""
        if size is None or size < 0:
            parts = [bytes(self._leftover)]
            self._leftover = memoryview(b"")
            parts.extend(self)
            return b"".join(parts)
        if size == 0:
            return b""
        while not self._leftover:
            piece = next(self, None)
            if piece is None:
                return b""
            self._leftover = memoryview(piece)
        out, self._leftover = self._leftover[:size], self._leftover[size:]
        return bytes(out)

    def _open_chunk(self, sealed: memoryview, index: int, final: bool) -> bytes:
        """Authenticate one chunk. `final` is what its position says (EOF follows it)."""
        flag = 1 if final else 0
        try:
            return self._aead.decrypt(_NONCE.pack(self._prefix, index, flag), sealed, self._raw)
        except InvalidTag:
            pass
        # Only on failure: does the chunk open with the other flag? That tells a clean truncation or
        # trailing junk apart from damage, at no cost to the normal path.
        full = len(sealed) == self._chunk_size + TAG_BYTES
        if full or not final:
            try:
                self._aead.decrypt(_NONCE.pack(self._prefix, index, 1 - flag), sealed, self._raw)
            except InvalidTag:
                pass
            else:
                if final:
                    raise ArchiveTruncated(
                        self.name, f"truncated after chunk {index}: the file ends before the final chunk"
                    )
                raise ArchiveCorrupt(self.name, f"unexpected data after the final chunk (chunk {index})")
        hint = "corrupt or tampered"
        if final:
            hint += ", or the file was cut short"
        if index == 0:
            hint += "; or the header was tampered with"
        raise ArchiveCorrupt(self.name, f"chunk {index} failed authentication ({hint})")

    def _generate(self) -> Iterator[bytes]:
        name = self.name
        sealed_len = self._chunk_size + TAG_BYTES
        # One byte of look-ahead past a full chunk tells whether the chunk is the last one.
        buf = bytearray(sealed_len + 1)
        view = memoryview(buf)
        have = 0
        index = 0
        decoder = zstandard.ZstdDecompressor().decompressobj(write_size=1 << 18)
        cutter = _BlockCutter()
        while True:
            have += _read_full(self._fileobj, view[have:])
            final = have <= sealed_len
            if final and have == 0:
                raise ArchiveTruncated(name, "truncated after the header: the file has no chunks")
            if index >= MAX_CHUNKS:
                raise ArchiveCorrupt(name, "more than 2**32 chunks")
            plaintext = self._open_chunk(view[: sealed_len if not final else have], index, final)
            if not final:
                buf[0] = buf[sealed_len]
                have = 1
            self.chunks = index + 1
            yield from self._inflate(decoder, cutter, plaintext, index)
            if final:
                if not decoder.eof:
                    raise ArchiveCorrupt(name, "the compressed stream ends early (authenticated, so written badly)")
                self.complete = True
                return
            index += 1

    def _inflate(self, decoder: Any, cutter: _BlockCutter, plaintext: bytes, index: int) -> Iterator[bytes]:
        view = memoryview(plaintext)
        start = 0
        for end in (*cutter.cuts(view), len(view)):
            if start == end:
                continue
            if decoder.eof:
                raise ArchiveCorrupt(self.name, f"chunk {index} holds data after the end of the compressed stream")
            try:
                out = decoder.decompress(view[start:end])
            except zstandard.ZstdError as exc:
                raise ArchiveCorrupt(self.name, f"chunk {index} does not decompress: {exc}") from None
            if decoder.eof and decoder.unused_data:
                raise ArchiveCorrupt(self.name, f"chunk {index} holds data after the end of the compressed stream")
            start = end
            if out:
                self.plaintext_bytes += len(out)
                yield out


def open_archive(
    fileobj: BinaryIO,
    *,
    name: str,
    resolve_key: Callable[[str], SecretKey],
) -> ArchiveReader:
    """Open an archive for streaming. `resolve_key(key_id)` returns the wedding key or raises CryptoKeyError.
    Iterate the result for plaintext pieces (or call .read(n)); every failure is an ArchiveError."""
    return ArchiveReader(fileobj, name=name, resolve_key=resolve_key)


def open_archive_bytes(
    data: bytes,
    *,
    name: str,
    resolve_key: Callable[[str], SecretKey],
) -> bytes:
    """Whole-archive convenience for tests and small archives: sealed bytes in, plaintext out."""
    import io

    return b"".join(open_archive(io.BytesIO(data), name=name, resolve_key=resolve_key))


def seal_bytes(
    data: bytes,
    *,
    wedding_key: SecretKey,
    label: dict[str, Any] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int = 3,
) -> tuple[bytes, ArchiveStats]:
    """Whole-archive convenience for tests and small payloads: plaintext in, sealed bytes out."""
    import io

    out = io.BytesIO()
    with ArchiveWriter(out, wedding_key=wedding_key, label=label, chunk_size=chunk_size, level=level) as writer:
        writer.write(data)
    return out.getvalue(), writer.close()


__all__ = [
    "ArchiveError",
    "ArchiveHeader",
    "ArchiveReader",
    "ArchiveStats",
    "ArchiveWriter",
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "MAGIC",
    "open_archive",
    "open_archive_bytes",
    "read_header",
    "seal_bytes",
]
