"""GDPR erasure of a wedding's backups by crypto-shredding: the wedding's keys are destroyed first (from
then on no copy anywhere can be decrypted), then every archive and every version of it is deleted on
every provider and in the vault where retention allows, and every DR pack naming it. A copy under Object
Lock stays, recorded as "locked until X, unreadable because the key is destroyed". The erasure is recorded
in the catalogue (wedbackup.erasures) and the audit trail, and is idempotent: running it again completes a
partial one.

`reapply_erasures` removes erased weddings' rows from a database restored from the platform partition
(whose archives are sealed with the platform key, not the wedding's, so they still name erased weddings).
`drop_inspection_schemas` removes what `restore --into-schema` left in the source: the wedding's own
inspection schemas, and its rows in platform ones (both marked by tenancy.INSPECTION_MARKER)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from wedbackup_dagster.core.errors import ReplicaLocked, WedbackupError
from wedbackup_dagster.core.governance.retention import CopyDeletion, delete_backup_copies
from wedbackup_dagster.core.postgres.snapshot import database_label
from wedbackup_dagster.core.postgres.tenancy import INSPECTION_MARKER, TableName, discover
from wedbackup_dagster.core.storage.replicas.base import stored_keys
from wedbackup_dagster.core.partitions import check_partition
from wedbackup_dagster.core.partitions import PLATFORM

# Platform rows that name a wedding without a foreign key (so tenancy cannot route them): a column
# `wedding_id`, or the pair (`entity` = 'wedding', `entity_id`) as in an audit log. Erasure removes them too.
WEDDING_ID_COLUMN = "wedding_id"
ENTITY_COLUMNS = ("entity", "entity_id")
ENTITY_WEDDING = "wedding"


@dataclass
class ErasureReport:
    partition: str
    requested_by: str
    erased_at: datetime | None
    keys_shredded: int
    deletions: list[CopyDeletion] = field(default_factory=list)
    stray_deleted: list[str] = field(default_factory=list)  # objects the catalogue did not know, deleted
    stray_locked: dict[str, datetime | None] = field(default_factory=dict)  # uri -> locked until
    # DR pack objects naming the wedding, deleted ("provider:key"): speed copies, never counted as copies
    dr_pack_deleted: list[str] = field(default_factory=list)
    vault_deleted: int = 0
    failed: list[str] = field(default_factory=list)
    key_backup: str | None = None  # sha256 of the key-store backup written without the destroyed key
    inspection: list[str] = field(default_factory=list)  # inspection schemas dropped or cleaned in the source

    @property
    def copies_deleted(self) -> int:
        return sum(len(d.deleted) for d in self.deletions) + len(self.stray_deleted) + self.vault_deleted

    @property
    def locked(self) -> list[dict[str, Any]]:
        """Every copy that stays because a lock holds it: unreadable, the key being destroyed."""
        out = [{"provider": p, "archive_sha256": d.archive_sha256, "locked_until": until}
               for d in self.deletions for p, until in d.locked.items()]
        out += [{"uri": uri, "locked_until": until} for uri, until in self.stray_locked.items()]
        return out

    @property
    def complete(self) -> bool:
        return not self.failed and not any(d.failed for d in self.deletions)

    def detail(self) -> dict[str, Any]:
        return {"keys_shredded": self.keys_shredded, "backups": len(self.deletions), "key_backup": self.key_backup,
                "locked": [{**c, "locked_until": str(c["locked_until"]),
                            "note": "unreadable because the key is destroyed"} for c in self.locked],
                "stray_deleted": self.stray_deleted[:50], "dr_pack_deleted": self.dr_pack_deleted[:50],
                "vault_deleted": self.vault_deleted,
                "inspection": self.inspection[:50],
                "failed": (self.failed + [f"{p}: {e}" for d in self.deletions for p, e in d.failed.items()])[:50]}


def _wedding_partition(partition: str) -> str:
    if check_partition(partition) == PLATFORM:
        raise WedbackupError("the platform partition cannot be erased: erasure is for one wedding's data")
    return partition


def erasure_preview(catalogue: Any, partition: str) -> dict[str, Any]:
    """What `erase_wedding` would destroy, for the confirmation prompt: keys, backups, copies per provider."""
    _wedding_partition(partition)
    rows = catalogue.backups_with_copies(partition)
    with catalogue.connect() as conn:
        keys = conn.execute("SELECT count(*) FILTER (WHERE wrapped IS NOT NULL) AS live, count(*) AS all "
                            "FROM wedbackup.wedding_keys WHERE partition = %s", (partition,)).fetchone()
    copies: dict[str, int] = {}
    locked = 0
    for row in rows:
        for c in row["copies"]:
            copies[c["provider"]] = copies.get(c["provider"], 0) + 1
            locked += c["locked_until"] is not None
    erased = [e for e in catalogue.erasures() if e["partition"] == partition]
    return {"partition": partition, "live_keys": keys["live"], "keys": keys["all"], "backups": len(rows),
            "copies": copies, "known_locked": locked, "already_erased_at": erased[0]["erased_at"] if erased else None}


def _stored_keys(replica: Any, partition: str) -> set[str]:
    """Every object key the provider holds under the wedding's folder (stored_keys)."""
    return stored_keys(replica, f"weddings/{partition}/")


def erase_wedding(catalogue: Any, vault: Any, replicas: Mapping[str, Any], partition: str, *,
                  requested_by: str, settings: Any | None = None) -> ErasureReport:
    """Erase one wedding's backups everywhere (see the module docstring). Provider outages do not stop
    it: they are reported (the erasure stays incomplete) and a re-run finishes it. With `settings`, the
    key-store backups are replaced by one without the destroyed key (what the erase_wedding job does):
    until then an older key backup, opened with the master key, would still hold it; and the wedding's
    inspection schemas in the source database are dropped (`drop_inspection_schemas`)."""
    _wedding_partition(partition)
    record = catalogue.begin_erasure(partition, partition, requested_by)
    shredded = catalogue.shred_wedding_key(partition)
    report = ErasureReport(partition, record["requested_by"], record["erased_at"], shredded)
    if settings is not None:
        # Every run, not only the one that shredded: a re-run after an outage must finish this too.
        from wedbackup_dagster.core.keys.backup import refresh_key_backups

        try:
            report.key_backup = refresh_key_backups(settings, catalogue, replicas).sha256
        except WedbackupError as exc:
            report.failed.append(f"key backups still hold the destroyed key: {exc}")
        try:
            report.inspection = drop_inspection_schemas(settings.source_dsn, partition)
        except psycopg.Error as exc:
            report.failed.append(f"inspection schemas in {database_label(settings.source_dsn)} were not dropped "
                                 f"({type(exc).__name__}: {str(exc).strip()[:200]}); run the erasure again")

    rows = catalogue.backups_with_copies(partition)
    catalogue.mark_deleting([r["id"] for r in rows])
    for row in rows:
        report.deletions.append(delete_backup_copies(catalogue, vault, replicas, row))
    # Anything the catalogue does not know of (a lost row, an upload whose run died before recording it).
    # Copies still catalogued (locked, or their provider failed above) were just tried and are reported.
    remaining = {(c["provider"], c["object_key"]) for r in catalogue.backups_with_copies(partition)
                 for c in r["copies"]}
    for provider, replica in replicas.items():
        try:
            keys = _stored_keys(replica, partition)
        except WedbackupError as exc:
            report.failed.append(f"{provider}: listing the wedding's objects failed: {exc}")
            continue
        for key in sorted(keys):
            if (provider, key) in remaining:
                continue
            try:
                replica.delete(key)
                report.stray_deleted.append(f"{provider}:{key}")
            except ReplicaLocked as exc:
                report.stray_locked[f"{provider}:{key}"] = exc.locked_until
            except WedbackupError as exc:
                report.failed.append(str(exc)[:300])
    # DR packs (core/disaster/packs.py) naming the wedding: each such pack's index, then every segment no remaining
    # index references. The other weddings in them go back to their own objects until the next pack is built.
    from ..disaster import packs

    for provider, replica in replicas.items():
        try:
            report.dr_pack_deleted += [f"{provider}:{key}" for key in packs.forget_wedding(replica, partition)]
        except Exception as exc:  # noqa: BLE001 - reported; the rest of the erasure (vault, media) must still run
            report.failed.append(f"{provider}: DR packs naming the wedding were not all deleted: "
                                 f"{str(exc)[:300] or type(exc).__name__}")
    folder = vault.root / partition
    if folder.is_dir():
        for entry in list(vault.entries(partition)):
            report.vault_deleted += vault.remove(partition, entry.sha256)
        try:
            folder.rmdir()  # not even the wedding's folder name stays behind
        except OSError:
            pass  # a backup run is writing into it: its archive has a destroyed key; the sweep deletes it
    from ..media.store import erase_media  # the wedding's media (issue 19): packs and snapshots everywhere

    report.failed.extend(erase_media(catalogue, vault.root, replicas, partition))
    catalogue.finish_erasure(partition, deleted=report.copies_deleted, locked=len(report.locked),
                             detail=report.detail(), complete=report.complete)
    return report


# ------------------------------------------------------------------------------------ re-applying


def drop_inspection_schemas(dsn: str, partition: str) -> list[str]:
    """In the database at `dsn`, in one transaction: drop every schema `restore --into-schema` made of the
    wedding `partition`, and delete the rows naming it (`wedding_id`, or `entity`='wedding' + `entity_id`)
    from the tables of platform inspection schemas. One line per schema dropped or table cleaned."""
    done: list[str] = []
    with psycopg.connect(dsn) as conn:
        marked = conn.execute(
            "SELECT nspname::text, substr(obj_description(oid, 'pg_namespace'), %(n)s) FROM pg_namespace "
            "WHERE starts_with(coalesce(obj_description(oid, 'pg_namespace'), ''), %(m)s) ORDER BY 1",
            {"m": INSPECTION_MARKER, "n": len(INSPECTION_MARKER) + 1}).fetchall()
        for schema, owner in marked:
            if owner == partition:
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
                done.append(f"schema {schema}: dropped (an inspection copy of wedding {partition})")
            elif owner == PLATFORM:
                columns: dict[str, set[str]] = {}
                for table, column in conn.execute("SELECT table_name::text, column_name::text FROM "
                                                  "information_schema.columns WHERE table_schema = %s", (schema,)):
                    columns.setdefault(table, set()).add(column)
                for table, cols in sorted(columns.items()):
                    _delete_naming(conn, TableName(schema, table), cols, [partition], done)
    return done


def _delete_naming(conn: psycopg.Connection, table: TableName, columns: set[str], ids: list[str],
                   done: list[str]) -> None:
    """Delete a platform table's rows that name one of the weddings `ids` without a foreign key."""
    if WEDDING_ID_COLUMN in columns:
        _delete(conn, sql.SQL("DELETE FROM {} WHERE {}::text = ANY(%(ids)s)").format(
            table.ident(), sql.Identifier(WEDDING_ID_COLUMN)), ids, table, done)
    if set(ENTITY_COLUMNS) <= columns:
        kind, ref = (sql.Identifier(c) for c in ENTITY_COLUMNS)
        _delete(conn, sql.SQL("DELETE FROM {} WHERE {} = %(kind)s AND {}::text = ANY(%(ids)s)").format(
            table.ident(), kind, ref), ids, table, done, kind=ENTITY_WEDDING)


def reapply_erasures(target_dsn: str, catalogue: Any, root: TableName = TableName("public", "weddings")
                     ) -> list[str]:
    """Delete every recorded erased wedding's rows from a restored database, in one transaction: its
    tenant rows (children first, along the same FK paths as the snapshots) and platform rows naming it
    without a foreign key (`wedding_id`, or `entity`='wedding' + `entity_id`). Returns one line per table
    that lost rows, e.g. "public.platform_audit: 3 row(s) of erased weddings"."""
    ids = sorted({str(e["wedding_id"]) for e in catalogue.erasures()})
    if not ids:
        return []
    done: list[str] = []
    with psycopg.connect(target_dsn) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s)", (str(root),))
            if cur.fetchone()[0] is None:
                return []  # nothing of the application's schema here (yet)
        plan = discover(conn, root)
        for table in reversed(plan.tenant_tables):  # children before their parents
            joined, columns = table._reach()
            last = f"t{len(joined) - 1}"
            match = sql.SQL(" AND ").join(sql.SQL("{}::text = ANY(%(ids)s)").format(sql.Identifier(last, c))
                                          for c in columns)
            query = sql.SQL("DELETE FROM {t} WHERE (tableoid, ctid) IN (SELECT t0.tableoid, t0.ctid FROM {chain} "
                            "WHERE {match})").format(t=table.table.ident(), chain=table._join_chain(joined, 0),
                                                     match=match)
            _delete(conn, query, ids, table.table, done)
        for table in plan.platform_tables:
            _delete_naming(conn, table.table, set(table.columns), ids, done)
    if done:
        catalogue.audit("erasures-reapplied", PLATFORM, {"weddings": len(ids), "tables": done})
    return done


def _delete(conn: psycopg.Connection, query: sql.Composable, ids: list[str], table: TableName, done: list[str],
            **params: str) -> None:
    count = conn.execute(query, {"ids": ids, **params}).rowcount
    if count:
        done.append(f"{table}: {count} row(s) of erased weddings")
