"""Every provider's uploads at once (Engine.replicate_to_all) on the real stand-ins: each archive is read and
hashed once for S3, GCS and Azure, the three providers upload at the same time, each still confirms its own
checksum, a damaged vault file goes to none of them, and a provider that is down fails only its own uploads."""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import socket
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import google_crc32c
import pytest

from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.errors import ArchiveError, WedbackupError
from wedbackup_dagster.core.outcomes import ReplicaOutcome
from wedbackup_dagster.core.storage.providers import PROVIDERS, replica_for
from wedbackup_dagster.core.storage.replicas import base
from wedbackup_dagster_tests.core.test_parallel_uploads import seal

WEDDINGS = [str(i) for i in range(1, 13)]


class Watched:
    """A real replica, watched: its first upload waits (at most 20 s) until every watched provider has one in
    flight, so the three can only pass if they upload at the same time; counts its uploads in flight."""

    def __init__(self, replica: Any, together: threading.Barrier):
        self._replica, self._together = replica, together
        self.provider = replica.provider
        self._lock = threading.Lock()
        self.in_flight = self.most_at_once = self.uploads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._replica, name)

    def upload(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.uploads += 1
            first = self.uploads == 1
            self.in_flight += 1
            self.most_at_once = max(self.most_at_once, self.in_flight)
        try:
            if first:
                self._together.wait(timeout=20)  # BrokenBarrierError: the providers did not upload at once
            return self._replica.upload(*args, **kwargs)
        finally:
            with self._lock:
                self.in_flight -= 1


@pytest.fixture
def sealed(demo_env) -> Engine:
    return seal(demo_env, WEDDINGS, seed=17, upload_concurrency=3)


@pytest.fixture
def reads(monkeypatch) -> Counter:
    """How often each vault file is read and hashed (base.digest_file, which every upload path uses)."""
    counted: Counter = Counter()
    real = base.digest_file

    def digest_file(path: Path, **kwargs: Any) -> Any:
        counted[Path(path).name] += 1
        return real(path, **kwargs)

    monkeypatch.setattr(base, "digest_file", digest_file)
    return counted


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def test_every_provider_uploads_at_once_from_one_read_of_each_archive(sealed: Engine, reads: Counter):
    engine = sealed
    together = threading.Barrier(len(PROVIDERS))
    replicas = {p: Watched(replica_for(p, engine.settings), together) for p in PROVIDERS}

    outcomes = {(p, w): o for p, w, o in engine.replicate_to_all(WEDDINGS, replicas)}

    assert set(outcomes) == {(p, w) for p in PROVIDERS for w in WEDDINGS}
    assert all(isinstance(o, ReplicaOutcome) for o in outcomes.values()), outcomes
    assert not together.broken  # the three providers' first uploads were in flight together
    for replica in replicas.values():
        assert replica.uploads == len(WEDDINGS)
        assert 1 <= replica.most_at_once <= 3  # each provider bounded by its own setting
    # One read and hash of each archive served all three providers.
    archives = {engine.vault.get(w, engine.catalogue.require_latest_backup(w).archive_sha256).path.name
                for w in WEDDINGS}
    assert dict(reads) == {name: 1 for name in archives}
    # Each provider confirmed, and recorded, the checksum of the archive's own bytes.
    for wedding in WEDDINGS:
        backup = engine.catalogue.require_latest_backup(wedding)
        data = engine.vault.get(wedding, backup.archive_sha256).path.read_bytes()
        crc = google_crc32c.Checksum()
        crc.update(data)
        expected = {"s3": _b64(hashlib.sha256(data).digest()),
                    "gcs": f"crc32c:{_b64(crc.digest())} md5:{_b64(hashlib.md5(data).digest())}",
                    "azure": _b64(hashlib.md5(data).digest())}
        copies = {c.provider: c for c in engine.catalogue.copies(backup.id)}
        assert set(copies) == {"vault", *PROVIDERS}
        for provider in PROVIDERS:
            assert outcomes[(provider, wedding)].record.provider_checksum == expected[provider], (provider, wedding)
            assert copies[provider].checksum == expected[provider]
            assert replicas[provider].head(copies[provider].object_key).size == len(data)

    # A re-run reads each archive once more and uploads nothing twice.
    reads.clear()
    again = list(engine.replicate_to_all(WEDDINGS, {p: replica_for(p, engine.settings) for p in PROVIDERS}))
    assert len(again) == len(PROVIDERS) * len(WEDDINGS)
    assert all(isinstance(o, ReplicaOutcome) and o.record.already_present for _, _, o in again)
    assert set(reads.values()) == {1}


def test_a_damaged_vault_file_is_refused_for_every_provider(sealed: Engine):
    engine = sealed
    victim = WEDDINGS[4]
    backup = engine.catalogue.require_latest_backup(victim)
    path = engine.vault.get(victim, backup.archive_sha256).path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit flipped
    path.chmod(0o600)
    path.write_bytes(bytes(data))
    replicas = {p: replica_for(p, engine.settings) for p in PROVIDERS}

    outcomes = {(p, w): o for p, w, o in engine.replicate_to_all(WEDDINGS, replicas)}

    for provider, replica in replicas.items():
        error = outcomes[(provider, victim)]
        assert isinstance(error, ArchiveError) and "sha256" in str(error) and str(path) in str(error), error
        assert replica.head(replica.object_key(victim, backup.archive_sha256)) is None  # no copy anywhere
        for wedding in set(WEDDINGS) - {victim}:
            assert isinstance(outcomes[(provider, wedding)], ReplicaOutcome), (provider, wedding)
    assert {c.provider for c in engine.catalogue.copies(backup.id)} == {"vault"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_provider_that_is_down_fails_only_its_own_uploads(sealed: Engine):
    engine = sealed
    down = dataclasses.replace(engine.settings.s3, endpoint_url=f"http://127.0.0.1:{_closed_port()}")
    settings = dataclasses.replace(engine.settings, s3=down)
    replicas = {"s3": replica_for("s3", settings),
                **{p: replica_for(p, engine.settings) for p in ("gcs", "azure")}}

    outcomes = {(p, w): o for p, w, o in engine.replicate_to_all(WEDDINGS, replicas)}

    for wedding in WEDDINGS:
        error = outcomes[("s3", wedding)]
        assert isinstance(error, WedbackupError) and "provider s3" in str(error) and f"/{wedding}/" in str(error)
        assert isinstance(outcomes[("gcs", wedding)], ReplicaOutcome)
        assert isinstance(outcomes[("azure", wedding)], ReplicaOutcome)
        backup = engine.catalogue.require_latest_backup(wedding)
        assert {c.provider for c in engine.catalogue.copies(backup.id)} == {"vault", "gcs", "azure"}


def test_wanted_narrows_what_each_provider_is_sent(sealed: Engine, reads: Counter):
    """A retried step's leftovers: S3 gets two weddings, GCS none, Azure (not narrowed) every one."""
    engine = sealed
    replicas = {p: replica_for(p, engine.settings) for p in PROVIDERS}

    got = Counter((p, w) for p, w, o in engine.replicate_to_all(
        WEDDINGS, replicas, wanted={"s3": WEDDINGS[:2], "gcs": []}) if isinstance(o, ReplicaOutcome))

    assert set(got) == {("s3", w) for w in WEDDINGS[:2]} | {("azure", w) for w in WEDDINGS}
    assert set(got.values()) == {1} and set(reads.values()) == {1}  # still one read per archive
    for wedding in WEDDINGS:
        backup = engine.catalogue.require_latest_backup(wedding)
        expected = {"vault", "azure"} | ({"s3"} if wedding in WEDDINGS[:2] else set())
        assert {c.provider for c in engine.catalogue.copies(backup.id)} == expected
