"""The metadata a person reads in the UI for each wedding's backup steps (rows and bytes per table, sizes,
compression ratio, key id, URIs, restore seconds), made from the core's outcomes. Shared by the backup assets,
the list pipeline, the restore jobs and the disaster-recovery drill."""
from typing import Any

import dagster as dg

from ..core.engine import BackupOutcome, ReplicaOutcome, VerifyOutcome


def metadata_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> dg.MetadataValue:
    """Rows as a table the UI shows; `columns` are (name, type) pairs."""
    schema = dg.TableSchema(columns=[dg.TableColumn(name, type_) for name, type_ in columns])
    records = [dg.TableRecord({name: row.get(name) for name, _ in columns}) for row in rows]
    return dg.MetadataValue.table(records=records, schema=schema)


def dump_metadata(o: BackupOutcome) -> dict[str, Any]:
    m = o.manifest
    tables = [{"table": f"{t['schema']}.{t['name']}", "rows": int(t["rows"]), "bytes": int(t["bytes"])}
              for t in m["tables"]]
    return {
        "rows": dg.MetadataValue.int(sum(t["rows"] for t in tables)),
        "raw_bytes": dg.MetadataValue.int(sum(t["bytes"] for t in tables)),
        "tables": metadata_table(tables, [("table", "string"), ("rows", "int"), ("bytes", "int")]),
        "snapshot_time": dg.MetadataValue.text(str(m["snapshot_time"])),
        "txid": dg.MetadataValue.text(str(m.get("txid", ""))),
        "server_version": dg.MetadataValue.text(str(m.get("server_version", ""))),
        "schema_fingerprint": dg.MetadataValue.text(str(m.get("schema_fingerprint", ""))[:16]),
        **_broken_keys_metadata(m),
    }


def _broken_keys_metadata(m: dict[str, Any]) -> dict[str, Any]:
    """Platform only: rows that break a validated foreign key on the source (those on a wedding path reach
    no wedding; the platform archive carries them), per key, so the UI shows them on every platform backup."""
    if m.get("partition") != "platform" or not isinstance(m.get("broken_foreign_keys"), list):
        return {}
    rows = [{"table": f"{fk.get('schema')}.{fk.get('table')}", "constraint": str(fk.get("constraint")),
             "parent": str(fk.get("parent")), "rows": int(fk.get("source_rows") or 0)}
            for fk in m["broken_foreign_keys"] if isinstance(fk, dict) and fk.get("source_rows")]
    return {"rows_breaking_foreign_keys": dg.MetadataValue.int(sum(r["rows"] for r in rows)),
            "broken_foreign_keys": metadata_table(rows, [("table", "string"), ("constraint", "string"),
                                                 ("parent", "string"), ("rows", "int")])}


def archive_metadata(o: BackupOutcome) -> dict[str, Any]:
    s = o.stats
    return {
        "vault_path": dg.MetadataValue.path(str(o.vault.path)),
        "archive_sha256": dg.MetadataValue.text(s.sha256),
        "raw_bytes": dg.MetadataValue.int(s.raw_bytes),
        "compressed_bytes": dg.MetadataValue.int(s.compressed_bytes),
        "sealed_bytes": dg.MetadataValue.int(s.sealed_bytes),
        "compression_ratio": dg.MetadataValue.float(round(s.raw_bytes / max(s.compressed_bytes, 1), 2)),
        "key_id": dg.MetadataValue.text(s.key_id),
        "seconds": dg.MetadataValue.float(round(o.seconds, 3)),
    }


def replica_metadata(o: ReplicaOutcome) -> dict[str, Any]:
    r = o.record
    uri_value = dg.MetadataValue.url(r.uri) if r.uri.startswith("http") else dg.MetadataValue.text(r.uri)
    return {
        "uri": uri_value,
        "version_id": dg.MetadataValue.text(str(r.version_id or "")),
        "size": dg.MetadataValue.int(r.size),
        "archive_sha256": dg.MetadataValue.text(r.sha256),
        "provider_checksum": dg.MetadataValue.text(str(r.provider_checksum)),
        "storage_class": dg.MetadataValue.text(str(r.storage_class)),
        "region": dg.MetadataValue.text(str(r.region or "")),
        "already_present": dg.MetadataValue.bool(bool(r.already_present)),
        "seconds": dg.MetadataValue.float(round(o.seconds, 3)),
    }


def verify_metadata(o: VerifyOutcome) -> dict[str, Any]:
    return {
        "checked_copy": dg.MetadataValue.text(o.provider),
        "archive_sha256": dg.MetadataValue.text(o.backup.archive_sha256),
        "restore_seconds": dg.MetadataValue.float(round(o.restore_seconds, 3)),
        "download_seconds": dg.MetadataValue.float(round(o.download_seconds, 3)),
        "total_seconds": dg.MetadataValue.float(round(o.seconds, 3)),
        "tables_checked": dg.MetadataValue.int(len(o.tables)),
        "foreign_keys_checked": dg.MetadataValue.int(o.fk_checked),
        "foreign_keys_external": dg.MetadataValue.int(o.fk_external),
    }


def log_key_backup(context: Any, result: Any) -> None:
    """Say what the run's key-store backup did (Engine.back_up_new_keys; None: every key was backed up)."""
    if result is not None:
        context.log.info(f"key-store backup {result.sha256[:16]}: {result.key_count} wedding keys at "
                         f"{', '.join(sorted(result.copies))}" + (f"; failed: {', '.join(sorted(result.failures))}"
                                                                  if result.failures else ""))
