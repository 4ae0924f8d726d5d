"""A small fleet for the erasure and retention tests (their modules import these fixtures): a demo
source, a catalogue, a vault, one bucket per provider (the S3 one with Object Lock when asked), all
real, wired through the environment; backups are taken and replicated with the engine directly."""
from __future__ import annotations

import dagster as dg
import pytest

from wedbackup_dagster.dev import demo_data
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster_tests.backups.conftest import engine_replicas


@pytest.fixture
def make_governance_fleet(stack, make_database, tmp_path, monkeypatch, s3_bucket, s3_lock_bucket, gcs_bucket,
                          azure_container):
    def make(*, weddings: int = 4, object_lock: str = "none") -> dict:
        source, catalogue = make_database(), make_database()
        for name, value in {
            "WEDBACKUP_SOURCE_DSN": source, "WEDBACKUP_CATALOGUE_DSN": catalogue,
            "WEDBACKUP_VAULT_DIR": str(tmp_path / "vault"),
            "WEDBACKUP_S3_BUCKET": s3_lock_bucket if object_lock != "none" else s3_bucket,
            "WEDBACKUP_S3_OBJECT_LOCK": object_lock, "WEDBACKUP_S3_OBJECT_LOCK_DAYS": "1",
            "WEDBACKUP_GCS_BUCKET": gcs_bucket, "WEDBACKUP_AZURE_CONTAINER": azure_container,
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("WEDBACKUP_POLICY_FILE", raising=False)
        demo_data.generate(source, weddings=weddings, seed=13, document_bytes=128)
        engine = Engine.from_env()
        return {"source": source, "engine": engine, "catalogue": Catalogue(catalogue),
                "replicas": engine_replicas(engine.settings)}

    return make


def back_up(fleet: dict, partition: str) -> int:
    """One new backup of `partition`, replicated to every provider; its backup id."""
    engine: Engine = fleet["engine"]
    with engine.snapshot_session() as session:
        outcome = engine.back_up(partition, session)
    for replica in fleet["replicas"].values():
        engine.replicate(partition, replica)
    return outcome.backup.id


@pytest.fixture
def governance_instance():
    with dg.instance_for_test() as inst:
        yield inst
