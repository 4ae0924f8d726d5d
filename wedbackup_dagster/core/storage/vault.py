"""The on-site vault: copy #1 of every sealed archive, on local disk. Archives are written to a temporary
file, fsynced, then renamed to their content address, so a crash never leaves a half-written archive
under a real name and a retry can never overwrite a good copy with different bytes."""
from __future__ import annotations

import fcntl
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from wedbackup_dagster.core.errors import WedbackupError
from wedbackup_dagster.core.partitions import check_partition, is_partition, shown

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SUFFIX = ".wbk"
KEY_BACKUP_DIR = "keys.d"  # encrypted key-store backups (core/keys/backup.py); the dot keeps it from being a partition


def check_sha256(sha256: str) -> str:
    if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
        raise WedbackupError(f"{shown(sha256)} is not a lower-case hex SHA-256")
    return sha256


@dataclass(frozen=True)
class VaultEntry:
    partition: str
    sha256: str
    path: Path
    size: int


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Vault:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    def path_for(self, partition: str, sha256: str) -> Path:
        return self.root / check_partition(partition) / f"{check_sha256(sha256)}{SUFFIX}"

    @contextmanager
    def incoming(self, partition: str) -> Iterator[tuple[BinaryIO, Path]]:
        """A temporary file in the partition's folder; removed unless `commit()` renamed it."""
        folder = self.root / check_partition(partition)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".incoming-{uuid.uuid4().hex}"
        fh = open(tmp, "xb")
        # Held while the archive is written: clean_incoming tells a live writer's file from one a killed
        # process left (the kernel drops the lock with the process, kill -9 included).
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield fh, tmp
        finally:
            if not fh.closed:
                fh.close()
            tmp.unlink(missing_ok=True)

    def commit(self, fh: BinaryIO, tmp: Path, partition: str, sha256: str) -> VaultEntry:
        """fsync the temporary file, then rename it to its content address (atomic on POSIX)."""
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        final = self.path_for(partition, sha256)
        size = tmp.stat().st_size
        if final.exists() and final.stat().st_size == size:
            # Same content address and size: the identical archive is already there; keep the old one.
            tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, final)
            fsync_dir(final.parent)
        return VaultEntry(partition, sha256, final, size)

    def get(self, partition: str, sha256: str) -> VaultEntry | None:
        path = self.path_for(partition, sha256)
        if not path.exists():
            return None
        return VaultEntry(partition, sha256, path, path.stat().st_size)

    def entries(self, partition: str | None = None) -> Iterator[VaultEntry]:
        # Only partition folders: the key-store backups (KEY_BACKUP_DIR) are not archives of a wedding.
        folders = [self.root / check_partition(partition)] if partition else sorted(
            p for p in self.root.glob("*") if p.is_dir() and is_partition(p.name))
        for folder in folders:
            for path in sorted(folder.glob(f"*{SUFFIX}")):
                yield VaultEntry(folder.name, path.stem, path, path.stat().st_size)

    def remove(self, partition: str, sha256: str) -> bool:
        """Delete one archive (retention, erasure); True when it was there. The folder is synced, so the
        deletion survives a crash like a commit does."""
        path = self.path_for(partition, sha256)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        return True

    def clean_incoming(self, partition: str | None = None) -> int:
        """Remove temporary files a killed run left behind (never renamed, so never valid archives); a file
        a live writer still holds locked is left alone. Returns how many were removed."""
        removed = 0
        pattern = f"{check_partition(partition)}/.incoming-*" if partition else "*/.incoming-*"
        for tmp in self.root.glob(pattern):
            try:
                fd = os.open(tmp, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # a live writer holds it
            try:
                tmp.unlink(missing_ok=True)
                removed += 1
            finally:
                os.close(fd)
        return removed
