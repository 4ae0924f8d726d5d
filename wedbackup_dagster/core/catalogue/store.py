"""The catalogue: an index of backups, their copies, and the wedding keys, in PostgreSQL (schema
`wedbackup`). Storage stays the source of truth; the catalogue makes questions like "newest verified
backup of wedding 42" one indexed query instead of a scan of Dagster's event log."""
from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from wedbackup_dagster.core.errors import CryptoKeyError, UnknownWeddingError, WedbackupError
from wedbackup_dagster.core.keys.keyring import MasterKeyring, SecretKey, new_data_key, unwrap_key, wrap_key
from wedbackup_dagster.core.catalogue.locks import PartitionLocks
from wedbackup_dagster.core.changefeed.schema import CHANGEFEED_PLATFORM, CHANGEFEED_TABLES
from wedbackup_dagster.core.media.schema import MEDIA_TABLES

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
    # 3: what the backup schedule remembers per partition: when a tick last found its data unchanged since
    # its newest backup (still covered, no new archive), and when automation last asked for a backup run
    # (so the next ticks do not ask again while that run waits in the queue).
    """
    ALTER TABLE wedbackup.partitions ADD COLUMN IF NOT EXISTS covered_at timestamptz;
    ALTER TABLE wedbackup.partitions ADD COLUMN IF NOT EXISTS requested_at timestamptz;
    """,
    """
    -- migration: retention, erasure and immutability (issue 6 parts 2, 4, 5; core/governance/erasure.py, core/governance/retention.py)
    -- One row per erased wedding: started when its key is shredded, completed once no copy is left that
    -- retention allows deleting. Copies under Object Lock stay (unreadable) and are counted in copies_locked.
    CREATE TABLE IF NOT EXISTS wedbackup.erasures (
        partition       text PRIMARY KEY,
        wedding_id      text NOT NULL,
        erased_at       timestamptz NOT NULL DEFAULT now(),
        requested_by    text NOT NULL,
        copies_deleted  int NOT NULL DEFAULT 0,
        copies_locked   int NOT NULL DEFAULT 0,
        completed_at    timestamptz,
        detail          jsonb NOT NULL DEFAULT '{}'
    );
    -- Object Lock: until when the provider refuses to delete this copy (NULL: not locked).
    ALTER TABLE wedbackup.copies ADD COLUMN IF NOT EXISTS locked_until timestamptz;
    ALTER TABLE wedbackup.copies ADD COLUMN IF NOT EXISTS lock_mode text;
    -- Set before a backup's copies are deleted (prune, erasure): a crash part-way leaves it marked, so
    -- readers and the next sweep know its remaining copy rows may point at objects already gone.
    ALTER TABLE wedbackup.backups ADD COLUMN IF NOT EXISTS deleting_since timestamptz;
    """,
    """
    -- migration: keys (encrypted key-store backups, core/keys/backup.py; rotation needs no schema change)
    CREATE TABLE IF NOT EXISTS wedbackup.key_backups (
        id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        sha256        text NOT NULL UNIQUE,   -- of the sealed file: its name everywhere
        size          bigint NOT NULL,
        master_key_id text NOT NULL,          -- the master key it is sealed with (and its keys wrapped by)
        key_count     int NOT NULL,
        key_set       text NOT NULL,          -- fingerprint of the live key ids it holds (unchanged: no new one)
        created_at    timestamptz NOT NULL DEFAULT now(),
        deleted_at    timestamptz             -- set once every copy of it was deleted
    );
    CREATE TABLE IF NOT EXISTS wedbackup.key_backup_copies (
        key_backup_id bigint NOT NULL REFERENCES wedbackup.key_backups (id) ON DELETE CASCADE,
        provider      text NOT NULL,          -- vault | s3 | gcs | azure
        uri           text NOT NULL,
        object_key    text NOT NULL,
        version_id    text,
        size          bigint NOT NULL,
        checksum      text,
        stored_at     timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (key_backup_id, provider)
    );
    """,
    """
    -- migration: shrinkage flags (issue 14; core/policy/rules.py shrinkage, core/governance/retention.py). A backup whose rows
    -- dropped sharply against its wedding's previous verified backup; until a person acknowledges it,
    -- retention keeps the baseline and the backup taken just before. No foreign keys: a flag outlives
    -- the backups it names (its audit value does not end when retention deletes them after the ack).
    CREATE TABLE IF NOT EXISTS wedbackup.shrinkage_flags (
        backup_id        bigint PRIMARY KEY,   -- the backup whose rows dropped
        partition        text NOT NULL,
        snapshot_time    timestamptz NOT NULL, -- its snapshot: a later comparison spanning it is the same drop
        baseline_id      bigint NOT NULL,      -- the verified backup it was compared with
        previous_id      bigint,               -- the newest backup taken before it (verified or not)
        level            text NOT NULL,        -- warn | error
        summary          text NOT NULL,        -- tables and counts, in words
        detail           jsonb NOT NULL,
        flagged_at       timestamptz NOT NULL DEFAULT now(),
        acknowledged_at  timestamptz,
        acknowledged_by  text,
        note             text
    );
    CREATE INDEX IF NOT EXISTS shrinkage_flags_open ON wedbackup.shrinkage_flags (partition)
        WHERE acknowledged_at IS NULL;
    """,
    """
    -- migration: keys outside the catalogue (issue 14 defect 9; core/keys/backup.py): when a wedding key first
    -- reached a key-store backup with a copy in the vault and at least one provider. NULL: it lives only here,
    -- so the backups it opens do not count for 3-2-1 yet.
    ALTER TABLE wedbackup.wedding_keys ADD COLUMN IF NOT EXISTS key_backup_at timestamptz;
    CREATE INDEX IF NOT EXISTS wedding_keys_awaiting_backup ON wedbackup.wedding_keys (key_id)
        WHERE key_backup_at IS NULL AND wrapped IS NOT NULL;
    """,
    MEDIA_TABLES,
    CHANGEFEED_TABLES,
    CHANGEFEED_PLATFORM,
]


# A backups row's columns with an empty manifest: for readers of many rows that need no manifest (parsing
# thousands of them cost more than the query).
_NO_MANIFEST = "id, partition, archive_sha256, size, key_id, snapshot_time, rows, raw_bytes, '{}'::jsonb AS manifest"


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
        self._locks: PartitionLocks | None = None

    @property
    def partition_locks(self) -> PartitionLocks:
        """This catalogue's per-partition locks (core/catalogue/locks.py), on a connection of their own."""
        if self._locks is None:
            self._locks = PartitionLocks(self.dsn)
        return self._locks

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
        if self._locks is not None:
            self._locks.close()

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
        """The live key of a wedding (made and stored wrapped on first use). An erased wedding's key is
        never read or made, even while its erasure is still shredding (README, GDPR erasure)."""
        for _ in range(2):
            with self.connect() as conn:
                row = conn.execute(
                    "SELECT key_id, wrapped, master_key_id FROM wedbackup.wedding_keys "
                    "WHERE partition = %s AND shredded_at IS NULL", (partition,)).fetchone()
                _refuse_erased(conn, partition)
                if row is not None:
                    return self._unwrap(row["key_id"], partition, row["wrapped"], row["master_key_id"], keyring)
                if not create:
                    raise CryptoKeyError(f"wedding {partition} has no live key")
                # Key creation and erasure of one partition are serialised: an erasure that began after the
                # check above waits for this key (and shreds it); one that committed first is seen below.
                lock_partition_keys(conn, partition)
                _refuse_erased(conn, partition)
                self._refuse_second_spelling(conn, partition)
                key_id = f"{partition}.{uuid.uuid4().hex[:12]}"
                material = new_data_key()
                master = keyring.current
                wrapped = wrap_key(master, material, wedding_key_context(partition, key_id))
                # Two runs racing to create the key: the unique index lets one win; the other reads it.
                inserted = conn.execute(
                    "INSERT INTO wedbackup.wedding_keys (key_id, partition, wrapped, master_key_id) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING key_id",
                    (key_id, partition, wrapped, master.key_id)).fetchone()
                if inserted:
                    return SecretKey(key_id, material)
        raise CryptoKeyError(f"wedding {partition}: could not create or read its key")

    def wedding_keys(self, partitions: list[str], keyring: MasterKeyring) -> dict[str, SecretKey | CryptoKeyError]:
        """`wedding_key` for a batch of weddings (a snapshot batch's first backups), in one catalogue
        transaction instead of one per wedding, with the same guarantees: each wedding's key lock is taken
        (sorted, so two batches never deadlock) before the erasure and second-spelling checks and the
        insert, so an erasure that began first is refused by name and one that begins later waits for the
        key and shreds it; a key another run made meanwhile is read, not duplicated (the unique index
        keeps one live key per wedding); every new key is wrapped by the current master key and awaits
        the key-store backup like any other. Returns each wedding's key, or the CryptoKeyError that
        `wedding_key` would raise for that wedding alone; the others still get theirs."""
        from wedbackup_dagster.core.partitions import other_spellings

        wanted = list(dict.fromkeys(partitions))
        out: dict[str, SecretKey | CryptoKeyError] = dict(self.live_wedding_keys(wanted, keyring))
        missing = [p for p in wanted if p not in out]
        if not missing:
            return out
        with self.connect() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s), h) FROM (SELECT DISTINCT hashtext(p) AS h "
                         "FROM unnest(%s::text[]) AS p ORDER BY h) AS l", (KEY_LOCK_NAMESPACE, missing))
            for r in conn.execute("SELECT partition, erased_at, requested_by FROM wedbackup.erasures "
                                  "WHERE partition = ANY(%s)", (missing,)).fetchall():
                out[r["partition"]] = CryptoKeyError(_erased_message(r["partition"], r))
            missing = [p for p in missing if p not in out]
            self._read_live_keys(conn, missing, keyring, out)
            missing = [p for p in missing if p not in out]
            spelt = [(p, pattern) for p in missing if (pattern := other_spellings(p)) is not None]
            if spelt:
                # `_refuse_second_spelling` for the batch: the keys are joined on one canonical spelling (leading
                # zeros dropped, uuids in lower case) computed once per key, not matched against each wedding's
                # pattern in turn; the pattern itself still decides.
                for r in conn.execute(
                        f"SELECT DISTINCT ON (x.p) x.p, k.partition FROM unnest(%s::text[], %s::text[], %s::text[]) "
                        f"AS x(p, pattern, canonical) JOIN wedbackup.wedding_keys k ON {_CANONICAL_SPELLING} = x.canonical "
                        "AND k.partition <> x.p AND k.partition ~ x.pattern WHERE EXISTS (SELECT FROM wedbackup.backups b "
                        "WHERE b.partition = k.partition) ORDER BY x.p, k.partition",
                        ([p for p, _ in spelt], [pattern for _, pattern in spelt],
                         [canonical_spelling(p) for p, _ in spelt])).fetchall():
                    out[r["p"]] = CryptoKeyError(_second_spelling_message(r["p"], r["partition"]))
            missing = [p for p in missing if p not in out]
            master = keyring.current
            made: dict[str, tuple[str, bytes, bytes]] = {}
            for partition in missing:
                key_id = f"{partition}.{uuid.uuid4().hex[:12]}"
                material = new_data_key()
                made[partition] = (key_id, material,
                                   wrap_key(master, material, wedding_key_context(partition, key_id)))
            if made:
                # A row that appeared without the key lock (none of ours takes that path) loses to the unique
                # index; its key is read back below.
                inserted = conn.execute(
                    "INSERT INTO wedbackup.wedding_keys (key_id, partition, wrapped, master_key_id) "
                    "SELECT key_id, partition, wrapped, %s FROM unnest(%s::text[], %s::text[], %s::bytea[]) "
                    "AS n(key_id, partition, wrapped) ON CONFLICT DO NOTHING RETURNING partition",
                    (master.key_id, [m[0] for m in made.values()], list(made),
                     [m[2] for m in made.values()])).fetchall()
                for r in inserted:
                    key_id, material, _ = made[r["partition"]]
                    out[r["partition"]] = SecretKey(key_id, material)
                self._read_live_keys(conn, [p for p in made if p not in out], keyring, out)
        for partition in wanted:
            out.setdefault(partition, CryptoKeyError(f"wedding {partition}: could not create or read its key"))
        return {p: out[p] for p in wanted}

    def _read_live_keys(self, conn: psycopg.Connection, partitions: list[str], keyring: MasterKeyring,
                        out: dict[str, SecretKey | CryptoKeyError]) -> None:
        """The live keys among `partitions` into `out` (a key that does not unwrap: its error, by name)."""
        if not partitions:
            return
        for r in conn.execute("SELECT key_id, partition, wrapped, master_key_id FROM wedbackup.wedding_keys "
                              "WHERE partition = ANY(%s) AND shredded_at IS NULL", (partitions,)).fetchall():
            try:
                out[r["partition"]] = self._unwrap(r["key_id"], r["partition"], r["wrapped"], r["master_key_id"],
                                                   keyring)
            except CryptoKeyError as exc:
                out[r["partition"]] = exc

    def live_wedding_keys(self, partitions: list[str], keyring: MasterKeyring) -> dict[str, SecretKey]:
        """`wedding_key` of the weddings among `partitions` that have a live key already, in one query (a
        snapshot batch). Left out, for `wedding_key` to make or refuse one by one: a wedding without a key
        yet, an erased one (even while its key awaits shredding), a key that does not unwrap."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT key_id, partition, wrapped, master_key_id FROM wedbackup.wedding_keys k "
                "WHERE partition = ANY(%s) AND shredded_at IS NULL AND NOT EXISTS "
                "(SELECT FROM wedbackup.erasures e WHERE e.partition = k.partition)", (list(partitions),)).fetchall()
        out: dict[str, SecretKey] = {}
        for r in rows:
            try:
                out[r["partition"]] = self._unwrap(r["key_id"], r["partition"], r["wrapped"], r["master_key_id"],
                                                   keyring)
            except CryptoKeyError:
                pass  # wedding_key raises the same error for this wedding alone
        return out

    @staticmethod
    def _refuse_second_spelling(conn: psycopg.Connection, partition: str) -> None:
        """"07" and "7" are one wedding: once one spelling has a key and a backup, another never gets a key
        (and so no backup) of its own. (A spelling the source does not use gets no archive: the snapshot
        refuses it, so a key it was given first blocks nothing.)"""
        from wedbackup_dagster.core.partitions import other_spellings

        pattern = other_spellings(partition)
        if pattern is None:
            return
        row = conn.execute("SELECT k.partition FROM wedbackup.wedding_keys k WHERE k.partition <> %s AND "
                           "k.partition ~ %s AND EXISTS (SELECT FROM wedbackup.backups b WHERE b.partition = "
                           "k.partition) LIMIT 1", (partition, pattern)).fetchone()
        if row is not None:
            raise CryptoKeyError(_second_spelling_message(partition, row["partition"]))

    def key_by_id(self, key_id: str, keyring: MasterKeyring) -> SecretKey:
        with self.connect() as conn:
            row = conn.execute(
                "SELECT partition, wrapped, master_key_id, shredded_at FROM wedbackup.wedding_keys "
                "WHERE key_id = %s", (key_id,)).fetchone()
            if row is not None:
                _refuse_erased(conn, row["partition"])
        if row is None:
            raise CryptoKeyError(f"wedding key {key_id} is not in the catalogue")
        if row["wrapped"] is None:
            raise CryptoKeyError(f"wedding key {key_id} was destroyed (erasure) at {row['shredded_at']:%Y-%m-%d}")
        return self._unwrap(key_id, row["partition"], row["wrapped"], row["master_key_id"], keyring)

    @staticmethod
    def _unwrap(key_id: str, partition: str, wrapped: bytes, master_key_id: str,
                keyring: MasterKeyring) -> SecretKey:
        master = keyring.get(master_key_id)
        return SecretKey(key_id, unwrap_key(master, bytes(wrapped), wedding_key_context(partition, key_id)))

    # ---- backups and copies ------------------------------------------------------------------------
    def record_backup(self, *, partition: str, archive_sha256: str, size: int, key_id: str,
                      manifest: dict[str, Any], vault_copy: dict[str, Any] | None = None) -> BackupRecord:
        """Record a new backup (and, in the same transaction, its vault copy) and audit it."""
        with self.connect() as conn:
            return self._insert_backup(conn, partition=partition, archive_sha256=archive_sha256, size=size,
                                       key_id=key_id, manifest=manifest, vault_copy=vault_copy)

    def record_backups(self, backups: list[dict[str, Any]]) -> list[BackupRecord]:
        """`record_backup` for many (each a dict of its arguments) in one transaction: a snapshot batch
        records its weddings together instead of one commit each. All or none. The same statements as
        `_insert_backup`, pipelined (psycopg pipeline mode): two waits for the server per batch, not three
        per wedding (the vault copies need the backups' ids, so they follow the first wait)."""
        with self.connect() as conn, conn.pipeline():
            inserted = [conn.execute(self._INSERT_BACKUP, _backup_row(b["partition"], b["archive_sha256"], b["size"],
                                                                      b["key_id"], b["manifest"]))
                        for b in backups]
            for b in backups:
                conn.execute(self._AUDIT_BACKUP,
                             self._audit_backup_args(b["partition"], b["archive_sha256"], b["size"]))
            rows = [cur.fetchone() for cur in inserted]
            for row, b in zip(rows, backups):
                if b.get("vault_copy") is not None:
                    conn.execute(self._RECORD_COPY, self._vault_copy_args(row["id"], b["vault_copy"]))
        return [_backup(row) for row in rows]

    _INSERT_BACKUP = """INSERT INTO wedbackup.backups (partition, archive_sha256, size, key_id, snapshot_time, txid,
                   schema_fingerprint, rows, raw_bytes, manifest)
               VALUES (%(partition)s, %(sha)s, %(size)s, %(key_id)s, %(snapshot_time)s, %(txid)s,
                   %(fingerprint)s, %(rows)s, %(raw)s, %(manifest)s)
               ON CONFLICT (archive_sha256) DO UPDATE SET size = EXCLUDED.size
               RETURNING *"""
    _AUDIT_BACKUP = "INSERT INTO wedbackup.audit (action, partition, detail) VALUES ('backup', %s, %s)"

    @staticmethod
    def _audit_backup_args(partition: str, archive_sha256: str, size: int) -> tuple[str, str]:
        return partition, json.dumps({"archive_sha256": archive_sha256, "size": size})

    @staticmethod
    def _vault_copy_args(backup_id: int, vault_copy: dict[str, Any]) -> tuple[Any, ...]:
        c = {"locked_until": None, "lock_mode": None, **vault_copy}
        return (backup_id, c["provider"], c["uri"], c["object_key"], c["version_id"], c["size"], c["checksum"],
                c["storage_class"], c["region"], c["media"], c["offsite"], c["locked_until"], c["lock_mode"])

    def _insert_backup(self, conn: psycopg.Connection, *, partition: str, archive_sha256: str, size: int,
                       key_id: str, manifest: dict[str, Any], vault_copy: dict[str, Any] | None) -> BackupRecord:
        row = conn.execute(self._INSERT_BACKUP,
                           _backup_row(partition, archive_sha256, size, key_id, manifest)).fetchone()
        conn.execute(self._AUDIT_BACKUP, self._audit_backup_args(partition, archive_sha256, size))
        if vault_copy is not None:
            conn.execute(self._RECORD_COPY, self._vault_copy_args(row["id"], vault_copy))
        return _backup(row)

    def latest_backup(self, partition: str) -> BackupRecord | None:
        with self.connect() as conn:
            row = conn.execute(
                "SELECT * FROM wedbackup.backups WHERE partition = %s ORDER BY snapshot_time DESC, id DESC LIMIT 1",
                (partition,)).fetchone()
        return _backup(row) if row else None

    def latest_backups(self, partitions: list[str], *, manifests: bool = True) -> dict[str, BackupRecord]:
        """latest_backup of many partitions in one query (those without a backup are absent). `manifests=False`:
        each record's manifest is left empty ({}), as in backups_by_sha (the upload step needs none of them)."""
        columns = "*" if manifests else _NO_MANIFEST
        with self.connect() as conn:
            rows = conn.execute(
                f"SELECT DISTINCT ON (partition) {columns} FROM wedbackup.backups WHERE partition = ANY(%s) "
                "ORDER BY partition, snapshot_time DESC, id DESC", (list(partitions),)).fetchall()
        return {row["partition"]: _backup(row) for row in rows}

    def backup_by_sha(self, sha256: str) -> BackupRecord | None:
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM wedbackup.backups WHERE archive_sha256 = %s", (sha256,)).fetchone()
        return _backup(row) if row else None

    def backups_by_sha(self, shas: list[str], *, manifests: bool = True) -> dict[str, BackupRecord]:
        """backup_by_sha of many archives in one query (those unknown are absent). `manifests=False`: each
        record's manifest is left empty ({}), for a reader that checks the archive against the manifest it
        carries (restore --all reads thousands: parsing every catalogue manifest cost it more than the query)."""
        columns = "*" if manifests else _NO_MANIFEST
        with self.connect() as conn:
            rows = conn.execute(f"SELECT {columns} FROM wedbackup.backups WHERE archive_sha256 = ANY(%s)",
                                (list(shas),)).fetchall()
        return {row["archive_sha256"]: _backup(row) for row in rows}

    def require_latest_backup(self, partition: str) -> BackupRecord:
        backup = self.latest_backup(partition)
        if backup is None:
            raise UnknownWeddingError(partition, "has no backup in the catalogue yet")
        return backup

    _RECORD_COPY = """INSERT INTO wedbackup.copies (backup_id, provider, uri, object_key, version_id, size, checksum,
                       storage_class, region, media, offsite, locked_until, lock_mode)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (backup_id, provider) DO UPDATE SET uri = EXCLUDED.uri,
                       object_key = EXCLUDED.object_key, version_id = EXCLUDED.version_id, size = EXCLUDED.size,
                       checksum = EXCLUDED.checksum, storage_class = EXCLUDED.storage_class,
                       region = EXCLUDED.region, stored_at = now(), locked_until = EXCLUDED.locked_until,
                       lock_mode = EXCLUDED.lock_mode"""

    def record_copy(self, backup_id: int, *, provider: str, uri: str, object_key: str, version_id: str | None,
                    size: int, checksum: str | None, storage_class: str | None, region: str | None, media: str,
                    offsite: bool, locked_until: datetime | None = None, lock_mode: str | None = None) -> None:
        with self.connect() as conn:
            conn.execute(self._RECORD_COPY, (backup_id, provider, uri, object_key, version_id, size, checksum,
                                             storage_class, region, media, offsite, locked_until, lock_mode))

    def record_copies(self, copies: list[dict[str, Any]]) -> None:
        """`record_copy` for many copies (each a dict of its arguments) in one transaction: a replica step
        records its confirmed uploads a few dozen at a time instead of one commit each. All or none: a
        copy not recorded is uploaded again by the next run, a no-op on its content-addressed object."""
        if not copies:
            return
        rows = [(c["backup_id"], c["provider"], c["uri"], c["object_key"], c["version_id"], c["size"],
                 c["checksum"], c["storage_class"], c["region"], c["media"], c["offsite"],
                 c.get("locked_until"), c.get("lock_mode")) for c in copies]
        with self.connect() as conn, conn.cursor() as cur:
            cur.executemany(self._RECORD_COPY, rows)

    def copies(self, backup_id: int) -> list[CopyRecord]:
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT provider, uri, object_key, version_id, size, checksum, storage_class, region, media, "
                "offsite, verified_at FROM wedbackup.copies WHERE backup_id = %s ORDER BY provider",
                (backup_id,)).fetchall()
        return [CopyRecord(**r) for r in rows]

    def copies_of(self, backup_ids: list[int]) -> dict[int, list[CopyRecord]]:
        """copies of many backups in one query (a backup without copies is absent)."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT backup_id, provider, uri, object_key, version_id, size, checksum, storage_class, region, "
                "media, offsite, verified_at FROM wedbackup.copies WHERE backup_id = ANY(%s) "
                "ORDER BY backup_id, provider", (list(backup_ids),)).fetchall()
        out: dict[int, list[CopyRecord]] = {}
        for r in rows:
            out.setdefault(r.pop("backup_id"), []).append(CopyRecord(**r))
        return out

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

    def record_restores(self, restores: list[tuple[int, str, bool, float, dict[str, Any]]]) -> None:
        """`record_restore` for many (backup id, provider, ok, seconds, detail) in one transaction (batch
        verification: a few round trips for the batch instead of three per wedding)."""
        if not restores:
            return
        with self.connect() as conn, conn.cursor() as cur:
            cur.executemany("INSERT INTO wedbackup.restores (backup_id, provider, ok, seconds, detail) "
                            "VALUES (%s, %s, %s, %s, %s)",
                            [(b, p, ok, s, json.dumps(d)) for b, p, ok, s, d in restores])
            cur.executemany("UPDATE wedbackup.copies SET verified_at = now() WHERE backup_id = %s AND provider = %s",
                            [(b, p) for b, p, ok, _, _ in restores if ok])
            cur.executemany("INSERT INTO wedbackup.audit (action, partition, detail) "
                            "SELECT 'verify', partition, %s FROM wedbackup.backups WHERE id = %s",
                            [(json.dumps({"provider": p, "ok": ok, "seconds": round(s, 3)}), b)
                             for b, p, ok, s, _ in restores])

    def keys_by_id(self, key_ids: list[str], keyring: MasterKeyring) -> dict[str, SecretKey]:
        """The live wedding keys among `key_ids`, in one query (those missing or destroyed, or of an erased
        wedding whose key is not shredded yet, are left out: `key_by_id` says why for each)."""
        with self.connect() as conn:
            rows = conn.execute("SELECT key_id, partition, wrapped, master_key_id FROM wedbackup.wedding_keys k "
                                "WHERE key_id = ANY(%s) AND wrapped IS NOT NULL AND NOT EXISTS "
                                "(SELECT FROM wedbackup.erasures e WHERE e.partition = k.partition)",
                                (list(key_ids),)).fetchall()
        out = {}
        for r in rows:
            try:
                out[r["key_id"]] = self._unwrap(r["key_id"], r["partition"], r["wrapped"], r["master_key_id"], keyring)
            except CryptoKeyError:
                pass  # key_by_id raises the same error for the archive that needs it
        return out

    def restore_count(self, backup_id: int) -> int:
        with self.connect() as conn:
            return conn.execute("SELECT count(*) AS n FROM wedbackup.restores WHERE backup_id = %s",
                                (backup_id,)).fetchone()["n"]

    def restore_counts(self, backup_ids: list[int]) -> dict[int, int]:
        """restore_count of many backups in one query (a backup never restored is absent)."""
        with self.connect() as conn:
            rows = conn.execute("SELECT backup_id, count(*) AS n FROM wedbackup.restores WHERE backup_id = ANY(%s) "
                                "GROUP BY backup_id", (list(backup_ids),)).fetchall()
        return {r["backup_id"]: r["n"] for r in rows}

    def audit(self, action: str, partition: str | None, detail: dict[str, Any]) -> None:
        with self.connect() as conn:
            conn.execute("INSERT INTO wedbackup.audit (action, partition, detail) VALUES (%s, %s, %s)",
                         (action, partition, json.dumps(detail)))

    # ==== automation: known partitions, due weddings, change capture (issue 4 part A; core/policy/backup_policy.py) ====
    def sync_partitions(self, present: list[tuple[str, date | None]]) -> tuple[list[str], list[str]]:
        """Make wedbackup.partitions match the source's weddings (and their dates): `present` is every
        partition that exists now. Returns (changed: new, re-dated or back again; removed); removed rows
        keep their history."""
        with self.connect() as conn:
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS wedbackup_present (partition text PRIMARY KEY, "
                         "wedding_date date) ON COMMIT DROP")
            with conn.cursor().copy("COPY wedbackup_present (partition, wedding_date) FROM STDIN") as copy:
                for partition, wedding_date in present:
                    copy.write_row((partition, wedding_date))
            added = conn.execute(
                """INSERT INTO wedbackup.partitions AS p (partition, wedding_date)
                   SELECT partition, wedding_date FROM wedbackup_present
                   ON CONFLICT (partition) DO UPDATE SET wedding_date = EXCLUDED.wedding_date, removed_at = NULL
                   WHERE p.wedding_date IS DISTINCT FROM EXCLUDED.wedding_date OR p.removed_at IS NOT NULL
                   RETURNING partition""").fetchall()
            removed = conn.execute(
                """UPDATE wedbackup.partitions p SET removed_at = now()
                   WHERE removed_at IS NULL AND NOT EXISTS (SELECT FROM wedbackup_present x
                                                            WHERE x.partition = p.partition)
                   RETURNING partition""").fetchall()
            conn.execute("DROP TABLE wedbackup_present")
            if removed:
                conn.execute("INSERT INTO wedbackup.audit (action, partition, detail) "
                             "SELECT 'partition-removed', unnest(%s::text[]), '{}'",
                             ([r["partition"] for r in removed],))
        return sorted(r["partition"] for r in added), sorted(r["partition"] for r in removed)

    def live_partitions(self) -> dict[str, date | None]:
        with self.connect() as conn:
            rows = conn.execute("SELECT partition, wedding_date FROM wedbackup.partitions "
                                "WHERE removed_at IS NULL").fetchall()
        return {r["partition"]: r["wedding_date"] for r in rows}

    def due_partitions(self, bands: list[Any], now: datetime) -> list[dict[str, Any]]:
        """Every live partition whose newest backup, coverage check or pending request is older than its
        tier's RPO, in one query: `bands` (policy.Band: tier, lo, hi, rpo, rule.fresh_copy_every) assign
        tiers by wedding date. Each row: partition, tier, action — 'backup' when the data changed since
        the newest backup (or there is none, or it is older than the tier's fresh_copy_every), else
        'covered'."""
        values = sql.SQL(", ").join(
            sql.SQL("({}::text, {}::date, {}::date, {}::interval, {}::interval)").format(
                sql.Literal(b.tier), sql.Literal(b.lo), sql.Literal(b.hi), sql.Literal(b.rpo),
                sql.Literal(b.rule.fresh_copy_every))
            for b in bands)
        query = sql.SQL("""
            WITH band (tier, lo, hi, rpo, fresh) AS (VALUES {values})
            SELECT p.partition, band.tier,
                   CASE WHEN lb.snapshot_time IS NULL OR p.source_updated_at IS NULL
                             OR p.source_updated_at > lb.snapshot_time
                             OR lb.snapshot_time <= %(now)s - band.fresh
                        THEN 'backup' ELSE 'covered' END AS action
            FROM wedbackup.partitions p
            JOIN band ON CASE WHEN band.tier = 'platform' THEN p.wedding_date IS NULL
                              ELSE p.wedding_date >= coalesce(band.lo, p.wedding_date)
                                   AND p.wedding_date <= coalesce(band.hi, p.wedding_date) END
            LEFT JOIN LATERAL (SELECT b.snapshot_time FROM wedbackup.backups b WHERE b.partition = p.partition
                               ORDER BY b.snapshot_time DESC LIMIT 1) lb ON true
            WHERE p.removed_at IS NULL
              AND (lb.snapshot_time IS NULL
                   OR greatest(lb.snapshot_time, p.covered_at, p.requested_at) <= %(now)s - band.rpo)
              AND (p.requested_at IS NULL OR p.requested_at <= %(now)s - band.rpo)
            """).format(values=values)
        with self.connect() as conn:
            # JIT compiling this one query cost more (0.7 s at 100k partitions) than running it; the memo
            # over the LATERAL probe never hits (one probe per partition) and only adds overhead.
            conn.execute("SET LOCAL jit = off")
            conn.execute("SET LOCAL enable_memoize = off")
            return conn.execute(query, {"now": now}).fetchall()

    def mark_covered(self, partitions: list[str], at: datetime, detail: dict[str, Any]) -> None:
        """The newest backups of `partitions` still cover their data at `at` (unchanged since): one audit
        entry for the lot (a summary: at 100k weddings a row each per tick would swamp the trail)."""
        if not partitions:
            return
        with self.connect() as conn:
            conn.execute("UPDATE wedbackup.partitions SET covered_at = %s WHERE partition = ANY(%s)",
                         (at, partitions))
            conn.execute("INSERT INTO wedbackup.audit (at, action, partition, detail) VALUES (%s, 'covered', NULL, %s)",
                         (at, json.dumps({**detail, "partitions": len(partitions),
                                          "sample": sorted(partitions)[:20]})))

    def mark_requested(self, partitions: list[str], at: datetime) -> None:
        if partitions:
            with self.connect() as conn:
                conn.execute("UPDATE wedbackup.partitions SET requested_at = %s WHERE partition = ANY(%s)",
                             (at, partitions))

    def record_source_changes(self, changes: dict[str, datetime]) -> list[dict[str, Any]]:
        """Raise each partition's source_updated_at to the change seen (never lower it); return, for the
        known live ones, what deciding on a backup needs: wedding_date, newest snapshot, requested_at."""
        if not changes:
            return []
        names, times = list(changes), [changes[k] for k in changes]
        with self.connect() as conn:
            return conn.execute(
                """WITH c (partition, at) AS (SELECT * FROM unnest(%s::text[], %s::timestamptz[]))
                   UPDATE wedbackup.partitions p
                   SET source_updated_at = greatest(p.source_updated_at, c.at)
                   FROM c WHERE c.partition = p.partition AND p.removed_at IS NULL
                   RETURNING p.partition, p.wedding_date, p.source_updated_at, p.requested_at,
                       (SELECT max(b.snapshot_time) FROM wedbackup.backups b
                        WHERE b.partition = p.partition) AS snapshot_time""",
                (names, times)).fetchall()

    def source_changes_since(self, since: datetime | None) -> list[dict[str, Any]]:
        """The live partitions whose source_updated_at (kept by the change feed's drains) is later than `since`
        (every one with a change recorded, without it), in record_source_changes's shape."""
        with self.connect() as conn:
            return conn.execute(
                """SELECT p.partition, p.wedding_date, p.source_updated_at, p.requested_at,
                       (SELECT max(b.snapshot_time) FROM wedbackup.backups b
                        WHERE b.partition = p.partition) AS snapshot_time
                   FROM wedbackup.partitions p
                   WHERE p.removed_at IS NULL AND p.source_updated_at IS NOT NULL
                     AND (%(since)s::timestamptz IS NULL OR p.source_updated_at > %(since)s::timestamptz)""",
                {"since": since}).fetchall()

    # ==== provider health, catch-up and rebuild (issue 4 part B; core/storage/health.py, core/catalogue/rebuild_from_storage.py) ======
    def record_provider_check(self, provider: str, *, ok: bool, seconds: float | None, error: str | None,
                              state_ok: bool, consecutive_failures: int, since: str, at: str) -> None:
        """One canary into the history, and the provider's resulting state, in one transaction."""
        with self.connect() as conn:
            conn.execute("INSERT INTO wedbackup.provider_health (provider, at, ok, seconds, error) "
                         "VALUES (%s, %s, %s, %s, %s)", (provider, at, ok, seconds, error))
            conn.execute(
                """INSERT INTO wedbackup.provider_state (provider, ok, consecutive_failures, since, last_checked)
                   VALUES (%s, %s, %s, %s, %s)
                   ON CONFLICT (provider) DO UPDATE SET ok = EXCLUDED.ok,
                       consecutive_failures = EXCLUDED.consecutive_failures, since = EXCLUDED.since,
                       last_checked = EXCLUDED.last_checked""",
                (provider, state_ok, consecutive_failures, since, at))

    def provider_states(self) -> list[dict[str, Any]]:
        with self.connect() as conn:
            return conn.execute("SELECT provider, ok, consecutive_failures, since, last_checked "
                                "FROM wedbackup.provider_state ORDER BY provider").fetchall()

    def provider_history(self, provider: str, limit: int = 20) -> list[dict[str, Any]]:
        with self.connect() as conn:
            return conn.execute("SELECT at, ok, seconds, error FROM wedbackup.provider_health WHERE provider = %s "
                                "ORDER BY at DESC, id DESC LIMIT %s", (provider, limit)).fetchall()

    # The newest backup of every partition still worth copying: not erased (live key) and not removed from
    # the source. `has_copy` says whether `provider` holds a copy of it.
    _COVERAGE = """
        SELECT b.partition, (c.backup_id IS NOT NULL) AS has_copy
        FROM (SELECT DISTINCT ON (partition) id, partition, key_id FROM wedbackup.backups
              ORDER BY partition, snapshot_time DESC, id DESC) b
        LEFT JOIN wedbackup.copies c ON c.backup_id = b.id AND c.provider = %(provider)s
        LEFT JOIN wedbackup.partitions p ON p.partition = b.partition
        LEFT JOIN wedbackup.wedding_keys k ON k.key_id = b.key_id
        WHERE p.removed_at IS NULL AND k.shredded_at IS NULL
    """

    def copy_coverage(self, provider: str) -> dict[str, bool]:
        """partition -> whether its newest backup has a copy at `provider` (for batching catch-up runs)."""
        with self.connect() as conn:
            rows = conn.execute(self._COVERAGE, {"provider": provider}).fetchall()
        return {r["partition"]: r["has_copy"] for r in rows}

    def partitions_missing_copy(self, provider: str) -> list[str]:
        """Partitions whose newest backup has no copy at `provider`: what a catch-up must replicate."""
        with self.connect() as conn:
            query = sql.SQL("SELECT partition FROM ({}) x WHERE NOT has_copy ORDER BY partition").format(
                sql.SQL(self._COVERAGE))
            rows = conn.execute(query, {"provider": provider}).fetchall()
        return [r["partition"] for r in rows]

    def rebuilt_backup(self, *, partition: str, archive_sha256: str, size: int, key_id: str,
                       manifest: dict[str, Any]) -> tuple[int, bool]:
        """(backup id, inserted) for a backup found in storage; an existing row with that SHA-256 is kept."""
        with self.connect() as conn:
            row = conn.execute(
                """INSERT INTO wedbackup.backups (partition, archive_sha256, size, key_id, snapshot_time, txid,
                       schema_fingerprint, rows, raw_bytes, manifest)
                   VALUES (%(partition)s, %(sha)s, %(size)s, %(key_id)s, %(snapshot_time)s, %(txid)s,
                       %(fingerprint)s, %(rows)s, %(raw)s, %(manifest)s)
                   ON CONFLICT (archive_sha256) DO NOTHING RETURNING id""",
                _backup_row(partition, archive_sha256, size, key_id, manifest)).fetchone()
            if row is not None:
                return row["id"], True
            row = conn.execute("SELECT id FROM wedbackup.backups WHERE archive_sha256 = %s",
                               (archive_sha256,)).fetchone()
        return row["id"], False

    def counts(self) -> dict[str, Any]:
        """Row counts for `wedbackup catalogue status`: backups, partitions, copies per provider."""
        with self.connect() as conn:
            backups = conn.execute("SELECT count(*) AS n, count(DISTINCT partition) AS p "
                                   "FROM wedbackup.backups").fetchone()
            copies = conn.execute("SELECT provider, count(*) AS n FROM wedbackup.copies GROUP BY provider "
                                  "ORDER BY provider").fetchall()
        return {"backups": backups["n"], "partitions": backups["p"],
                "copies": {r["provider"]: r["n"] for r in copies}}

    # ==== erasure, retention, immutability (issue 6 parts 2, 4, 5; core/governance/erasure.py, core/governance/retention.py) ====
    def shred_wedding_key(self, partition: str) -> int:
        """Crypto-shredding: destroy every key the wedding ever had (wrapped = NULL, shredded_at = now()),
        so no archive sealed for it can be opened again by anyone. Returns how many keys were destroyed
        now (0 when they already were: shredding is idempotent)."""
        with self.connect() as conn:
            rows = conn.execute(
                "UPDATE wedbackup.wedding_keys SET wrapped = NULL, shredded_at = coalesce(shredded_at, now()) "
                "WHERE partition = %s AND wrapped IS NOT NULL RETURNING key_id", (partition,)).fetchall()
            if rows:
                conn.execute("INSERT INTO wedbackup.audit (action, partition, detail) VALUES ('key-shredded', %s, %s)",
                             (partition, json.dumps({"keys": [r["key_id"] for r in rows]})))
        return len(rows)

    def begin_erasure(self, partition: str, wedding_id: str, requested_by: str, *, erased_at: Any = None,
                      detail: dict[str, Any] | None = None) -> dict[str, Any]:
        """The erasure record of a wedding, made on the first request (a repeated request keeps the first
        one's time and requester); the partition is marked removed in the same transaction. Serialised with
        key creation (`lock_partition_keys`): a key made before this commits is shredded afterwards."""
        with self.connect() as conn:
            lock_partition_keys(conn, partition)
            # erased_at and detail are given when the record comes back from a key backup (core/keys/backup.py).
            conn.execute("INSERT INTO wedbackup.erasures (partition, wedding_id, requested_by, erased_at, detail) "
                         "VALUES (%s, %s, %s, coalesce(%s::timestamptz, now()), %s) ON CONFLICT (partition) DO NOTHING",
                         (partition, wedding_id, requested_by, erased_at, json.dumps(detail or {})))
            conn.execute(
                """INSERT INTO wedbackup.partitions AS p (partition, removed_at) VALUES (%s, now())
                   ON CONFLICT (partition) DO UPDATE SET removed_at = coalesce(p.removed_at, now())""",
                (partition,))
            return conn.execute("SELECT * FROM wedbackup.erasures WHERE partition = %s", (partition,)).fetchone()

    def finish_erasure(self, partition: str, *, deleted: int, locked: int, detail: dict[str, Any],
                       complete: bool) -> None:
        """Record what this pass of an erasure did (deleted copies add up over passes; locked is what
        remains locked now) and audit it; `complete` once nothing deletable is left."""
        with self.connect() as conn:
            conn.execute(
                """UPDATE wedbackup.erasures SET copies_deleted = copies_deleted + %s, copies_locked = %s,
                       detail = %s, completed_at = CASE WHEN %s THEN coalesce(completed_at, now()) END
                   WHERE partition = %s""",
                (deleted, locked, json.dumps(detail, default=str), complete, partition))
            conn.execute("INSERT INTO wedbackup.audit (action, partition, detail) VALUES ('erasure', %s, %s)",
                         (partition, json.dumps({"deleted": deleted, "locked": locked, "complete": complete,
                                                 **detail}, default=str)))

    def erasures(self) -> list[dict[str, Any]]:
        with self.connect() as conn:
            return conn.execute("SELECT * FROM wedbackup.erasures ORDER BY erased_at, partition").fetchall()

    def erased_partitions(self) -> set[str]:
        with self.connect() as conn:
            return {r["partition"] for r in conn.execute("SELECT partition FROM wedbackup.erasures").fetchall()}

    def backups_with_copies(self, partition: str | list[str] | None = None) -> list[dict[str, Any]]:
        """Every backup (of one partition, of a list of them, or all) with its copies and what retention
        needs to judge it: the partition's wedding date, and whether it was ever verified by a restore."""
        partitions = [partition] if isinstance(partition, str) else partition
        with self.connect() as conn:
            return conn.execute(
                """SELECT b.id, b.partition, b.archive_sha256, b.key_id, b.snapshot_time, b.created_at,
                          b.deleting_since, p.wedding_date,
                          (EXISTS (SELECT FROM wedbackup.copies v
                                   WHERE v.backup_id = b.id AND v.verified_at IS NOT NULL)
                           OR EXISTS (SELECT FROM wedbackup.restores r WHERE r.backup_id = b.id AND r.ok)) AS verified,
                          coalesce((SELECT jsonb_agg(jsonb_build_object(
                                        'provider', c.provider, 'object_key', c.object_key, 'uri', c.uri,
                                        'version_id', c.version_id, 'locked_until', c.locked_until,
                                        'lock_mode', c.lock_mode) ORDER BY c.provider)
                                    FROM wedbackup.copies c WHERE c.backup_id = b.id), '[]') AS copies
                   FROM wedbackup.backups b LEFT JOIN wedbackup.partitions p ON p.partition = b.partition
                   WHERE %(partitions)s::text[] IS NULL OR b.partition = ANY(%(partitions)s)
                   ORDER BY b.partition, b.snapshot_time, b.id""", {"partitions": partitions}).fetchall()

    def prunable_partitions(self) -> list[str]:
        """Partitions retention may have work in: more than one backup (a lone one is its newest), or
        erased (whatever is left of them goes)."""
        with self.connect() as conn:
            rows = conn.execute(
                """SELECT partition FROM wedbackup.backups GROUP BY partition HAVING count(*) > 1
                   UNION SELECT b.partition FROM wedbackup.backups b JOIN wedbackup.erasures e USING (partition)
                   ORDER BY 1""").fetchall()
        return [r["partition"] for r in rows]

    def mark_deleting(self, backup_ids: list[int]) -> None:
        if backup_ids:
            with self.connect() as conn:
                conn.execute("UPDATE wedbackup.backups SET deleting_since = coalesce(deleting_since, now()) "
                             "WHERE id = ANY(%s)", (backup_ids,))

    def forget_copy(self, backup_id: int, provider: str) -> None:
        """The copy is gone from storage: drop its row (called only after the provider confirmed)."""
        with self.connect() as conn:
            conn.execute("DELETE FROM wedbackup.copies WHERE backup_id = %s AND provider = %s", (backup_id, provider))

    def record_lock(self, backup_id: int, provider: str, locked_until: datetime | None, mode: str | None) -> None:
        with self.connect() as conn:
            conn.execute("UPDATE wedbackup.copies SET locked_until = %s, lock_mode = %s "
                         "WHERE backup_id = %s AND provider = %s", (locked_until, mode, backup_id, provider))

    def forget_backup_if_uncopied(self, backup_id: int) -> bool:
        """Drop a backup's row once no copy of it is left anywhere (its restores go with it)."""
        with self.connect() as conn:
            row = conn.execute("DELETE FROM wedbackup.backups b WHERE id = %s AND NOT EXISTS "
                               "(SELECT FROM wedbackup.copies c WHERE c.backup_id = b.id) RETURNING id",
                               (backup_id,)).fetchone()
        return row is not None

    # ==== shrinkage flags (issue 14; core/policy/rules.py shrinkage, core/governance/retention.py) =========================
    def record_shrinkage(self, flags: list[dict[str, Any]]) -> int:
        """Record flagged drops (rules.shrinkage_flag); a backup already flagged keeps its first flag (and
        its acknowledgement). Each new flag is audited. Returns how many were new."""
        new = 0
        with self.connect() as conn:
            for f in flags:
                row = conn.execute(
                    """INSERT INTO wedbackup.shrinkage_flags (backup_id, partition, snapshot_time, baseline_id,
                           previous_id, level, summary, detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                       ON CONFLICT (backup_id) DO NOTHING RETURNING backup_id""",
                    (f["backup_id"], f["partition"], f["snapshot_time"], f["baseline_id"], f["previous_id"],
                     f["level"], f["summary"], json.dumps(f["detail"]))).fetchone()
                if row is not None:
                    new += 1
                    conn.execute("INSERT INTO wedbackup.audit (action, partition, detail) "
                                 "VALUES ('shrinkage-flagged', %s, %s)",
                                 (f["partition"], json.dumps({k: f[k] for k in (
                                     "backup_id", "baseline_id", "previous_id", "level", "summary")})))
        return new

    def shrinkage_flags(self, partitions: list[str] | None = None, *, open_only: bool = False
                        ) -> list[dict[str, Any]]:
        """Flags (of these partitions, or all), oldest first; open_only: not yet acknowledged."""
        with self.connect() as conn:
            return conn.execute(
                """SELECT * FROM wedbackup.shrinkage_flags
                   WHERE (%(parts)s::text[] IS NULL OR partition = ANY(%(parts)s))
                     AND (NOT %(open)s OR acknowledged_at IS NULL)
                   ORDER BY flagged_at, backup_id""", {"parts": partitions, "open": open_only}).fetchall()

    def acknowledge_shrinkage(self, partition: str, *, by: str, note: str | None = None,
                              backup_id: int | None = None) -> list[dict[str, Any]]:
        """A person checked the drop: acknowledge the wedding's open flags (or those naming `backup_id` as
        the flagged backup, its baseline or the backup before it), audited; retention may then delete what
        they held."""
        if not by.strip():
            raise WedbackupError(f"wedding {partition}: acknowledging a drop needs the name of who checked it (--by)")
        with self.connect() as conn:
            rows = conn.execute(
                """UPDATE wedbackup.shrinkage_flags SET acknowledged_at = now(), acknowledged_by = %(by)s,
                       note = %(note)s
                   WHERE partition = %(partition)s AND acknowledged_at IS NULL
                     AND (%(id)s::bigint IS NULL OR %(id)s IN (backup_id, baseline_id, previous_id))
                   RETURNING *""", {"by": by, "note": note, "partition": partition, "id": backup_id}).fetchall()
            if rows:
                conn.execute("INSERT INTO wedbackup.audit (action, partition, detail) "
                             "VALUES ('shrinkage-acknowledged', %s, %s)",
                             (partition, json.dumps({"by": by, "note": note, "flags": [r["backup_id"] for r in rows],
                                                     "released": sorted({i for r in rows for i in (
                                                         r["baseline_id"], r["previous_id"]) if i is not None})})))
        return rows



KEY_LOCK_NAMESPACE = "wedbackup-wedding-key"


def lock_partition_keys(conn: psycopg.Connection, partition: str) -> None:
    """Serialise making a wedding's key with erasing it: a transaction-level advisory lock, released at commit
    (its own namespace: the session locks of core/catalogue/locks.py are held by backups that make keys)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))", (KEY_LOCK_NAMESPACE, partition))


def _backup_row(partition: str, archive_sha256: str, size: int, key_id: str, manifest: dict[str, Any]
                ) -> dict[str, Any]:
    """The parameters of a wedbackup.backups row (record_backup, rebuilt_backup)."""
    return {"partition": partition, "sha": archive_sha256, "size": size, "key_id": key_id,
            "snapshot_time": manifest["snapshot_time"], "txid": str(manifest.get("txid", "")),
            "fingerprint": manifest.get("schema_fingerprint"), "rows": sum(t["rows"] for t in manifest["tables"]),
            "raw": sum(t["bytes"] for t in manifest["tables"]), "manifest": json.dumps(manifest)}


def _refuse_erased(conn: psycopg.Connection, partition: str) -> None:
    row = conn.execute("SELECT erased_at, requested_by FROM wedbackup.erasures WHERE partition = %s",
                       (partition,)).fetchone()
    if row is not None:
        raise CryptoKeyError(_erased_message(partition, row))


# A wedding key's partition in one spelling per wedding (what `canonical_spelling` makes in Python): an integer
# id without leading zeros, anything else in lower case.
_CANONICAL_SPELLING = ("(CASE WHEN k.partition ~ '^-?[0-9]+$' THEN regexp_replace(k.partition, '^(-?)0*([0-9])', "
                       "'\\1\\2') ELSE lower(k.partition) END)")


def canonical_spelling(partition: str) -> str:
    """`_CANONICAL_SPELLING` of one partition: "007" and "7" give "7", "-07" gives "-7", a uuid its lower case."""
    import re

    if re.fullmatch(r"-?[0-9]+", partition):
        return re.sub(r"^(-?)0*([0-9])", r"\1\2", partition)
    return partition.lower()


def _erased_message(partition: str, row: dict[str, Any]) -> str:
    return (f"wedding {partition} was erased (GDPR erasure recorded {row['erased_at']:%Y-%m-%d %H:%M} "
            f"by {row['requested_by']}): its key is not read or made again, and nothing of it is "
            "backed up or restored; see `wedbackup erase` and README, GDPR erasure")


def _second_spelling_message(partition: str, holder: str) -> str:
    return (f"wedding {partition!r} is another spelling of wedding {holder!r}, which has "
            f"its key and backups already: one wedding has one partition; use {holder!r}")


def wedding_key_context(partition: str, key_id: str) -> bytes:
    # Binds a wrapped wedding key to its wedding and id: a wrapped key copied onto another row won't open.
    return f"wedbackup-wedding-key:{partition}:{key_id}".encode()


def _backup(row: dict[str, Any]) -> BackupRecord:
    return BackupRecord(id=row["id"], partition=row["partition"], archive_sha256=row["archive_sha256"],
                        size=row["size"], key_id=row["key_id"], snapshot_time=row["snapshot_time"],
                        rows=row["rows"], raw_bytes=row["raw_bytes"], manifest=row["manifest"])
