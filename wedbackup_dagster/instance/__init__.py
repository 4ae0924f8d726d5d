"""The Dagster instance wedbackup runs in: its run and event storage (local stack or production
PostgreSQL) and the batching of per-wedding materializations into few event-log writes."""
