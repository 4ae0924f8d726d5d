"""Each per-wedding check on the real stack: it passes on healthy weddings and fails — for the faulty
wedding only — on its matching fault. The fleet is shared; each test damages its own weddings:
w[0] deleted replica, w[1] flipped byte at S3, w[2] flipped byte in the vault, w[5]/w[6] back-dated,
w[8] only two copies, w[9] manifest mismatch; w[3], w[4], w[7], w[10], w[11] stay healthy (Azure is taken
down while w[4] is checked)."""
from __future__ import annotations

import datetime as dt
import socket

import dagster as dg

from wedbackup_dagster.backups.constants import AZURE_REPLICA, DB_DUMP, ENCRYPTED_ARCHIVE, GCS_REPLICA, S3_REPLICA
from wedbackup_dagster.backups.launch import run_job_for
from wedbackup_dagster.backups.partitions import weddings_partitions
from wedbackup_dagster.backups.checks import wedding_checks

from .conftest import evaluations, run_checks

CHECKS = [("encrypted_archive", "archive_integrity"), ("s3_replica", "replica_checksum"),
          ("gcs_replica", "replica_checksum"), ("azure_replica", "replica_checksum"),
          ("verified_restore", "three_two_one"), ("verified_restore", "restore_matches_manifest"),
          ("verified_restore", "freshness"), ("db_dump", "shrinkage")]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy(fleet, wedding: str, provider: str):
    cat = fleet["catalogue"]
    backup = cat.require_latest_backup(wedding)
    return backup, next(c for c in cat.copies(backup.id) if c.provider == provider)


def test_every_check_passes_for_every_wedding_of_a_healthy_backup_run(fleet):
    instance, weddings = fleet["instance"], fleet["weddings"]
    # A backup run carries the blocking integrity check and shrinkage; check_weddings evaluates the others.
    in_backup = evaluations(instance, fleet["backup_run"])
    assert {key[:2] for key in in_backup} == {("encrypted_archive", "archive_integrity"), ("db_dump", "shrinkage")}
    assert all(ev.passed for ev in in_backup.values())
    got = run_checks(instance, weddings)
    for asset, check in CHECKS:
        for wedding in weddings:
            ev = got[(asset, check, wedding)]
            assert ev.passed, (asset, check, wedding, ev.description)
    specs = [spec for check in wedding_checks for spec in check.check_specs]
    assert len(specs) == 8 and all(spec.partitions_def is weddings_partitions for spec in specs)
    # 3-2-1 lists each copy: where, media, offsite, when verified.
    table = got[("verified_restore", "three_two_one", weddings[0])].metadata["copies"]
    rows = {r.data["where"]: r.data for r in table.records}
    assert set(rows) == {"vault", "s3", "gcs", "azure"}
    assert rows["vault"]["media"] == "disk" and rows["vault"]["offsite"] is False
    assert rows["s3"]["media"] == "object-storage" and rows["s3"]["offsite"] is True
    assert all(r["verified"] and r["checksum_confirmed"] for r in rows.values())
    # The run's checks are findable per partition, as the UI shows them.
    key = dg.AssetCheckKey(dg.AssetKey("verified_restore"), "three_two_one")
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    assert record.event.dagster_event.event_specific_data.partition in weddings


def test_deleted_replica_fails_that_providers_checksum_check_only(fleet):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    victim, healthy = fleet["weddings"][0], fleet["weddings"][11]
    _, copy = _copy(fleet, victim, "gcs")
    settings = fleet["engine"].settings
    client = storage.Client(project=settings.gcs.project, credentials=AnonymousCredentials())
    client.bucket(settings.gcs.bucket).blob(copy.object_key).delete()

    got = run_checks(fleet["instance"], [victim, healthy])
    ev = got[("gcs_replica", "replica_checksum", victim)]
    assert not ev.passed and "missing" in ev.description and copy.object_key in ev.description
    assert got[("gcs_replica", "replica_checksum", healthy)].passed
    assert got[("s3_replica", "replica_checksum", victim)].passed
    assert got[("azure_replica", "replica_checksum", victim)].passed


def test_one_flipped_byte_at_a_provider_fails_its_checksum_check(fleet):
    s3_client = fleet["s3"]
    victim, healthy = fleet["weddings"][1], fleet["weddings"][11]
    _, copy = _copy(fleet, victim, "s3")
    bucket = fleet["engine"].settings.s3.bucket
    obj = s3_client.get_object(Bucket=bucket, Key=copy.object_key)
    data = bytearray(obj["Body"].read())
    data[len(data) // 2] ^= 0x01
    s3_client.put_object(Bucket=bucket, Key=copy.object_key, Body=bytes(data), Metadata=obj["Metadata"],
                         ChecksumAlgorithm="SHA256")

    got = run_checks(fleet["instance"], [victim, healthy])
    ev = got[("s3_replica", "replica_checksum", victim)]
    assert not ev.passed and "provider checksum" in ev.description
    assert ev.metadata["recorded_checksum"].value != ev.metadata["provider_checksum"].value
    assert got[("s3_replica", "replica_checksum", healthy)].passed
    assert got[("gcs_replica", "replica_checksum", victim)].passed


def test_flipped_byte_in_the_vault_fails_integrity_and_blocks_the_replicas(fleet):
    s3_client = fleet["s3"]
    from wedbackup_dagster.definitions import defs

    instance, victim = fleet["instance"], fleet["weddings"][2]
    engine = fleet["engine"]
    backup, vault_copy = _copy(fleet, victim, "vault")
    # Replicas absent, so a blocked upload is visible: delete the S3 object and its catalogue row.
    _, s3_copy = _copy(fleet, victim, "s3")
    s3_client.delete_object(Bucket=engine.settings.s3.bucket, Key=s3_copy.object_key)
    with fleet["catalogue"].connect() as conn:
        conn.execute("DELETE FROM wedbackup.copies WHERE backup_id = %s AND provider = 's3'", (backup.id,))
    path = engine.vault.path_for(victim, backup.archive_sha256)
    data = bytearray(path.read_bytes())
    data[len(data) - 40] ^= 0x80
    path.write_bytes(bytes(data))

    # The replicas of an existing archive, behind the blocking integrity check (no new dump, which would
    # seal a fresh, healthy archive).
    integrity = dg.AssetCheckKey(ENCRYPTED_ARCHIVE, "archive_integrity")
    job = defs.resolve_job_def("backup_weddings").get_subset(
        asset_selection={S3_REPLICA, GCS_REPLICA, AZURE_REPLICA}, asset_check_selection={integrity})
    result = job.execute_in_process(instance=instance, partition_key=victim, raise_on_error=False)
    assert not result.success
    got = evaluations(instance, result.run_id)
    ev = got[("encrypted_archive", "archive_integrity", victim)]
    assert not ev.passed and f"vault:{victim}/" in ev.description
    started = {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
    assert "encrypted_archive_archive_integrity" in started
    assert "replicate_to_providers" not in started  # the upload step (every provider) never began
    assert "s3" not in {c.provider for c in fleet["catalogue"].copies(backup.id)}  # nothing uploaded

    # The healthy weddings' archives still pass.
    got = run_checks(instance, [fleet["weddings"][11]])
    assert got[("encrypted_archive", "archive_integrity", fleet["weddings"][11])].passed


def test_provider_down_fails_its_checksum_check(fleet, monkeypatch):
    instance, other = fleet["instance"], fleet["weddings"][4]
    good = fleet["engine"].settings.azure.connection_string
    down = good.replace(f"127.0.0.1:{good.split('127.0.0.1:')[1].split('/')[0]}", f"127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("WEDBACKUP_AZURE_CONNECTION_STRING", down)
    got = run_checks(instance, [other])
    ev = got[("azure_replica", "replica_checksum", other)]
    assert not ev.passed and "azure" in ev.description
    assert "AccountKey" not in ev.description
    assert got[("s3_replica", "replica_checksum", other)].passed


def test_backup_older_than_the_rpo_fails_freshness_warn_and_error_in_the_critical_week(fleet):
    instance, (stale, critical, fresh) = fleet["instance"], fleet["weddings"][5:8]
    with fleet["catalogue"].connect() as conn:
        conn.execute("UPDATE wedbackup.backups SET snapshot_time = snapshot_time - interval '3 days' "
                     "WHERE partition = ANY(%s)", ([stale, critical],))
        conn.execute("INSERT INTO wedbackup.partitions (partition, wedding_date) VALUES (%s, %s) "
                     "ON CONFLICT (partition) DO UPDATE SET wedding_date = EXCLUDED.wedding_date",
                     (critical, dt.date.today() + dt.timedelta(days=1)))  # critical: within ±2 days
    got = run_checks(instance, [stale, critical, fresh])
    a, b, c = (got[("verified_restore", "freshness", w)] for w in (stale, critical, fresh))
    assert not a.passed and a.severity == dg.AssetCheckSeverity.WARN and "beyond the RPO" in a.description
    assert not b.passed and b.severity == dg.AssetCheckSeverity.ERROR and b.metadata["tier"].value == "critical"
    assert c.passed


def test_wedding_with_only_two_copies_fails_three_two_one(fleet):
    from wedbackup_dagster.definitions import defs

    instance, victim, healthy = fleet["instance"], fleet["weddings"][8], fleet["weddings"][7]
    # A new backup that only reached Azure: vault + one replica.
    job = defs.resolve_job_def("backup_weddings")
    result = job.execute_in_process(instance=instance, partition_key=victim, raise_on_error=False,
                                    asset_selection=[DB_DUMP, ENCRYPTED_ARCHIVE, AZURE_REPLICA])
    assert result.success
    got = run_checks(instance, [victim, healthy])
    ev = got[("verified_restore", "three_two_one", victim)]
    assert not ev.passed and "only 2 verified copies" in ev.description
    assert {r.data["where"] for r in ev.metadata["copies"].records} == {"vault", "azure"}
    assert got[("verified_restore", "three_two_one", healthy)].passed
    # The copies that never happened are named by their providers' checks too.
    for provider in ("s3", "gcs"):
        ev = got[(f"{provider}_replica", "replica_checksum", victim)]
        assert not ev.passed and f"no {provider} copy of the newest backup" in ev.description
    assert got[("azure_replica", "replica_checksum", victim)].passed


def test_restore_not_matching_the_manifest_fails_for_that_wedding_only(fleet):
    instance, victim, healthy = fleet["instance"], fleet["weddings"][9], fleet["weddings"][10]
    with fleet["catalogue"].connect() as conn:
        conn.execute("UPDATE wedbackup.backups SET manifest = jsonb_set(manifest, '{tables,0,rows}', "
                     "to_jsonb((manifest #>> '{tables,0,rows}')::int + 1)) "
                     "WHERE id = (SELECT id FROM wedbackup.backups WHERE partition = %s "
                     "ORDER BY snapshot_time DESC LIMIT 1)", (victim,))
    results = run_job_for("reverify_weddings", [victim, healthy], instance=instance)
    assert len(results) == 1 and not results[0].success
    assert any(f"wedding {victim}" in f for f in results[0].failures) and not any(
        f"wedding {healthy}:" in f for f in results[0].failures)
    got = run_checks(instance, [victim, healthy])
    ev = got[("verified_restore", "restore_matches_manifest", victim)]
    assert not ev.passed and "failed" in ev.description
    assert got[("verified_restore", "restore_matches_manifest", healthy)].passed
