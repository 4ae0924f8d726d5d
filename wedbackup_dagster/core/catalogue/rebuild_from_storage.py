"""Rebuild the catalogue's backups and copies from storage, the source of truth: one provider's listing
names every archive (partition and SHA-256 are in the key); each archive's own manifest fills the rest."""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wedbackup_dagster.core.formats.archive import open_archive
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.errors import WedbackupError
from wedbackup_dagster.core.keys.keyring import MasterKeyring
from wedbackup_dagster.core.storage.vault import Vault

# What cannot come back from storage, and why (README "Provider outages and the catalogue"):
# backups.id and copies.backup_id (new identities), backups.created_at and copies.stored_at (the time of
# the rebuild), copies.verified_at and the restores table (verification history lives only in the
# catalogue), backups.source_fingerprint (a property of the source at backup time, not of the archive), and
# the manifest's `seconds` (the snapshot's duration, known only after the archive's manifest was sealed).
NOT_RECOVERABLE = ("backups.id", "backups.created_at", "backups.source_fingerprint", "manifest.seconds",
                   "copies.backup_id", "copies.stored_at", "copies.verified_at", "restores")


@dataclass
class RebuildReport:
    provider: str
    listed: int = 0  # archives in the listing
    backups_added: int = 0
    backups_known: int = 0  # already in the catalogue: only the copy rows were (re)written
    copies_written: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "<key>: why" for archives that could not be read
    key_backup: str | None = None  # the key-store backup wedding keys were restored from
    keys_restored: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "listed": self.listed, "backups_added": self.backups_added,
                "backups_known": self.backups_known, "copies_written": self.copies_written,
                "skipped": self.skipped, "key_backup": self.key_backup, "keys_restored": self.keys_restored}


def read_archive_manifest(replica: Any, key: str, sha256: str, resolve_key: Callable[[str], Any],
                          *, tmp_dir: str | None = None) -> tuple[str, dict[str, Any]]:
    """(key id, manifest) of one archive at a provider: downloaded to a temporary file (its SHA-256
    checked on the way), opened with the wedding key and read through to its manifest record."""
    from wedbackup_dagster.core.formats.snapshot_stream import read_manifest

    with tempfile.TemporaryFile(dir=tmp_dir) as tmp:
        replica.download(key, tmp, expected_sha256=sha256)
        tmp.seek(0)
        reader = open_archive(tmp, name=f"{replica.provider}:{key}", resolve_key=resolve_key)
        manifest = read_manifest(reader, name=f"{replica.provider}:{key}")
        return reader.header.key_id, manifest.to_dict()


def rebuild_from(replica: Any, catalogue: Catalogue, keyring: MasterKeyring, *, vault: Vault | None = None,
                 progress: Callable[[int, str], None] | None = None, restore_keys: bool = True) -> RebuildReport:
    """Add every archive `replica` lists to the catalogue: the backup row (from the archive's manifest,
    unless a row with that SHA-256 exists) and its copy at the provider, plus the vault copy when the
    vault holds the same file. Additive and idempotent: nothing already in the catalogue is removed.
    First, with `restore_keys`, wedding keys the catalogue lacks come back from the provider's newest
    key-store backup (core/keys/backup.py); an archive whose key is still missing (or shredded) is skipped."""
    from wedbackup_dagster.core.errors import KeyBackupError
    from wedbackup_dagster.core.keys.backup import newest_key_backup, restore_key_store

    catalogue.migrate()
    report = RebuildReport(provider=replica.provider)
    if restore_keys:
        try:
            key_tmp = str(vault.root) if vault is not None and vault.root.is_dir() else None
            # None: no key backup yet (a store from before them), nothing to restore.
            newest = newest_key_backup(replica, keyring, tmp_dir=key_tmp)
            keys = restore_key_store(replica, catalogue, keyring, sha256=newest[0], tmp_dir=key_tmp) if newest else None
            if keys is not None:
                report.key_backup, report.keys_restored = keys.key_backup, keys.restored
                report.skipped.extend(keys.conflicts)
        except KeyBackupError as exc:
            report.skipped.append(f"wedding keys: {exc}")
    region_of = getattr(replica, "region", None)  # GCS only learns its region from the bucket

    def resolve_key(key_id: str) -> Any:
        return catalogue.key_by_id(key_id, keyring)

    tmp_dir = str(vault.root) if vault is not None and vault.root.is_dir() else None
    for listed in replica.list():
        if listed.partition is None or listed.sha256 is None:
            continue  # canaries and anything else that is not one of our archives
        report.listed += 1
        if progress:
            progress(report.listed, listed.key)
        try:
            known = catalogue.backup_by_sha(listed.sha256)
            if known is None:
                key_id, manifest = read_archive_manifest(replica, listed.key, listed.sha256, resolve_key,
                                                         tmp_dir=tmp_dir)
                if manifest.get("partition") != listed.partition:
                    raise WedbackupError(f"its manifest says partition {manifest.get('partition')!r}, "
                                         f"the key says {listed.partition!r}")
                backup_id, added = catalogue.rebuilt_backup(partition=listed.partition,
                                                            archive_sha256=listed.sha256, size=listed.size,
                                                            key_id=key_id, manifest=manifest)
            else:
                backup_id, added = known.id, False
            head = replica.head(listed.key)
            if head is None:
                raise WedbackupError("vanished between listing and head")
        except WedbackupError as exc:
            report.skipped.append(f"{listed.key}: {exc}")
            continue
        report.backups_added += added
        report.backups_known += not added
        region = head.region
        if region is None and callable(region_of):
            region = region_of()
        catalogue.record_copy(backup_id, provider=head.provider, uri=head.uri, object_key=head.key,
                              version_id=head.version_id, size=head.size, checksum=head.provider_checksum,
                              storage_class=head.storage_class, region=region, media=head.media,
                              offsite=head.offsite)
        _count(report, head.provider)
        entry = vault.get(listed.partition, listed.sha256) if vault is not None else None
        # The vault file's name is its content address; its size must match too (a cut-off file does not).
        if entry is not None and entry.size == head.size:
            catalogue.record_copy(backup_id, provider="vault", uri=entry.path.as_uri(), object_key=entry.path.name,
                                  version_id=None, size=entry.size, checksum=listed.sha256,
                                  storage_class="local-disk", region=None, media="disk", offsite=False)
            _count(report, "vault")
    catalogue.audit("rebuild", None, report.to_dict() | {"skipped": len(report.skipped)})
    return report


def _count(report: RebuildReport, provider: str) -> None:
    report.copies_written[provider] = report.copies_written.get(provider, 0) + 1
