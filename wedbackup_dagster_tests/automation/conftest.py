"""Fixtures for the automation tests: a fresh migrated catalogue, a small source database (weddings and
guests, with updated_at), and a test Dagster instance — all real, wired through the environment."""
from __future__ import annotations

import dagster as dg
import psycopg
import pytest

from wedbackup_dagster.core.catalogue.store import Catalogue

SOURCE_SCHEMA = """
CREATE TABLE weddings (id bigint PRIMARY KEY, wedding_date date NOT NULL,
                       updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE guests (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                     wedding_id bigint NOT NULL REFERENCES weddings (id) ON DELETE CASCADE,
                     name text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON guests (wedding_id);
CREATE TABLE vendors (id bigint PRIMARY KEY, name text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
"""


@pytest.fixture
def catalogue(stack, make_database, monkeypatch) -> Catalogue:
    dsn = make_database()
    monkeypatch.setenv("WEDBACKUP_CATALOGUE_DSN", dsn)
    monkeypatch.delenv("WEDBACKUP_POLICY_FILE", raising=False)
    cat = Catalogue(dsn)
    cat.migrate()
    yield cat
    cat.close()


@pytest.fixture
def source(stack, make_database, monkeypatch) -> str:
    dsn = make_database()
    monkeypatch.setenv("WEDBACKUP_SOURCE_DSN", dsn)
    with psycopg.connect(dsn) as conn:
        conn.execute(SOURCE_SCHEMA)
    return dsn


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst
