"""The source side of the change feed: what a source must have (the check names every missing piece),
the publication of the tenancy plan's tables, and the logical replication slot itself (pgoutput, built in,
so nothing is installed on the server). Plain psycopg; no Dagster."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from wedbackup_dagster.core.postgres import tenancy

from .errors import ChangeFeedError, SlotLost

PLUGIN = "pgoutput"


@dataclass
class SourceCheck:
    """What `check_source` found: `problems` stop the feed; `warnings` say what to watch; `tables` say,
    per tenant table, how its changes are routed and what (if anything) it needs."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "warnings": self.warnings, "tables": self.tables}


def check_settings(settings: dict[str, str], *, role: dict[str, Any], slots_used: int) -> SourceCheck:
    """The server-wide part of the check, from `pg_settings` values and the connecting role: pure, so it is
    tested against settings rows of servers we do not run."""
    out = SourceCheck()
    level = settings.get("wal_level", "?")
    if level != "logical":
        out.problems.append(f"wal_level is {level!r}: the change feed needs wal_level = logical (set it in "
                            "postgresql.conf or ALTER SYSTEM SET wal_level = logical, then restart the server); "
                            "snapshots work without it")
    slots = int(settings.get("max_replication_slots", "0") or 0)
    if slots - slots_used < 1:
        out.problems.append(f"max_replication_slots is {slots} and {slots_used} in use: the feed needs one free "
                            "slot (raise it; server restart)")
    senders = int(settings.get("max_wal_senders", "0") or 0)
    if senders < 1:
        out.problems.append("max_wal_senders is 0: logical decoding needs at least 1 (server restart)")
    if not (role.get("superuser") or role.get("replication")):
        out.problems.append(f"role {role.get('name')!r} has neither REPLICATION nor SUPERUSER: it cannot create or "
                            "read a replication slot (ALTER ROLE … REPLICATION)")
    if not (role.get("superuser") or role.get("read_all_stats")):
        out.warnings.append(f"role {role.get('name')!r} cannot see other sessions' transactions (pg_read_all_stats): "
                            "the feed then cannot tell how far a drain's coverage reaches; GRANT pg_read_all_stats")
    if not role.get("superuser"):
        out.warnings.append(f"role {role.get('name')!r} is not a superuser: replay sets session_replication_role = "
                            "replica on the restore target, which needs a superuser there")
    keep = settings.get("max_slot_wal_keep_size", "-1")
    if keep in ("-1", "", None):
        out.warnings.append("max_slot_wal_keep_size is -1 (unlimited): a stalled feed keeps WAL until the disk is "
                            "full; set a cap (the slot is invalidated past it, and the feed recovers with fresh "
                            "snapshots)")
    return out


def _role(conn) -> dict[str, Any]:
    name, superuser, replication, stats = conn.execute(
        "SELECT rolname, rolsuper, rolreplication, pg_catalog.pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') "
        "FROM pg_catalog.pg_roles WHERE rolname = current_user").fetchone()
    return {"name": name, "superuser": superuser, "replication": replication, "read_all_stats": stats}


def check_tables(conn, plan: tenancy.TenancyPlan) -> list[dict[str, Any]]:
    """Per tenant table: its replica identity and how its DELETEs are routed. A DELETE carries only the
    replica identity; a table whose path to weddings does not start in its own key is routed by the
    feed's (table, key) → wedding map, so it needs a replica identity (a primary key, or FULL)."""
    rows = {(s, n): (ident, has_pk) for s, n, ident, has_pk in conn.execute(
        """SELECT n.nspname, c.relname, c.relreplident::text,
                  EXISTS (SELECT FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p')""")}
    out = []
    for t in plan.tenant_tables:
        ident, has_pk = rows.get((t.table.schema, t.table.name), ("?", False))
        entry = {"table": str(t.table), "replica_identity": {"d": "default", "f": "full", "i": "index",
                                                             "n": "nothing"}.get(ident, ident),
                 "routed_by": ("its own key (the wedding root)" if not t.path else
                               "the (table, key) → wedding map for DELETEs; its foreign key for the rest"),
                 "needs": None}
        if ident == "n" or (ident == "d" and not has_pk):
            entry["needs"] = (f"a replica identity: {t.table} has no primary key, so its UPDATEs and DELETEs "
                              f"fail on the source once published; add a primary key or ALTER TABLE "
                              f"{t.table} REPLICA IDENTITY FULL")
        out.append(entry)
    return out


def check_source(conn, plan: tenancy.TenancyPlan | None = None) -> SourceCheck:
    """Everything the feed needs from the source, each missing piece named."""
    settings = dict(conn.execute(
        "SELECT name, setting FROM pg_catalog.pg_settings WHERE name IN ('wal_level', 'max_replication_slots', "
        "'max_wal_senders', 'max_slot_wal_keep_size')").fetchall())
    (used,) = conn.execute("SELECT count(*) FROM pg_catalog.pg_replication_slots").fetchone()
    out = check_settings(settings, role=_role(conn), slots_used=used)
    if plan is not None:
        out.tables = check_tables(conn, plan)
        out.problems.extend(t["needs"] for t in out.tables if t["needs"])
    return out


def require_logical(conn) -> None:
    """Raise the check's problems (server settings and role) as one clear error."""
    check = check_source(conn)
    if not check.ok:
        raise ChangeFeedError("the source cannot feed changes: " + "; ".join(check.problems))


def publication_name(slot: str) -> str:
    return f"{slot}_pub"


def published_tables(plan: tenancy.TenancyPlan) -> list[tenancy.TenantTable | tenancy.PlatformTable]:
    """What the feed captures: every tenant table, and the platform tables with a primary key. A platform table
    without one is left out — published, its UPDATEs and DELETEs would fail on the source — so the platform
    partition is then not replayed (restored to its snapshot; replay.py names the table)."""
    return [*plan.tenant_tables, *(t for t in plan.platform_tables if t.keyed)]


def ensure_publication(conn, slot: str, plan: tenancy.TenancyPlan) -> None:
    """The publication of exactly `published_tables(plan)`, made or brought up to date. Its name follows the
    slot's."""
    name = publication_name(slot)
    tables = sql.SQL(", ").join(t.table.ident() for t in published_tables(plan))
    exists = conn.execute("SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = %s", (name,)).fetchone()
    verb = "ALTER PUBLICATION {} SET TABLE {}" if exists else "CREATE PUBLICATION {} FOR TABLE {}"
    conn.execute(sql.SQL(verb).format(sql.Identifier(name), tables))


def slot_state(conn, slot: str) -> dict[str, Any] | None:
    row = conn.execute(
        """SELECT slot_name, plugin, database, confirmed_flush_lsn::text, restart_lsn::text, wal_status,
                  safe_wal_size, active, pg_catalog.pg_current_wal_lsn()::text AS current_lsn,
                  (pg_catalog.pg_current_wal_lsn() - confirmed_flush_lsn)::bigint AS lag_bytes,
                  (pg_catalog.pg_current_wal_lsn() - restart_lsn)::bigint AS retained_bytes
             FROM pg_catalog.pg_replication_slots WHERE slot_name = %s""", (slot,)).fetchone()
    if row is None:
        return None
    keys = ("slot", "plugin", "database", "confirmed_flush_lsn", "restart_lsn", "wal_status", "safe_wal_size",
            "active", "current_lsn", "lag_bytes", "retained_bytes")
    return dict(zip(keys, row))


def require_slot(conn, slot: str) -> dict[str, Any]:
    """The slot's state, or SlotLost when someone dropped it or the server invalidated it."""
    state = slot_state(conn, slot)
    if state is None:
        raise SlotLost(f"replication slot {slot!r} is gone (dropped on the source): changes since the last drain "
                       "are lost; the feed needs a new slot and every wedding a fresh snapshot")
    if state["wal_status"] == "lost":
        raise SlotLost(f"replication slot {slot!r} was invalidated by the server (its retained WAL passed "
                       "max_slot_wal_keep_size): changes since the last drain are lost; the feed needs a new slot "
                       "and every wedding a fresh snapshot")
    if state["database"] != conn.info.dbname:
        raise ChangeFeedError(f"replication slot {slot!r} belongs to database {state['database']!r}, not "
                              f"{conn.info.dbname!r}")
    return state


def create_slot(conn, slot: str) -> str:
    """Create the logical slot (pgoutput); returns its consistent point (LSN text). Waits for write
    transactions open at that moment to end, as PostgreSQL must."""
    require_logical(conn)
    try:
        (lsn,) = conn.execute("SELECT lsn::text FROM pg_catalog.pg_create_logical_replication_slot(%s, %s)",
                              (slot, PLUGIN)).fetchone()
    except psycopg.errors.DuplicateObject:
        raise ChangeFeedError(f"replication slot {slot!r} exists already on the source") from None
    return lsn


def drop_slot(conn, slot: str) -> bool:
    """Drop the slot and its publication (both may be gone already); True when the slot was there."""
    conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(publication_name(slot))))
    found = conn.execute("SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots "
                         "WHERE slot_name = %s", (slot,)).fetchall()
    return bool(found)


SLOT_SETTING = "WEDBACKUP_CHANGEFEED_SLOT"
DEFAULT_SLOT = "wedbackup_feed"


def slot_from_env(environ) -> str:
    """The slot's name from WEDBACKUP_CHANGEFEED_SLOT (default wedbackup_feed): PostgreSQL allows lower-case
    letters, digits and underscores, at most 63."""
    import re

    name = environ.get(SLOT_SETTING) or DEFAULT_SLOT
    if not re.fullmatch(r"[a-z0-9_]{1,63}", name):
        raise ChangeFeedError(f"{SLOT_SETTING}={name!r}: a replication slot name is 1-63 lower-case letters, digits "
                              "or underscores")
    return name
