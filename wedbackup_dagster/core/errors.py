"""Errors wedbackup raises on purpose. Each names the thing at fault (archive, wedding, provider,
setting) so an on-call engineer knows where to look; none ever carries key material or passwords."""
from __future__ import annotations


class WedbackupError(Exception):
    """Base class: an error whose message is meant for a person, already naming the thing at fault."""


class ConfigError(WedbackupError):
    """A setting is missing or malformed. The message names the variable, never its (secret) value."""

    def __init__(self, variable: str, problem: str):
        self.variable = variable
        super().__init__(f"configuration {variable}: {problem}")


class StackError(WedbackupError):
    """The local stack (PostgreSQL or a storage stand-in) could not be started or reached."""


class ArchiveError(WedbackupError):
    """A sealed archive cannot be read: corrupt, truncated, tampered, or sealed with another key."""

    def __init__(self, archive: str, problem: str):
        self.archive = archive
        self.problem = problem
        super().__init__(f"archive {archive}: {problem}")


class CryptoKeyError(WedbackupError):
    """A key is missing, malformed, or does not open what it should (wrong master key, shredded key)."""


class UnknownWeddingError(WedbackupError):
    def __init__(self, wedding_id: str, problem: str = "no such wedding in the source database"):
        self.wedding_id = wedding_id
        super().__init__(f"wedding {wedding_id}: {problem}")


class TenancyError(WedbackupError):
    """The foreign-key graph does not say unambiguously which wedding a table's rows belong to."""


class SchemaMismatchError(WedbackupError):
    """The target database's schema differs from the one the archive was taken from."""


class ProviderError(WedbackupError):
    """A storage provider (s3, gcs, azure) failed or returned something we did not write."""

    def __init__(self, provider: str, problem: str):
        self.provider = provider
        super().__init__(f"provider {provider}: {problem}")


class VerificationError(WedbackupError):
    """A restored copy does not match its manifest."""


class ArchiveNotRecognised(ArchiveError):
    """The file does not start with the wedbackup magic bytes: it is not a wedbackup archive at all."""


class ArchiveUnsupportedVersion(ArchiveError):
    """The archive declares a format version this reader does not know (written by a newer wedbackup)."""


class ArchiveTruncated(ArchiveError):
    """The file ends before its final, last-flagged chunk: an interrupted or cut-short copy."""


class ArchiveCorrupt(ArchiveError):
    """A chunk or the header failed authentication or does not parse: bit rot, tampering, or garbage."""


class ArchiveWrongKey(ArchiveError):
    """The archive's data key does not open with the wedding key it names (different key, or tampering)."""


class ArchiveKeyUnavailable(ArchiveError):
    """The wedding key the archive names could not be obtained (unknown, shredded, or not accessible)."""


class ReplicaError(ProviderError):
    """One replica operation failed on one object: names the provider and the object key (never a secret)."""

    def __init__(self, provider: str, key: str | None, problem: str):
        self.key = key
        super().__init__(provider, f"{key}: {problem}" if key else problem)


class ReplicaChecksumMismatch(ReplicaError):
    """The bytes at the provider are not the archive we uploaded (tampering, bit rot, or a wrong object)."""


class ReplicaLocked(ReplicaError):
    """The provider refused to delete a copy because a retention lock (S3 Object Lock) still holds it:
    reported and recorded (with the date the lock ends), never a crash of the erasure or prune."""

    def __init__(self, provider: str, key: str | None, problem: str, *, locked_until=None, mode: str | None = None):
        self.locked_until = locked_until
        self.mode = mode
        super().__init__(provider, key, problem)


class ReplicaKeyRejected(ProviderError, ValueError):
    """A partition, checksum, key or metadata value would not make a safe object inside the replica prefix."""


class SnapshotError(WedbackupError):
    """A snapshot could not be taken (pg_dump failed, the source is unreachable); names the database."""


class SnapshotIncomplete(SnapshotError):
    """A table's COPY handed over a different number of rows than an independent count(*) of the same
    rows in the same snapshot: the archive would not hold its wedding's rows, so it is not written."""


class SnapshotRetryable(SnapshotError):
    """The snapshot met concurrent DDL (a table rewritten, truncated or dropped, or its lock not granted in
    time): this snapshot would be incomplete, so it fails; a new one, taken later, is expected to succeed."""


class SnapshotFormatError(ArchiveError):
    """The snapshot stream inside an (authenticated) archive does not parse: truncated, garbled, or
    written by another format version. Names the archive or stream it came from."""


class RestoreError(WedbackupError):
    """A restore could not be applied to its target (rows or DDL refused); names the table at fault.
    Nothing is committed: restores run in one transaction."""


class KeyBackupError(ArchiveError):
    """An encrypted key-store backup cannot be read, written or deleted: names the file or object at fault
    (truncated, tampered, sealed with a master key that is not configured), never a key."""

    def __init__(self, backup: str, problem: str):
        super().__init__(backup, problem)
        self.args = (f"key backup {backup}: {problem}",)

    def __str__(self) -> str:
        return self.args[0]


class PartitionBusyError(WedbackupError):
    """Another backup or restore of the same partition held its lock for longer than we may wait."""

    def __init__(self, partition: str, purpose: str, waited: float, holder: str):
        self.partition = partition
        self.holder = holder
        what = "the platform partition" if partition == "platform" else f"wedding {partition}"
        waited_text = f"after waiting {waited:.1f} s" if waited > 0 else "without waiting"
        super().__init__(f"{what}: {purpose} not started {waited_text}: another backup or restore of it is "
                         f"running (lock held by {holder})")
