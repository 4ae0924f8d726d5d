"""What every domain of the wiring uses: the resources (engine and provider replicas), the per-wedding
metadata and failure handling of the backup steps, and progress lines."""
