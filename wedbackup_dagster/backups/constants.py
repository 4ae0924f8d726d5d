"""Asset keys, pools and owners as constants: used in specs and results alike."""
import dagster as dg

DB_DUMP = dg.AssetKey("db_dump")
ENCRYPTED_ARCHIVE = dg.AssetKey("encrypted_archive")
S3_REPLICA = dg.AssetKey("s3_replica")
GCS_REPLICA = dg.AssetKey("gcs_replica")
AZURE_REPLICA = dg.AssetKey("azure_replica")
VERIFIED_RESTORE = dg.AssetKey("verified_restore")

REPLICA_KEYS = {"s3": S3_REPLICA, "gcs": GCS_REPLICA, "azure": AZURE_REPLICA}
# One step uploads to every provider at once (backups/assets.py replicate_to_providers), so the providers share one
# pool; each provider's own bound is its upload concurrency (WEDBACKUP_<PROVIDER>_UPLOAD_CONCURRENCY).
UPLOAD_POOL = "upload"
SOURCE_POOL = "source_db"
RESTORE_POOL = "scratch_restore"

GROUP = "wedding_backups"
OWNERS = ["team:platform-reliability"]
