"""Dagster instance storage for deployments: dagster-postgres's event log, holding its connection open.

dagster-postgres opens a new PostgreSQL connection for every statement batch (NullPool), so each event
written on its own costs two connection set-ups (the event row, then the asset index). This storage is
the same class with a small pool (what dagster-webserver itself switches to, `optimize_for_webserver`),
so a run's events reuse one connection. Since the list runs store their materializations in batches
(event_batches.py) it saves little, 0.5–0.9 ms per wedding (README, Benchmarks); the deployments use
stock dagster-postgres. Select it in
dagster.yaml as `event_log_storage: {module: wedbackup_dagster.instance_storage, class:
PooledPostgresEventLogStorage, config: {postgres_url: ...}}` (same config as dagster-postgres)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy.pool as db_pool
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
