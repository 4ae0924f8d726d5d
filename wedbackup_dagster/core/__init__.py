"""The plain-Python core of wedbackup: configuration, stack, tenancy, snapshot, archive format, keys,
replicas and restore. Nothing in here imports Dagster, so it can be used and tested on its own."""
