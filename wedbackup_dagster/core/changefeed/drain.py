"""One drain of the change feed: peek the slot's pgoutput messages over plain SQL, decode them into
transactions, route every change to its wedding, seal each wedding's changes into a segment in the vault,
record the segments and the new position in the catalogue in one transaction, and only then advance the
slot. At-least-once from the slot, exactly-once into the catalogue: a drain killed after sealing and before
advancing re-reads those transactions next time and skips every one ending at or before the recorded
position, so nothing is lost and nothing is recorded twice.

Why SQL and not the streaming replication protocol: psycopg 3 has none (psycopg#71), and a pull by SQL is
what lets the slot advance only after the segments are durable; see docs/CHANGEFEED.md."""
from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from wedbackup_dagster.core.partitions import PLATFORM
from wedbackup_dagster.core.postgres import tenancy
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.errors import CryptoKeyError
from wedbackup_dagster.core.keys.keyring import MasterKeyring

from . import slot as slots
from .decode import Decoder, lsn_text, parse_lsn, transactions
from .errors import ChangeFeedError, SlotLost
from .routing import Router, seed_routes
from .segments import SegmentDraft, SegmentTransaction, provider_key, seal, segment_vault
from .store import FeedStore
from .visibility import parse_snapshot, visible

DEFAULT_SLOT = slots.DEFAULT_SLOT
DEFAULT_MAX_CHANGES = 200_000  # pgoutput messages per peek: bounds a drain's memory


@dataclass
class DrainResult:
    slot: str
    feed_id: int
    transactions: int = 0
    changes: int = 0
    already_persisted: int = 0  # transactions re-read after a drain that sealed them but did not advance
    before_feed: int = 0  # transactions the feed's seed snapshot already saw
    segments: dict[str, dict[str, Any]] = field(default_factory=dict)  # wedding -> segment row
    erased: list[str] = field(default_factory=list)  # weddings whose changes were dropped: erased meanwhile
    barriers: list[dict[str, Any]] = field(default_factory=list)
    unrouted: int = 0
    persisted_lsn: str = ""
    covered_until: datetime | None = None
    lag_bytes: int | None = None
    retained_bytes: int | None = None
    safe_wal_size: int | None = None
    seconds: float = 0.0
    more: bool = False  # the peek was cut at max_changes: drain again

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["covered_until"] = self.covered_until.isoformat() if self.covered_until else None
        d["segments"] = {w: {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in s.items()}
                         for w, s in self.segments.items()}
        d["barriers"] = [{k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in b.items()}
                         for b in self.barriers]
        return d


class ChangeFeed:
    """The feed of one source into one catalogue, through one slot."""

    def __init__(self, source_dsn: str, catalogue: Catalogue, keyring: MasterKeyring, vault_dir: str, *,
                 slot: str = DEFAULT_SLOT, max_changes: int = DEFAULT_MAX_CHANGES, zstd_level: int = 3,
                 root: tenancy.TableName = tenancy.TableName("public", "weddings"),
                 overrides: Mapping[str, object] | None = None):
        self.source_dsn = source_dsn
        self.catalogue = catalogue
        self.keyring = keyring
        self.store = FeedStore(catalogue)
        self.vault = segment_vault(vault_dir)
        self.slot = slot
        self.max_changes = max_changes
        self.zstd_level = zstd_level
        self.root = root
        self.overrides = overrides
        self._keys: dict[str, Any] = {}  # wedding -> its live key, between drains
        self.store.migrate()

    @classmethod
    def from_settings(cls, settings: Any, keyring: MasterKeyring, catalogue: Catalogue | None = None,
                      **kw: Any) -> ChangeFeed:
        return cls(settings.source_dsn, catalogue or Catalogue(settings.catalogue_dsn), keyring,
                   str(settings.vault_dir), zstd_level=settings.zstd_level, **kw)

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.source_dsn, autocommit=True, application_name="wedbackup-changefeed")

    def _plan(self, conn) -> tenancy.TenancyPlan:
        return tenancy.discover(conn, self.root, dict(self.overrides) if self.overrides else None)

    # ---- start and stop ----------------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        """Create the publication and slot and seed the routing map; the feed's coverage begins at the seed.
        Refused (naming what is missing) on a source that cannot feed changes."""
        if self.store.live_feed(self.slot) is not None:
            raise ChangeFeedError(f"the change feed on slot {self.slot!r} is running already")
        with self._connect() as conn:
            check = slots.check_source(conn, self._plan(conn))
            if not check.ok:
                raise ChangeFeedError("the source cannot feed changes: " + "; ".join(check.problems))
            plan = self._plan(conn)
            slots.ensure_publication(conn, self.slot, plan)
            start_lsn = slots.create_slot(conn, self.slot)
            try:
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    seed_snapshot, seed_time = conn.execute(
                        "SELECT pg_catalog.pg_current_snapshot()::text, pg_catalog.now()").fetchone()
                    routes = seed_routes(conn, plan)
                feed_id = self.store.start_feed(slot=self.slot, start_lsn=parse_lsn(start_lsn),
                                                seed_snapshot=seed_snapshot, seed_time=seed_time,
                                                plan_fingerprint=plan.fingerprint, routes=routes)
            except BaseException:
                slots.drop_slot(conn, self.slot)  # a slot nobody drains would pin WAL for ever
                raise
        return {"feed": feed_id, "slot": self.slot, "start_lsn": start_lsn, "seed_time": seed_time,
                "routes": len(routes)}

    def stop(self, reason: str = "stopped by the operator") -> bool:
        """Drop the slot and publication; the feed's coverage ends at its last drain."""
        feed = self.store.live_feed(self.slot)
        if feed is not None:
            self.store.mark_lost(feed["id"], reason)
        with self._connect() as conn:
            return slots.drop_slot(conn, self.slot)

    def recover(self) -> dict[str, Any]:
        """After the slot was lost: record the gap (a barrier for every wedding), then start a new feed. Every
        wedding needs a fresh snapshot before it can be restored to a second past the gap."""
        feed = self.store.live_feed(self.slot)
        if feed is not None:
            self.store.mark_lost(feed["id"], "slot lost")
        with self._connect() as conn:
            slots.drop_slot(conn, self.slot)
        lost = max(self.store.feeds(), key=lambda f: f["id"], default=None)
        started = self.start()
        # The gap in the continuous range: from what the lost feed had captured to the new feed's start.
        started["gap_from"] = lost["covered_until"] if lost else None
        started["gap_to"] = started["seed_time"]
        return started

    # ---- draining ------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        feed = self.store.live_feed(self.slot)
        with self._connect() as conn:
            state = slots.slot_state(conn, self.slot)
        return {"slot": self.slot, "feed": feed, "slot_state": state, "weddings": self.store.newest_changes()}

    def drain(self) -> DrainResult:
        started = time.monotonic()
        feed = self.store.live_feed(self.slot)
        if feed is None:
            raise ChangeFeedError(f"no change feed on slot {self.slot!r}: start it first (wedbackup changes start)")
        result = DrainResult(self.slot, feed["id"])
        with self._connect() as conn:
            try:
                slots.require_slot(conn, self.slot)
            except SlotLost as exc:
                self.store.mark_lost(feed["id"], str(exc))
                raise
            plan = self._plan(conn)
            if plan.fingerprint != feed["plan_fingerprint"]:
                # DDL is not decoded: a changed schema is a barrier for every wedding, and the publication
                # follows the new plan.
                slots.ensure_publication(conn, self.slot, plan)
                result.barriers.append({"partition": None, "lsn": feed["persisted_lsn"],
                                        "at": conn.execute("SELECT now()").fetchone()[0],
                                        "reason": "the source's schema or tenancy plan changed"})
                self._set_fingerprint(feed["id"], plan.fingerprint)
            # What this peek covers: every commit before this moment, except those of write transactions
            # still in progress now (one may have taken its commit timestamp and not yet written its commit
            # record): coverage stops at the oldest of their starts. Seeing other sessions' transactions
            # needs superuser or pg_read_all_stats (the source check says so). Only this database's count (the
            # slot decodes no other's: a catalogue on the same server must not hold the feed back), and not
            # autovacuum's (its ANALYZE takes an xid but writes no row the feed decodes).
            peek_time, oldest_open, inserted = conn.execute(
                "SELECT pg_catalog.clock_timestamp(), (SELECT min(xact_start) FROM pg_catalog.pg_stat_activity "
                "WHERE backend_xid IS NOT NULL AND pid <> pg_catalog.pg_backend_pid() "
                "AND datname = pg_catalog.current_database() AND backend_type <> 'autovacuum worker'), "
                "pg_catalog.pg_current_wal_insert_lsn()::text").fetchone()
            # Decoding reads flushed WAL only: with synchronous_commit = off a commit can be acknowledged before
            # its record is flushed, so wait (the WAL writer flushes within wal_writer_delay) until everything
            # inserted before `peek_time` is flushed; else this drain does not claim to cover it.
            flushed = self._wait_for_flush(conn, inserted)
            if not flushed:
                peek_time = oldest_open = feed["covered_until"]
            rows = conn.execute(
                "SELECT data FROM pg_catalog.pg_logical_slot_peek_binary_changes(%s, NULL, %s, 'proto_version', '1', "
                "'publication_names', %s)", (self.slot, self.max_changes, slots.publication_name(self.slot))).fetchall()
            result.more = len(rows) >= self.max_changes
            persisted = feed["persisted_lsn"]
            seed = parse_snapshot(feed["seed_snapshot"])
            txns = []
            for txn in transactions((r[0] for r in rows), Decoder()):
                if txn.end_lsn <= persisted:
                    result.already_persisted += 1
                elif visible(txn.xid, seed):
                    result.before_feed += 1
                else:
                    txns.append(txn)
            del rows
            router = Router(plan, lambda keys: self.store.routes(feed["id"], keys))
            router.prefetch(ch for txn in txns for ch in txn.changes)
            drafts: dict[str, SegmentDraft] = {}
            for txn in txns:
                per_wedding: dict[str, SegmentTransaction] = {}
                for trunc in txn.truncates:
                    # A tenant table's: every partition (pgoutput sends no rows); a platform table's: the platform.
                    names = [r.table for r in trunc.relations if router.is_tenant(r)]
                    if names:
                        result.barriers.append({"partition": None, "lsn": txn.end_lsn, "at": txn.commit_time,
                                                "reason": f"TRUNCATE of {', '.join(names)}"})
                    names = [r.table for r in trunc.relations if router.is_platform(r)]
                    if names:
                        result.barriers.append({"partition": PLATFORM, "lsn": txn.end_lsn, "at": txn.commit_time,
                                                "reason": f"TRUNCATE of {', '.join(names)}"})
                for ch in txn.changes:
                    routed, barriers = router.route(ch)
                    for r in routed:
                        seg_txn = per_wedding.get(r.partition)
                        if seg_txn is None:
                            seg_txn = per_wedding[r.partition] = SegmentTransaction(
                                txn.xid, txn.commit_lsn, txn.end_lsn, txn.commit_time)
                        seg_txn.changes.append(r)
                        draft = drafts.setdefault(r.partition, SegmentDraft(r.partition))
                        draft.columns.setdefault(ch.relation.table, list(ch.relation.column_names))
                    for wedding, reason in barriers:
                        result.barriers.append({"partition": wedding, "lsn": txn.end_lsn, "at": txn.commit_time,
                                                "reason": reason})
                for wedding, seg_txn in per_wedding.items():
                    drafts[wedding].add(seg_txn)
                result.changes += len(txn.changes)
            result.transactions = len(txns)
            result.unrouted = router.unrouted
            sealed = self._seal(drafts, feed, result)
            new_lsn = max([persisted] + [t.end_lsn for t in txns])
            if result.more and txns:
                covered = txns[-1].commit_time
            else:
                covered = min(peek_time, oldest_open) if oldest_open else peek_time
            if not self.store.commit_drain(feed["id"], expected_lsn=persisted, persisted_lsn=new_lsn,
                                           covered_until=covered, segments=list(sealed.values()),
                                           route_changes=router.changed, barriers=result.barriers):
                for s in sealed.values():
                    self.vault.remove(s["partition"], s["sha256"])
                raise ChangeFeedError(f"another drain of slot {self.slot!r} recorded first; this one's segments "
                                      "were discarded (nothing lost: run it again)")
            result.segments = sealed
            # The backup schedule's signal that a wedding changed (as the updated_at capture gives it), here with
            # deletes and tables without updated_at included.
            self.catalogue.record_source_changes({w: s["last_commit"] for w, s in sealed.items()})
            result.persisted_lsn = lsn_text(new_lsn)
            result.covered_until = covered
            self._advance(conn, new_lsn)
            state = slots.slot_state(conn, self.slot) or {}
            result.lag_bytes = state.get("lag_bytes")
            result.retained_bytes = state.get("retained_bytes")
            result.safe_wal_size = state.get("safe_wal_size")
        result.seconds = round(time.monotonic() - started, 6)
        return result

    @staticmethod
    def _wait_for_flush(conn, lsn: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            (done,) = conn.execute("SELECT pg_catalog.pg_current_wal_flush_lsn() >= %s::pg_lsn", (lsn,)).fetchone()
            if done:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def _seal(self, drafts: dict[str, SegmentDraft], feed: dict[str, Any], result: DrainResult
              ) -> dict[str, dict[str, Any]]:
        keys = {}
        # Wedding keys are kept between drains (reading one costs a catalogue transaction); the erasures are
        # read afresh every drain, so a wedding erased since is never sealed again.
        erased = self.catalogue.erased_partitions() if drafts else set()
        for wedding, draft in drafts.items():
            if not draft.transactions:
                continue
            try:
                if wedding in erased:
                    self._keys.pop(wedding, None)
                    raise CryptoKeyError(f"wedding {wedding} was erased")
                if wedding not in self._keys:
                    self._keys[wedding] = self.catalogue.wedding_key(wedding, self.keyring)
                keys[wedding] = self._keys[wedding]
            except CryptoKeyError:
                # Erased while its changes were buffered in the slot: nothing of it is sealed, ever.
                result.erased.append(wedding)
        # Each segment waits for two fsyncs: sealed side by side, the disk serves them together.
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(keys))), thread_name_prefix="wedbackup-segment") as pool:
            futures = {w: pool.submit(seal, drafts[w], self.vault, k, feed_id=feed["id"], slot=self.slot,
                                      zstd_level=self.zstd_level) for w, k in keys.items()}
        return {w: f.result() for w, f in futures.items()}

    def _advance(self, conn, lsn: int) -> None:
        """Consume the slot up to `lsn`: only ever called after the catalogue recorded everything before it."""
        state = slots.require_slot(conn, self.slot)
        if parse_lsn(state["confirmed_flush_lsn"]) < lsn:
            conn.execute("SELECT pg_catalog.pg_replication_slot_advance(%s, %s::pg_lsn)", (self.slot, lsn_text(lsn)))

    def _set_fingerprint(self, feed_id: int, fingerprint: str) -> None:
        with self.catalogue.connect() as c:
            c.execute("UPDATE wedbackup.changefeed_feeds SET plan_fingerprint = %s WHERE id = %s",
                      (fingerprint, feed_id))

    # ---- replicas ------------------------------------------------------------------------------------
    def replicate(self, replica: Any, limit: int = 1000) -> dict[str, Any]:
        """Upload segments the provider lacks (content-addressed: a re-run is a no-op), each confirmed by the
        provider's checksum, and record the copies. Returns counts and failures."""
        done, failed = 0, {}
        for seg in self.store.segments_missing(replica.provider, limit):
            entry = self.vault.get(seg["partition"], seg["sha256"])
            if entry is None:
                failed[seg["sha256"][:12]] = "not in the vault"
                continue
            try:
                record = replica.upload(entry.path, partition=seg["partition"], sha256=seg["sha256"], size=seg["size"],
                                        metadata={"kind": "wedbackup-changes"},
                                        key=provider_key(replica.provider, replica.prefix, seg["partition"],
                                                         seg["sha256"]))
            except Exception as exc:  # noqa: BLE001 - one provider's refusal is reported, the rest go on
                failed[seg["sha256"][:12]] = str(exc)
                continue
            self.store.record_segment_copy(seg["id"], provider=replica.provider, uri=record.uri,
                                           object_key=record.key, version_id=record.version_id, size=record.size,
                                           checksum=record.provider_checksum)
            done += 1
        return {"provider": replica.provider, "uploaded": done, "failed": failed}
