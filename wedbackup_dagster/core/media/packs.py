"""The media pack format: many encrypted chunks ("blobs") in one file of ~16-64 MB, with an encrypted
index at the end. Writer, reader and error side by side; the byte layout is in docs/MEDIA.md.

A pack is named by the SHA-256 of its bytes, so any copy is checked without a key; opening it needs the
wedding key, which wraps the pack's own data key (as an archive's), so erasure's key shredding covers it."""
from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from wedbackup_dagster.core.errors import ArchiveError, CryptoKeyError
from wedbackup_dagster.core.keys.keyring import SecretKey, new_data_key, unwrap_key, wrap_key

from .chunker import CHUNK_MAX, MediaKeys, decompress

MAGIC = b"WEDPACK"
TRAILER_MAGIC = b"WEDPEND"
FORMAT_VERSION = 1
# A pack is closed once it holds this much: large enough that a 1 GB wedding is ~30 objects per provider
# (few requests, little per-object cost), small enough that restoring one file never downloads much
# more than it needs and a failed upload retries quickly.
PACK_TARGET_BYTES = 32 << 20
DATA_KEY_CONTEXT_PREFIX = b"wedbackup-media-pack-v1:"
NONCE_PREFIX_BYTES = 8
TAG_BYTES = 16
FLAG_ZSTD = 1
INDEX_COUNTER = 0xFFFFFFFF  # the index's nonce counter: never a blob's
MAX_BLOBS = INDEX_COUNTER - 1
MAX_HEADER_BYTES = 4096

_PREAMBLE = struct.Struct(">7sBI")  # magic, version, header length (whole header, preamble included)
_NONCE = struct.Struct(">8sI")
_ENTRY = struct.Struct(">32sBQII")  # chunk id, flags, offset, sealed length, raw length
_TRAILER = struct.Struct(">QI7s")  # index offset, index sealed length, magic


class PackError(ArchiveError):
    """A pack that cannot be read: names the pack and what is wrong with it."""


@dataclass(frozen=True)
class BlobEntry:
    chunk_id: bytes
    flags: int
    offset: int
    sealed_len: int
    raw_len: int


@dataclass(frozen=True)
class PackInfo:
    sha256: str
    size: int
    key_id: str
    entries: tuple[BlobEntry, ...]

    @property
    def raw_bytes(self) -> int:
        return sum(e.raw_len for e in self.entries)


def _context(key_id: str) -> bytes:
    return DATA_KEY_CONTEXT_PREFIX + key_id.encode("ascii")


def _blob_aad(header: bytes, chunk_id: bytes, flags: int, raw_len: int) -> bytes:
    # The header ties a blob to its pack; the chunk id, flags and length to its index entry.
    return hashlib.sha256(header).digest() + chunk_id + struct.pack(">BI", flags, raw_len)


class PackWriter:
    """Writes one pack to `fileobj` (a vault temporary file): header, blobs as they come, then the index and
    trailer on close(). Holds one blob at a time; the SHA-256 of everything written is the pack's name."""

    def __init__(self, fileobj: BinaryIO, wedding_key: SecretKey):
        data_key = new_data_key()
        wrapped = wrap_key(wedding_key, data_key, _context(wedding_key.key_id))
        kid = wedding_key.key_id.encode("ascii")
        self._prefix = os.urandom(NONCE_PREFIX_BYTES)
        body = struct.pack(">B", len(kid)) + kid + struct.pack(">H", len(wrapped)) + wrapped + self._prefix
        self._header = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, _PREAMBLE.size + len(body)) + body
        self._aead = AESGCM(data_key)
        self._fileobj = fileobj
        self._sha = hashlib.sha256()
        self._size = 0
        self._entries: list[BlobEntry] = []
        self.key_id = wedding_key.key_id
        self._emit(self._header)

    def _emit(self, data: bytes) -> None:
        self._fileobj.write(data)
        self._sha.update(data)
        self._size += len(data)

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, chunk_id: bytes, stored: bytes | memoryview, raw_len: int, compressed: bool) -> BlobEntry:
        if len(self._entries) >= MAX_BLOBS:
            raise PackError("pack", "too many blobs in one pack")
        flags = FLAG_ZSTD if compressed else 0
        nonce = _NONCE.pack(self._prefix, len(self._entries))
        sealed = self._aead.encrypt(nonce, bytes(stored), _blob_aad(self._header, chunk_id, flags, raw_len))
        entry = BlobEntry(chunk_id, flags, self._size, len(sealed), raw_len)
        self._emit(sealed)
        self._entries.append(entry)
        return entry

    def close(self) -> PackInfo:
        index_offset = self._size
        plain = b"".join(_ENTRY.pack(e.chunk_id, e.flags, e.offset, e.sealed_len, e.raw_len) for e in self._entries)
        sealed = self._aead.encrypt(_NONCE.pack(self._prefix, INDEX_COUNTER), plain, self._header + b"index")
        self._emit(sealed)
        self._emit(_TRAILER.pack(index_offset, len(sealed), TRAILER_MAGIC))
        return PackInfo(self._sha.hexdigest(), self._size, self.key_id, tuple(self._entries))


class PackReader:
    """Reads a pack from a seekable file: the header, the wedding key (via `resolve_key`), the index; then
    any blob by its entry, authenticated, decompressed and checked against its keyed chunk id."""

    def __init__(self, fileobj: BinaryIO, *, name: str, resolve_key: Callable[[str], SecretKey]):
        self.name = name
        self._fileobj = fileobj
        fileobj.seek(0, os.SEEK_END)
        total = fileobj.tell()
        fileobj.seek(0)
        pre = fileobj.read(_PREAMBLE.size)
        if len(pre) < _PREAMBLE.size or pre[:7] != MAGIC:
            raise PackError(name, "not a wedbackup media pack (bad magic)")
        _, version, header_len = _PREAMBLE.unpack(pre)
        if version != FORMAT_VERSION:
            raise PackError(name, f"pack format version {version} is not supported (this build reads {FORMAT_VERSION})")
        if not _PREAMBLE.size < header_len <= MAX_HEADER_BYTES or header_len + _TRAILER.size > total:
            raise PackError(name, f"header length {header_len} is impossible for a {total}-byte pack")
        self._header = pre + fileobj.read(header_len - _PREAMBLE.size)
        body = self._header[_PREAMBLE.size:]
        try:
            klen = body[0]
            key_id = body[1:1 + klen].decode("ascii")
            (wlen,) = struct.unpack(">H", body[1 + klen:3 + klen])
            wrapped = body[3 + klen:3 + klen + wlen]
            self._prefix = body[3 + klen + wlen:3 + klen + wlen + NONCE_PREFIX_BYTES]
        except (IndexError, struct.error, UnicodeDecodeError):
            raise PackError(name, "header is damaged") from None
        if len(self._prefix) != NONCE_PREFIX_BYTES:
            raise PackError(name, "header is damaged (short)")
        self.key_id = key_id
        try:
            wedding_key = resolve_key(key_id)
        except CryptoKeyError as exc:
            raise PackError(name, f"wedding key {key_id!r} is not available: {exc}") from None
        try:
            data_key = unwrap_key(wedding_key, wrapped, _context(key_id))
        except CryptoKeyError:
            raise PackError(name, f"the data key does not open with wedding key {key_id!r}, or the header "
                                  "was tampered with") from None
        self._aead = AESGCM(data_key)
        self._keys = MediaKeys.of(wedding_key)
        fileobj.seek(total - _TRAILER.size)
        index_offset, index_len, magic = _TRAILER.unpack(fileobj.read(_TRAILER.size))
        if magic != TRAILER_MAGIC or index_offset + index_len + _TRAILER.size != total or index_offset < header_len:
            raise PackError(name, "trailer is damaged or the pack is truncated")
        fileobj.seek(index_offset)
        try:
            plain = self._aead.decrypt(_NONCE.pack(self._prefix, INDEX_COUNTER), fileobj.read(index_len),
                                       self._header + b"index")
        except InvalidTag:
            raise PackError(name, "index does not authenticate: the pack is damaged") from None
        if len(plain) % _ENTRY.size:
            raise PackError(name, "index has a partial entry")
        self.entries = {}
        for i in range(0, len(plain), _ENTRY.size):
            cid, flags, offset, slen, rlen = _ENTRY.unpack_from(plain, i)
            self.entries[cid] = (i // _ENTRY.size, BlobEntry(cid, flags, offset, slen, rlen))

    def read_chunk(self, chunk_id: bytes) -> bytes:
        found = self.entries.get(chunk_id)
        if found is None:
            raise PackError(self.name, f"has no chunk {chunk_id.hex()[:16]}…")
        counter, entry = found
        if entry.raw_len > CHUNK_MAX or entry.sealed_len > CHUNK_MAX + 1024:
            raise PackError(self.name, f"chunk {chunk_id.hex()[:16]}… claims an impossible size")
        self._fileobj.seek(entry.offset)
        sealed = self._fileobj.read(entry.sealed_len)
        try:
            stored = self._aead.decrypt(_NONCE.pack(self._prefix, counter), sealed,
                                        _blob_aad(self._header, entry.chunk_id, entry.flags, entry.raw_len))
        except InvalidTag:
            raise PackError(self.name, f"chunk {chunk_id.hex()[:16]}… does not authenticate: damaged") from None
        data = decompress(stored, entry.raw_len) if entry.flags & FLAG_ZSTD else stored
        if len(data) != entry.raw_len or self._keys.chunk_id(data) != chunk_id:
            raise PackError(self.name, f"chunk {chunk_id.hex()[:16]}… is not the chunk its id names")
        return data


def pack_sha256(fileobj: BinaryIO) -> str:
    """The SHA-256 of a pack's bytes: its name, checked without any key."""
    sha = hashlib.sha256()
    fileobj.seek(0)
    while block := fileobj.read(1 << 20):
        sha.update(block)
    return sha.hexdigest()
