"""What one partition's step produced: a backup sealed into the vault, a copy on a provider, a verified
restore — or, when the step went on with the other weddings, the one small record of why this wedding
failed (`WeddingFailure`), used by every step that loops over weddings."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from wedbackup_dagster.core.catalogue.store import BackupRecord
from wedbackup_dagster.core.formats.archive import ArchiveStats
from wedbackup_dagster.core.partitions import partition_label
from wedbackup_dagster.core.storage.vault import VaultEntry


@dataclass
class BackupOutcome:
    partition: str
    backup: BackupRecord
    stats: ArchiveStats
    vault: VaultEntry
    manifest: dict[str, Any]
    seconds: float


@dataclass
class ReplicaOutcome:
    partition: str
    backup: BackupRecord
    record: Any  # replicas.ReplicaRecord
    seconds: float


@dataclass
class VerifyOutcome:
    partition: str
    backup: BackupRecord
    provider: str
    seconds: float
    download_seconds: float
    restore_seconds: float
    tables: list[dict[str, Any]] = field(default_factory=list)
    fk_checked: int = 0
    fk_external: int = 0


@dataclass(frozen=True)
class WeddingFailure:
    """One partition that failed in a step that went on with the others: which one, in which step, and
    why. `message` is the error's own text (wedbackup's errors name what is at fault and never carry a
    secret), so it can be logged, shown in Dagster and printed as is."""
    partition: str
    step: str
    message: str

    @classmethod
    def of(cls, partition: str, step: str, error: BaseException) -> WeddingFailure:
        return cls(partition, step, str(error) or type(error).__name__)

    def line(self) -> str:
        """`- wedding 12: <why>` (the step is the heading, see describe_failures)."""
        return f"- {partition_label(self.partition)}: {self.message}"


def describe_failures(step: str, failures: Iterable[WeddingFailure], succeeded: int) -> str:
    """The text a step fails with when some of its weddings failed: how many of how many, then one line
    each, in partition order."""
    failed = sorted(failures, key=lambda f: f.partition)
    lines = "\n".join(f.line() for f in failed)
    return f"{step} failed for {len(failed)} of {len(failed) + succeeded} partition(s):\n{lines}"
