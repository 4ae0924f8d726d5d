"""The end-state audit of the reliability tests: storage and catalogue checked against each other, straight
at the stand-ins (never through a fault proxy). Every object at every provider is downloaded, its SHA-256
compared with its content-addressed key and opened with its wedding's key; every catalogued copy must
exist with its size and checksum; no unfinished multipart upload, no vault temp file, no scratch database;
and nothing left of an erased wedding (no object, no vault folder, no live key, the erasure complete)."""
from __future__ import annotations

import hashlib
import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg

from wedbackup_dagster.core.formats.archive import open_archive
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.errors import WedbackupError
from wedbackup_dagster.core.storage.replicas import AzureReplica, GCSReplica, S3Replica
from wedbackup_dagster.core.storage.replicas.base import parse_key_backup_key


@dataclass
class AuditReport:
    objects_checked: Counter = field(default_factory=Counter)  # by provider (vault included)
    copies_checked: int = 0
    key_backups: Counter = field(default_factory=Counter)  # key-store backups at each provider (not archives)
    erased_checked: int = 0
    multipart_uploads: int = 0
    uncommitted_blobs: int = 0
    vault_temp_files: int = 0
    s3_extra_versions: int = 0  # identical re-uploads kept as versions (an SDK retry of a PUT whose answer was lost)
    problems: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return not self.problems


def direct_replicas(engine: Engine, s3_client: Any, gcs_client: Any, azure_service: Any) -> dict[str, Any]:
    settings = engine.settings
    return {"s3": S3Replica(s3_client, settings.s3), "gcs": GCSReplica(gcs_client, settings.gcs),
            "azure": AzureReplica(azure_service, settings.azure)}


def _open_through(engine: Engine, data: bytes, name: str) -> None:
    for _ in open_archive(io.BytesIO(data), name=name, resolve_key=engine.resolve_key):
        pass  # every chunk's AES-GCM tag and the final chunk checked


def audit(engine: Engine, replicas: dict[str, Any], *, scratch_prefix: str | None = None,
          admin_dsn: str | None = None, erased: tuple[str, ...] = ()) -> AuditReport:
    report = AuditReport()
    _audit_erased(engine, replicas, erased, report)
    cat = engine.catalogue
    with cat.connect() as conn:
        copies = conn.execute(
            "SELECT b.partition, b.archive_sha256, b.size AS backup_size, b.key_id, c.provider, c.object_key, "
            "c.size, c.checksum FROM wedbackup.copies c JOIN wedbackup.backups b ON b.id = c.backup_id").fetchall()
    catalogued = {(c["provider"], c["object_key"]): c for c in copies}

    # Storage -> catalogue: every object is a whole archive, under its own hash, known to the catalogue.
    for provider, replica in replicas.items():
        for obj in replica.list():
            report.objects_checked[provider] += 1
            where = f"{provider}:{obj.key}"
            if obj.sha256 is None and parse_key_backup_key(replica.prefix, obj.key) is not None:
                report.objects_checked[provider] -= 1
                report.key_backups[provider] += 1  # sealed with the master key: keybackup's tests open them
                continue
            if obj.sha256 is None:
                report.problems.append(f"{where}: not a content-addressed archive key")
                continue
            sink = io.BytesIO()
            try:
                replica.download(obj.key, sink, expected_sha256=obj.sha256)
                _open_through(engine, sink.getvalue(), where)
            except WedbackupError as exc:
                report.problems.append(f"{where}: {exc}")
                continue
            row = catalogued.get((provider, obj.key))
            if row is None:
                report.problems.append(f"{where}: object has no copies row in the catalogue")
            elif row["size"] != obj.size or row["archive_sha256"] != obj.sha256 or row["partition"] != obj.partition:
                report.problems.append(f"{where}: catalogue says {row['size']} bytes of {row['archive_sha256'][:12]} "
                                       f"(wedding {row['partition']}), storage has {obj.size} bytes")

    # Catalogue -> storage: every copy is there with the size and provider checksum recorded.
    for (provider, key), row in catalogued.items():
        report.copies_checked += 1
        if provider == "vault":
            entry = engine.vault.get(row["partition"], row["archive_sha256"])
            if entry is None or entry.size != row["size"]:
                report.problems.append(f"vault:{key}: catalogued copy missing or of another size")
                continue
            data = entry.path.read_bytes()
            if hashlib.sha256(data).hexdigest() != row["archive_sha256"]:
                report.problems.append(f"vault:{key}: sha256 differs from its name")
            continue
        head = replicas[provider].head(key)
        if head is None:
            report.problems.append(f"{provider}:{key}: catalogued copy is missing at the provider")
        elif head.size != row["size"] or head.provider_checksum != row["checksum"]:
            report.problems.append(f"{provider}:{key}: provider has {head.size} bytes / {head.provider_checksum}, "
                                   f"catalogue {row['size']} / {row['checksum']}")

    # The vault: every archive whole and catalogued, no temp file visible as an archive or left over.
    vault_keys = {k for p, k in catalogued if p == "vault"}
    for entry in engine.vault.entries():
        report.objects_checked["vault"] += 1
        if entry.path.name not in vault_keys:
            report.problems.append(f"vault:{entry.path}: archive not in the catalogue")
        try:
            _open_through(engine, entry.path.read_bytes(), f"vault:{entry.path.name}")
        except WedbackupError as exc:
            report.problems.append(f"vault:{entry.path}: {exc}")
    temps = list(engine.vault.root.glob("*/.incoming-*"))
    report.vault_temp_files = len(temps)
    if temps:
        report.problems.append(f"vault: {len(temps)} temporary file(s) left: {[t.name for t in temps[:3]]}")

    # Unfinished uploads: S3 multipart uploads; Azure blobs with only uncommitted blocks.
    s3 = replicas.get("s3")
    if s3 is not None:
        uploads = s3.client.list_multipart_uploads(Bucket=s3.target.bucket).get("Uploads", [])
        report.multipart_uploads = len(uploads)
        versions: Counter = Counter()
        for page in s3.client.get_paginator("list_object_versions").paginate(Bucket=s3.target.bucket):
            versions.update(v["Key"] for v in page.get("Versions", []))
        report.s3_extra_versions = sum(n - 1 for n in versions.values())
        if uploads:
            report.problems.append(f"s3: {len(uploads)} unfinished multipart upload(s): "
                                   f"{[u['Key'] for u in uploads[:3]]}")
    azure = replicas.get("azure")
    if azure is not None:
        committed = {b.name for b in azure.container.list_blobs()}
        try:
            listed = {b.name for b in azure.container.list_blobs(include=["uncommittedblobs"])}
        except Exception:  # noqa: BLE001 - a stand-in without the listing: nothing to count
            listed = committed
        report.uncommitted_blobs = len(listed - committed)

    if scratch_prefix and admin_dsn:
        with psycopg.connect(admin_dsn) as conn:
            left = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                                               (scratch_prefix,))]
        if left:
            report.problems.append(f"postgres: {len(left)} scratch database(s) left: {left[:3]}")
    return report


def _audit_erased(engine: Engine, replicas: dict[str, Any], erased: tuple[str, ...], report: AuditReport) -> None:
    """Each erased wedding: erasure recorded complete, no live key, nothing at any provider or in the vault."""
    cat = engine.catalogue
    with cat.connect() as conn:
        done = {r["partition"]: r["completed_at"] for r in conn.execute(
            "SELECT partition, completed_at FROM wedbackup.erasures").fetchall()}
        live = {r["partition"] for r in conn.execute(
            "SELECT DISTINCT partition FROM wedbackup.wedding_keys WHERE wrapped IS NOT NULL").fetchall()}
    for wedding in erased:
        report.erased_checked += 1
        if done.get(wedding) is None:
            report.problems.append(f"erased wedding {wedding}: erasure not recorded as complete")
        if wedding in live:
            report.problems.append(f"erased wedding {wedding}: a live wedding key is left in the catalogue")
        for provider, replica in replicas.items():
            left = [o.key for o in replica.list(f"weddings/{wedding}/")]
            if left:
                report.problems.append(f"erased wedding {wedding}: {len(left)} object(s) left at {provider}: "
                                       f"{left[:2]}")
        if (engine.vault.root / wedding).exists():
            report.problems.append(f"erased wedding {wedding}: its vault folder is left")
