"""The backups domain: per-wedding backup assets (dump → archive → replicas → verified restore) and the
Dagster objects around them. Thin wiring over `wedbackup_dagster.core`."""
