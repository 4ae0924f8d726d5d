"""Find leaked secrets: the configured secret values (master keys, provider keys, SAS tokens, DSN
passwords; master and wedding keys also as raw bytes) searched for in text, in files (Dagster's SQLite event
logs and compute logs included, read as bytes) and in every text, json and bytea column of a PostgreSQL
database, big tables streamed. A finding names where the secret was and which setting it belongs to, never
the value. The test session runs it over everything the suite wrote (wedbackup_dagster_tests/secrets_guard.py)."""
from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus

from wedbackup_dagster.core.config import SECRET_VARIABLES

# Secrets shorter than this are not searched for: they would match by chance (and are no secrets).
MIN_SECRET = 8
_SAS_SIGNATURE = re.compile(rb"(?i)(?:^|[?&;\s\"'])sig=(?!\*\*\*)([A-Za-z0-9%+/=]{16,})")
_READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class Finding:
    where: str  # a file, a database table and column, a test's captured output
    secret: str  # which secret: a setting's name and part (never the value)

    def __str__(self) -> str:
        return f"{self.secret} found in {self.where}"


def secret_parts(environ: Mapping[str, str]) -> dict[str, str | bytes]:
    """label -> value for every secret in `environ`: each secret setting whole, and the parts that leak
    on their own (a DSN's password, each master key's base64, hex and raw bytes, an account key, a SAS
    signature). Raw bytes are searched for as they are (a key written into a bytea column)."""
    from psycopg.conninfo import conninfo_to_dict

    out: dict[str, str | bytes] = {}
    # An access key *id* names a key, it is not one (and the local stack's, "wedbackup-local", is also
    # the GCS project's name): leaking it alone opens nothing.
    for name in sorted(SECRET_VARIABLES - {"AWS_ACCESS_KEY_ID"}):
        value = environ.get(name, "")
        if not value:
            continue
        out[name] = value
        if name.endswith("_DSN"):
            try:
                password = conninfo_to_dict(value).get("password")
            except Exception:  # noqa: BLE001 - a malformed DSN still counts whole
                password = None
            if password:
                out[f"{name} password"] = str(password)
        elif name == "WEDBACKUP_MASTER_KEY":
            for i, entry in enumerate(value.split(",")):
                key_id, _, material = entry.strip().partition(":")
                if material:
                    out[f"{name} #{i + 1} ({key_id})"] = material
                    try:
                        raw = base64.b64decode(material)
                    except ValueError:
                        continue
                    out[f"{name} #{i + 1} ({key_id}) as hex"] = raw.hex()
                    out[f"{name} #{i + 1} ({key_id}) as raw bytes"] = raw
        elif name == "WEDBACKUP_AZURE_CONNECTION_STRING":
            for part in value.split(";"):
                field, _, secret = part.partition("=")
                if field.strip() in ("AccountKey", "SharedAccessSignature") and secret:
                    out[f"{name} {field.strip()}"] = secret
                    for sig in re.findall(r"(?:^|[?&])sig=([^&]+)", secret):
                        out[f"{name} SAS signature"] = sig
    return {label: v for label, v in out.items() if len(v) >= MIN_SECRET}


def wedding_key_secrets(catalogue_dsn: str, environ: Mapping[str, str]) -> dict[str, bytes]:
    """label -> raw bytes of every live wedding key in a catalogue, unwrapped with the master keys of
    `environ` (none when the database has no key table or the keys are not ours to open)."""
    import psycopg

    from wedbackup_dagster.core.catalogue.store import Catalogue
    from wedbackup_dagster.core.errors import WedbackupError
    from wedbackup_dagster.core.keys.keyring import load_master_keyring

    try:
        keyring = load_master_keyring(environ)
        with psycopg.connect(catalogue_dsn, autocommit=True, application_name="wedbackup-secretscan") as conn:
            if conn.execute("SELECT pg_catalog.to_regclass('wedbackup.wedding_keys')").fetchone()[0] is None:
                return {}
            rows = conn.execute("SELECT key_id, partition, wrapped, master_key_id FROM wedbackup.wedding_keys "
                                "WHERE wrapped IS NOT NULL").fetchall()
    except (psycopg.Error, WedbackupError):
        return {}
    out: dict[str, bytes] = {}
    for key_id, partition, wrapped, master_key_id in rows:
        try:
            key = Catalogue._unwrap(key_id, partition, bytes(wrapped), master_key_id, keyring)
        except (WedbackupError, ValueError, KeyError):
            continue  # wrapped by a master key this environment does not hold
        out[f"wedding key {key_id} as raw bytes"] = key.material
    return out


class SecretScanner:
    """Searches for a fixed set of secrets (label -> value): text in its plain and URL-encoded forms,
    bytes as they are."""

    def __init__(self, secrets: Mapping[str, str | bytes]):
        needles: dict[bytes, str] = {}
        for label, value in secrets.items():
            if len(value) < MIN_SECRET:
                continue
            if isinstance(value, bytes):
                needles.setdefault(value, label)
                continue
            for form in {value, quote(value, safe=""), quote_plus(value)}:
                needles.setdefault(form.encode(), label)
        self._needles = needles
        self._longest = max((len(n) for n in needles), default=0)

    @property
    def labels(self) -> list[str]:
        return sorted(set(self._needles.values()))

    def with_secrets(self, more: Mapping[str, str | bytes]) -> SecretScanner:
        """This scanner's secrets and `more`."""
        scanner = SecretScanner(more)
        scanner._needles = {**scanner._needles, **self._needles}
        scanner._longest = max((len(n) for n in scanner._needles), default=0)
        return scanner

    def labels_in(self, data: bytes | str) -> list[str]:
        """Which secrets `data` holds (labels only), plus any SAS signature, known or not."""
        blob = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else bytes(data)
        found = {label for needle, label in self._needles.items() if needle in blob}
        # The regular expression costs ~50 ms per MiB; the plain search that rules most blocks out, ~1 ms.
        if b"sig=" in blob.lower() and _SAS_SIGNATURE.search(blob):
            found.add("a SAS token signature (sig=…)")
        return sorted(found)

    def scan_text(self, where: str, data: bytes | str) -> list[Finding]:
        return [Finding(where, label) for label in self.labels_in(data)]

    def scan_file(self, path: Path) -> list[Finding]:
        """The file read as bytes in blocks (overlapping by the longest secret, so none is cut in two)."""
        found: set[str] = set()
        overlap = max(self._longest, 64)
        try:
            with open(path, "rb") as fh:
                tail = b""
                while block := fh.read(_READ_BLOCK):
                    found.update(self.labels_in(tail + block))
                    tail = block[-overlap:]
        except OSError:
            return []  # gone meanwhile (a temporary file), or not readable: nothing to report
        return [Finding(str(path), label) for label in sorted(found)]

    def scan_tree(self, root: Path, *, skip: Iterable[Path] = ()) -> tuple[list[Finding], int]:
        """Every regular file under `root` (symlinks not followed); returns the findings and files read."""
        skipped = [Path(p).resolve() for p in skip]
        findings: list[Finding] = []
        files = 0
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            here = Path(dirpath).resolve()
            if any(here == s or s in here.parents for s in skipped):
                dirnames[:] = []
                continue
            for name in filenames:
                path = Path(dirpath) / name
                if path.is_symlink() or not path.is_file():
                    continue
                files += 1
                findings += self.scan_file(path)
        return findings, files

    def scan_database(self, dsn: str, *, label: str | None = None, schemas: Iterable[str] | None = None,
                      tables: Iterable[str] = (), max_table_bytes: int = 64 << 20) -> tuple[list[Finding], int]:
        """Every text-like, json and bytea column of every table outside the system schemas (or only those
        in `schemas`, plus any table named in `tables` wherever it is). A table up to `max_table_bytes` is
        searched in one SQL pass (findings name the column); a bigger one is streamed out with COPY in
        binary (bytea as its raw bytes) and searched block by block with an overlap of the longest secret,
        so memory stays bounded (findings name the table and its searched columns). Returns the findings
        and the number of columns searched."""
        import psycopg

        from wedbackup_dagster.core.postgres.snapshot import database_label

        where = label or database_label(dsn)
        needles = list(self._needles)
        if not needles:
            return [], 0
        findings: list[Finding] = []
        searched = 0
        with psycopg.connect(dsn, autocommit=True, application_name="wedbackup-secretscan") as conn:
            columns = conn.execute(
                """SELECT n.nspname::text, c.relname::text, a.attname::text, t.typname::text,
                          pg_catalog.pg_total_relation_size(c.oid)
                   FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
                   WHERE c.relkind IN ('r', 'p', 'm') AND a.attnum > 0 AND NOT a.attisdropped
                     AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
                     AND (%(all)s OR n.nspname = ANY(%(schemas)s) OR c.relname = ANY(%(tables)s))
                     AND (t.typname IN ('text', 'varchar', 'bpchar', 'json', 'jsonb', 'bytea', 'name', 'xml')
                          OR t.typcategory = 'S')
                   ORDER BY 1, 2, 3""", {"all": schemas is None, "schemas": list(schemas or []),
                                         "tables": list(tables)}).fetchall()
            by_table: dict[tuple[str, str], list[tuple[str, str]]] = {}
            sizes: dict[tuple[str, str], int] = {}
            for schema, table, column, typname, size in columns:
                by_table.setdefault((schema, table), []).append((column, typname))
                sizes[(schema, table)] = size
            for (schema, table), cols in by_table.items():
                try:
                    # Streamed too when one probe per column and secret would pass PostgreSQL's 1,664 columns.
                    if sizes[(schema, table)] > max_table_bytes or len(cols) * len(needles) > 1600:
                        found = self._stream_table(conn, schema, table, [c for c, _ in cols])
                        findings += [Finding(f"database {where}, {schema}.{table} (one of its columns "
                                             f"{', '.join(c for c, _ in cols)})", secret) for secret in found]
                    else:
                        findings += self._query_table(conn, where, schema, table, cols, needles)
                except (psycopg.errors.UndefinedTable, psycopg.errors.InsufficientPrivilege):
                    continue  # dropped meanwhile, or not ours to read; any other error is the scan's own
                searched += len(cols)
        return findings, searched

    def _query_table(self, conn, where: str, schema: str, table: str, cols: list[tuple[str, str]],
                     needles: list[bytes]) -> list[Finding]:
        """One SQL pass over the table: for each column and secret, whether any row holds it."""
        from psycopg import sql

        probes = []
        for column, typname in cols:
            value = sql.Identifier(column) if typname == "bytea" else \
                sql.SQL("pg_catalog.convert_to({}::text, 'UTF8')").format(sql.Identifier(column))
            probes += [sql.SQL("coalesce(bool_or(position((%(needles)s::bytea[])[{}] IN {}) > 0), "
                               "false)").format(sql.Literal(i + 1), value) for i in range(len(needles))]
        query = sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(probes), sql.Identifier(schema, table))
        row = conn.execute(query, {"needles": needles}).fetchone()
        findings = []
        for c, (column, _) in enumerate(cols):
            for i, needle in enumerate(needles):
                if row[c * len(needles) + i]:
                    findings.append(Finding(f"database {where}, {schema}.{table}.{column}", self._needles[needle]))
        return findings

    def _stream_table(self, conn, schema: str, table: str, columns: list[str]) -> list[str]:
        """The table's columns COPYed out in binary (text as UTF-8, bytea raw) and searched in blocks of
        about _READ_BLOCK bytes, each with the previous block's tail: no secret is cut in two."""
        from psycopg import sql

        found: set[str] = set()
        overlap = max(self._longest, 64)
        query = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT binary)").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(schema, table))
        block = bytearray()
        tail = b""
        with conn.cursor().copy(query) as copy:
            for data in copy:
                block += data
                if len(block) >= _READ_BLOCK:
                    found.update(self.labels_in(tail + bytes(block)))
                    tail = bytes(block[-overlap:])
                    block.clear()
        found.update(self.labels_in(tail + bytes(block)))
        return sorted(found)


def scan_server(admin_dsn: str, scanner: SecretScanner, *, databases: Iterable[str] | None = None,
                schemas: Iterable[str] | None = None, tables: Iterable[str] = ()) -> tuple[list[Finding], int]:
    """`scan_database` over every database of a server that accepts connections (or those named)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT datname::text FROM pg_catalog.pg_database WHERE datallowconn AND NOT datistemplate "
            "ORDER BY 1").fetchall()]
    if databases is not None:
        wanted = set(databases)
        names = [n for n in names if n in wanted]
    parts = conninfo_to_dict(admin_dsn)
    findings: list[Finding] = []
    searched = 0
    for name in names:
        parts["dbname"] = name
        try:
            found, n = scanner.scan_database(make_conninfo(**parts), label=name, schemas=schemas, tables=tables)
        except psycopg.OperationalError:
            continue  # dropped between the listing and the scan
        findings += found
        searched += n
    return findings, searched

