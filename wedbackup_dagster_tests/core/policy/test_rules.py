"""The rules as plain functions: 3-2-1 counting only verified copies, freshness by tier, the sealed-archive
read-through, and the replica comparison."""
from __future__ import annotations

import datetime as dt
import hashlib
from types import SimpleNamespace

import pytest

from wedbackup_dagster.core.policy import rules
from wedbackup_dagster.core.formats.archive import seal_bytes
from wedbackup_dagster.core.errors import ArchiveError
from wedbackup_dagster.core.keys.keyring import SecretKey

NOW = dt.datetime(2026, 6, 1, 12, tzinfo=dt.timezone.utc)
KEY = SecretKey("42.k1", bytes(range(32)))


def copy(provider: str, media: str = "object-storage", offsite: bool = True, *, present: bool = True,
         confirmed: dt.datetime | None = NOW, restored: dt.datetime | None = None) -> rules.CopyEvidence:
    return rules.CopyEvidence(provider, f"{provider}://x", media, offsite, 10, confirmed, restored, present)


HEALTHY = [copy("vault", "disk", False), copy("s3"), copy("gcs"), copy("azure")]


def test_three_two_one_passes_with_vault_and_replicas():
    verdict = rules.three_two_one(HEALTHY)
    assert verdict.passed and verdict.verified_copies == 4 and verdict.media_kinds == ("disk", "object-storage")
    assert verdict.offsite_copies == 3 and verdict.has_vault


@pytest.mark.parametrize("copies, problem", [
    ([copy("vault", "disk", False), copy("s3")], "only 2 verified copies"),
    ([copy("s3"), copy("gcs"), copy("azure")], "no verified vault copy"),
    ([copy("vault", "object-storage", False), copy("s3"), copy("gcs")], "only 1 kind(s) of media"),
    ([copy("vault", "disk", False), copy("nas", "tape", False), copy("usb", "tape", False)], "only 0 offsite"),
    ([copy("vault", "disk", False, present=False), copy("s3"), copy("gcs"), copy("azure")], "no verified vault"),
    ([copy("vault", "disk", False), copy("s3"), copy("gcs", confirmed=None)], "not verified: gcs"),
])
def test_three_two_one_fails_naming_what_is_short(copies, problem):
    verdict = rules.three_two_one(copies)
    assert not verdict.passed and problem in verdict.summary


def test_a_restore_alone_verifies_a_copy_and_the_latest_evidence_is_reported():
    later = NOW + dt.timedelta(hours=2)
    c = copy("s3", confirmed=None, restored=later)
    assert c.verified and c.verified_when == later
    assert copy("s3", restored=later).verified_when == later
    assert copy("s3", present=False).verified_when is None


@pytest.mark.parametrize("days, tier", [(-1, "past"), (0, "critical"), (7, "critical"), (8, "high"),
                                        (30, "high"), (31, "normal")])
def test_tiers_by_days_to_the_wedding(days, tier):
    assert rules.tier_from_date(NOW.date() + dt.timedelta(days=days), NOW.date()) == tier
    assert rules.tier_from_date(None, NOW.date()) == "normal"


def test_freshness_within_and_beyond_the_rpo():
    rpo = dt.timedelta(hours=24)
    ok = rules.freshness("7", NOW - dt.timedelta(hours=23), now=NOW, rpo=rpo, tier="normal")
    late = rules.freshness("7", NOW - dt.timedelta(hours=25), now=NOW, rpo=rpo, tier="critical")
    never = rules.freshness("7", None, now=NOW, rpo=rpo, tier="high")
    assert ok.passed and not late.passed and late.critical and not never.passed
    assert "beyond the RPO of 24.0 h" in late.summary and "no verified backup" in never.summary


def test_freshness_of_uses_the_given_rpo_function_and_catalogue_dates():
    evidence = {"1": rules.WeddingEvidence("1", newest_verified=NOW - dt.timedelta(hours=5),
                                           wedding_date=NOW.date() + dt.timedelta(days=2)),
                "2": rules.WeddingEvidence("2", newest_verified=NOW - dt.timedelta(hours=5))}
    out = rules.freshness_of(evidence, now=NOW, rpo_for_partition=lambda p: dt.timedelta(hours=4 if p == "1" else 6))
    assert not out["1"].passed and out["1"].tier == "critical"
    assert out["2"].passed and out["2"].tier == "normal"
    out = rules.freshness_of(evidence, now=NOW, tier_for_partition=lambda p: "past")
    assert all(f.passed and f.tier == "past" for f in out.values())


def _sealed(tmp_path, data: bytes = b"wedding 42 " * 20_000):
    sealed, stats = seal_bytes(data, wedding_key=KEY, chunk_size=64 * 1024)
    path = tmp_path / "a.wbk"
    path.write_bytes(sealed)
    return path, sealed, len(data)


def test_sealed_archive_reads_through_with_its_key(tmp_path):
    path, sealed, plain = _sealed(tmp_path)
    report = rules.verify_sealed_archive(path, name="vault:42/x", expected_sha256=hashlib.sha256(sealed).hexdigest(),
                                         expected_size=len(sealed), resolve_key=lambda k: KEY)
    assert report.plaintext_bytes == plain and report.chunks >= 1 and report.key_id == "42.k1"


@pytest.mark.parametrize("fault", ["flip", "truncate", "wrong_sha", "missing"])
def test_sealed_archive_faults_raise_naming_the_archive(tmp_path, fault):
    path, sealed, _ = _sealed(tmp_path)
    sha = hashlib.sha256(sealed).hexdigest()
    if fault == "flip":
        data = bytearray(sealed)
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    elif fault == "truncate":
        path.write_bytes(sealed[:-100])
    elif fault == "wrong_sha":
        sha = "0" * 64
    else:
        path.unlink()
    with pytest.raises(ArchiveError, match="vault:42/x"):
        rules.verify_sealed_archive(path, name="vault:42/x", expected_sha256=sha, expected_size=len(sealed),
                                    resolve_key=lambda k: KEY)


def test_compare_replica():
    recorded = SimpleNamespace(object_key="p/weddings/1/a.wbk", checksum="abc", size=10)
    same = SimpleNamespace(provider_checksum="abc", size=10, sha256="f" * 64)
    assert rules.compare_replica("s3", "1", "f" * 64, recorded, same).passed
    r = rules.compare_replica("s3", "1", "f" * 64, recorded, SimpleNamespace(provider_checksum="abd", size=11,
                                                                            sha256="f" * 64))
    assert not r.passed and "provider checksum abd != recorded abc" in r.problem and "size 11" in r.problem
    assert "missing" in rules.compare_replica("gcs", "1", "f" * 64, recorded, None).problem
    assert "no azure copy" in rules.compare_replica("azure", "1", "f" * 64, None, None).problem
