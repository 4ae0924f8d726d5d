"""Change segments live exactly as long as the snapshots they extend."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg

from wedbackup_dagster.core.changefeed.replay import SELECTION_MARGIN
from wedbackup_dagster.core.changefeed.retention import doomed_segments, prune_segments
from wedbackup_dagster.core.storage.vault import Vault

T = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)


def test_a_segment_goes_once_every_kept_snapshot_of_its_wedding_is_newer_than_it():
    segs = [{"id": 1, "partition": "1", "last_commit": T - SELECTION_MARGIN - timedelta(seconds=1)},
            {"id": 2, "partition": "1", "last_commit": T - SELECTION_MARGIN + timedelta(seconds=1)},
            {"id": 3, "partition": "1", "last_commit": T + timedelta(hours=1)},
            {"id": 4, "partition": "2", "last_commit": T}]  # wedding 2 has no kept snapshot
    assert doomed_segments(segs, {"1": T}) == [1, 4]
    assert doomed_segments(segs, {"1": T, "2": T - timedelta(days=1)}) == [1]


def test_prune_deletes_the_segments_of_a_wedding_without_snapshots_and_keeps_the_others(feed_env):
    engine, feed, source = feed_env["engine"], feed_env["feed"], feed_env["source"]
    with engine.snapshot_session() as session:
        engine.back_up("3", session)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("UPDATE guests SET meal_choice = 'x' WHERE wedding_id IN (3, 4)")
    result = feed.drain()
    assert {"3", "4"} <= set(result.segments)
    vault = Vault(engine.settings.vault_dir)
    assert prune_segments(engine.catalogue, vault, {}, dry_run=True)["would_delete"] >= 1
    out = prune_segments(engine.catalogue, vault, {}, dry_run=False)
    assert out["deleted"] >= 1 and not out["failed"]
    assert feed.store.segments("4") == [] and not list(feed.vault.entries("4"))
    assert len(feed.store.segments("3")) == 1 and list(feed.vault.entries("3"))
