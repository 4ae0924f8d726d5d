"""The byte formats wedbackup writes and reads: the sealed archive (docs/FORMAT.md) and the snapshot stream
inside it (docs/SNAPSHOT.md)."""
