"""Replay: a wedding's captured changes applied on top of a restored snapshot, up to a second T, inside the
restore's own transaction.

Which transactions: those of the wedding's segments that the snapshot did not see (pg_visible_in_snapshot's
rule, evaluated here from the xmin, xmax and in-progress list the snapshot recorded) and that committed at or
before T, in commit (LSN) order, each once. Refused, naming the nearest restorable points, when T is past
what the feed has captured, when a barrier (TRUNCATE, a schema change, a lost slot, a parent row moving
between weddings) lies between the snapshot and T, or when no feed covers the snapshot.

How: with session_replication_role = replica, as PostgreSQL's own logical replication applies changes (the
feed already holds what triggers and cascades did on the source). Every change must touch exactly one row,
and afterwards each table's row count must equal the snapshot's plus the segments' inserts minus deletes."""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from wedbackup_dagster.core.partitions import PLATFORM
from wedbackup_dagster.core.postgres import tenancy

from .errors import ReplayRefused
from .segments import provider_key, read_segment, segment_vault
from .store import FeedStore
from .visibility import parse_snapshot, visible

# Segments are chosen by commit time with this margin before the snapshot; the visibility rule then decides
# exactly (a commit's timestamp precedes the moment it becomes visible by far less).
SELECTION_MARGIN = timedelta(minutes=10)
REPLAY_BATCH = 2000  # statements per pipeline sync


@dataclass
class ReplayPlan:
    partition: str
    feed_id: int
    snapshot: str
    snapshot_time: datetime
    as_of: datetime
    segments: list[dict[str, Any]]
    covered_until: datetime


@dataclass
class ReplayReport:
    partition: str
    as_of: str
    transactions: int = 0
    changes: int = 0
    segments: int = 0
    tables: dict[str, dict[str, int]] = field(default_factory=dict)  # table -> I/U/D applied, rows after

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _fmt(t: datetime | None) -> str:
    return t.isoformat() if t else "-"


def plan_replay(store: FeedStore, partition: str, manifest: Mapping[str, Any], snapshot_time: datetime,
                as_of: datetime | None, next_snapshot: datetime | None = None) -> ReplayPlan | None:
    """What to replay on top of the snapshot with `manifest` to reach `as_of` (None: as far as captured).
    None when the catalogue has no change feed at all (a snapshot-only restore, as before the feed).
    `next_snapshot`: the wedding's first snapshot after `as_of`, named in a refusal as the next restorable point."""
    after = (f", or the wedding's next snapshot, of {next_snapshot.isoformat()}, and any second the feed covers "
             "after it" if next_snapshot else ", or a snapshot taken after it (none yet)")
    feeds = store.feeds()
    if not feeds:
        return None
    snap = parse_snapshot(manifest["snapshot"])
    # The feed whose seed the snapshot saw entirely: every transaction the snapshot missed is in that feed.
    usable = [f for f in feeds if parse_snapshot(f["seed_snapshot"]).xmax <= snap.xmin
              and f["seed_time"] <= snapshot_time]
    if not usable:
        first = min(feeds, key=lambda f: f["seed_time"])
        raise ReplayRefused(f"{_label(partition)}: its snapshot of {_fmt(snapshot_time)} was taken before the change "
                            f"feed started ({_fmt(first['seed_time'])}): it can be restored to that snapshot only; "
                            "take a fresh snapshot to restore to any second after it")
    feed = max(usable, key=lambda f: f["id"])
    if partition == PLATFORM and not feed.get("platform_captured"):
        if as_of is None:
            return None  # the platform to its snapshot, as before the feed captured it
        raise ReplayRefused(f"the platform partition: the change feed extending its snapshot of "
                            f"{_fmt(snapshot_time)} (started {_fmt(feed['seed_time'])}) does not capture the "
                            "platform's tables: restore it to that snapshot (without --as-of), or start a new feed "
                            "and take a fresh snapshot")
    covered = feed["covered_until"]
    target = as_of or covered
    if target > covered:
        raise ReplayRefused(f"{_label(partition)}: {target.isoformat()} is past what the change feed has captured "
                            f"({covered.isoformat()}{', where the feed was lost' if feed['lost_at'] else ''}); the "
                            f"nearest restorable points: any second from {snapshot_time.isoformat()} to "
                            f"{covered.isoformat()}{after}")
    for b in store.barriers(partition):
        if snapshot_time < b["at"] <= target and (b["feed_id"] in (None, feed["id"])):
            raise ReplayRefused(f"{_label(partition)}: replay from the snapshot of {snapshot_time.isoformat()} to "
                                f"{target.isoformat()} would cross a barrier at {b['at'].isoformat()} ({b['reason']}); "
                                f"the nearest restorable points: any second from {snapshot_time.isoformat()} to before "
                                f"{b['at'].isoformat()}{after}")
    segments = [s for s in store.segments(partition, feed_id=feed["id"], since=snapshot_time - SELECTION_MARGIN)
                if s["first_commit"] <= target]
    return ReplayPlan(partition, feed["id"], manifest["snapshot"], snapshot_time, target, segments, covered)


def load_transactions(plan: ReplayPlan, fetch: Callable[[dict[str, Any]], Any], resolve_key) -> list[dict[str, Any]]:
    """The plan's transactions to apply, in commit order, each once. `fetch(segment)` opens a copy of the
    segment (a file object) that the sealed format then checks chunk by chunk."""
    snap = parse_snapshot(plan.snapshot)
    seen: set[tuple[int, int]] = set()
    out = []
    for seg in plan.segments:
        with fetch(seg) as fh:
            opened = read_segment(fh, name=f"change segment {seg['sha256'][:12]} of {_label(plan.partition)}",
                                  resolve_key=resolve_key)
        if str(opened.header.get("partition")) != plan.partition:
            raise ReplayRefused(f"change segment {seg['sha256'][:12]} holds wedding {opened.header.get('partition')}, "
                                f"not {plan.partition}")
        for txn in opened.transactions:
            ident = (txn["xid"], txn["end_lsn"])
            if ident in seen or visible(txn["xid"], snap):
                continue
            if datetime.fromisoformat(txn["commit_time"]) > plan.as_of:
                continue
            seen.add(ident)
            txn["columns"] = opened.header["columns"]
            out.append(txn)
    out.sort(key=lambda t: t["end_lsn"])
    return out


def _types(conn, table: tenancy.TableName) -> dict[str, str]:
    return dict(conn.execute(
        "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a "
        "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
        (f"{sql.Identifier(table.schema, table.name).as_string(conn)}",)).fetchall())


def apply(conn, live_plan: tenancy.TenancyPlan, txns: list[dict[str, Any]], manifest: Mapping[str, Any],
          partition: str, as_of: datetime, placed: Mapping[str, sql.Identifier] | None = None) -> ReplayReport:
    """Apply `txns` on `conn` (inside the restore's transaction) and check the outcome. `placed`: where each
    table's rows were restored instead of the table itself (`--into-schema`: a copy holding this wedding only)."""
    report = ReplayReport(partition, as_of.isoformat(), transactions=len(txns))
    tables: dict[str, Any] = {str(t.table): t for t in live_plan.tenant_tables}
    if partition == PLATFORM:
        keyless = [str(t.table) for t in live_plan.platform_tables if not t.keyed]
        if keyless:
            raise ReplayRefused(f"the platform partition: {', '.join(keyless)} ha{'s' if len(keyless) == 1 else 've'} "
                                "no primary key, so the change feed does not capture it (published, its UPDATEs and "
                                "DELETEs would fail on the source): restore the platform to a snapshot (without "
                                "--as-of), or give it a primary key")
        tables.update({str(t.table): t for t in live_plan.platform_tables})
    manifest_tables = {f"{t['schema']}.{t['name']}": t for t in manifest["tables"]}
    types_of: dict[str, dict[str, str]] = {}
    if placed is None:  # copies (a stage, an inspection schema) have no triggers or foreign keys to hold off
        conn.execute("SET LOCAL session_replication_role = replica")
    # Statements go out pipelined (no round trip each), a few thousand at a time; each must have touched
    # exactly one row (by primary key), checked on its own result once the batch is synced.
    statements: dict[tuple, bytes] = {}
    batch: list[tuple[bytes, tuple, tuple]] = []

    def flush() -> None:
        if not batch:
            return
        try:
            with conn.pipeline():
                cursors = []
                for query, params, where in batch:
                    cur = conn.cursor()
                    cur.execute(query, params)
                    cursors.append((cur, where))
        except psycopg.Error as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ReplayRefused(f"{_label(partition)}: replaying the change feed failed ({first}): the "
                                "restored snapshot and the change feed disagree; nothing was written") from None
        for cur, (xid, op, name, key) in cursors:
            if cur.rowcount != 1:
                raise ReplayRefused(f"{_label(partition)}: replaying transaction {xid} ({op} on {name}, key {key}) "
                                    f"touched {cur.rowcount} rows, not 1: the restored snapshot and the change feed "
                                    "disagree; nothing was written")
            cur.close()
        batch.clear()

    for txn in txns:
        for name, cols in txn["columns"].items():
            known = manifest_tables.get(name)
            if known is None or [c for c in known["columns"] if c in cols] != list(cols):
                raise ReplayRefused(f"{_label(partition)}: table {name}'s columns in the change feed "
                                    f"({', '.join(cols)}) "
                                    f"are not the snapshot's ({', '.join(known['columns']) if known else 'absent'}): "
                                    "replay never crosses a schema change; restore a snapshot taken after it")
        for op, name, row, key in txn["changes"]:
            t = tables.get(name)
            if t is None:
                raise ReplayRefused(f"{_label(partition)}: table {name} of the change feed is not a table of the "
                                    "target's tenancy plan")
            shape = (op, name, tuple(row or ()), tuple(key or ()))
            query = statements.get(shape)
            if query is None:
                into = placed.get(name) if placed is not None else None
                if placed is not None and into is None:
                    raise ReplayRefused(f"{_label(partition)}: table {name} of the change feed was not restored")
                query = statements[shape] = _statement(conn, t, op, row, key, types_of, into).as_bytes(conn)
            params = (*(row or {}).values(), *(key or {}).values()) if op != "D" else tuple(key.values())
            batch.append((query, params, (txn["xid"], op, name, key)))
            if len(batch) >= REPLAY_BATCH:
                flush()
            counts = report.tables.setdefault(name, {"I": 0, "U": 0, "D": 0})
            counts[op] += 1
            report.changes += 1
    flush()
    if placed is None:
        conn.execute("SET LOCAL session_replication_role = origin")
    params = {"wedding_id": partition}
    for name, counts in report.tables.items():
        expected = manifest_tables[name]["rows"] + counts["I"] - counts["D"]
        if placed is not None:
            (rows,) = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(placed[name])).fetchone()
        elif partition == PLATFORM:  # the platform's rows of the table, as its snapshot selects them
            select = tables[name].platform_select()
            (rows,) = conn.execute(sql.SQL("SELECT count(*) FROM ({}) AS r").format(select)).fetchone()
        else:
            (rows,) = conn.execute(sql.SQL("SELECT count(*) FROM ({}) AS r").format(
                tables[name].wedding_rows([sql.SQL("1")])), params).fetchone()
        counts["rows"] = rows
        if rows != expected:
            raise ReplayRefused(f"{_label(partition)}: after replay table {name} holds {rows} rows, the snapshot and "
                                f"the segments say {expected}; nothing was written")
    return report


def _label(partition: str) -> str:
    return "the platform partition" if partition == PLATFORM else f"wedding {partition}"


def _statement(conn, t: tenancy.TenantTable | tenancy.PlatformTable, op: str, row: dict[str, Any] | None, key: dict[str, Any] | None,
               types_of: dict[str, dict[str, str]], into: sql.Identifier | None = None) -> sql.Composed:
    name = str(t.table)
    types = types_of.get(name) or types_of.setdefault(name, _types(conn, t.table))

    def vals(d: dict[str, Any]) -> sql.Composable:
        return sql.SQL(", ").join(sql.SQL("CAST({} AS {})").format(sql.Placeholder(), sql.SQL(types[c])) for c in d)

    def where(d: dict[str, Any]) -> sql.Composable:
        return sql.SQL(" AND ").join(
            sql.SQL("{} = CAST({} AS {})").format(sql.Identifier(c), sql.Placeholder(), sql.SQL(types[c])) for c in d)

    if op == "I":
        return sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({})").format(
            into or t.table.ident(), sql.SQL(", ").join(map(sql.Identifier, row)), vals(row))
    if op == "U":
        return sql.SQL("UPDATE {} SET ({}) = ROW({}) WHERE {}").format(
            into or t.exact(), sql.SQL(", ").join(map(sql.Identifier, row)), vals(row), where(key))
    return sql.SQL("DELETE FROM {} WHERE {}").format(into or t.exact(), where(key))


class SegmentSource:
    """Opens a segment's copy: the vault's, else the first provider holding one (SHA-256 checked on download)."""

    def __init__(self, store: FeedStore, vault_dir: str, replicas: Mapping[str, Any] | None = None):
        self.store = store
        self.vault = segment_vault(vault_dir)
        self.replicas = dict(replicas or {})

    def __call__(self, seg: dict[str, Any]):
        entry = self.vault.get(seg["partition"], seg["sha256"])
        if entry is not None:
            return open(entry.path, "rb")
        copies = {c["provider"] for c in self.store.segment_copies(seg["id"])}
        for provider, replica in self.replicas.items():
            if provider in copies:
                tmp = tempfile.TemporaryFile()
                replica.download(provider_key(provider, replica.prefix, seg["partition"], seg["sha256"]), tmp,
                                 expected_sha256=seg["sha256"])
                tmp.seek(0)
                return tmp
        raise ReplayRefused(f"change segment {seg['sha256'][:12]} of wedding {seg['partition']}: no reachable copy")


class PreparedReplay:
    """The callable a restore runs inside its transaction, after the snapshot's rows are in and checked:
    applies the prepared transactions and keeps the report."""

    def __init__(self, plan: ReplayPlan, txns: list[dict[str, Any]], manifest: Mapping[str, Any]):
        self.plan = plan
        self.txns = txns
        self.manifest = manifest
        self.report: ReplayReport | None = None

    def net_rows(self) -> dict[str, int]:
        """Per table, the transactions' inserts less their deletes, counted without applying anything (a dry
        run into an empty database, which has no tables to stage in); also kept as the report."""
        report = ReplayReport(self.plan.partition, self.plan.as_of.isoformat(), transactions=len(self.txns),
                              segments=len(self.plan.segments))
        for txn in self.txns:
            for op, name, _, _ in txn["changes"]:
                report.tables.setdefault(name, {"I": 0, "U": 0, "D": 0})[op] += 1
                report.changes += 1
        self.report = report
        return {name: c["I"] - c["D"] for name, c in report.tables.items()}

    def __call__(self, conn, placed: Mapping[str, sql.Identifier] | None = None) -> None:
        live_plan = tenancy.discover(conn)
        self.report = apply(conn, live_plan, self.txns, self.manifest, self.plan.partition, self.plan.as_of, placed)
        self.report.segments = len(self.plan.segments)
        if placed is not None:  # copies made LIKE the tables: no sequences of their own
            return
        # Replayed inserts may carry ids past what the snapshot held: sequences move past them (never back).
        from wedbackup_dagster.core.postgres.load_snapshot import advance_sequences

        advance_sequences(conn, [tuple(name.split(".", 1)) for name in self.report.tables])


def prepare_for_restore(engine: Any, backup: Any, as_of: datetime | None, replicas: Mapping[str, Any],
                        progress: Callable[[str], None]) -> PreparedReplay | None:
    """For `recover`: the replay from `backup`'s snapshot to `as_of` (None: as far as captured), its segments
    fetched and opened now, before the restore's transaction begins. None when no change feed exists."""
    store = FeedStore(engine.catalogue)
    if not _feed_tables_exist(engine.catalogue):
        return None
    if backup.partition == PLATFORM and as_of is None:
        return None  # the platform is replayed to an explicit --as-of only; by default, its newest snapshot
    with engine.catalogue.connect() as conn:
        row = conn.execute("SELECT min(snapshot_time) AS t FROM wedbackup.backups WHERE partition = %s "
                           "AND snapshot_time > %s", (backup.partition, as_of or backup.snapshot_time)).fetchone()
    plan = plan_replay(store, backup.partition, backup.manifest, backup.snapshot_time, as_of,
                       next_snapshot=row["t"] if row else None)
    if plan is None:
        return None
    txns = load_transactions(plan, SegmentSource(store, str(engine.settings.vault_dir), replicas), engine.resolve_key)
    progress(f"{_label(backup.partition)}: {len(txns):,} transaction(s) of {len(plan.segments)} change segment(s) to "
             f"replay from {backup.snapshot_time.isoformat()} to {plan.as_of.isoformat()}")
    return PreparedReplay(plan, txns, backup.manifest)


def _feed_tables_exist(catalogue: Any) -> bool:
    with catalogue.connect() as conn:
        row = conn.execute("SELECT pg_catalog.to_regclass('wedbackup.changefeed_feeds') IS NOT NULL AS present"
                           ).fetchone()
    return bool(row["present"] if isinstance(row, dict) else row[0])


def continuous_ranges(catalogue: Any, partition: str, points: list[Any], limit: int = 5
                      ) -> dict[str, tuple[datetime, datetime, str]]:
    """For `wedbackup points`: per recovery point (archive SHA-256; the newest `limit`), the continuous range
    the change feed extends it over — from its snapshot to the first barrier after it or what the feed has
    captured — and why it ends there. Points no feed covers are left out."""
    if not _feed_tables_exist(catalogue):
        return {}
    store = FeedStore(catalogue)
    feeds = store.feeds()
    barriers = store.barriers(partition)
    out = {}
    for p in points[:limit]:
        backup = catalogue.backup_by_sha(p.archive_sha256)
        if backup is None or "snapshot" not in backup.manifest:
            continue
        snap = parse_snapshot(backup.manifest["snapshot"])
        usable = [f for f in feeds if parse_snapshot(f["seed_snapshot"]).xmax <= snap.xmin
                  and f["seed_time"] <= p.snapshot_time]
        if not usable:
            continue
        feed = max(usable, key=lambda f: f["id"])
        if partition == PLATFORM and not feed.get("platform_captured"):
            continue
        end, why = feed["covered_until"], "feed lost" if feed["lost_at"] else "captured so far"
        for b in barriers:
            if p.snapshot_time < b["at"] < end and b["feed_id"] in (None, feed["id"]):
                end, why = b["at"], f"barrier: {b['reason']}"
                break
        out[p.archive_sha256] = (p.snapshot_time, end, why)
    return out
