"""The catalogue tables of wedding media, one migration of the catalogue (core/catalogue.py MIGRATIONS).
No imports, so the catalogue can list it without a cycle."""

MEDIA_TABLES = """
    -- migration: wedding media (issue 19; core/media/). Packs and snapshots are content-addressed (SHA-256 of
    -- the stored bytes); chunks are known by their keyed id, per wedding key, so dedup never crosses weddings.
    CREATE TABLE IF NOT EXISTS wedbackup.media_packs (
        pack_sha256  text PRIMARY KEY,
        partition    text NOT NULL,
        key_id       text NOT NULL,
        size         bigint NOT NULL,
        blobs        int NOT NULL,
        raw_bytes    bigint NOT NULL,
        created_at   timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX IF NOT EXISTS media_packs_partition ON wedbackup.media_packs (partition);
    CREATE TABLE IF NOT EXISTS wedbackup.media_chunks (
        key_id       text NOT NULL,
        chunk_id     text NOT NULL,          -- hex keyed BLAKE3 of the plaintext chunk
        pack_sha256  text NOT NULL REFERENCES wedbackup.media_packs (pack_sha256) ON DELETE CASCADE,
        raw_bytes    int NOT NULL,
        PRIMARY KEY (key_id, chunk_id)
    );
    CREATE TABLE IF NOT EXISTS wedbackup.media_snapshots (
        id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        partition     text NOT NULL,
        snapshot_sha256 text NOT NULL UNIQUE,
        key_id        text NOT NULL,
        taken_at      timestamptz NOT NULL,
        confirmed_at  timestamptz NOT NULL,  -- last backup that found the media unchanged
        files         bigint NOT NULL,
        bytes         bigint NOT NULL,
        new_bytes     bigint NOT NULL,
        stored_bytes  bigint NOT NULL,       -- sealed pack bytes written by this backup
        packs         int NOT NULL,          -- packs this snapshot references
        skipped       jsonb NOT NULL,
        verified_at   timestamptz,
        verifications int NOT NULL DEFAULT 0
    );
    CREATE INDEX IF NOT EXISTS media_snapshots_partition ON wedbackup.media_snapshots (partition, taken_at DESC);
    CREATE TABLE IF NOT EXISTS wedbackup.media_copies (
        object_sha256 text NOT NULL,         -- a pack's or a snapshot's SHA-256
        kind          text NOT NULL,         -- pack | snapshot
        partition     text NOT NULL,
        provider      text NOT NULL,         -- vault | s3 | gcs | azure
        uri           text NOT NULL,
        object_key    text NOT NULL,
        version_id    text,
        size          bigint NOT NULL,
        checksum      text,
        media         text NOT NULL,
        offsite       boolean NOT NULL,
        created_at    timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (object_sha256, provider)
    );
    CREATE INDEX IF NOT EXISTS media_copies_partition ON wedbackup.media_copies (partition, provider);
"""
