"""The storage providers domain (S3, GCS, Azure): a canary per provider and catch-up runs after an outage,
run-failure alerts, and the cross-provider inventory reconciled with the catalogue."""
