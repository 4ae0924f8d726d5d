"""Asset keys, pools and owners as constants: used in specs and results alike."""
import dagster as dg

DB_DUMP = dg.AssetKey("db_dump")
ENCRYPTED_ARCHIVE = dg.AssetKey("encrypted_archive")
S3_REPLICA = dg.AssetKey("s3_replica")
GCS_REPLICA = dg.AssetKey("gcs_replica")
AZURE_REPLICA = dg.AssetKey("azure_replica")
VERIFIED_RESTORE = dg.AssetKey("verified_restore")

REPLICA_KEYS = {"s3": S3_REPLICA, "gcs": GCS_REPLICA, "azure": AZURE_REPLICA}
UPLOAD_POOLS = {"s3": "upload_s3", "gcs": "upload_gcs", "azure": "upload_azure"}
SOURCE_POOL = "source_db"
RESTORE_POOL = "scratch_restore"

GROUP = "wedding_backups"
OWNERS = ["team:platform-reliability"]
