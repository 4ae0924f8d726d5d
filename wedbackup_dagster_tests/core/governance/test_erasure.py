"""GDPR erasure on the real stack: after erase_wedding no copy of the wedding is left on any provider or
in the vault (every S3 version and stray objects included), its keys are destroyed, the erasure is
recorded, re-running completes it, other weddings are untouched, a copy under Object Lock stays but no
key the catalogue holds opens it, a platform restore re-applies recorded erasures, and no DR pack naming
the wedding is left (index and the segments holding it), the packs not naming it untouched."""
from __future__ import annotations

import io

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from wedbackup_dagster.core.formats.archive import open_archive
from wedbackup_dagster.core.errors import ArchiveError, CryptoKeyError, WedbackupError
from wedbackup_dagster.core.governance.erasure import erase_wedding, erasure_preview, reapply_erasures
from wedbackup_dagster.core.postgres.restore_wedding import RecoveryRequest, recover
from wedbackup_dagster.core.keys.keyring import SecretKey
from wedbackup_dagster_tests.governance_fleet import back_up, make_governance_fleet  # noqa: F401 - fixture


def stored(fleet: dict, partition: str) -> dict[str, list]:
    """Every object (S3: every version and delete marker) under the wedding's folder, per provider."""
    r = fleet["replicas"]
    s3 = r["s3"]
    versions = s3.client.list_object_versions(Bucket=s3.target.bucket, Prefix=f"{s3.prefix}/weddings/{partition}/")
    return {"s3": [v["VersionId"] for v in versions.get("Versions", []) + versions.get("DeleteMarkers", [])],
            "gcs": [o.key for o in r["gcs"].list(f"weddings/{partition}/")],
            "azure": [o.key for o in r["azure"].list(f"weddings/{partition}/")],
            "vault": list(fleet["engine"].vault.entries(partition))
            if (fleet["engine"].vault.root / partition).is_dir() else []}


def test_erasure_destroys_keys_and_every_copy_and_version(make_governance_fleet):
    fleet = make_governance_fleet()
    cat, engine, replicas = fleet["catalogue"], fleet["engine"], fleet["replicas"]
    first, _ = back_up(fleet, "2"), back_up(fleet, "2")
    other = back_up(fleet, "3")
    # A second S3 version of one archive, and a stray object the catalogue does not know of (GCS, Azure).
    row = next(r for r in cat.backups_with_copies("2") if r["id"] == first)
    s3_key = next(c["object_key"] for c in row["copies"] if c["provider"] == "s3")
    s3 = replicas["s3"]
    body = s3.client.get_object(Bucket=s3.target.bucket, Key=s3_key)["Body"].read()
    s3.client.put_object(Bucket=s3.target.bucket, Key=s3_key, Body=body)
    assert len(s3.versions(s3_key)) == 2
    stray = f"{'f' * 64}.wbk"
    replicas["gcs"].bucket.blob(f"{replicas['gcs'].prefix}/weddings/2/{stray}").upload_from_string(b"stray")
    replicas["azure"].container.upload_blob(f"{replicas['azure'].prefix}/weddings/2/{stray}", b"stray")
    # A key whose newest entry is a delete marker over an old version: invisible to a plain listing.
    hidden = f"{s3.prefix}/weddings/2/{'e' * 64}.wbk"
    s3.client.put_object(Bucket=s3.target.bucket, Key=hidden, Body=b"old")
    s3.client.delete_object(Bucket=s3.target.bucket, Key=hidden)
    assert not [o for o in s3.list("weddings/2/") if o.key == hidden]
    before = stored(fleet, "2")
    assert len(before["s3"]) == 5 and len(before["gcs"]) == len(before["azure"]) == 3 and len(before["vault"]) == 2

    preview = erasure_preview(cat, "2")
    assert preview["backups"] == 2 and preview["live_keys"] == 1
    assert preview["copies"] == {"vault": 2, "s3": 2, "gcs": 2, "azure": 2}

    report = erase_wedding(cat, engine.vault, replicas, "2", requested_by="dpo@example.com")
    assert report.complete and report.keys_shredded == 1 and report.locked == []
    assert stored(fleet, "2") == {"s3": [], "gcs": [], "azure": [], "vault": []}
    assert sorted(report.stray_deleted) == sorted([f"s3:{hidden}", f"gcs:{replicas['gcs'].prefix}/weddings/2/{stray}",
                                                   f"azure:{replicas['azure'].prefix}/weddings/2/{stray}"])
    assert cat.backups_with_copies("2") == []
    with cat.connect() as conn:
        keys = conn.execute("SELECT wrapped, shredded_at FROM wedbackup.wedding_keys WHERE partition = '2'").fetchall()
        partition = conn.execute("SELECT removed_at FROM wedbackup.partitions WHERE partition = '2'").fetchone()
        audit = [r["action"] for r in conn.execute("SELECT action FROM wedbackup.audit WHERE partition = '2' "
                                                   "ORDER BY id").fetchall()]
    assert keys and all(k["wrapped"] is None and k["shredded_at"] is not None for k in keys)
    assert partition["removed_at"] is not None
    assert audit[-2:] == ["key-shredded", "erasure"]
    [erasure] = cat.erasures()
    assert (erasure["partition"], erasure["wedding_id"], erasure["requested_by"]) == ("2", "2", "dpo@example.com")
    assert erasure["copies_deleted"] == 8 + 3 and erasure["copies_locked"] == 0 and erasure["completed_at"]

    # Idempotent: a second run finds nothing more to do and changes nothing recorded.
    again = erase_wedding(cat, engine.vault, replicas, "2", requested_by="someone else")
    assert again.complete and again.keys_shredded == 0 and again.copies_deleted == 0
    assert cat.erasures()[0]["requested_by"] == "dpo@example.com"
    assert cat.erasures()[0]["copies_deleted"] == 11

    # The erased wedding is never backed up again; the other wedding is untouched and still restores.
    with engine.snapshot_session() as session, pytest.raises(CryptoKeyError, match="erased"):
        engine.back_up("2", session)
    assert {c.provider for c in cat.copies(other)} == {"vault", "s3", "gcs", "azure"}
    engine.verify("3", replicas, provider="s3")
    with pytest.raises(WedbackupError, match="platform"):
        erase_wedding(cat, engine.vault, replicas, "platform", requested_by="x")


def test_erasure_after_a_provider_outage_is_completed_by_a_rerun(make_governance_fleet):
    fleet = make_governance_fleet()
    cat, engine, replicas = fleet["catalogue"], fleet["engine"], fleet["replicas"]
    back_up(fleet, "1")
    reachable = {p: r for p, r in replicas.items() if p != "azure"}  # azure "down": not reachable here
    partial = erase_wedding(cat, engine.vault, reachable, "1", requested_by="dpo")
    assert not partial.complete and "azure" in partial.deletions[0].failed
    assert cat.erasures()[0]["completed_at"] is None
    assert stored(fleet, "1")["azure"] and not stored(fleet, "1")["s3"]
    done = erase_wedding(cat, engine.vault, replicas, "1", requested_by="dpo")
    assert done.complete and stored(fleet, "1") == {"s3": [], "gcs": [], "azure": [], "vault": []}
    assert cat.erasures()[0]["completed_at"] is not None and cat.erasures()[0]["copies_deleted"] == 4


def test_a_locked_copy_stays_but_no_key_the_catalogue_holds_opens_it(make_governance_fleet):
    fleet = make_governance_fleet(object_lock="governance")
    cat, engine, replicas = fleet["catalogue"], fleet["engine"], fleet["replicas"]
    backup_id = back_up(fleet, "4")
    back_up(fleet, "1")
    [s3_copy] = [c for c in cat.copies(backup_id) if c.provider == "s3"]
    s3 = replicas["s3"]
    head = s3.client.head_object(Bucket=s3.target.bucket, Key=s3_copy.object_key)
    assert head["ObjectLockMode"] == "GOVERNANCE"
    row = next(r for r in cat.backups_with_copies("4"))
    locked_until = next(c["locked_until"] for c in row["copies"] if c["provider"] == "s3")
    assert locked_until is not None  # recorded at upload (copies.locked_until)

    from wedbackup_dagster.core.keys.backup import _provider_key_backups, back_up_key_store

    older = back_up_key_store(engine.settings, cat, replicas, engine.keyring)
    older_key = f"{s3.prefix}/keys/{older.sha256}.wbk"
    assert "ObjectLockMode" not in s3.client.head_object(Bucket=s3.target.bucket, Key=older_key)

    report = erase_wedding(cat, engine.vault, replicas, "4", requested_by="dpo", settings=engine.settings)
    assert report.complete  # a lock is reported, not a failure
    # Key-store backups are never locked, so the one holding wedding 4's key is gone, every version.
    assert report.key_backup and report.key_backup != older.sha256
    assert [sha for sha, _ in _provider_key_backups(s3)] == [report.key_backup]
    versions = s3.client.list_object_versions(Bucket=s3.target.bucket, Prefix=older_key)
    assert not versions.get("Versions") and not versions.get("DeleteMarkers")
    [locked] = report.locked
    assert locked["provider"] == "s3" and locked["locked_until"] is not None
    left = stored(fleet, "4")
    assert left["gcs"] == left["azure"] == left["vault"] == [] and len(left["s3"]) == 1
    [erasure] = cat.erasures()
    assert erasure["copies_locked"] == 1
    assert erasure["detail"]["locked"][0]["note"] == "unreadable because the key is destroyed"
    assert [c.provider for c in cat.copies(backup_id)] == ["s3"]  # the catalogue still knows it is there

    # Retention finishes the erasure once the lock ends; until then it reports the copy as locked again.
    from wedbackup_dagster.core.policy.backup_policy import Policy
    from wedbackup_dagster.core.governance.retention import ERASED, prune

    swept = prune(cat, engine.vault, replicas, Policy())
    [leftover] = [d for d in swept.deletions if d.partition == "4"]
    assert leftover.reason == ERASED and set(leftover.locked) == {"s3"} and not leftover.failed
    assert all(d.partition == "4" for d in swept.deletions)  # wedding 1's only backup is its newest

    data = s3.client.get_object(Bucket=s3.target.bucket, Key=s3_copy.object_key)["Body"].read()
    with pytest.raises(ArchiveError):
        b"".join(open_archive(io.BytesIO(data), name="locked", resolve_key=engine.resolve_key))
    # Nor does any key the catalogue still holds, whatever id it is presented under.
    with cat.connect() as conn:
        live = [r["key_id"] for r in conn.execute("SELECT key_id FROM wedbackup.wedding_keys "
                                                  "WHERE wrapped IS NOT NULL").fetchall()]
    assert live
    for key_id in live:
        material = engine.resolve_key(key_id).material
        with pytest.raises(ArchiveError):
            b"".join(open_archive(io.BytesIO(data), name="locked",
                                  resolve_key=lambda wanted, m=material: SecretKey(wanted, m)))


def test_a_platform_restore_reapplies_recorded_erasures(make_governance_fleet, make_database):
    fleet = make_governance_fleet()
    cat, engine, replicas = fleet["catalogue"], fleet["engine"], fleet["replicas"]
    back_up(fleet, "platform")
    erase_wedding(cat, engine.vault, replicas, "3", requested_by="dpo")
    with psycopg.connect(fleet["source"]) as conn:
        named = conn.execute("SELECT count(*) FROM platform_audit WHERE entity = 'wedding' AND entity_id = 3"
                             ).fetchone()[0]
        others = conn.execute("SELECT count(*) FROM platform_audit WHERE NOT (entity = 'wedding' AND entity_id = 3)"
                              ).fetchone()[0]
    assert named >= 1  # the platform archive names the erased wedding

    target = make_database()
    engine.restore_to("platform", target, replicas)
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM platform_audit WHERE entity = 'wedding' AND entity_id = 3"
                            ).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM platform_audit").fetchone()[0] == others

    # The same through recovery.recover, the path of `wedbackup restore --platform` and restore_wedding.
    target = make_database()
    said: list[str] = []
    recover(engine, RecoveryRequest(partition="platform", mode="target", include_unverified=True), replicas,
            target_dsn=target, progress=said.append)
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM platform_audit WHERE entity = 'wedding' AND entity_id = 3"
                            ).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM platform_audit").fetchone()[0] == others
    assert any(line.startswith("re-applied a recorded erasure: public.platform_audit") for line in said)

    # A full copy of the source (every wedding's rows): the erased wedding's tenant rows all go too.
    full = make_database(template=conninfo_to_dict(fleet["source"])["dbname"])
    lines = reapply_erasures(full, cat)
    with psycopg.connect(full) as conn, psycopg.connect(fleet["source"]) as src:
        assert conn.execute("SELECT count(*) FROM weddings WHERE id = 3").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM guests WHERE wedding_id = 3").fetchone()[0] == 0
        query = "SELECT count(*) FROM guests WHERE wedding_id <> 3"
        assert conn.execute(query).fetchone() == src.execute(query).fetchone()
    assert any(line.startswith("public.guests:") for line in lines)
    assert any(line.startswith("public.weddings: 1 row") for line in lines)


def pack_indexes(replica) -> dict[str, dict[str, set[str]]]:
    """Every DR pack index at the provider, read as stored (JSON, not through packs' reader) -> its segment keys
    -> the weddings each holds."""
    import json

    from wedbackup_dagster.core.disaster import packs

    out = {}
    for listed in replica.list(f"{packs.PACK_DIR}/{packs.INDEX_DIR}/"):
        body = io.BytesIO()
        replica.download(listed.key, body)
        out[listed.key] = {s["key"]: {e[0] for e in s["entries"]} for s in json.loads(body.getvalue())["segments"]}
    return out


def named(indexes: dict[str, dict[str, set[str]]]) -> dict[str, set[str]]:
    """index key -> every wedding the pack holds."""
    return {key: set().union(*segments.values()) for key, segments in indexes.items()}


def test_erasure_deletes_every_dr_pack_naming_the_wedding_and_its_segments(make_governance_fleet):
    """Two packs at each provider, the older naming wedding 2, the newer not (2 was unverified when it was built):
    the erasure deletes the older pack's index and the segments holding wedding 2's archive, leaves the newer
    pack whole, records what it deleted apart from the copies, and a provider that cannot be reached makes it
    incomplete, naming it, until a re-run finishes it."""
    import dataclasses

    from wedbackup_dagster.core.disaster import pack_build, packs
    from wedbackup_dagster.core.storage.providers import replica_for

    fleet = make_governance_fleet()
    cat, engine, replicas = fleet["catalogue"], fleet["engine"], fleet["replicas"]
    for partition in ("1", "2", "3"):
        back_up(fleet, partition)
        engine.verify(partition, replicas, provider="s3")
    first = pack_build.build_pack(engine, replicas)
    assert first.ok and first.weddings == 3
    with cat.connect() as conn:  # wedding 2 unverified: the next pack leaves it to its own objects
        conn.execute("DELETE FROM wedbackup.restores WHERE backup_id = %s", (cat.latest_backup("2").id,))
        conn.execute("UPDATE wedbackup.copies SET verified_at = NULL WHERE backup_id = %s",
                     (cat.latest_backup("2").id,))
    second = pack_build.build_pack(engine, replicas)
    assert second.ok and second.weddings == 2 and set(second.left_out) >= {"2"}
    holding: dict[str, set[str]] = {}  # provider -> the first pack's segments holding wedding 2
    for provider, replica in replicas.items():
        indexes = pack_indexes(replica)
        assert named(indexes) == {first.published[provider]: {"1", "2", "3"}, second.published[provider]: {"1", "3"}}
        holding[provider] = {k for k, weddings in indexes[first.published[provider]].items() if "2" in weddings}
        assert holding[provider]

    # Azure unreachable (a container that is not there): its packs stay, the erasure is incomplete and says why.
    lost = dataclasses.replace(engine.settings, azure=dataclasses.replace(engine.settings.azure,
                                                                          container="no-such-container"))
    partial = erase_wedding(cat, engine.vault, {**replicas, "azure": replica_for("azure", lost)}, "2",
                            requested_by="dpo")
    assert not partial.complete
    assert any(f.startswith("azure: DR packs naming the wedding were not all deleted: ") for f in partial.failed)
    assert first.published["azure"] in pack_indexes(replicas["azure"])
    assert sorted(partial.dr_pack_deleted) == sorted([f"{p}:{first.published[p]}" for p in ("s3", "gcs")]
                                                     + [f"{p}:{k}" for p in ("s3", "gcs") for k in holding[p]])
    for provider in ("s3", "gcs"):
        assert named(pack_indexes(replicas[provider])) == {second.published[provider]: {"1", "3"}}

    done = erase_wedding(cat, engine.vault, replicas, "2", requested_by="dpo")
    assert done.complete
    assert sorted(done.dr_pack_deleted) == sorted([f"azure:{first.published['azure']}"]
                                                  + [f"azure:{k}" for k in holding["azure"]])
    for provider, replica in replicas.items():
        # No pack index names wedding 2; the segments that held it are gone; the newer pack is whole and used.
        assert named(pack_indexes(replica)) == {second.published[provider]: {"1", "3"}}
        left = {o.key for o in replica.list(f"{packs.PACK_DIR}/{packs.SEGMENT_DIR}/")}
        assert not holding[provider] & left
        pack, notes = packs.newest_pack(replica)
        assert notes == [] and pack.index_key == second.published[provider]
        assert {s.key for s in pack.segments} <= left
    # Pack objects are speed copies, not copies: the copy count is the archive's four, they are listed apart.
    [erasure] = cat.erasures()
    assert erasure["copies_deleted"] == 4 and erasure["detail"]["dr_pack_deleted"]
    again = erase_wedding(cat, engine.vault, replicas, "2", requested_by="dpo")
    assert again.complete and again.dr_pack_deleted == []
