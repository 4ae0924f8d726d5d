"""Content-defined chunking of media (FastCDC 2020 via pyfastcdc) and keyed chunk ids (BLAKE3 keyed with a
key derived from the wedding's key). The parameters are named constants; the reasons are beside them."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import blake3
import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pyfastcdc import FastCDC

from wedbackup_dagster.core.keys.keyring import SecretKey

# Chunk sizes. Most media bytes are 2-8 MB photos; an edit (EXIF, a crop saved by the same tool) or the
# same photo re-uploaded changes a few places, and dedup can only share the chunks around those places:
# with ~768 KiB chunks a photo is 3-10 chunks, so an edit that touches one place still shares most of it.
# Videos of 100 MB+ become ~130+ chunks per 100 MB: a few hundred catalogue rows, no more. Smaller chunks
# would dedup slightly better but cost a catalogue row and ~100 bytes of pack index and AEAD tag each;
# restic (512 KiB min / 1 MiB avg / 8 MiB max) made the same trade. MAX bounds the memory one chunk
# holds (two chunks of buffers per stream). pyfastcdc's average is AVG + MIN ("cut-point skipping").
CHUNK_MIN = 256 << 10
CHUNK_AVG = 512 << 10  # so ~768 KiB on average
CHUNK_MAX = 4 << 20
# Normalized chunking level 1 (FastCDC paper, section 4.4): fewer tiny and giant chunks at almost no dedup cost.
NORMALIZATION = 1
READ_SIZE = 1 << 20

# Compression is tried on a sample first: JPEG, HEIC, MP4 and zip-based documents do not compress, and
# zstd over incompressible bytes would cost as much CPU as everything else together. A chunk is stored
# compressed only when the whole chunk shrinks by at least COMPRESS_MIN_SAVING.
COMPRESS_SAMPLE = 16 << 10
COMPRESS_SAMPLE_RATIO = 0.90
COMPRESS_MIN_SAVING = 0.05
COMPRESS_LEVEL = 3

_KDF_PREFIX = b"wedbackup-media-v1:"


def _derive(wedding_key: SecretKey, purpose: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                info=_KDF_PREFIX + purpose + b":" + wedding_key.key_id.encode("ascii")).derive(wedding_key.material)


@dataclass(frozen=True, repr=False)
class MediaKeys:
    """What a wedding key gives its media: the chunk-id key (keyed BLAKE3, so nobody without the key can
    test whether a known photo is in a backup) and the gear seed (so chunk boundaries, visible as blob sizes
    in a pack, depend on the key as well as the content). Shown by key id only."""

    key_id: str
    chunk_id_key: bytes = field(repr=False)
    gear_seed: int = field(repr=False)

    @classmethod
    def of(cls, wedding_key: SecretKey) -> "MediaKeys":
        # 63 bits: pyfastcdc shifts the seed left by one into a uint64; 0 would mean "no seed".
        seed = (int.from_bytes(_derive(wedding_key, b"gear-seed", 8), "big") >> 1) | 1
        return cls(wedding_key.key_id, _derive(wedding_key, b"chunk-id"), seed)

    def __repr__(self) -> str:
        return f"MediaKeys(key_id={self.key_id!r})"

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, key=self.chunk_id_key).digest()

    def chunker(self) -> FastCDC:
        return FastCDC(CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX, normalized_chunking=NORMALIZATION,
                       seed=self.gear_seed)


def chunks(keys: MediaKeys, stream: BinaryIO) -> Iterator[memoryview]:
    """The content-defined chunks of a stream. Each view is valid only until the next one is produced, so a
    caller that keeps one must copy it; at most CHUNK_MAX plus a read buffer is held."""
    for chunk in keys.chunker().cut_stream(stream):
        yield chunk.data


def maybe_compress(data: bytes | memoryview) -> tuple[bytes | memoryview, bool]:
    """(stored bytes, compressed?): zstd only when a sample says it pays and the whole chunk confirms it."""
    if len(data) < 512:
        return data, False
    sample = data[:COMPRESS_SAMPLE]
    if len(zstandard.ZstdCompressor(level=1).compress(sample)) > COMPRESS_SAMPLE_RATIO * len(sample):
        return data, False
    packed = zstandard.ZstdCompressor(level=COMPRESS_LEVEL).compress(data)
    if len(packed) > (1 - COMPRESS_MIN_SAVING) * len(data):
        return data, False
    return packed, True


def decompress(data: bytes, raw_size: int) -> bytes:
    return zstandard.ZstdDecompressor().decompress(data, max_output_size=raw_size)
