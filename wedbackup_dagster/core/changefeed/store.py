"""The change feed's rows in the catalogue (its tables are one of the catalogue's migrations, schema.py):
feeds (one per slot lifetime), sealed segments and their copies, the (table, key) → wedding routing map, and
barriers (TRUNCATE, a schema change, a parent row moving between weddings) that replay never crosses."""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from wedbackup_dagster.core.catalogue.store import Catalogue


class FeedStore:
    """The change feed's rows in one catalogue (its connection and transactions)."""

    def __init__(self, catalogue: Catalogue):
        self.catalogue = catalogue

    def migrate(self) -> None:
        self.catalogue.migrate()  # the feed's tables are one of its migrations (schema.py)

    # ---- feeds -------------------------------------------------------------------------------------
    def live_feed(self, slot: str) -> dict[str, Any] | None:
        with self.catalogue.connect() as conn:
            return conn.execute("SELECT * FROM wedbackup.changefeed_feeds WHERE slot = %s AND lost_at IS NULL",
                                (slot,)).fetchone()

    def deciding_watermark(self, slot: str) -> datetime | None:
        """When a live feed runs on `slot`, how far it has captured (every change committed by then is recorded
        in the partitions' source_updated_at): the feed, not updated_at, then decides which weddings changed.
        None without one (never started, stopped, or lost and not yet recovered): updated_at is the fallback."""
        feed = self.live_feed(slot)
        return feed["covered_until"] if feed is not None else None

    def feeds(self) -> list[dict[str, Any]]:
        with self.catalogue.connect() as conn:
            return conn.execute("SELECT * FROM wedbackup.changefeed_feeds ORDER BY id").fetchall()

    def feed(self, feed_id: int) -> dict[str, Any]:
        with self.catalogue.connect() as conn:
            return conn.execute("SELECT * FROM wedbackup.changefeed_feeds WHERE id = %s", (feed_id,)).fetchone()

    def start_feed(self, *, slot: str, start_lsn: int, seed_snapshot: str, seed_time: datetime,
                   plan_fingerprint: str, routes: list[tuple[str, str, str, str]]) -> int:
        with self.catalogue.connect() as conn:
            feed_id = conn.execute(
                """INSERT INTO wedbackup.changefeed_feeds (slot, start_lsn, seed_snapshot, seed_time, plan_fingerprint,
                       persisted_lsn, covered_until, platform_captured) VALUES (%s, %s, %s, %s, %s, %s, %s, true)
                   RETURNING id""",
                (slot, start_lsn, seed_snapshot, seed_time, plan_fingerprint, start_lsn, seed_time)).fetchone()["id"]
            with conn.cursor() as cur, cur.copy(
                    "COPY wedbackup.changefeed_routes (feed_id, tbl, cols, key, partition) FROM STDIN") as copy:
                for row in routes:
                    copy.write_row((feed_id, *row))
            conn.execute("INSERT INTO wedbackup.audit (action, partition, detail) "
                         "VALUES ('changefeed-start', NULL, %s)",
                         (json.dumps({"slot": slot, "feed": feed_id, "routes": len(routes)}),))
        return feed_id

    def mark_lost(self, feed_id: int, reason: str) -> None:
        with self.catalogue.connect() as conn:
            conn.execute("UPDATE wedbackup.changefeed_feeds SET lost_at = coalesce(lost_at, now()), lost_reason = %s "
                         "WHERE id = %s", (reason, feed_id))
            conn.execute("INSERT INTO wedbackup.changefeed_barriers (feed_id, partition, lsn, at, reason) "
                         "SELECT id, NULL, persisted_lsn, covered_until, %s FROM wedbackup.changefeed_feeds "
                         "WHERE id = %s", (f"feed lost: {reason}", feed_id))
            conn.execute("INSERT INTO wedbackup.audit (action, partition, detail) VALUES ('changefeed-lost', NULL, %s)",
                         (json.dumps({"feed": feed_id, "reason": reason}),))

    # ---- routes ------------------------------------------------------------------------------------
    def routes(self, feed_id: int, keys: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], str]:
        if not keys:
            return {}
        with self.catalogue.connect() as conn:
            rows = conn.execute(
                """SELECT r.tbl, r.cols, r.key, r.partition FROM wedbackup.changefeed_routes r
                   JOIN unnest(%s::text[], %s::text[], %s::text[]) AS k(tbl, cols, key)
                     ON (r.tbl, r.cols, r.key) = (k.tbl, k.cols, k.key) WHERE r.feed_id = %s""",
                ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys], feed_id)).fetchall()
        return {(r["tbl"], r["cols"], r["key"]): r["partition"] for r in rows}

    # ---- one drain's results, atomically -------------------------------------------------------------
    def commit_drain(self, feed_id: int, *, expected_lsn: int, persisted_lsn: int, covered_until: datetime,
                     segments: list[dict[str, Any]], route_changes: dict[tuple[str, str, str], str | None],
                     barriers: list[dict[str, Any]]) -> bool:
        """Record sealed segments, routing changes, barriers and the new persisted position in ONE
        transaction, only if the feed is still where this drain found it (`expected_lsn`): a second drain
        racing this one, or a re-run after a crash, can never record a transaction twice. False when the
        position had moved (nothing recorded)."""
        with self.catalogue.connect() as conn:
            row = conn.execute("SELECT persisted_lsn, lost_at FROM wedbackup.changefeed_feeds WHERE id = %s FOR UPDATE",
                               (feed_id,)).fetchone()
            if row is None or row["lost_at"] is not None or row["persisted_lsn"] != expected_lsn:
                return False
            for s in segments:
                seg_id = conn.execute(
                    """INSERT INTO wedbackup.changefeed_segments (feed_id, partition, sha256, size, key_id, first_lsn,
                           last_lsn, first_commit, last_commit, transactions, changes, tables)
                       VALUES (%(feed)s, %(partition)s, %(sha256)s, %(size)s, %(key_id)s, %(first_lsn)s, %(last_lsn)s,
                           %(first_commit)s, %(last_commit)s, %(transactions)s, %(changes)s, %(tables)s)
                       RETURNING id""",
                    {**s, "feed": feed_id, "tables": json.dumps(s["tables"])}).fetchone()["id"]
                conn.execute(
                    """INSERT INTO wedbackup.changefeed_segment_copies
                           (segment_id, provider, uri, object_key, size, checksum)
                       VALUES (%s, 'vault', %s, %s, %s, %s)""",
                    (seg_id, s["uri"], s["object_key"], s["size"], s["sha256"]))
            upserts = [(k, v) for k, v in route_changes.items() if v is not None]
            deletes = [k for k, v in route_changes.items() if v is None]
            if upserts:
                conn.execute(
                    """INSERT INTO wedbackup.changefeed_routes (feed_id, tbl, cols, key, partition)
                       SELECT %s, * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[])
                       ON CONFLICT (feed_id, tbl, cols, key) DO UPDATE SET partition = EXCLUDED.partition""",
                    (feed_id, [k[0] for k, _ in upserts], [k[1] for k, _ in upserts], [k[2] for k, _ in upserts],
                     [v for _, v in upserts]))
            if deletes:
                conn.execute(
                    """DELETE FROM wedbackup.changefeed_routes r USING unnest(%s::text[], %s::text[], %s::text[])
                           AS k(tbl, cols, key)
                       WHERE r.feed_id = %s AND (r.tbl, r.cols, r.key) = (k.tbl, k.cols, k.key)""",
                    ([k[0] for k in deletes], [k[1] for k in deletes], [k[2] for k in deletes], feed_id))
            for b in barriers:
                conn.execute("INSERT INTO wedbackup.changefeed_barriers (feed_id, partition, lsn, at, reason) "
                             "VALUES (%s, %s, %s, %s, %s)", (feed_id, b["partition"], b["lsn"], b["at"], b["reason"]))
            conn.execute("UPDATE wedbackup.changefeed_feeds SET persisted_lsn = %s, "
                         "covered_until = greatest(covered_until, %s) "
                         "WHERE id = %s", (persisted_lsn, covered_until, feed_id))
        return True

    # ---- segments ----------------------------------------------------------------------------------
    def segments(self, partition: str, *, feed_id: int | None = None, since: datetime | None = None
                 ) -> list[dict[str, Any]]:
        with self.catalogue.connect() as conn:
            return conn.execute(
                """SELECT * FROM wedbackup.changefeed_segments WHERE partition = %s
                     AND (%s::bigint IS NULL OR feed_id = %s) AND (%s::timestamptz IS NULL OR last_commit >= %s)
                   ORDER BY first_lsn, id""", (partition, feed_id, feed_id, since, since)).fetchall()

    def segment_copies(self, segment_id: int) -> list[dict[str, Any]]:
        with self.catalogue.connect() as conn:
            return conn.execute("SELECT * FROM wedbackup.changefeed_segment_copies WHERE segment_id = %s "
                                "ORDER BY provider", (segment_id,)).fetchall()

    def segments_missing(self, provider: str, limit: int = 1000) -> list[dict[str, Any]]:
        with self.catalogue.connect() as conn:
            return conn.execute(
                """SELECT s.* FROM wedbackup.changefeed_segments s WHERE NOT EXISTS (SELECT FROM
                       wedbackup.changefeed_segment_copies c WHERE c.segment_id = s.id AND c.provider = %s)
                   ORDER BY s.id LIMIT %s""", (provider, limit)).fetchall()

    def record_segment_copy(self, segment_id: int, *, provider: str, uri: str, object_key: str,
                            version_id: str | None, size: int, checksum: str | None) -> None:
        with self.catalogue.connect() as conn:
            conn.execute(
                """INSERT INTO wedbackup.changefeed_segment_copies (segment_id, provider, uri, object_key, version_id,
                       size, checksum) VALUES (%s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (segment_id, provider) DO UPDATE SET uri = EXCLUDED.uri,
                       object_key = EXCLUDED.object_key,
                       version_id = EXCLUDED.version_id, size = EXCLUDED.size, checksum = EXCLUDED.checksum""",
                (segment_id, provider, uri, object_key, version_id, size, checksum))

    def barriers(self, partition: str) -> list[dict[str, Any]]:
        with self.catalogue.connect() as conn:
            return conn.execute("SELECT * FROM wedbackup.changefeed_barriers WHERE partition = %s OR partition IS NULL "
                                "ORDER BY at", (partition,)).fetchall()

    def newest_changes(self) -> list[dict[str, Any]]:
        """Per wedding: its newest captured commit and how many segments it has."""
        with self.catalogue.connect() as conn:
            return conn.execute(
                """SELECT partition, max(last_commit) AS newest_commit, count(*) AS segments, sum(changes) AS changes,
                          sum(size) AS bytes FROM wedbackup.changefeed_segments GROUP BY partition
                   ORDER BY max(last_commit) DESC""").fetchall()

    def forget_segments(self, ids: list[int]) -> None:
        with self.catalogue.connect() as conn:
            conn.execute("DELETE FROM wedbackup.changefeed_segments WHERE id = ANY(%s)", (ids,))
