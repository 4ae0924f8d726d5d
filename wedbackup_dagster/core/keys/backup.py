"""Encrypted backups of the key store, so that losing the catalogue loses no wedding key: every live
wedding key (wrapped by the current master key) sealed into one file in the archive format, with a key
derived from that master key, written atomically into the vault and uploaded to every provider under
`<prefix>/keys/<sha256>.wbk`. Shredded keys are never written; `refresh_key_backups` writes a new backup
and deletes every older one everywhere (erasure). Since format version 2 it also holds the erasure list, so
a catalogue rebuilt after a loss still refuses erased weddings. The format is docs/KEYBACKUP.md."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import psycopg
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from wedbackup_dagster.core.formats.archive import ArchiveStats, ArchiveWriter, loads_untrusted, open_archive
from wedbackup_dagster.core.catalogue.store import Catalogue, wedding_key_context
from wedbackup_dagster.core.errors import (ArchiveError, ArchiveKeyUnavailable, KeyBackupError, CryptoKeyError,
                                           WedbackupError)
from wedbackup_dagster.core.keys.keyring import MasterKeyring, SecretKey, load_master_keyring, unwrap_key, wrap_key
from wedbackup_dagster.core.storage.replicas.base import KEY_BACKUP_DIR as PROVIDER_KEY_BACKUP_DIR
from wedbackup_dagster.core.storage.replicas.base import (KEY_BACKUP_METADATA_PARTITION, key_backup_key,
                                                          parse_key_backup_key)
from wedbackup_dagster.core.storage.vault import KEY_BACKUP_DIR as VAULT_KEY_BACKUP_DIR
from wedbackup_dagster.core.storage.vault import SUFFIX, fsync_dir, check_sha256

FORMAT_NAME = "wedbackup-key-store"
FORMAT_VERSION = 2  # 2: erasure lines after the key lines (version 1 files, without them, still read)
READABLE_VERSIONS = (1, 2)
# HKDF info: the sealing key is derived from the master key, never the master key itself, so the two
# uses (wrapping wedding keys, sealing key backups) cannot be confused.
_HKDF_INFO = b"wedbackup-key-store-backup-v1"
KEEP_KEY_BACKUPS = 7  # the newest this many key backups are kept by a routine back_up_key_store


@dataclass(frozen=True, repr=False)
class KeyEntry:
    """One wedding key as a key backup holds it: still wrapped (by `master_key_id`), never in the clear."""

    key_id: str
    partition: str
    wrapped: bytes
    master_key_id: str
    created_at: str

    def __repr__(self) -> str:
        return f"KeyEntry(key_id={self.key_id!r}, partition={self.partition!r}, master_key_id={self.master_key_id!r})"


@dataclass(frozen=True)
class ErasureEntry:
    """One recorded GDPR erasure as a key backup holds it: enough to refuse the wedding after a catalogue loss."""

    partition: str
    wedding_id: str
    erased_at: str
    requested_by: str


@dataclass
class KeyBackupContents:
    name: str
    master_key_id: str
    created_at: str
    entries: list[KeyEntry]
    erasures: list[ErasureEntry] = field(default_factory=list)


@dataclass
class KeyBackupResult:
    """What back_up_key_store did: the new file (or why none was needed), its copies, and failures."""

    sha256: str | None
    key_count: int
    master_key_id: str
    skipped: str = ""  # why no new backup was written (the key set is unchanged and fully copied)
    copies: dict[str, str] = field(default_factory=dict)  # provider -> uri
    failures: dict[str, str] = field(default_factory=dict)  # provider -> error
    deleted: dict[str, int] = field(default_factory=dict)  # provider -> older key backups deleted

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "key_count": self.key_count, "master_key_id": self.master_key_id,
                "skipped": self.skipped, "copies": self.copies, "failures": self.failures, "deleted": self.deleted}


@dataclass
class KeyRestoreReport:
    provider: str
    key_backup: str | None = None  # the object restored from
    in_backup: int = 0
    restored: int = 0  # inserted into wedding_keys
    known: int = 0  # already in the catalogue (live or shredded: a shredded key is never brought back)
    conflicts: list[str] = field(default_factory=list)  # partition already has another live key
    erasures_restored: int = 0  # erasure records the catalogue lacked, brought back
    erased_skipped: int = 0  # keys of erased weddings in the backup: never brought back

    def to_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "key_backup": self.key_backup, "in_backup": self.in_backup,
                "restored": self.restored, "known": self.known, "conflicts": self.conflicts,
                "erasures_restored": self.erasures_restored, "erased_skipped": self.erased_skipped}


# ------------------------------------------------------------------------------------------ the format


def sealing_key(master: SecretKey) -> SecretKey:
    """The key a key backup is sealed with: HKDF-SHA256 of the master key; its id is the master key's."""
    material = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(master.material)
    return SecretKey(master.key_id, material)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def write_key_backup(fh: BinaryIO, entries: list[KeyEntry], master: SecretKey, *, created_at: str,
                     erasures: list[ErasureEntry] = ()) -> ArchiveStats:
    """Seal `entries` (all wrapped by `master`) and `erasures` as JSON lines into `fh`: a header line, one
    line per key, one line per erasure."""
    if any(e.master_key_id != master.key_id for e in entries):
        raise CryptoKeyError(f"every key in a key backup must be wrapped by its sealing master key {master.key_id!r}")
    writer = ArchiveWriter(fh, wedding_key=sealing_key(master), label={"app": "wedbackup", "kind": FORMAT_NAME})
    try:
        head = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "created_at": created_at,
                "master_key_id": master.key_id, "key_count": len(entries), "erasure_count": len(erasures)}
        writer.write(json.dumps(head, sort_keys=True).encode() + b"\n")
        for e in entries:
            line = {"key_id": e.key_id, "partition": e.partition, "master_key_id": e.master_key_id,
                    "wrapped": _b64(e.wrapped), "created_at": e.created_at}
            writer.write(json.dumps(line, sort_keys=True).encode() + b"\n")
        for x in erasures:
            line = {"erasure": {"partition": x.partition, "wedding_id": x.wedding_id, "erased_at": x.erased_at,
                                "requested_by": x.requested_by}}
            writer.write(json.dumps(line, sort_keys=True).encode() + b"\n")
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def _lines(reader: Any) -> Iterator[bytes]:
    pending = b""
    for piece in reader:
        pending += piece
        *complete, pending = pending.split(b"\n")
        yield from complete
    if pending:
        yield pending


def read_key_backup(fh: BinaryIO, *, name: str, keyring: MasterKeyring, check_keys: bool = True) -> KeyBackupContents:
    """Open, authenticate and parse a key backup; with `check_keys`, also prove every wrapped key opens with
    the keyring. Every failure is a KeyBackupError naming `name`."""

    def resolve(key_id: str) -> SecretKey:
        return sealing_key(keyring.get(key_id))

    try:
        reader = open_archive(fh, name=name, resolve_key=resolve)
        if (reader.header.label or {}).get("kind") != FORMAT_NAME:
            raise KeyBackupError(name, "is a wedbackup archive but not a key-store backup")
        lines = _lines(reader)
        head = loads_untrusted(next(lines, b"{}"))
        if head.get("format") != FORMAT_NAME or head.get("version") not in READABLE_VERSIONS:
            raise KeyBackupError(name, f"unknown key backup format {head.get('format')!r} version "
                                       f"{head.get('version')!r} (this build reads {FORMAT_NAME} "
                                       f"{', '.join(map(str, READABLE_VERSIONS))})")
        entries, erasures = [], []
        for raw in lines:
            item = loads_untrusted(raw)
            if "erasure" in item and head["version"] >= 2:
                x = item["erasure"]
                erasures.append(ErasureEntry(str(x["partition"]), str(x["wedding_id"]), str(x["erased_at"]),
                                             str(x["requested_by"])))
                continue
            entries.append(KeyEntry(item["key_id"], item["partition"], base64.b64decode(item["wrapped"], validate=True),
                                    item["master_key_id"], item["created_at"]))
        if not reader.complete:
            raise KeyBackupError(name, "did not read through to its final chunk")
    except ArchiveKeyUnavailable:
        raise KeyBackupError(name, f"is sealed with master key {reader_key_id(fh)!r}, which is not configured "
                                   f"(configured: {', '.join(keyring.key_ids)})") from None
    except KeyBackupError:
        raise
    except ArchiveError as exc:
        raise KeyBackupError(name, exc.problem) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # authenticated JSON or base64 that does not parse
        raise KeyBackupError(name, f"its contents do not parse ({type(exc).__name__})") from None
    if head.get("key_count") != len(entries):
        raise KeyBackupError(name, f"says it holds {head.get('key_count')} keys but holds {len(entries)}")
    if head.get("erasure_count", 0) != len(erasures):
        raise KeyBackupError(name, f"says it holds {head.get('erasure_count')} erasures but holds {len(erasures)}")
    if check_keys:
        for e in entries:
            try:
                unwrap_key(keyring.get(e.master_key_id), e.wrapped, wedding_key_context(e.partition, e.key_id))
            except CryptoKeyError as exc:
                raise KeyBackupError(name, f"wedding key {e.key_id}: {exc}") from None
    return KeyBackupContents(name, head["master_key_id"], head["created_at"], entries, erasures)


def reader_key_id(fh: BinaryIO) -> str:
    """The key id in a (possibly unreadable) archive header, for error messages; '?' when it does not parse."""
    from wedbackup_dagster.core.formats.archive import read_header

    try:
        fh.seek(0)
        return read_header(fh, name="key backup").key_id
    except (ArchiveError, OSError):
        return "?"


# ----------------------------------------------------------------------------------- the live key set


def key_set_fingerprint(catalogue: Catalogue, master_key_id: str) -> tuple[str, int]:
    """(fingerprint, count) of the live key ids and erased partitions: a key backup with the same fingerprint
    holds the same keys and erasures. Ids in byte order (COLLATE "C", as Python sorts them), whatever the
    catalogue's collation."""
    with _connect(catalogue) as conn:
        row = conn.execute(
            "SELECT count(*) AS n, coalesce(string_agg(key_id, ',' ORDER BY key_id COLLATE \"C\"), '') AS ids "
            "FROM wedbackup.wedding_keys WHERE wrapped IS NOT NULL AND shredded_at IS NULL").fetchone()
        erased = conn.execute("SELECT coalesce(string_agg(partition, ',' ORDER BY partition COLLATE \"C\"), '') "
                              "AS p FROM wedbackup.erasures").fetchone()["p"]
    return _key_set(master_key_id, row["ids"], erased), row["n"]


def _key_set(master_key_id: str, key_ids: str, erased: str) -> str:
    # Without erasures, the fingerprint of format version 1: their key backups stay current.
    text = f"{master_key_id}|{key_ids}" + (f"|erased:{erased}" if erased else "")
    return hashlib.sha256(text.encode()).hexdigest()


def erasure_entries(catalogue: Catalogue) -> list[ErasureEntry]:
    """Every recorded erasure, in partition byte order, as a key backup holds it."""
    with _connect(catalogue) as conn:
        rows = conn.execute("SELECT partition, wedding_id, erased_at, requested_by FROM wedbackup.erasures "
                            "ORDER BY partition COLLATE \"C\"").fetchall()
    return [ErasureEntry(r["partition"], r["wedding_id"], r["erased_at"].isoformat(), r["requested_by"]) for r in rows]


def live_key_entries(catalogue: Catalogue, keyring: MasterKeyring) -> list[KeyEntry]:
    """Every live wedding key, wrapped by the current master key (re-wrapped in memory where the catalogue
    still has it under an older one). A key whose master key is not configured stops the backup, named."""
    current = keyring.current
    with _connect(catalogue) as conn:
        rows = conn.execute(
            "SELECT key_id, partition, wrapped, master_key_id, created_at FROM wedbackup.wedding_keys "
            "WHERE wrapped IS NOT NULL AND shredded_at IS NULL ORDER BY key_id COLLATE \"C\"").fetchall()
    entries = []
    for r in rows:
        wrapped = bytes(r["wrapped"])
        if r["master_key_id"] != current.key_id:
            context = wedding_key_context(r["partition"], r["key_id"])
            if r["master_key_id"] not in keyring:
                raise CryptoKeyError(f"wedding key {r['key_id']} is wrapped by master key {r['master_key_id']!r}, "
                                "which is not configured: it cannot be backed up (or read)")
            wrapped = wrap_key(current, unwrap_key(keyring.get(r["master_key_id"]), wrapped, context), context)
        entries.append(KeyEntry(r["key_id"], r["partition"], wrapped, current.key_id, r["created_at"].isoformat()))
    return entries


# ------------------------------------------------------------------------------------ vault and storage


def vault_key_backup_dir(settings: Any) -> Path:
    return Path(settings.vault_dir) / VAULT_KEY_BACKUP_DIR


def _write_to_vault(folder: Path, write: Callable[[BinaryIO], ArchiveStats]) -> tuple[Path, ArchiveStats]:
    """Write through a temporary file, fsync, rename to `<sha256>.wbk` (atomic): never a half-written backup."""
    tmp = folder / f".incoming-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as fh:
            stats = write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        final = folder / f"{check_sha256(stats.sha256)}{SUFFIX}"
        os.replace(tmp, final)
        fsync_dir(folder)
    except OSError as exc:
        raise KeyBackupError(f"vault:{folder}", f"could not be written: {exc.strerror or type(exc).__name__}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return final, stats


def _provider_key_backups(replica: Any) -> list[tuple[str, Any]]:
    """(sha256, listed object) of every key backup a provider lists, newest first."""
    found = []
    for listed in replica.list(f"{PROVIDER_KEY_BACKUP_DIR}/"):
        sha = parse_key_backup_key(replica.prefix, listed.key)
        if sha is not None:
            found.append((sha, listed))
    epoch = datetime.min.replace(tzinfo=timezone.utc)
    found.sort(key=lambda item: (item[1].modified or epoch, item[0]), reverse=True)
    return found


def _hidden_s3_keys(replica: Any) -> set[str]:
    # S3 keeps noncurrent versions that a plain listing does not show: a key-backup object deleted with only
    # a delete marker still holds its bytes. Other providers' listings show what they keep.
    client = getattr(replica, "client", None)
    if replica.provider != "s3" or client is None:
        return set()
    keys = set()
    prefix = f"{replica.prefix}/{PROVIDER_KEY_BACKUP_DIR}/"
    for page in client.get_paginator("list_object_versions").paginate(Bucket=replica.target.bucket, Prefix=prefix):
        for entry in page.get("Versions", []) + page.get("DeleteMarkers", []):
            if parse_key_backup_key(replica.prefix, entry["Key"]) is not None:
                keys.add(entry["Key"])
    return keys


def _record(catalogue: Catalogue, *, sha256: str, size: int, master_key_id: str, key_count: int, key_set: str,
            created_at: str | None = None) -> int:
    with _connect(catalogue) as conn:
        row = conn.execute(
            "INSERT INTO wedbackup.key_backups (sha256, size, master_key_id, key_count, key_set, created_at) "
            "VALUES (%s, %s, %s, %s, %s, coalesce(%s::timestamptz, now())) "
            "ON CONFLICT (sha256) DO UPDATE SET deleted_at = NULL RETURNING id",
            (sha256, size, master_key_id, key_count, key_set, created_at)).fetchone()
    return row["id"]


def _record_copy(catalogue: Catalogue, backup_id: int, *, provider: str, uri: str, object_key: str,
                 version_id: str | None, size: int, checksum: str | None) -> None:
    with _connect(catalogue) as conn:
        conn.execute(
            """INSERT INTO wedbackup.key_backup_copies (key_backup_id, provider, uri, object_key, version_id, size,
                   checksum) VALUES (%s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (key_backup_id, provider) DO UPDATE SET uri = EXCLUDED.uri,
                   object_key = EXCLUDED.object_key, version_id = EXCLUDED.version_id, size = EXCLUDED.size,
                   checksum = EXCLUDED.checksum, stored_at = now()""",
            (backup_id, provider, uri, object_key, version_id, size, checksum))


def newest_recorded_key_backup(catalogue: Catalogue) -> dict[str, Any] | None:
    with _connect(catalogue) as conn:
        row = conn.execute(
            "SELECT k.*, coalesce(array_agg(c.provider) FILTER (WHERE c.provider IS NOT NULL), '{}') AS providers "
            "FROM wedbackup.key_backups k LEFT JOIN wedbackup.key_backup_copies c ON c.key_backup_id = k.id "
            "WHERE k.deleted_at IS NULL GROUP BY k.id ORDER BY k.created_at DESC, k.id DESC LIMIT 1").fetchone()
    return row


def key_backup_is_current(catalogue: Catalogue, keyring: MasterKeyring) -> tuple[bool, str]:
    """(whether the newest key backup holds exactly the live keys under the current master key, the live
    key set's fingerprint): two cheap queries, for sensors."""
    catalogue.migrate()
    fingerprint, _ = key_set_fingerprint(catalogue, keyring.current.key_id)
    newest = newest_recorded_key_backup(catalogue)
    return newest is not None and newest["key_set"] == fingerprint, fingerprint


# ---------------------------------------------------------------------------------------- operations


_LOCK_NAME = "wedbackup-key-backups"


@dataclass
class _HeldLock:
    conn: Any  # the catalogue connection whose session holds the lock
    depth: int = 1


@contextmanager
def _one_at_a_time(catalogue: Catalogue) -> Iterator[None]:
    """One key-backup writer or deleter at a time across processes: otherwise a routine backup's pruning or
    an erasure's refresh could delete a key backup another run has just written. A session-level advisory
    lock on the catalogue's connection, the one the work runs on (re-entrant, so refresh can hold it around
    back_up_key_store). When that connection is reopened meanwhile, `_connect` re-takes the lock or fails."""
    held = getattr(catalogue, "_key_backup_lock", None)
    if held is not None:
        with _connect(catalogue):  # still ours (re-taken after a reconnect), or KeyBackupError
            held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
        return
    with catalogue.connect() as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (_LOCK_NAME,))
    held = catalogue._key_backup_lock = _HeldLock(conn)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        catalogue._key_backup_lock = None  # type: ignore[attr-defined]
        try:
            if not held.conn.closed and not held.conn.broken:
                held.conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (_LOCK_NAME,))
        except psycopg.OperationalError:
            pass  # the session is gone, and its lock with it


@contextmanager
def _connect(catalogue: Catalogue) -> Iterator[Any]:
    """`catalogue.connect()` for key-backup work: inside `_one_at_a_time`, it proves the lock is still held by
    the connection it hands out. A reconnect (the server released the lock with the old session) re-takes
    it at once or fails naming the lock: never key-backup work without it."""
    with catalogue.connect() as conn:
        held = getattr(catalogue, "_key_backup_lock", None)
        if held is not None and conn is not held.conn:
            if not conn.execute("SELECT pg_try_advisory_lock(hashtext(%s)) AS ok", (_LOCK_NAME,)).fetchone()["ok"]:
                raise KeyBackupError("lock", "was lost with its catalogue connection and another run "
                                     "holds it now: this run stopped before writing or deleting anything more; "
                                     "run it again")
            held.conn = conn
        yield conn


def back_up_key_store(settings: Any, catalogue: Catalogue, replicas: Mapping[str, Any],
                      keyring: MasterKeyring | None = None, *, force: bool = False,
                      keep: int | None = KEEP_KEY_BACKUPS) -> KeyBackupResult:
    """Write a new key backup of every live wedding key into the vault and upload it to every replica given
    (`{"s3": S3Replica, ...}`), recorded in the catalogue and audited. Without `force`, nothing is written
    when the newest key backup already holds exactly the live keys under the current master key and has a
    copy everywhere. `keep`: afterwards, delete all but the newest `keep` key backups (only when every
    upload succeeded; None keeps all). A provider that fails is named in `failures`; the others go on."""
    keyring = keyring or load_master_keyring(os.environ)
    catalogue.migrate()
    with _one_at_a_time(catalogue):
        return _back_up_key_store(settings, catalogue, replicas, keyring, force=force, keep=keep)


def _back_up_key_store(settings: Any, catalogue: Catalogue, replicas: Mapping[str, Any], keyring: MasterKeyring,
                       *, force: bool, keep: int | None) -> KeyBackupResult:
    master = keyring.current
    fingerprint, _ = key_set_fingerprint(catalogue, master.key_id)
    newest = newest_recorded_key_backup(catalogue)
    wanted = {"vault", *replicas}
    if (not force and newest is not None and newest["key_set"] == fingerprint
            and wanted <= set(newest["providers"])
            and (vault_key_backup_dir(settings) / f"{newest['sha256']}{SUFFIX}").is_file()):
        if set(newest["providers"]) - {"vault"}:  # keys from before this was recorded: the newest holds them all
            _mark_backed_up(catalogue, None)
        return KeyBackupResult(newest["sha256"], newest["key_count"], newest["master_key_id"],
                               skipped="unchanged: the newest key backup holds every live key and is everywhere")

    # The time is taken before the keys are read: a key made meanwhile counts as newer than this backup.
    created_at = datetime.now(timezone.utc).isoformat()
    entries = live_key_entries(catalogue, keyring)
    erasures = erasure_entries(catalogue)
    path, stats = _write_to_vault(vault_key_backup_dir(settings), lambda fh: write_key_backup(
        fh, entries, master, created_at=created_at, erasures=erasures))
    key_set = _key_set(master.key_id, ",".join(e.key_id for e in entries), ",".join(x.partition for x in erasures))
    backup_id = _record(catalogue, sha256=stats.sha256, size=stats.sealed_bytes, master_key_id=master.key_id,
                        key_count=len(entries), key_set=key_set, created_at=created_at)
    _record_copy(catalogue, backup_id, provider="vault", uri=path.as_uri(), object_key=path.name, version_id=None,
                 size=stats.sealed_bytes, checksum=stats.sha256)
    result = KeyBackupResult(stats.sha256, len(entries), master.key_id, copies={"vault": path.as_uri()})
    metadata = {"kind": FORMAT_NAME, "master-key-id": master.key_id, "key-count": str(len(entries)),
                "erasure-count": str(len(erasures))}
    for provider, replica in replicas.items():
        try:
            record = replica.upload(path, partition=KEY_BACKUP_METADATA_PARTITION, sha256=stats.sha256,
                                    size=stats.sealed_bytes, metadata=metadata,
                                    key=key_backup_key(provider, replica.prefix, stats.sha256))
        except WedbackupError as exc:
            result.failures[provider] = str(exc)
            continue
        _record_copy(catalogue, backup_id, provider=provider, uri=record.uri, object_key=record.key,
                     version_id=record.version_id, size=record.size, checksum=record.provider_checksum)
        result.copies[provider] = record.uri
    if "vault" in result.copies and len(result.copies) > 1:  # outside the catalogue: at the vault and a provider
        _mark_backed_up(catalogue, [e.key_id for e in entries])
    if keep is not None and result.ok:
        with _connect(catalogue) as conn:
            rows = conn.execute("SELECT sha256 FROM wedbackup.key_backups WHERE deleted_at IS NULL "
                                "ORDER BY created_at DESC, id DESC LIMIT %s", (max(1, keep),)).fetchall()
        kept = {r["sha256"] for r in rows} | {stats.sha256}
        result.deleted, leftovers = delete_key_backups(settings, catalogue, replicas, keep=kept)
        result.failures.update({p: f"could not delete an older key backup: {m}" for p, m in leftovers.items()})
    catalogue.audit("key-backup", None, result.to_dict() | {"copies": sorted(result.copies)})
    return result


def _mark_backed_up(catalogue: Catalogue, key_ids: list[str] | None) -> None:
    """Record that these live keys (None: every live key) are in a key backup at the vault and a provider."""
    with _connect(catalogue) as conn:
        conn.execute("UPDATE wedbackup.wedding_keys SET key_backup_at = now() WHERE key_backup_at IS NULL "
                     "AND wrapped IS NOT NULL AND (%(ids)s::text[] IS NULL OR key_id = ANY(%(ids)s))", {"ids": key_ids})


def keys_awaiting_backup(catalogue: Catalogue) -> int:
    """How many live wedding keys are in no key backup at the vault and a provider (they live only in the
    catalogue): one indexed count, so every backup run can ask."""
    with _connect(catalogue) as conn:
        return conn.execute("SELECT count(*) AS n FROM wedbackup.wedding_keys "
                            "WHERE key_backup_at IS NULL AND wrapped IS NOT NULL").fetchone()["n"]


def keys_outside_catalogue(catalogue: Catalogue, key_ids: list[str]) -> set[str]:
    """Those of `key_ids` that a key backup at the vault and at least one provider holds."""
    with _connect(catalogue) as conn:
        rows = conn.execute("SELECT key_id FROM wedbackup.wedding_keys WHERE key_id = ANY(%s) "
                            "AND key_backup_at IS NOT NULL", (list(key_ids),)).fetchall()
    return {r["key_id"] for r in rows}


def delete_key_backups(settings: Any, catalogue: Catalogue, replicas: Mapping[str, Any], *,
                       keep: set[str]) -> tuple[dict[str, int], dict[str, str]]:
    """Delete every key backup whose SHA-256 is not in `keep`: every version at every replica (whatever its
    listing or the catalogue knows of), and the vault file. Returns (deleted per provider, failures)."""
    deleted: dict[str, int] = {}
    failures: dict[str, str] = {}
    with _connect(catalogue) as conn:
        known = conn.execute(
            "SELECT k.sha256, c.provider, c.object_key FROM wedbackup.key_backups k "
            "JOIN wedbackup.key_backup_copies c ON c.key_backup_id = k.id").fetchall()
    for provider, replica in replicas.items():
        try:
            doomed = {o.key for sha, o in _provider_key_backups(replica) if sha not in keep}
            doomed |= {k for k in _hidden_s3_keys(replica) if parse_key_backup_key(replica.prefix, k) not in keep}
            doomed |= {r["object_key"] for r in known if r["provider"] == provider and r["sha256"] not in keep}
            for key in sorted(doomed):
                replica.delete(key)
                deleted[provider] = deleted.get(provider, 0) + 1
                _forget_copy(catalogue, provider, parse_key_backup_key(replica.prefix, key))
        except WedbackupError as exc:
            failures[provider] = str(exc)
        except Exception as exc:  # noqa: BLE001 - an SDK error outside the replica's own wrapping
            failures[provider] = f"{type(exc).__name__}"
    folder = vault_key_backup_dir(settings)
    try:
        for path in sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []:
            if path.stem not in keep:
                path.unlink(missing_ok=True)
                deleted["vault"] = deleted.get("vault", 0) + 1
                _forget_copy(catalogue, "vault", path.stem)
        if folder.is_dir():
            fsync_dir(folder)
    except OSError as exc:
        failures["vault"] = f"{folder}: {exc.strerror or type(exc).__name__}"
    with _connect(catalogue) as conn:
        conn.execute("UPDATE wedbackup.key_backups k SET deleted_at = now() WHERE deleted_at IS NULL "
                     "AND NOT (sha256 = ANY(%s)) AND NOT EXISTS (SELECT FROM wedbackup.key_backup_copies c "
                     "WHERE c.key_backup_id = k.id)", (sorted(keep),))
    return deleted, failures


def _forget_copy(catalogue: Catalogue, provider: str, sha256: str | None) -> None:
    with _connect(catalogue) as conn:
        conn.execute("DELETE FROM wedbackup.key_backup_copies c USING wedbackup.key_backups k "
                     "WHERE c.key_backup_id = k.id AND k.sha256 = %s AND c.provider = %s", (sha256, provider))


def refresh_key_backups(settings: Any, catalogue: Catalogue, replicas: Mapping[str, Any],
                        keyring: MasterKeyring | None = None) -> KeyBackupResult:
    """After a wedding key was shredded: write a new key backup (without shredded keys), then delete every
    older key backup, all versions, at every replica and in the vault. Raises KeyBackupError naming the
    provider when the new backup could not be written everywhere or an older one could not be deleted
    (everything possible is still done first), so an erasure never reports success with a key left behind."""
    keyring = keyring or load_master_keyring(os.environ)
    catalogue.migrate()
    with _one_at_a_time(catalogue):
        result = back_up_key_store(settings, catalogue, replicas, keyring, force=True, keep=None)
        deleted, leftovers = delete_key_backups(settings, catalogue, replicas, keep={result.sha256})
    result.deleted = deleted
    result.failures.update({p: f"could not delete an older key backup: {m}" for p, m in leftovers.items()})
    catalogue.audit("key-backups-refreshed", None, result.to_dict() | {"copies": sorted(result.copies)})
    if result.failures:
        raise KeyBackupError(f"key backups ({', '.join(sorted(result.failures))})",
                             "; ".join(f"{p}: {m}" for p, m in sorted(result.failures.items())))
    return result


def newest_key_backup(replica: Any, keyring: MasterKeyring, *, tmp_dir: str | None = None
                      ) -> tuple[str, KeyBackupContents] | None:
    """(sha256, contents) of the newest key backup at a provider by the creation time sealed inside it, or
    None when it holds none. Every one listed is downloaded and authenticated (pruning keeps them few): a
    listing's modification time is not authenticated and has one-second resolution at S3, so two backups
    of the same second would be ordered by chance. One that does not open stops it, named."""
    best: tuple[datetime, str, KeyBackupContents] | None = None
    for sha, _ in _provider_key_backups(replica):
        contents = fetch_key_backup(replica, sha, keyring, tmp_dir=tmp_dir, check_keys=False)
        try:
            created = datetime.fromisoformat(contents.created_at)
        except (TypeError, ValueError):
            raise KeyBackupError(contents.name, "its creation time does not parse") from None
        if best is None or created > best[0]:
            best = (created, sha, contents)
    return (best[1], best[2]) if best else None


def fetch_key_backup(replica: Any, sha256: str, keyring: MasterKeyring, *, tmp_dir: str | None = None,
                     check_keys: bool = True) -> KeyBackupContents:
    """Download one key backup (SHA-256 checked as it streams), open and verify it."""
    key = key_backup_key(replica.provider, replica.prefix, sha256)
    name = f"{replica.provider}:{key}"
    with tempfile.TemporaryFile(dir=tmp_dir) as tmp:
        try:
            replica.download(key, tmp, expected_sha256=sha256)
        except WedbackupError as exc:
            raise KeyBackupError(name, f"could not be downloaded: {exc}") from None
        tmp.seek(0)
        return read_key_backup(tmp, name=name, keyring=keyring, check_keys=check_keys)


def restore_key_store(replica: Any, catalogue: Catalogue, keyring: MasterKeyring, *, sha256: str | None = None,
                      tmp_dir: str | None = None) -> KeyRestoreReport:
    """Bring wedding keys back into the catalogue from the newest key backup at `replica` (or the one named
    by `sha256`): verified, every key proven to open, then inserted where the catalogue lacks them. A key
    the catalogue has (live, or shredded by an erasure) is left alone; a wedding that meanwhile got another
    live key is named in `conflicts`. Raises KeyBackupError when the provider holds no key backup."""
    catalogue.migrate()
    report = KeyRestoreReport(provider=replica.provider)
    if sha256 is None:
        newest = newest_key_backup(replica, keyring, tmp_dir=tmp_dir)
        if newest is None:
            raise KeyBackupError(f"{replica.provider}:{replica.prefix}/{PROVIDER_KEY_BACKUP_DIR}/",
                                 "holds no key backup")
        sha256 = newest[0]
    contents = fetch_key_backup(replica, sha256, keyring, tmp_dir=tmp_dir)
    report.key_backup = contents.name
    report.in_backup = len(contents.entries)
    report.erasures_restored = restore_erasures(catalogue, contents)
    erased = catalogue.erased_partitions()
    with _connect(catalogue) as conn:
        for e in contents.entries:
            if e.partition in erased:  # an erasure wins over any key backup that still holds the key
                report.erased_skipped += 1
                continue
            inserted = conn.execute(
                "INSERT INTO wedbackup.wedding_keys (key_id, partition, wrapped, master_key_id, created_at) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING key_id",
                (e.key_id, e.partition, e.wrapped, e.master_key_id, e.created_at)).fetchone()
            if inserted:
                report.restored += 1
                continue
            if conn.execute("SELECT 1 FROM wedbackup.wedding_keys WHERE key_id = %s", (e.key_id,)).fetchone():
                report.known += 1
            else:
                report.conflicts.append(f"wedding {e.partition}: key {e.key_id} not restored, the catalogue has "
                                        "another live key for it")
    key_set = _key_set(contents.master_key_id, ",".join(sorted(e.key_id for e in contents.entries)),
                       ",".join(sorted(x.partition for x in contents.erasures)))
    head = replica.head(key_backup_key(replica.provider, replica.prefix, sha256))
    backup_id = _record(catalogue, sha256=sha256, size=head.size if head else 0,
                        master_key_id=contents.master_key_id, key_count=len(contents.entries), key_set=key_set,
                        created_at=contents.created_at)
    if head is not None:
        _record_copy(catalogue, backup_id, provider=replica.provider, uri=head.uri, object_key=head.key,
                     version_id=head.version_id, size=head.size, checksum=head.provider_checksum)
    catalogue.audit("key-restore", None, report.to_dict() | {"conflicts": len(report.conflicts)})
    return report


def restore_erasures(catalogue: Catalogue, contents: KeyBackupContents) -> int:
    """Bring back the erasure records a key backup holds that the catalogue lacks (with their original time and
    requester), each wedding marked removed, and shred any live key the catalogue has for one of them: an
    erased wedding is not discovered, keyed or backed up again. Returns how many records came back."""
    known = catalogue.erased_partitions()
    restored = 0
    for x in contents.erasures:
        if x.partition not in known:
            catalogue.begin_erasure(x.partition, x.wedding_id, x.requested_by, erased_at=x.erased_at,
                                    detail={"restored_from": contents.name})
            restored += 1
        catalogue.shred_wedding_key(x.partition)
    if restored:
        catalogue.audit("erasures-restored", None, {"erasures": restored, "key_backup": contents.name})
    return restored


def read_vault_key_backup(path: Path, keyring: MasterKeyring) -> KeyBackupContents:
    """A key backup file in the vault, opened and verified (for checks and tests)."""
    with open(path, "rb") as fh:
        return read_key_backup(fh, name=f"vault:{path}", keyring=keyring)


def read_key_backup_bytes(data: bytes, *, name: str, keyring: MasterKeyring) -> KeyBackupContents:
    return read_key_backup(io.BytesIO(data), name=name, keyring=keyring)
