"""Dagster instance storage: the local instance's choice of storage (LocalStackStorage), and for deployments
dagster-postgres's event log holding its connection open (PooledPostgresEventLogStorage).

LocalStackStorage is what the project's dagster.yaml (linked into the local stack's DAGSTER_HOME) selects:
dagster-postgres, the storage production runs on (with the pooled event log below), in the stack's own `dagster` database when
WEDBACKUP_DAGSTER_PG_URL is set (`wedbackup stack env` sets it; the URL lives only in the environment, never
in a file); Dagster's SQLite storage under DAGSTER_HOME where no stack runs. A run worker or subprocess
reloading the instance makes the same choice from the same environment.


dagster-postgres opens a new PostgreSQL connection for every statement batch (NullPool), so each event
written on its own costs two connection set-ups (the event row, then the asset index). This storage is
the same class with a small pool (what dagster-webserver itself switches to, `optimize_for_webserver`),
so a run's events reuse one connection. Since the list runs store their materializations in batches
(event_batches.py) it saves little, 0.5–0.9 ms per wedding (README, Benchmarks); the deployments use
stock dagster-postgres. Select it in
dagster.yaml as `event_log_storage: {module: wedbackup_dagster.instance.storage, class:
PooledPostgresEventLogStorage, config: {postgres_url: ...}}` (same config as dagster-postgres)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import dagster as dg
import sqlalchemy.pool as db_pool
from dagster._core.storage.base_storage import DagsterStorage
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage
from dagster._serdes import ConfigurableClass, ConfigurableClassData
from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.utils import create_pg_engine, get_token_provider_from_config, pg_url_from_config

# A run's process writes its events from one thread; the overflow covers log capture and the daemon's
# threads. Connections are recycled hourly so a restarted PostgreSQL is never held on to for long.
POOL_SIZE = 1
MAX_OVERFLOW = 4
POOL_RECYCLE_SECONDS = 3600


class PooledPostgresEventLogStorage(PostgresEventLogStorage):
    """PostgresEventLogStorage whose engine keeps a connection instead of opening one per write."""

    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True, inst_data: Any = None,
                 token_provider: Any = None):
        super().__init__(postgres_url, should_autocreate_tables, inst_data, token_provider)
        self._engine.dispose()
        self._engine = create_pg_engine(self.postgres_url, token_provider, isolation_level="AUTOCOMMIT",
                                        poolclass=db_pool.QueuePool, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW,
                                        pool_recycle=POOL_RECYCLE_SECONDS)

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Mapping[str, Any]) -> PooledPostgresEventLogStorage:
        return cls(inst_data=inst_data, postgres_url=pg_url_from_config(config_value),
                   should_autocreate_tables=config_value.get("should_autocreate_tables", True),
                   token_provider=get_token_provider_from_config(config_value))


class PooledPostgresStorage(DagsterPostgresStorage):
    """DagsterPostgresStorage (runs, schedules, events) whose event log is PooledPostgresEventLogStorage: the
    local stack's instance. `wedbackup backup --all` runs the range job, which stores a few events per
    wedding one by one (planned materializations, check evaluations): on stock dagster-postgres each
    opened its own connection, 264 s of a 408 s 300-wedding job under load (README, Benchmarks)."""

    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True,
                 inst_data: ConfigurableClassData | None = None, token_provider: Any = None):
        super().__init__(postgres_url, should_autocreate_tables, inst_data, token_provider)
        self._event_log_storage.dispose()
        self._event_log_storage = PooledPostgresEventLogStorage(postgres_url, should_autocreate_tables,
                                                                token_provider=token_provider)


PG_URL_SETTING = "WEDBACKUP_DAGSTER_PG_URL"


class LocalStackStorage(DagsterStorage, ConfigurableClass):
    """dagster.yaml: `storage: {custom: {module: wedbackup_dagster.instance.storage, class: LocalStackStorage,
    config: {postgres_url_env: WEDBACKUP_DAGSTER_PG_URL}}}`. Builds DagsterPostgresStorage when the variable
    named by `postgres_url_env` is set, else DagsterSqliteStorage in `sqlite_base_dir` (default $DAGSTER_HOME:
    the layout of Dagster's default instance, so an existing local history stays readable; with neither, as
    under `dagster definitions validate` without DAGSTER_HOME, a throw-away temporary directory).
    Only a factory: Dagster requires it to be a DagsterStorage, but it is never instantiated itself."""

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {"postgres_url_env": dg.Field(str, is_required=False, default_value=PG_URL_SETTING),
                "sqlite_base_dir": dg.Field(dg.StringSource, is_required=False)}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
                          ) -> DagsterStorage:
        url = os.environ.get(config_value.get("postgres_url_env") or PG_URL_SETTING)
        if url:
            return PooledPostgresStorage(url, inst_data=inst_data)
        base_dir = config_value.get("sqlite_base_dir") or os.environ.get("DAGSTER_HOME")
        if not base_dir:
            base_dir = tempfile.mkdtemp(prefix="wedbackup-dagster-")
        return DagsterSqliteStorage(base_dir, inst_data=inst_data)
