"""The catalogue: an index of backups, their copies, and the wedding keys, in PostgreSQL (schema
`wedbackup`). Storage stays the source of truth; the catalogue makes questions like "newest verified
backup of wedding 42" one indexed query instead of a scan of Dagster's event log."""
from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from .errors import KeyError_, UnknownWeddingError
from .keys import MasterKeyring, SecretKey, new_data_key, unwrap_key, wrap_key

SCHEMA_VERSION = 1

MIGRATIONS = [
    """
    CREATE SCHEMA IF NOT EXISTS wedbackup;
    CREATE TABLE IF NOT EXISTS wedbackup.schema_version (version int NOT NULL);
    CREATE TABLE IF NOT EXISTS wedbackup.wedding_keys (
        key_id        text PRIMARY KEY,
        partition     text NOT NULL,
        wrapped       bytea,               -- NULL once shredded (GDPR erasure)
        master_key_id text NOT NULL,
        created_at    timestamptz NOT NULL DEFAULT now(),
        shredded_at   timestamptz
    );
    CREATE UNIQUE INDEX IF NOT EXISTS wedding_keys_one_live
        ON wedbackup.wedding_keys (partition) WHERE shredded_at IS NULL;
    CREATE TABLE IF NOT EXISTS wedbackup.backups (
        id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        partition       text NOT NULL,
        archive_sha256  text NOT NULL UNIQUE,
        size            bigint NOT NULL,
        key_id          text NOT NULL,
        snapshot_time   timestamptz NOT NULL,
        txid            text,
        schema_fingerprint text,
        rows            bigint NOT NULL,
        raw_bytes       bigint NOT NULL,
        manifest        jsonb NOT NULL,
        created_at      timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX IF NOT EXISTS backups_partition_time ON wedbackup.backups (partition, snapshot_time DESC);
    CREATE TABLE IF NOT EXISTS wedbackup.copies (
        backup_id   bigint NOT NULL REFERENCES wedbackup.backups (id) ON DELETE CASCADE,
        provider    text NOT NULL,          -- vault | s3 | gcs | azure
        uri         text NOT NULL,
        object_key  text NOT NULL,
        version_id  text,
        size        bigint NOT NULL,
        checksum    text,
        storage_class text,
        region      text,
        media       text NOT NULL,
        offsite     boolean NOT NULL,
        stored_at   timestamptz NOT NULL DEFAULT now(),
        verified_at timestamptz,
        PRIMARY KEY (backup_id, provider)
    );
    CREATE TABLE IF NOT EXISTS wedbackup.restores (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        backup_id   bigint NOT NULL REFERENCES wedbackup.backups (id) ON DELETE CASCADE,
        provider    text NOT NULL,
        ok          boolean NOT NULL,
        seconds     double precision NOT NULL,
        detail      jsonb NOT NULL,
        at          timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE IF NOT EXISTS wedbackup.audit (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at          timestamptz NOT NULL DEFAULT now(),
        action      text NOT NULL,
        partition   text,
        detail      jsonb NOT NULL DEFAULT '{}'
    );
    """,
    # 2: what automation needs: the known partitions (with their wedding date, for tiers), a cheap
    # fingerprint of the source rows behind each backup, and provider health.
    """
    CREATE TABLE IF NOT EXISTS wedbackup.partitions (
        partition          text PRIMARY KEY,
        wedding_date       date,              -- NULL for the platform partition
        source_updated_at  timestamptz,       -- newest updated_at seen in the source for this wedding
        discovered_at      timestamptz NOT NULL DEFAULT now(),
        removed_at         timestamptz        -- set when the wedding left the source (erased or deleted)
    );
    CREATE INDEX IF NOT EXISTS partitions_date ON wedbackup.partitions (wedding_date) WHERE removed_at IS NULL;
    ALTER TABLE wedbackup.backups ADD COLUMN IF NOT EXISTS source_fingerprint text;
    CREATE TABLE IF NOT EXISTS wedbackup.provider_health (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        provider    text NOT NULL,
        at          timestamptz NOT NULL DEFAULT now(),
        ok          boolean NOT NULL,
        seconds     double precision,
        error       text                   -- a redacted, person-readable reason; never a secret
    );
    CREATE INDEX IF NOT EXISTS provider_health_recent ON wedbackup.provider_health (provider, at DESC);
    CREATE TABLE IF NOT EXISTS wedbackup.provider_state (
        provider              text PRIMARY KEY,
        ok                    boolean NOT NULL,
        consecutive_failures  int NOT NULL DEFAULT 0,
        since                 timestamptz NOT NULL DEFAULT now(),   -- when the current state began
        last_checked          timestamptz NOT NULL DEFAULT now()
    );
    """,
]


@dataclass(frozen=True)
class BackupRecord:
    id: int
    partition: str
    archive_sha256: str
    size: int
    key_id: str
    snapshot_time: datetime
    rows: int
    raw_bytes: int
    manifest: dict[str, Any]


@dataclass(frozen=True)
class CopyRecord:
    provider: str
    uri: str
    object_key: str
    version_id: str | None
    size: int
    checksum: str | None
    storage_class: str | None
    region: str | None
    media: str
    offsite: bool
    verified_at: datetime | None


class Catalogue:
    def __init__(self, dsn: str):
        self.dsn = dsn
        self._conn: psycopg.Connection | None = None

    @contextmanager
    def connect(self) -> Iterator[psycopg.Connection]:
        """One transaction on the catalogue's long-lived connection (a new connection per call cost more
        than backing up a small wedding); reopened when the server dropped it."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            conn = self._conn = psycopg.connect(self.dsn, row_factory=dict_row, autocommit=True)
        with conn.transaction():
            yield conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def migrate(self) -> None:
        with self.connect() as conn:
            # One migrator at a time, even when several runs start together.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('wedbackup-catalogue-migrate'))")
            conn.execute("CREATE SCHEMA IF NOT EXISTS wedbackup")
            conn.execute("CREATE TABLE IF NOT EXISTS wedbackup.schema_version (version int NOT NULL)")
            row = conn.execute("SELECT max(version) AS v FROM wedbackup.schema_version").fetchone()
            current = row["v"] or 0
            for version, ddl in enumerate(MIGRATIONS, start=1):
                if version > current:
                    conn.execute(ddl)
                    conn.execute("INSERT INTO wedbackup.schema_version VALUES (%s)", (version,))

    # ---- wedding keys ------------------------------------------------------------------------------
    def wedding_key(self, partition: str, keyring: MasterKeyring, *, create: bool = True) -> SecretKey:
        """The live key of a wedding (made and stored wrapped on first use)."""
        for _ in range(2):
            with self.connect() as conn:
                row = conn.execute(
                    "SELECT key_id, wrapped, master_key_id FROM wedbackup.wedding_keys "
                    "WHERE partition = %s AND shredded_at IS NULL", (partition,)).fetchone()
                if row is not None:
                    return self._unwrap(row["key_id"], partition, row["wrapped"], row["master_key_id"], keyring)
                if not create:
                    raise KeyError_(f"wedding {partition} has no live key")
                key_id = f"{partition}.{uuid.uuid4().hex[:12]}"
                material = new_data_key()
                master = keyring.current
                wrapped = wrap_key(master, material, _context(partition, key_id))
                # Two runs racing to create the key: the unique index lets one win; the other reads it.
                inserted = conn.execute(
                    "INSERT INTO wedbackup.wedding_keys (key_id, partition, wrapped, master_key_id) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING key_id",
                    (key_id, partition, wrapped, master.key_id)).fetchone()
                if inserted:
                    return SecretKey(key_id, material)
        raise KeyError_(f"wedding {partition}: could not create or read its key")

    def key_by_id(self, key_id: str, keyring: MasterKeyring) -> SecretKey:
        with self.connect() as conn:
            row = conn.execute(
                "SELECT partition, wrapped, master_key_id, shredded_at FROM wedbackup.wedding_keys "
                "WHERE key_id = %s", (key_id,)).fetchone()
        if row is None:
            raise KeyError_(f"wedding key {key_id} is not in the catalogue")
        if row["wrapped"] is None:
            raise KeyError_(f"wedding key {key_id} was destroyed (erasure) at {row['shredded_at']:%Y-%m-%d}")
        return self._unwrap(key_id, row["partition"], row["wrapped"], row["master_key_id"], keyring)

    @staticmethod
    def _unwrap(key_id: str, partition: str, wrapped: bytes, master_key_id: str,
                keyring: MasterKeyring) -> SecretKey:
        master = keyring.get(master_key_id)
        return SecretKey(key_id, unwrap_key(master, bytes(wrapped), _context(partition, key_id)))

    # ---- backups and copies ------------------------------------------------------------------------
    def record_backup(self, *, partition: str, archive_sha256: str, size: int, key_id: str,
                      manifest: dict[str, Any], vault_copy: dict[str, Any] | None = None) -> BackupRecord:
        """Record a new backup (and, in the same transaction, its vault copy) and audit it."""
        with self.connect() as conn:
            row = conn.execute(
                """INSERT INTO wedbackup.backups (partition, archive_sha256, size, key_id, snapshot_time, txid,
                       schema_fingerprint, rows, raw_bytes, manifest)
                   VALUES (%(partition)s, %(sha)s, %(size)s, %(key_id)s, %(snapshot_time)s, %(txid)s,
                       %(fingerprint)s, %(rows)s, %(raw)s, %(manifest)s)
                   ON CONFLICT (archive_sha256) DO UPDATE SET size = EXCLUDED.size
                   RETURNING *""",
                {"partition": partition, "sha": archive_sha256, "size": size, "key_id": key_id,
                 "snapshot_time": manifest["snapshot_time"], "txid": str(manifest.get("txid", "")),
                 "fingerprint": manifest.get("schema_fingerprint"),
                 "rows": sum(t["rows"] for t in manifest["tables"]),
                 "raw": sum(t["bytes"] for t in manifest["tables"]),
                 "manifest": json.dumps(manifest)}).fetchone()
            conn.execute("INSERT INTO wedbackup.audit (action, partition, detail) VALUES ('backup', %s, %s)",
                         (partition, json.dumps({"archive_sha256": archive_sha256, "size": size})))
            if vault_copy is not None:
                self.record_copy(row["id"], **vault_copy)
        return _backup(row)

    def latest_backup(self, partition: str) -> BackupRecord | None:
        with self.connect() as conn:
            row = conn.execute(
                "SELECT * FROM wedbackup.backups WHERE partition = %s ORDER BY snapshot_time DESC, id DESC LIMIT 1",
                (partition,)).fetchone()
        return _backup(row) if row else None

    def backup_by_sha(self, sha256: str) -> BackupRecord | None:
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM wedbackup.backups WHERE archive_sha256 = %s", (sha256,)).fetchone()
        return _backup(row) if row else None

    def require_latest_backup(self, partition: str) -> BackupRecord:
        backup = self.latest_backup(partition)
        if backup is None:
            raise UnknownWeddingError(partition, "has no backup in the catalogue yet")
        return backup

    def record_copy(self, backup_id: int, *, provider: str, uri: str, object_key: str, version_id: str | None,
                    size: int, checksum: str | None, storage_class: str | None, region: str | None, media: str,
                    offsite: bool) -> None:
        with self.connect() as conn:
            conn.execute(
                """INSERT INTO wedbackup.copies (backup_id, provider, uri, object_key, version_id, size, checksum,
                       storage_class, region, media, offsite)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (backup_id, provider) DO UPDATE SET uri = EXCLUDED.uri,
                       object_key = EXCLUDED.object_key, version_id = EXCLUDED.version_id, size = EXCLUDED.size,
                       checksum = EXCLUDED.checksum, storage_class = EXCLUDED.storage_class,
                       region = EXCLUDED.region, stored_at = now()""",
                (backup_id, provider, uri, object_key, version_id, size, checksum, storage_class, region, media,
                 offsite))

    def copies(self, backup_id: int) -> list[CopyRecord]:
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT provider, uri, object_key, version_id, size, checksum, storage_class, region, media, "
                "offsite, verified_at FROM wedbackup.copies WHERE backup_id = %s ORDER BY provider",
                (backup_id,)).fetchall()
        return [CopyRecord(**r) for r in rows]

    def record_restore(self, backup_id: int, *, provider: str, ok: bool, seconds: float,
                       detail: dict[str, Any]) -> None:
        with self.connect() as conn:
            conn.execute("INSERT INTO wedbackup.restores (backup_id, provider, ok, seconds, detail) "
                         "VALUES (%s, %s, %s, %s, %s)", (backup_id, provider, ok, seconds, json.dumps(detail)))
            if ok:
                conn.execute("UPDATE wedbackup.copies SET verified_at = now() WHERE backup_id = %s AND provider = %s",
                             (backup_id, provider))
            conn.execute("INSERT INTO wedbackup.audit (action, partition, detail) "
                         "SELECT 'verify', partition, %s FROM wedbackup.backups WHERE id = %s",
                         (json.dumps({"provider": provider, "ok": ok, "seconds": round(seconds, 3)}), backup_id))

    def restore_count(self, backup_id: int) -> int:
        with self.connect() as conn:
            return conn.execute("SELECT count(*) AS n FROM wedbackup.restores WHERE backup_id = %s",
                                (backup_id,)).fetchone()["n"]

    def audit(self, action: str, partition: str | None, detail: dict[str, Any]) -> None:
        with self.connect() as conn:
            conn.execute("INSERT INTO wedbackup.audit (action, partition, detail) VALUES (%s, %s, %s)",
                         (action, partition, json.dumps(detail)))


def _context(partition: str, key_id: str) -> bytes:
    # Binds a wrapped wedding key to its wedding and id: a wrapped key copied onto another row won't open.
    return f"wedbackup-wedding-key:{partition}:{key_id}".encode()


def _backup(row: dict[str, Any]) -> BackupRecord:
    return BackupRecord(id=row["id"], partition=row["partition"], archive_sha256=row["archive_sha256"],
                        size=row["size"], key_id=row["key_id"], snapshot_time=row["snapshot_time"],
                        rows=row["rows"], raw_bytes=row["raw_bytes"], manifest=row["manifest"])
