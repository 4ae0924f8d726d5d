"""Fixtures shared by the storage tests: a small archive-shaped file, as most weddings' archives are."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass
class SmallArchive:
    path: Path
    data: bytes
    sha: str

    def upload(self, replica: Any, partition: str = "7") -> Any:
        """Uploaded by the replica as a backup's copy would be (its ReplicaRecord)."""
        return replica.upload(self.path, partition=partition, sha256=self.sha, size=len(self.data),
                              metadata={"key_id": "k-1"})


@pytest.fixture
def archive(tmp_path) -> SmallArchive:
    data = os.urandom(36_000)
    path = tmp_path / "a.wbk"
    path.write_bytes(data)
    return SmallArchive(path, data, hashlib.sha256(data).hexdigest())
