"""The change feed's catalogue tables, one migration of the catalogue (core/catalogue/store.py MIGRATIONS), as
media's are: feeds, segments and their copies, the routing map, barriers. No imports, so the catalogue can list
it without a cycle."""

CHANGEFEED_TABLES = """
CREATE TABLE IF NOT EXISTS wedbackup.changefeed_feeds (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slot            text NOT NULL,
    start_lsn       bigint NOT NULL,         -- the slot's consistent point
    seed_snapshot   text NOT NULL,           -- pg_current_snapshot() of the routing map's seed
    seed_time       timestamptz NOT NULL,
    plan_fingerprint text NOT NULL,
    persisted_lsn   bigint NOT NULL,         -- every transaction ending at or before it is sealed
    covered_until   timestamptz NOT NULL,    -- every commit up to this time is sealed
    created_at      timestamptz NOT NULL DEFAULT now(),
    lost_at         timestamptz,             -- the slot was dropped or invalidated: coverage ends
    lost_reason     text
);
CREATE UNIQUE INDEX IF NOT EXISTS changefeed_feeds_one_live ON wedbackup.changefeed_feeds (slot) WHERE lost_at IS NULL;
CREATE TABLE IF NOT EXISTS wedbackup.changefeed_segments (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    feed_id         bigint NOT NULL REFERENCES wedbackup.changefeed_feeds (id),
    partition       text NOT NULL,
    sha256          text NOT NULL UNIQUE,
    size            bigint NOT NULL,
    key_id          text NOT NULL,
    first_lsn       bigint NOT NULL,         -- commit end LSNs of its first and last transaction
    last_lsn        bigint NOT NULL,
    first_commit    timestamptz NOT NULL,
    last_commit     timestamptz NOT NULL,
    transactions    int NOT NULL,
    changes         int NOT NULL,
    tables          jsonb NOT NULL,          -- per table: inserts, updates, deletes
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS changefeed_segments_partition ON wedbackup.changefeed_segments (partition, last_commit);
CREATE TABLE IF NOT EXISTS wedbackup.changefeed_segment_copies (
    segment_id  bigint NOT NULL REFERENCES wedbackup.changefeed_segments (id) ON DELETE CASCADE,
    provider    text NOT NULL,
    uri         text NOT NULL,
    object_key  text NOT NULL,
    version_id  text,
    size        bigint NOT NULL,
    checksum    text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (segment_id, provider)
);
CREATE TABLE IF NOT EXISTS wedbackup.changefeed_routes (
    feed_id     bigint NOT NULL REFERENCES wedbackup.changefeed_feeds (id) ON DELETE CASCADE,
    tbl         text NOT NULL,
    cols        text NOT NULL,
    key         text NOT NULL,
    partition   text NOT NULL,
    PRIMARY KEY (feed_id, tbl, cols, key)
);
CREATE TABLE IF NOT EXISTS wedbackup.changefeed_barriers (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    feed_id     bigint REFERENCES wedbackup.changefeed_feeds (id),
    partition   text,                        -- NULL: every wedding
    lsn         bigint,
    at          timestamptz NOT NULL,
    reason      text NOT NULL
);
CREATE INDEX IF NOT EXISTS changefeed_barriers_partition ON wedbackup.changefeed_barriers (partition, at);
"""

# Feeds started since the platform partition is captured too (its keyed tables published, rows that reach no
# wedding routed to it): only those can replay the platform to a second.
CHANGEFEED_PLATFORM = """
ALTER TABLE wedbackup.changefeed_feeds ADD COLUMN IF NOT EXISTS platform_captured boolean NOT NULL DEFAULT false;
"""
