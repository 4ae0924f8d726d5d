"""Inventory reconciliation: pandas over tiny hand-made listings (every finding kind, totals and cost),
then on the real stack against a catalogue and three providers."""
from __future__ import annotations

import socket

import pandas as pd
import pytest

from wedbackup_dagster.core.catalogue import inventory as inv
from wedbackup_dagster.core.errors import ConfigError
from wedbackup_dagster.core.storage.replicas import AzureReplica, GCSReplica, S3Replica
from wedbackup_dagster.core.storage.providers import ensure_targets

SHA = ["a" * 64, "b" * 64, "c" * 64, "d" * 64]


def _objects(rows):
    return pd.DataFrame(rows, columns=inv.OBJECT_COLUMNS)


def _copies(rows):
    return pd.DataFrame(rows, columns=inv.COPY_COLUMNS)


def test_reconcile_names_each_kind_of_finding_and_prices_the_bytes():
    objects = _objects([
        ("s3", "p/a", 100, "STANDARD", "1", SHA[0]),         # matches
        ("s3", "p/b", 99, "STANDARD", "2", SHA[1]),          # size differs
        ("s3", "p/c", 50, "STANDARD", "3", SHA[2]),          # orphan
        ("s3", "p/_canary/x", 5, "STANDARD", None, None),    # not an archive: counted, not an orphan
        ("gcs", "p/a", 100, "NEARLINE", "1", SHA[0]),        # stored checksum differs
    ])
    copies = _copies([
        ("s3", "p/a", 100, "s3sum", "STANDARD", "1", SHA[0]),
        ("s3", "p/b", 100, "s3sum", "STANDARD", "2", SHA[1]),
        ("s3", "p/d", 100, "s3sum", "STANDARD", "4", SHA[3]),   # missing
        ("gcs", "p/a", 100, "gcssum", "NEARLINE", "1", SHA[0]),
        ("azure", "p/a", 100, "md5", "Cool", "1", SHA[0]),      # provider could not be listed
    ])
    heads = {("s3", "p/a"): "s3sum", ("gcs", "p/a"): "other"}
    found = inv.reconcile(objects, copies, unreachable={"azure": "provider azure: list failed"},
                          prices={("s3", "STANDARD"): 0.02}, head_checksum=lambda p, k: heads[(p, k)])
    kinds = {(r.provider, r.key): r.finding for r in found.findings.itertuples()}
    assert kinds == {("s3", "p/b"): inv.SIZE_MISMATCH, ("s3", "p/c"): inv.ORPHAN, ("s3", "p/d"): inv.MISSING,
                     ("gcs", "p/a"): inv.CHECKSUM_MISMATCH, ("azure", "p/a"): inv.UNREACHABLE}
    assert found.counts() == {inv.MISSING: 1, inv.SIZE_MISMATCH: 1, inv.CHECKSUM_MISMATCH: 1, inv.UNREACHABLE: 1,
                              inv.ORPHAN: 1}
    totals = {(r.provider, r.storage_class): r for r in found.totals.itertuples()}
    assert totals[("s3", "STANDARD")].objects == 4 and totals[("s3", "STANDARD")].bytes == 254
    assert totals[("s3", "STANDARD")].monthly_cost_usd == pytest.approx(254 / 1e9 * 0.02)
    assert pd.isna(totals[("gcs", "NEARLINE")].monthly_cost_usd)  # no price given: unknown, not zero
    md = found.summary_markdown()
    assert "orphan" in md and "azure" in md and "gcs/NEARLINE" in md


def test_clean_reconciliation_has_no_findings():
    objects = _objects([("s3", "p/a", 100, "STANDARD", "1", SHA[0])])
    copies = _copies([("s3", "p/a", 100, "sum", "STANDARD", "1", SHA[0])])
    found = inv.reconcile(objects, copies, head_checksum=lambda p, k: "sum")
    assert found.findings.empty and found.monthly_cost == pytest.approx(100 / 1e9 * 0.023)
    assert "no orphans" in found.summary_markdown()
    empty = inv.reconcile(_objects([]), _copies([]))
    assert empty.rows.empty and empty.monthly_cost == 0 and not any(empty.counts().values())


def test_prices_come_from_the_environment_and_bad_entries_name_the_variable():
    prices = inv.prices_from_env({inv.PRICES_VARIABLE: "s3:STANDARD=0.05, wasabi:default=0.0069"})
    assert prices[("s3", "STANDARD")] == 0.05 and prices[("wasabi", "default")] == 0.0069
    assert prices[("azure", "Cool")] == inv.DEFAULT_PRICES[("azure", "Cool")]
    for bad in ("s3=0.1", "s3:STANDARD=cheap", "s3:STANDARD=-1"):
        with pytest.raises(ConfigError, match=inv.PRICES_VARIABLE):
            inv.prices_from_env({inv.PRICES_VARIABLE: bad})


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_inventory_on_the_real_stack(demo_env, s3_bucket, monkeypatch, s3_client):
    from wedbackup_dagster.core.config import Settings
    from wedbackup_dagster.core.engine import Engine
    from wedbackup_dagster.core.storage.replicas.azure import azure_service_from
    from wedbackup_dagster.core.storage.replicas.gcs import gcs_client_from
    from wedbackup_dagster.core.storage.replicas.s3 import s3_client_from

    demo_env(weddings=3, seed=3, document_bytes=256)
    engine = Engine.from_env()
    settings = engine.settings
    ensure_targets(settings)

    def replicas(s: Settings):
        return {"s3": S3Replica(s3_client_from(s.s3), s.s3), "gcs": GCSReplica(gcs_client_from(s.gcs), s.gcs),
                "azure": AzureReplica(azure_service_from(s.azure), s.azure)}

    reps = replicas(settings)
    with engine.snapshot_session() as session:
        for wedding in ("1", "2", "3"):
            engine.back_up(wedding, session)
            for replica in reps.values():
                engine.replicate(wedding, replica)
    found = inv.take_inventory(engine.catalogue, reps, engine.vault)
    assert found.findings.empty, found.findings
    assert len(found.rows) == 12
    assert set(found.totals["provider"]) == {"vault", "s3", "gcs", "azure"}

    # Faults: one GCS copy deleted, an orphan on S3, one Azure copy rewritten with a flipped byte.
    cat = engine.catalogue
    gone = next(c for c in cat.copies(cat.require_latest_backup("1").id) if c.provider == "gcs")
    reps["gcs"].delete(gone.object_key)
    orphan = reps["s3"].object_key("2", "e" * 64)
    s3_client.put_object(Bucket=s3_bucket, Key=orphan, Body=b"x" * 10)
    flipped = next(c for c in cat.copies(cat.require_latest_backup("3").id) if c.provider == "azure")
    blob = reps["azure"].container.get_blob_client(flipped.object_key)
    data = bytearray(blob.download_blob().readall())
    data[0] ^= 1
    blob.upload_blob(bytes(data), overwrite=True)
    found = inv.take_inventory(cat, reps, engine.vault)
    kinds = {(r.provider, r.key): r.finding for r in found.findings.itertuples()}
    assert kinds == {("gcs", gone.object_key): inv.MISSING, ("s3", orphan): inv.ORPHAN,
                     ("azure", flipped.object_key): inv.CHECKSUM_MISMATCH}

    # A provider that is down: its copies are reported unreachable, the others still reconciled.
    monkeypatch.setenv("WEDBACKUP_S3_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    found = inv.take_inventory(cat, replicas(Settings.from_env()), engine.vault)
    assert "s3" in found.unreachable
    assert (found.findings[found.findings["provider"] == "s3"]["finding"] == inv.UNREACHABLE).sum() == 3


def test_media_is_counted_and_priced_on_its_own():
    pack, snap = "e" * 64, "f" * 64
    objects = _objects([
        ("s3", "p/1/" + SHA[0] + ".wbk", 100, "STANDARD", "1", SHA[0]),
        ("s3", f"p/media/weddings/1/packs/{pack}.pack", 1000, "STANDARD", None, None),
        ("s3", f"p/media/platform/snapshots/{snap}.wbk", 10, "STANDARD", None, None),
        ("s3", "p/media/weddings/1/packs/not-a-pack.txt", 7, "STANDARD", None, None),  # not ours: rows' side
        ("azure", f"p/media/weddings/1/packs/{pack}.pack", 1000, "Cool", None, None),
    ])
    copies = _copies([("s3", "p/1/" + SHA[0] + ".wbk", 100, "sum", "STANDARD", "1", SHA[0])])
    found = inv.reconcile(objects, copies, prices={("s3", "STANDARD"): 0.02, ("azure", "Cool"): 0.01})
    media = {(r.provider, r.storage_class): r for r in found.media_totals.itertuples()}
    assert (media[("s3", "STANDARD")].objects, media[("s3", "STANDARD")].bytes) == (2, 1010)
    assert media[("azure", "Cool")].monthly_cost_usd == pytest.approx(1000 / 1e9 * 0.01)
    totals = {(r.provider, r.storage_class): r for r in found.totals.itertuples()}
    assert totals[("s3", "STANDARD")].bytes == 1117  # media is part of the totals too
    assert "wedding media at the providers: 3 objects" in found.summary_markdown()
    assert found.counts()[inv.ORPHAN] == 0
