"""The plain-Python core of wedbackup, grouped by what each part is about: formats (the sealed archive and
the snapshot stream), postgres (tenancy, snapshot, loading and restoring, verification), keys, storage
(vault, replicas, the provider factory), catalogue, governance (retention, erasure) and policy; engine.py
ties them together for one partition. Nothing in here imports Dagster (wedbackup_dagster_tests/
test_layout.py), so it can be used and tested on its own."""
