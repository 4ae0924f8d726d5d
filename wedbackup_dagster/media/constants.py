"""Media asset keys and group as constants: used in specs and results alike."""
import dagster as dg

MEDIA_SNAPSHOT = dg.AssetKey("media_snapshot")
MEDIA_REPLICA_KEYS = {p: dg.AssetKey(f"media_{p}_replica") for p in ("s3", "gcs", "azure")}
VERIFIED_MEDIA = dg.AssetKey("verified_media")
GROUP = "wedding_media"
OWNERS = ["team:platform-reliability"]
MEDIA_POOL = "media_source"
