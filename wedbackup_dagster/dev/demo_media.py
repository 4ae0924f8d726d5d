"""Synthetic wedding media for the demo and the tests, deterministic from a seed: per wedding mostly
2-8 MB incompressible "photos", optionally a few 100 MB+ "videos", many small compressible documents,
and the duplicates real platforms have (the same photo uploaded by the couple and the photographer under
other names, re-uploads, edited versions sharing most bytes); vendor portfolios for the platform partition.
Large objects are generated as streams, never held whole in memory."""
from __future__ import annotations

import hashlib
import io
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

MEDIA_BUCKET = "wedbackup-media"  # the local stack's media bucket (moto)
JPEG_HEADER = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"
MP4_HEADER = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00"


@dataclass(frozen=True)
class MediaScale:
    photos: int = 6  # distinct photos per wedding
    photo_min: int = 2 << 20
    photo_max: int = 8 << 20
    documents: int = 12
    videos: int = 0  # per wedding
    video_bytes: int = 100 << 20
    vendors: int = 3  # portfolios in the platform partition


SMALL = MediaScale()
BENCH = MediaScale(photos=40, documents=40, videos=1, video_bytes=120 << 20, vendors=10)


class RandomStream:
    """`size` deterministic pseudo-random bytes (incompressible, like JPEG or video data), read in blocks,
    after an optional header; `edits` are (offset, bytes) inserted, which is how an edited photo differs."""

    def __init__(self, seed: bytes, size: int, header: bytes = b"", edits: tuple[tuple[int, bytes], ...] = ()):
        self._seed = hashlib.sha256(seed).digest()
        self._size = size
        self._pos = 0
        self._header = header
        self._edits = dict(edits)
        self._pending = memoryview(b"")

    def _base(self) -> Iterator[bytes]:
        # An AES-CTR keystream: deterministic, incompressible, and generated at GB/s (SHAKE-256 was the
        # bottleneck of the benchmarks at ~90 MB/s).
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        keystream = Cipher(algorithms.AES(self._seed), modes.CTR(bytes(16))).encryptor()
        zeros = bytes(1 << 20)
        yield self._header
        while True:
            yield keystream.update(zeros)

    def read(self, n: int = -1) -> bytes:
        if not hasattr(self, "_gen"):
            self._gen = self._generate()
        want = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        out = []
        got = 0
        while got < want:
            if not self._pending:
                self._pending = memoryview(next(self._gen))
            take = self._pending[:want - got]
            self._pending = self._pending[len(take):]  # a view: no copy of the rest of the block
            out.append(take)
            got += len(take)
        self._pos += got
        return b"".join(out)

    def _generate(self) -> Iterator[bytes]:
        emitted = 0
        for piece in self._base():
            for offset in sorted(k for k in self._edits if emitted <= k < emitted + len(piece)):
                cut = offset - emitted
                yield piece[:cut]
                yield self._edits.pop(offset)
                emitted += cut
                piece = piece[cut:]
            emitted += len(piece)
            yield piece

    def __len__(self) -> int:
        return self._size


class MediaSink(Protocol):
    def put(self, path: str, stream: BinaryIO, size: int) -> None: ...


class S3Sink:
    def __init__(self, client: Any, bucket: str, prefix: str = ""):
        self.client, self.bucket, self.prefix = client, bucket, prefix

    def put(self, path: str, stream: BinaryIO, size: int) -> None:
        from boto3.s3.transfer import TransferConfig

        self.client.upload_fileobj(stream, self.bucket, self.prefix + path,
                                   Config=TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=16 << 20,
                                                         max_concurrency=2))


class DirectorySink:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    def put(self, path: str, stream: BinaryIO, size: int) -> None:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fh:
            while block := stream.read(1 << 20):
                fh.write(block)


def _document(rng: random.Random, wedding: str, n: int) -> bytes:
    words = ["guest", "table", "menu", "vegetarian", "contract", "deposit", "florist", "venue", "RSVP", "timeline",
             "shuttle", "playlist", "cake", "invoice", "photographer"]
    lines = [f"Wedding {wedding} — document {n}"]
    for i in range(rng.randint(20, 1500)):
        lines.append(f"{i:05d} " + " ".join(rng.choice(words) for _ in range(rng.randint(4, 14))))
    return "\n".join(lines).encode()


def wedding_media(wedding: str, seed: int, scale: MediaScale = SMALL) -> Iterator[tuple[str, RandomStream | bytes]]:
    """(path, content) of one wedding's media, duplicates included."""
    rng = random.Random(f"{seed}:{wedding}")
    base = f"weddings/{wedding}/"
    photos = []
    for i in range(scale.photos):
        size = rng.randint(scale.photo_min, scale.photo_max)
        ident = f"{seed}:{wedding}:photo:{i}".encode()
        photos.append((ident, size))
        yield f"{base}photographer/IMG_{i:04d}.jpg", RandomStream(ident, size, JPEG_HEADER)
    if photos:
        ident, size = photos[0]
        # the couple uploads the photographer's photo under its own name, then uploads it again
        yield f"{base}couple/our favourite ♥.jpg", RandomStream(ident, size, JPEG_HEADER)
        yield f"{base}couple/our favourite ♥ (1).jpg", RandomStream(ident, size, JPEG_HEADER)
        # an edited version: new metadata near the start, a crop mark later; most bytes shared
        ident, size = photos[-1]
        yield (f"{base}photographer/edited/IMG_{len(photos) - 1:04d}-retouched.jpg",
               RandomStream(ident, size + 700, JPEG_HEADER,
                            edits=((2048, b"EXIF:retouched" * 36), (size // 2, b"crop" * 50))))
    for v in range(scale.videos):
        yield (f"{base}videos/ceremony-{v}.mp4",
               RandomStream(f"{seed}:{wedding}:video:{v}".encode(), scale.video_bytes + rng.randint(0, 1 << 20),
                            MP4_HEADER))
    for d in range(scale.documents):
        yield f"{base}documents/doc-{d:03d}.txt", _document(rng, wedding, d)
    yield f"{base}documents/empty-note.txt", b""


def platform_media(seed: int, scale: MediaScale = SMALL) -> Iterator[tuple[str, RandomStream | bytes]]:
    rng = random.Random(f"{seed}:platform")
    shared = (f"{seed}:vendor-stock".encode(), 3 << 20)
    for v in range(scale.vendors):
        for i in range(3):
            size = rng.randint(scale.photo_min, scale.photo_min * 2)
            yield f"vendors/{v}/portfolio/work-{i}.jpg", RandomStream(f"{seed}:vendor:{v}:{i}".encode(), size,
                                                                       JPEG_HEADER)
        # the same stock photo in every vendor's portfolio: deduplicated within the platform partition
        yield f"vendors/{v}/portfolio/stock.jpg", RandomStream(shared[0], shared[1], JPEG_HEADER)


def generate_media(sink: MediaSink, weddings: list[str], *, seed: int = 7, scale: MediaScale = SMALL,
                   platform: bool = True) -> dict[str, int]:
    """Write the demo media of `weddings` (and the platform's) into `sink`; returns counts."""
    files = total = 0
    items = [item for w in weddings for item in wedding_media(w, seed, scale)]
    if platform:
        items += list(platform_media(seed, scale))
    for path, content in items:
        if isinstance(content, bytes):
            size, stream = len(content), io.BytesIO(content)
        else:
            size, stream = len(content), content
        sink.put(path, stream, size)
        files += 1
        total += size
    return {"files": files, "bytes": total, "weddings": len(weddings)}


def ensure_media_bucket(client: Any, bucket: str = MEDIA_BUCKET) -> None:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        client.create_bucket(Bucket=bucket, CreateBucketConfiguration={
            "LocationConstraint": os.environ.get("WEDBACKUP_S3_REGION") or "eu-west-1"})


def fill_demo_bucket(source_dsn: str, *, weddings: int = 5, seed: int = 7, scale: MediaScale = SMALL,
                     bucket: str = MEDIA_BUCKET) -> dict[str, Any]:
    """Fill the local stack's media bucket with demo media for the first `weddings` weddings of the demo
    database (and the platform's vendor portfolios). Set WEDBACKUP_MEDIA_SOURCE=s3://<bucket> to back it up."""
    import psycopg

    from wedbackup_dagster.core.media.source import media_s3_client

    with psycopg.connect(source_dsn) as conn:
        ids = [str(r[0]) for r in conn.execute("SELECT id FROM weddings ORDER BY id LIMIT %s", (weddings,))]
    client = media_s3_client(os.environ)
    ensure_media_bucket(client, bucket)
    summary = generate_media(S3Sink(client, bucket), ids, seed=seed, scale=scale)
    return {**summary, "bucket": bucket, "source": f"s3://{bucket}"}
