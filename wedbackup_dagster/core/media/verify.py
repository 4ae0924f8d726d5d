"""Verify a partition's newest media snapshot from one location: fetch it and the packs it needs (each
checked against its SHA-256 name), decrypt every chunk of the chosen files and compare each file's SHA-256
with the snapshot's. All files, or a rotating sample so that successive verifications cover every file."""
from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from wedbackup_dagster.core.errors import RestoreError, VerificationError, WedbackupError
from wedbackup_dagster.core.keys.keyring import SecretKey

from .restore import PackSource, choose_snapshot, load_snapshot, write_file
from .snapshot import MediaFile
from .store import MediaStore

MEDIA_VERIFY_SAMPLE_ENV = "WEDBACKUP_MEDIA_VERIFY_SAMPLE"


@dataclass
class MediaVerifyResult:
    partition: str
    provider: str
    snapshot_sha256: str
    files_checked: int = 0
    files_total: int = 0
    bytes_checked: int = 0
    packs_checked: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


class _Discard:
    def __init__(self) -> None:
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return len(data)


def sample_files(files: list[MediaFile], sample: int, round_: int) -> list[MediaFile]:
    """`sample` files (0: all), the `round_`-th slice of the files in path order: rounds cover them all."""
    if sample <= 0 or sample >= len(files):
        return list(files)
    ordered = sorted(files, key=lambda f: f.path)
    start = (round_ * sample) % len(ordered)
    return [ordered[(start + i) % len(ordered)] for i in range(sample)]


def verify_media(store: MediaStore, partition: str, resolve_key: Callable[[str], SecretKey], provider: str, *,
                 sample: int = 0) -> MediaVerifyResult:
    started = time.monotonic()
    row = choose_snapshot(store, partition)
    result = MediaVerifyResult(partition, provider, row.sha256)
    try:
        snapshot = load_snapshot(store, row, resolve_key, (provider,))
    except WedbackupError as exc:
        result.problems.append(str(exc))
        return result
    files = sample_files(snapshot.files, sample, row.verifications)
    result.files_total = len(snapshot.files)
    chunk_pack = store.chunk_packs(row.key_id, {c for f in files for c in f.chunks})
    with tempfile.TemporaryDirectory(prefix="wedbackup-media-verify-") as tmp:
        packs = PackSource(store, partition, resolve_key, (provider,), Path(tmp))
        try:
            for f in files:
                sink = _Discard()
                try:
                    sha = write_file(f, packs, chunk_pack, sink)
                except (RestoreError, WedbackupError) as exc:
                    result.problems.append(f"{f.path!r}: {exc}")
                    continue
                if sha != f.sha256:
                    result.problems.append(f"{f.path!r}: restores with SHA-256 {sha}, the snapshot says {f.sha256}")
                    continue
                result.files_checked += 1
                result.bytes_checked += f.size
        finally:
            packs.close()
        result.packs_checked = len(packs.readers)
        for damaged in packs.damaged:
            if damaged not in result.problems:
                result.problems.append(damaged)
    if result.ok:
        store.mark_verified(row.id, datetime.now(timezone.utc))
    result.seconds = time.monotonic() - started
    return result


def raise_for(result: MediaVerifyResult) -> None:
    if not result.ok:
        raise VerificationError(f"media of {result.partition} at {result.provider}: " + "; ".join(result.problems[:5]))
