"""Uploads side by side (Engine.replicate_each) on the real stand-ins: many weddings' archives go to a
provider at once, bounded by WEDBACKUP_UPLOAD_CONCURRENCY; a provider refusing some objects fails just those
weddings, by name, while the others are recorded, and no partial object is left anywhere."""
from __future__ import annotations

import threading

import pytest

from wedbackup_dagster.core.config import Settings
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.outcomes import ReplicaOutcome
from wedbackup_dagster.core.errors import ConfigError, WedbackupError
from wedbackup_dagster.core.storage.providers import ensure_targets
from wedbackup_dagster.core.storage.replicas.azure import AzureReplica, azure_service_from

WEDDINGS = [str(i) for i in range(1, 25)]
REFUSED = {"5", "12", "20"}  # their keys hold a leased blob of other content: Azure refuses to overwrite it
JUNK = b"not this archive"


class CountingAzureReplica(AzureReplica):
    """The real Azure replica, counting how many of its uploads are in flight at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.most_at_once = 0

    def upload(self, *args, **kwargs):
        with self._lock:
            self.in_flight += 1
            self.most_at_once = max(self.most_at_once, self.in_flight)
        try:
            return super().upload(*args, **kwargs)
        finally:
            with self._lock:
                self.in_flight -= 1


def lease_other_content(replica: AzureReplica, key: str) -> None:
    """Another writer's blob at `key`, held by an infinite lease: every write without its lease id fails."""
    blob = replica.container.get_blob_client(key)
    blob.upload_blob(JUNK, overwrite=True)
    blob.acquire_lease(lease_duration=-1)


def seal(demo_env, weddings: list[str], *, seed: int, upload_concurrency: int) -> Engine:
    """`weddings` of a new demo database sealed into the vault and the catalogue, nothing uploaded yet."""
    demo_env(weddings=len(weddings), seed=seed, document_bytes=256,
             WEDBACKUP_UPLOAD_CONCURRENCY=str(upload_concurrency))
    engine = Engine.from_env()
    ensure_targets(engine.settings)
    with engine.snapshot_session() as session:
        for key, outcome in engine.back_up_each(weddings, session):
            assert not isinstance(outcome, WedbackupError), outcome
    return engine


@pytest.fixture
def sealed(demo_env):
    return seal(demo_env, WEDDINGS, seed=11, upload_concurrency=6)


def test_many_weddings_upload_at_once_and_a_refused_object_fails_only_its_wedding(sealed: Engine):
    engine = sealed
    assert engine.settings.upload_concurrency == 6
    replica = CountingAzureReplica(azure_service_from(engine.settings.azure), engine.settings.azure)
    keys = {w: replica.object_key(w, engine.catalogue.require_latest_backup(w).archive_sha256) for w in WEDDINGS}
    for wedding in REFUSED:
        lease_other_content(replica, keys[wedding])

    outcomes = dict(engine.replicate_each(WEDDINGS, replica))

    assert sorted(outcomes, key=int) == WEDDINGS
    assert 1 < replica.most_at_once <= 6  # side by side, bounded by the setting
    failed = {w: o for w, o in outcomes.items() if isinstance(o, WedbackupError)}
    assert set(failed) == REFUSED
    for wedding, error in failed.items():
        assert "azure" in str(error) and keys[wedding] in str(error)  # names the provider and the wedding's object
    for wedding in set(WEDDINGS) - REFUSED:
        outcome = outcomes[wedding]
        assert isinstance(outcome, ReplicaOutcome) and not outcome.record.already_present
        backup = engine.catalogue.require_latest_backup(wedding)
        assert {c.provider for c in engine.catalogue.copies(backup.id)} == {"vault", "azure"}
        assert replica.head(keys[wedding]).size == backup.size
    for wedding in REFUSED:
        backup = engine.catalogue.require_latest_backup(wedding)
        assert "azure" not in {c.provider for c in engine.catalogue.copies(backup.id)}
        # No partial object: the other writer's blob is untouched and no upload committed anything else.
        assert replica.container.get_blob_client(keys[wedding]).download_blob().readall() == JUNK
    listed = {o.key: o.size for o in replica.list()}
    assert set(listed) == set(keys.values())
    assert all(listed[keys[w]] == engine.catalogue.require_latest_backup(w).size for w in set(WEDDINGS) - REFUSED)

    # A re-run uploads nothing twice: the recorded ones are already there, the refused ones still fail.
    again = dict(engine.replicate_each(WEDDINGS, replica, workers=3))
    assert {w for w, o in again.items() if isinstance(o, WedbackupError)} == REFUSED
    assert all(o.record.already_present for w, o in again.items() if w not in REFUSED)


def test_a_wedding_without_a_backup_is_named_and_the_others_upload(sealed: Engine):
    replica = AzureReplica(azure_service_from(sealed.settings.azure), sealed.settings.azure)
    outcomes = dict(sealed.replicate_each(["3", "999", "4"], replica, workers=2))
    assert isinstance(outcomes["3"], ReplicaOutcome) and isinstance(outcomes["4"], ReplicaOutcome)
    assert isinstance(outcomes["999"], WedbackupError) and "999" in str(outcomes["999"])


@pytest.mark.parametrize("value", ["0", "65", "eight", "-1", "²"])
def test_upload_concurrency_out_of_range_names_the_setting(monkeypatch, value):
    env = {"WEDBACKUP_SOURCE_DSN": "postgresql://u@h/s", "WEDBACKUP_CATALOGUE_DSN": "postgresql://u@h/c",
           "WEDBACKUP_UPLOAD_CONCURRENCY": value}
    with pytest.raises(ConfigError, match="WEDBACKUP_UPLOAD_CONCURRENCY"):
        Settings.from_env(env)


BASE_ENV = {"WEDBACKUP_SOURCE_DSN": "postgresql://u@h/s", "WEDBACKUP_CATALOGUE_DSN": "postgresql://u@h/c"}


@pytest.mark.parametrize("provider", ["s3", "gcs", "azure"])
def test_a_provider_setting_overrides_the_general_one_for_that_provider_only(provider):
    settings = Settings.from_env({**BASE_ENV, "WEDBACKUP_UPLOAD_CONCURRENCY": "6",
                                  f"WEDBACKUP_{provider.upper()}_UPLOAD_CONCURRENCY": "3"})
    assert settings.upload_concurrency_for(provider) == 3
    assert all(settings.upload_concurrency_for(p) == 6 for p in {"s3", "gcs", "azure"} - {provider})


def test_the_gcs_emulator_gets_at_most_four_uploads_at_once_unless_set():
    emulator = {**BASE_ENV, "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9023", "WEDBACKUP_UPLOAD_CONCURRENCY": "8"}
    assert Settings.from_env(emulator).upload_concurrency_for("gcs") == 4
    assert Settings.from_env(emulator).upload_concurrency_for("s3") == 8
    assert Settings.from_env({**emulator, "WEDBACKUP_UPLOAD_CONCURRENCY": "2"}).upload_concurrency_for("gcs") == 2
    assert Settings.from_env({**emulator, "WEDBACKUP_GCS_UPLOAD_CONCURRENCY": "8"}).upload_concurrency_for("gcs") == 8
    assert Settings.from_env({**BASE_ENV, "WEDBACKUP_UPLOAD_CONCURRENCY": "8"}).upload_concurrency_for("gcs") == 8


@pytest.mark.parametrize("value", ["0", "65", "many"])
def test_a_provider_concurrency_out_of_range_names_its_setting(value):
    with pytest.raises(ConfigError, match="WEDBACKUP_GCS_UPLOAD_CONCURRENCY"):
        Settings.from_env({**BASE_ENV, "WEDBACKUP_GCS_UPLOAD_CONCURRENCY": value})


def test_a_step_uses_its_providers_setting(sealed: Engine, monkeypatch):
    import dataclasses

    engine = sealed
    engine.settings = dataclasses.replace(engine.settings, upload_concurrency=8,
                                          provider_upload_concurrency=(("azure", 2),))
    replica = CountingAzureReplica(azure_service_from(engine.settings.azure), engine.settings.azure)
    outcomes = dict(engine.replicate_each(WEDDINGS[:10], replica))
    assert all(isinstance(o, ReplicaOutcome) for o in outcomes.values()), outcomes
    assert 1 <= replica.most_at_once <= 2


def test_the_step_reads_every_weddings_newest_backup_in_one_query_as_one_by_one(sealed: Engine):
    catalogue = sealed.catalogue
    with sealed.snapshot_session() as session:  # a second backup of a few weddings: the newest must win
        for key, outcome in sealed.back_up_each(["2", "3"], session):
            assert not isinstance(outcome, WedbackupError), outcome
    many = catalogue.latest_backups([*WEDDINGS, "999"])
    assert set(many) == set(WEDDINGS)
    assert many == {w: catalogue.latest_backup(w) for w in WEDDINGS}


def test_confirmed_uploads_are_recorded_a_batch_per_transaction_each_before_it_is_reported(sealed: Engine,
                                                                                            monkeypatch):
    engine = sealed
    engine.copy_record_batch = 4
    engine.copy_record_seconds = 600.0  # batches by size only here (the time limit is the next test's)
    replica = AzureReplica(azure_service_from(engine.settings.azure), engine.settings.azure)
    transactions: list[int] = []
    real = engine.catalogue.record_copies

    def record_copies(copies):
        transactions.append(len(copies))
        return real(copies)

    monkeypatch.setattr(engine.catalogue, "record_copies", record_copies)
    seen = 0
    for wedding, outcome in engine.replicate_each(WEDDINGS[:10], replica, workers=3):
        seen += 1
        assert isinstance(outcome, ReplicaOutcome), outcome
        # Reported only once its copy is in the catalogue, with the provider's checksum.
        backup = engine.catalogue.require_latest_backup(wedding)
        copy = next(c for c in engine.catalogue.copies(backup.id) if c.provider == "azure")
        assert copy.object_key == outcome.record.key and copy.checksum == outcome.record.provider_checksum
    assert seen == 10
    assert sum(transactions) == 10 and max(transactions) <= 4 and len(transactions) <= 4, transactions


def test_a_confirmed_upload_waits_at_most_copy_record_seconds_for_its_batch(sealed: Engine, monkeypatch):
    """Behind a slow upload, the confirmed ones are recorded (and reported) once they are that old, not when
    the batch is full or the step ends."""
    engine = sealed
    engine.copy_record_batch, engine.copy_record_seconds = 1000, 0.5
    release = threading.Event()

    class SlowForOne(AzureReplica):
        def upload(self, path, **kwargs):  # noqa: ANN001, ANN003
            if kwargs["partition"] == WEDDINGS[0]:
                assert release.wait(30)
            return super().upload(path, **kwargs)

    replica = SlowForOne(azure_service_from(engine.settings.azure), engine.settings.azure)
    transactions: list[int] = []
    real = engine.catalogue.record_copies
    monkeypatch.setattr(engine.catalogue, "record_copies", lambda copies: (transactions.append(len(copies)),
                                                                          real(copies))[1])
    reported = []
    for wedding, outcome in engine.replicate_each(WEDDINGS[:6], replica, workers=3):
        assert isinstance(outcome, ReplicaOutcome), outcome
        reported.append(wedding)
        if len(reported) == 5:  # the five quick ones came out while the first still hangs
            assert WEDDINGS[0] not in reported
            release.set()
    assert reported[-1] == WEDDINGS[0] and transactions[-1] == 1 and sum(transactions) == 6


def test_an_s3_upload_step_aborts_the_abandoned_multipart_uploads_under_its_prefix(sealed: Engine):
    """Single PUTs never look for abandoned multipart uploads, so replicate_each tidies once per step."""
    from wedbackup_dagster.core.storage.replicas.s3 import S3Replica, s3_client_from

    engine = sealed
    client = s3_client_from(engine.settings.s3)
    dead_key = f"{engine.settings.s3.prefix}/weddings/{WEDDINGS[0]}/died-mid-upload.wbk"
    dead = client.create_multipart_upload(Bucket=engine.settings.s3.bucket, Key=dead_key)["UploadId"]
    replica = S3Replica(client, engine.settings.s3, abandoned_after=0)

    outcomes = dict(engine.replicate_each(WEDDINGS[:3], replica))

    assert all(isinstance(o, ReplicaOutcome) for o in outcomes.values()), outcomes
    uploads = client.list_multipart_uploads(Bucket=engine.settings.s3.bucket).get("Uploads", [])
    assert dead not in {u["UploadId"] for u in uploads}
