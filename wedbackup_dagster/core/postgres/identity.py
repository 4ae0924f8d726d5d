"""Which database a DSN really reaches, and the guards built on it: a restore target may be neither the live
source (only an in-place restore touches that) nor the catalogue, and the catalogue may not be the source.
Two DSNs are compared by the server they reach (its system identifier, postmaster start time and port,
and the database's OID, read over a connection), so another spelling (keyword form, `localhost` for
127.0.0.1, extra parameters, a service file, PG* variables) cannot pass; and, as a fallback that needs no
connection, by the resolved host, port and database name under libpq's defaults."""
from __future__ import annotations

import configparser
import getpass
import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from wedbackup_dagster.core.errors import ConfigError, RestoreError

_LOOPBACK = "loopback"


@dataclass(frozen=True)
class ServerIdentity:
    """What a connection reached: the cluster (system identifier when readable, postmaster start time and
    port, which together tell two servers apart even on one machine) and the database in it."""
    system_identifier: int | None
    started: datetime
    port: str
    database_oid: int
    database: str

    def same_database(self, other: ServerIdentity) -> bool:
        if None not in (self.system_identifier, other.system_identifier) and \
                self.system_identifier != other.system_identifier:
            return False
        return (self.started, self.port, self.database_oid) == (other.started, other.port, other.database_oid)


def server_identity(dsn: str, *, timeout: int = 5) -> ServerIdentity | None:
    """The identity of the database `dsn` reaches, or None when it cannot be reached (the caller then
    falls back to comparing DSNs; the restore itself reports the unreachable server)."""
    import psycopg

    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=timeout,
                             application_name="wedbackup-identity") as conn:
            row = conn.execute(
                "SELECT pg_catalog.pg_postmaster_start_time(), pg_catalog.current_setting('port'),"
                " d.oid::bigint, d.datname::text FROM pg_catalog.pg_database d"
                " WHERE d.datname = pg_catalog.current_database()").fetchone()
            try:  # pg_control_system() is for superusers and pg_monitor members only
                system = conn.execute("SELECT system_identifier FROM pg_catalog.pg_control_system()").fetchone()[0]
            except psycopg.Error:
                system = None
    except (psycopg.Error, ValueError):  # ValueError: a DSN psycopg cannot even parse
        return None
    return ServerIdentity(system, row[0], str(row[1]), int(row[2]), row[3])


def _service(name: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The `[name]` section of the user's or the system's pg_service.conf (libpq's lookup order)."""
    files = [environ.get("PGSERVICEFILE") or str(Path.home() / ".pg_service.conf")]
    files.append(str(Path(environ.get("PGSYSCONFDIR") or "/etc/postgresql-common") / "pg_service.conf"))
    for file in files:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(file)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        if parser.has_section(name):
            return dict(parser.items(name))
    return {}


def _hosts(host: str, hostaddr: str, resolve: bool) -> frozenset[str]:
    """A host as a set of addresses: loopback names and addresses are one; unix sockets are the machine."""
    out: set[str] = set()
    for name in (hostaddr or host or "").split(",") or [""]:
        name = name.strip()
        if not name or name.startswith("/") or name.startswith("@") or name.lower() == "localhost":
            out.add(_LOOPBACK)
            continue
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            address = None
        if address is not None:
            out.add(_LOOPBACK if address.is_loopback else str(address))
            continue
        out.add(name.lower().rstrip("."))
        if resolve:
            try:
                for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP):
                    found = ipaddress.ip_address(info[4][0])
                    out.add(_LOOPBACK if found.is_loopback else str(found))
            except (OSError, UnicodeError, ValueError):
                pass
    return frozenset(out)


@dataclass(frozen=True)
class DsnAddress:
    hosts: frozenset[str]
    port: str
    database: str

    def same_database(self, other: DsnAddress) -> bool:
        return self.port == other.port and self.database == other.database and bool(self.hosts & other.hosts)


def dsn_address(dsn: str, environ: Mapping[str, str] | None = None, *, resolve: bool = True) -> DsnAddress:
    """Host(s), port and database a DSN names once libpq's defaults are applied: the DSN's own fields,
    then its service's, then PGHOST/PGPORT/PGDATABASE/PGUSER, then localhost, 5432 and the user's name."""
    from psycopg.conninfo import conninfo_to_dict

    env = os.environ if environ is None else environ
    parts = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v not in (None, "")}
    service = parts.get("service") or env.get("PGSERVICE")
    if service:
        parts = {**_service(service, env), **parts}

    def field(name: str, variable: str, default: str) -> str:
        return parts.get(name) or env.get(variable) or default

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    user = field("user", "PGUSER", user)
    port = field("port", "PGPORT", "5432").split(",")[0].strip() or "5432"
    return DsnAddress(_hosts(field("host", "PGHOST", ""), field("hostaddr", "PGHOSTADDR", ""), resolve),
                      port, field("dbname", "PGDATABASE", user))


def same_database(a: str, b: str, *, identities: dict[str, ServerIdentity | None] | None = None) -> bool:
    """Whether two DSNs reach the same database: by server identity when both connect, and (always) by
    their resolved addresses, so a DSN that cannot connect right now is still recognised."""
    try:
        if dsn_address(a).same_database(dsn_address(b)):
            return True
    except Exception:  # noqa: BLE001 - a DSN that does not parse names no database we could compare
        pass
    cache = {} if identities is None else identities
    for dsn in (a, b):
        if dsn not in cache:
            cache[dsn] = server_identity(dsn)
    first, second = cache[a], cache[b]
    return first is not None and second is not None and first.same_database(second)


def check_restore_target(target_dsn: str, *, source_dsn: str, catalogue_dsn: str, mode: str) -> None:
    """The one guard every restore entry point (command line, restore_wedding job, engine) goes through:
    a restore into another database (mode `target`) may not reach the live source database, and no restore
    may write into the catalogue. A new inspection schema (mode `schema`) may go into the source."""
    identities: dict[str, ServerIdentity | None] = {}
    if same_database(target_dsn, catalogue_dsn, identities=identities):
        raise RestoreError("the restore target is the catalogue database (WEDBACKUP_CATALOGUE_DSN): restore into "
                           "another database; the catalogue holds the backups' keys and records")
    if mode == "target" and same_database(target_dsn, source_dsn, identities=identities):
        raise RestoreError("the restore target is the live source database (WEDBACKUP_SOURCE_DSN), written another "
                           "way: a restore into another database would overwrite production without the in-place "
                           "safeguards; use --in-place (mode in_place) to restore a wedding there, or name another "
                           "database")


_CHECKED: set[tuple[str, str]] = set()  # pairs whose servers were compared already (once per process)


def check_catalogue_not_source(source_dsn: str, catalogue_dsn: str, *, connect: bool) -> None:
    """The catalogue may not be the source database: its wedding keys would be sealed into the platform's
    archives. Without `connect`, only the DSNs are compared (settings load); with it, the servers too, once
    per process for a pair of DSNs."""
    if connect and (source_dsn, catalogue_dsn) in _CHECKED:
        return
    if connect:
        same = same_database(source_dsn, catalogue_dsn)
    else:
        try:
            same = dsn_address(source_dsn, resolve=False).same_database(dsn_address(catalogue_dsn, resolve=False))
        except Exception:  # noqa: BLE001 - each DSN was validated on its own already
            same = False
    if same:
        raise ConfigError("WEDBACKUP_CATALOGUE_DSN", "reaches the same database as WEDBACKUP_SOURCE_DSN: the "
                                                     "catalogue must be a database of its own (its wedding keys would "
                                                     "otherwise be backed up into the platform's archives)")
    if connect:
        _CHECKED.add((source_dsn, catalogue_dsn))
