"""The snapshot stream format (docs/SNAPSHOT.md), writer and reader side by side: the record kinds and
framing, the manifest, `write_record` (used by postgres/snapshot.py, which takes the snapshot) and
`read_snapshot` with the checks of every record's contents (used by postgres/load_snapshot.py, which loads
a stream into a database, and by every other reader). A malformed stream is a SnapshotFormatError naming
the stream and the offset."""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from wedbackup_dagster.core.errors import SnapshotFormatError, VerificationError
from wedbackup_dagster.core.formats.archive import loads_untrusted
from wedbackup_dagster.core.partitions import PLATFORM, is_partition
from wedbackup_dagster.core.postgres import tenancy

FORMAT_NAME = "wedbackup-snapshot"
FORMAT_VERSION = 1
MAGIC = b"WBSNAP\r\n"  # 8 bytes; the CR LF catches a stream mangled by text-mode line-ending conversion

# Record types: one ASCII byte each, then an 8-byte big-endian payload length, then the payload.
HEADER = b"H"
PRE_DATA = b"P"
POST_DATA = b"Q"
TABLE_BEGIN = b"T"
DATA = b"D"
TABLE_END = b"E"
MANIFEST = b"M"
RECORD_TYPES = {HEADER: "header", PRE_DATA: "pre_data", POST_DATA: "post_data", TABLE_BEGIN: "table_begin",
                DATA: "data", TABLE_END: "table_end", MANIFEST: "manifest"}
FRAME_HEADER_SIZE = 9

# COPY hands over one row per block; rows are coalesced so framing and sink calls stay rare, and a
# single huge row is cut into pieces so a reader never needs more than MAX_DATA_RECORD at once.
DATA_RECORD_TARGET = 256 * 1024
MAX_DATA_RECORD = 1024 * 1024
MAX_META_RECORD = 256 * 1024 * 1024  # header, DDL, manifest: large schemas, still bounded


class Sink(Protocol):
    def write(self, data: bytes, /) -> Any: ...


# --- manifest ---------------------------------------------------------------------------------------

@dataclass
class TableManifest:
    """One table of a snapshot: what was copied, how much, its checksum, and the SELECT that chose it."""

    schema: str
    name: str
    columns: list[str]
    rows: int
    bytes: int
    sha256: str
    select_sql: str  # as rendered on the source; `%(wedding_id)s` is the only placeholder
    params: dict[str, str] | None
    order_by: list[str] = field(default_factory=list)
    path: str = ""  # how the table's rows reach a wedding, for people
    seconds: float = 0.0
    # count(*) of the same rows in the same snapshot by another query (no ORDER BY, no column list,
    # counted by the server): equal to `rows` in every archive written. None in archives written before it.
    counted: int | None = None

    @property
    def table(self) -> str:
        return f"{self.schema}.{self.name}"

    def table_name(self) -> tenancy.TableName:
        return tenancy.TableName(self.schema, self.name)


class TableTotals:
    """Totals over `self.tables` (each with `rows` and `bytes`): shared by manifests and restore reports."""

    @property
    def total_rows(self) -> int:
        return sum(t.rows for t in self.tables)

    @property
    def total_bytes(self) -> int:
        return sum(t.bytes for t in self.tables)

    def table_rows(self) -> list[dict[str, Any]]:
        """One dict per table, for a UI table or a DataFrame."""
        return [asdict(t) for t in self.tables]


@dataclass
class Manifest(TableTotals):
    """What a snapshot holds: enough to verify a restore and to rebuild every table's SELECT."""

    partition: str
    snapshot_time: str
    txid: int
    snapshot: str
    server_version: str
    schema_fingerprint: str
    tables: list[TableManifest]
    plan: dict[str, Any]
    format_version: int = FORMAT_VERSION
    seconds: float = 0.0
    # Platform partition only (None elsewhere, and before): validated foreign keys the source's rows break
    # (rows that reach no wedding are carried here), see broken_foreign_keys:
    # [{"schema", "table", "constraint", "parent", "rows", "source_rows"}].
    broken_foreign_keys: list[dict[str, Any]] | None = None

    @property
    def wedding_id(self) -> str | None:
        return None if self.partition == PLATFORM else self.partition

    def table(self, name: str) -> TableManifest:
        for t in self.tables:
            if t.table == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))  # shallow on purpose: asdict's deep copy costs more than the JSON itself
        d["tables"] = [dict(vars(t)) for t in self.tables]
        d["total_rows"] = self.total_rows
        d["total_bytes"] = self.total_bytes
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        # Keys this version does not know (added by a later writer, or the totals) are ignored.
        table_keys = set(TableManifest.__dataclass_fields__)
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["tables"] = [TableManifest(**{k: v for k, v in t.items() if k in table_keys}) for t in d["tables"]]
        return cls(**known)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        from wedbackup_dagster.core.formats.archive import loads_untrusted

        return cls.from_dict(loads_untrusted(text))


# --- writing records ------------------------------------------------------------------------------

def write_record(sink: Sink, kind: bytes, payload: bytes | bytearray) -> int:
    sink.write(kind + len(payload).to_bytes(8, "big"))
    if payload:
        sink.write(payload)
    return FRAME_HEADER_SIZE + len(payload)


def json_payload(obj: Any) -> bytes:
    return json_text(obj).encode()


def json_text(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def json_payload_with(obj: dict[str, Any], encoded: dict[str, str]) -> bytes:
    """`json_payload({**obj, **values})` where `encoded` holds some values already as `json_text(value)`: the
    same bytes (keys sorted, the same separators), without encoding those values again."""
    parts = {k: json_text(v) for k, v in obj.items() if k not in encoded}
    parts.update(encoded)
    return ("{" + ",".join(f"{json_text(k)}:{parts[k]}" for k in sorted(parts)) + "}").encode()


# --- reading the stream -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    kind: bytes  # one of snapshot.RECORD_TYPES
    payload: bytes
    offset: int  # where the record starts in the stream, for error messages
    source: str = "snapshot stream"

    @property
    def kind_name(self) -> str:
        return RECORD_TYPES[self.kind]

    def json(self) -> dict[str, Any]:
        try:
            value = loads_untrusted(self.payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SnapshotFormatError(self.source, f"{self.kind_name} record at offset {self.offset} "
                                                   f"is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
        if not isinstance(value, dict):
            raise SnapshotFormatError(self.source, f"{self.kind_name} record at offset {self.offset} "
                                                   f"is not a JSON object")
        return value

    def text(self) -> str:
        try:
            return self.payload.decode()
        except UnicodeDecodeError:
            raise SnapshotFormatError(self.source, f"{self.kind_name} record at offset {self.offset} "
                                                   f"is not UTF-8 text") from None


# What may follow each record: header, pre-data, post-data, then (table-begin data* table-end)*, manifest.
_NEXT = {
    None: {HEADER},
    HEADER: {PRE_DATA},
    PRE_DATA: {POST_DATA},
    POST_DATA: {TABLE_BEGIN, MANIFEST},
    TABLE_BEGIN: {DATA, TABLE_END},
    DATA: {DATA, TABLE_END},
    TABLE_END: {TABLE_BEGIN, MANIFEST},
    MANIFEST: set(),
}


def read_snapshot(chunks: Iterable[bytes], *, name: str = "snapshot stream") -> Iterator[Record]:
    """Parse the framed snapshot stream from chunks of any size (records may span chunks). Memory is
    bounded by the largest record. A truncated, garbled or out-of-order stream raises
    SnapshotFormatError naming `name` and the offset."""
    buf = bytearray()
    offset = 0  # stream offset of buf[0]
    magic_seen = False
    last: bytes | None = None
    for chunk in chunks:
        if not chunk:
            continue
        buf += chunk
        if not magic_seen:
            if len(buf) < len(MAGIC):
                if not MAGIC.startswith(bytes(buf)):
                    raise SnapshotFormatError(name, "not a wedbackup snapshot stream (bad magic)")
                continue
            if bytes(buf[:len(MAGIC)]) != MAGIC:
                raise SnapshotFormatError(name, "not a wedbackup snapshot stream (bad magic)")
            del buf[:len(MAGIC)]
            offset = len(MAGIC)
            magic_seen = True
        while len(buf) >= FRAME_HEADER_SIZE:
            kind = bytes(buf[:1])
            length = int.from_bytes(buf[1:FRAME_HEADER_SIZE], "big")
            if kind not in RECORD_TYPES:
                raise SnapshotFormatError(name, f"unknown record type {kind!r} at offset {offset}: "
                                                f"the stream is garbled")
            if kind not in _NEXT[last]:
                after = RECORD_TYPES[last] if last else "the start"
                raise SnapshotFormatError(name, f"{RECORD_TYPES[kind]} record at offset {offset} cannot "
                                                f"follow {after}: the stream is garbled")
            limit = MAX_DATA_RECORD if kind == DATA else MAX_META_RECORD
            if length > limit:
                raise SnapshotFormatError(name, f"{RECORD_TYPES[kind]} record at offset {offset} declares "
                                                f"{length} bytes, more than the limit of {limit}: the stream is garbled")
            end = FRAME_HEADER_SIZE + length
            if len(buf) < end:
                break
            payload = bytes(buf[FRAME_HEADER_SIZE:end])
            del buf[:end]
            yield Record(kind, payload, offset, name)
            offset += end
            last = kind
    if not magic_seen:
        raise SnapshotFormatError(name, "empty or truncated before the snapshot's first record")
    if buf:
        if last == MANIFEST:
            raise SnapshotFormatError(name, f"{len(buf)} unexpected bytes after the manifest at offset {offset}")
        raise SnapshotFormatError(name, f"truncated: the stream ends inside a record at offset {offset}")
    if last != MANIFEST:
        where = RECORD_TYPES[last] if last else "the start"
        raise SnapshotFormatError(name, f"truncated: the stream ends after {where} at offset {offset}, "
                                        f"before its manifest")


def read_manifest(chunks: Iterable[bytes], *, name: str = "snapshot stream") -> Manifest:
    """The manifest of a snapshot stream (reads the whole stream, holding one record at a time)."""
    manifest = None
    for record in read_snapshot(chunks, name=name):
        if record.kind == MANIFEST:
            manifest = manifest_of(record)
    if manifest is None:  # read_snapshot raises first; kept for a clear message if that changes
        raise SnapshotFormatError(name, "the stream has no manifest")
    return manifest


# --- record contents --------------------------------------------------------------------------------
# A stream that authenticated can still be garbled (written by a broken writer, or by someone holding the
# key): every field the restore relies on is checked, so a bad one is a SnapshotFormatError naming the
# stream, never a KeyError or TypeError from deep inside.

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _garbled(record: Record, problem: str) -> SnapshotFormatError:
    return SnapshotFormatError(record.source, f"{record.kind_name} record at offset {record.offset} {problem}")


class CheckedHeader(dict):
    """A header record's JSON as header_of checked it, with the bytes it was read from and, when those bytes are
    the writer's own (json_payload), where the value of each of its per-wedding members (_PER_WEDDING) sits in
    them: `spans`, (name, start, end) in the order they appear, for each member whose spelling appears once."""

    __slots__ = ("payload", "spans", "_segments")


# The members of a header that differ from one wedding's archive to the next: its partition and its own snapshot
# (a wedding backed up alone, or in another shared transaction). A value as json_payload writes it: a plain string
# (no escape, no control character) or a whole number that fits in 64 bits, read alike by every JSON parser.
_PER_WEDDING = {"partition": str, "snapshot": str, "snapshot_time": str, "txid": int}
_PLAIN_STRING = re.compile(rb'"([^"\\\x00-\x1f]{0,200})"')
_PLAIN_INT = re.compile(rb"0|[1-9][0-9]{0,17}")


def _as_checked(header: dict[str, Any], payload: bytes) -> CheckedHeader:
    checked = CheckedHeader(header)
    checked.payload, checked.spans, checked._segments = payload, (), None
    # Only bytes exactly as the writer writes them (sorted keys, no spaces) spell each top-level member one way;
    # a spelling found once is then the top-level member itself (a nested member spelled the same way would be a
    # second occurrence). In any other spelling nothing is taken from the bytes.
    if json_payload(header) != payload:
        return checked
    spans = []
    for name, kind in _PER_WEDDING.items():
        value = header.get(name)
        if type(value) is not kind or (kind is str and not _PLAIN_STRING.fullmatch(json_payload(value))):
            continue
        member = json_payload(name) + b":" + json_payload(value)
        at = payload.find(member)
        if at >= 0 and payload.find(member, at + 1) < 0:
            spans.append((name, at + len(member) - len(json_payload(value)), at + len(member)))
    checked.spans = tuple(sorted(spans, key=lambda span: span[1]))
    return checked


def _same_but_per_wedding(payload: bytes, like: CheckedHeader) -> CheckedHeader | None:
    """`like` with other per-wedding values (partition, snapshot, snapshot time, txid), when `payload` is `like`'s
    bytes with only those members' values changed, each to a plain string or whole number; else None. Sound
    because `like`'s bytes are the writer's own spelling and hold each of those members once, so each span is the
    top-level member's value; every byte outside them is the same, and each new value is one plain JSON string or
    number: parsing `payload` would give `like` with those values, and every other field was checked when `like`
    was (and is shared, not copied)."""
    if not like.spans:
        return None
    if like._segments is None:  # the constant bytes before, between and after the spans
        bounds = [0, *[x for _, start, end in like.spans for x in (start, end)], len(like.payload)]
        like._segments = tuple(like.payload[bounds[i]:bounds[i + 1]] for i in range(0, len(bounds), 2))
    segments = like._segments
    pos = 0
    values: dict[str, Any] = {}
    spans = []
    for (name, _, _), segment in zip(like.spans, segments):
        if not payload.startswith(segment, pos):
            return None
        pos += len(segment)
        if _PER_WEDDING[name] is int:
            match = _PLAIN_INT.match(payload, pos)
            if match is None:
                return None
            values[name] = int(match.group())
        else:
            match = _PLAIN_STRING.match(payload, pos)
            if match is None:
                return None
            try:
                values[name] = match.group(1).decode()
            except UnicodeDecodeError:
                return None
        spans.append((name, pos, match.end()))
        pos = match.end()
    if len(payload) - pos != len(segments[-1]) or not payload.endswith(segments[-1]):
        return None
    if "partition" in values and not is_partition(values["partition"]):
        return None  # the full reading names the fault
    header = CheckedHeader(like)
    header.update(values)
    header.payload, header.spans, header._segments = payload, tuple(spans), segments
    return header


def header_of(record: Record, like: dict[str, Any] | None = None) -> dict[str, Any]:
    """The header record's JSON, with the fields a restore uses checked. `like`: a header this returned before
    (the previous wedding's of a batch). The weddings of a batch have headers equal but for the partition and
    their own snapshot (the schema description, foreign keys and tenancy plan are the bulk of them): a header
    whose bytes differ from `like`'s only in those values is `like` with them, not parsed again
    (_same_but_per_wedding); else one whose large parts equal `like`'s (compared in C) is not walked again,
    element by element. The header returned is a CheckedHeader: a shared copy, not to be changed."""
    if isinstance(like, CheckedHeader):
        same = _same_but_per_wedding(record.payload, like)
        if same is not None:
            return same
    header = record.json()
    if header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
        raise SnapshotFormatError(record.source, f"snapshot format {str(header.get('format'))[:40]!r} version "
                                                 f"{str(header.get('version'))[:10]!r} is not {FORMAT_NAME} "
                                                 f"version {FORMAT_VERSION}")
    if not is_partition(header.get("partition")):
        raise _garbled(record, "does not name a valid partition")
    if not isinstance(header.get("schema_fingerprint"), str):
        raise _garbled(record, "has no schema fingerprint")
    if like is not None and all(header.get(k) == like.get(k) for k in ("schema", "foreign_keys", "plan")):
        return _as_checked(header, record.payload)
    schema = header.get("schema", [])
    if not isinstance(schema, list) or not all(
            isinstance(line, list) and len(line) == 3 and all(isinstance(x, str) for x in line) for line in schema):
        raise _garbled(record, "has a schema description that is not a list of [kind, key, detail]")
    fks = header.get("foreign_keys", [])
    if not isinstance(fks, list) or not all(
            isinstance(fk, dict) and all(isinstance(fk.get(k), str)
                                         for k in ("schema", "table", "name", "ref_schema", "ref_table"))
            for fk in fks):
        raise _garbled(record, "has a foreign key list that is not a list of constraints")
    plan = header.get("plan", {})
    if not isinstance(plan, dict) or not isinstance(plan.get("tenant_tables", {}), dict):
        raise _garbled(record, "has a tenancy plan that is not an object with a tenant_tables object")
    return _as_checked(header, record.payload)


# Table-begin records read and checked, by their bytes: every wedding's archive begins each table with the same
# record, so a batch of weddings reads each one once. Bounded: emptied when full.
_TABLE_BEGINS: dict[bytes, tuple[str, str, tuple[str, ...]]] = {}
_TABLE_BEGINS_MAX = 4096


def table_begin_of(record: Record) -> tuple[str, str, list[str]]:
    """(schema, table, columns) of a table-begin record (the columns a new list, the caller's own)."""
    known = _TABLE_BEGINS.get(record.payload)
    if known is not None:
        return known[0], known[1], list(known[2])
    begin = record.json()
    schema, name, columns = begin.get("schema"), begin.get("name"), begin.get("columns")
    if not (isinstance(schema, str) and schema and isinstance(name, str) and name and isinstance(columns, list)
            and columns and all(isinstance(c, str) and c for c in columns)):
        raise _garbled(record, "does not name a table and its columns")
    if len(_TABLE_BEGINS) >= _TABLE_BEGINS_MAX:
        _TABLE_BEGINS.clear()
    _TABLE_BEGINS[record.payload] = (schema, name, tuple(columns))
    return schema, name, columns


_MANIFEST_TABLE_TYPES = {"schema": str, "name": str, "columns": list, "rows": int, "bytes": int, "sha256": str,
                         "select_sql": str}


def manifest_of(record: Record) -> Manifest:
    """The manifest record as a Manifest, its fields checked (types, totals that are whole numbers)."""
    d = record.json()
    tables = d.get("tables")
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise _garbled(record, "has no list of tables")
    for t in tables:
        for key, kind in _MANIFEST_TABLE_TYPES.items():
            value = t.get(key)
            if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0)):
                raise _garbled(record, f"has a table whose {key!r} is missing or not a {kind.__name__}")
        if not (t.get("params") is None or isinstance(t.get("params"), dict)):
            raise _garbled(record, "has a table whose 'params' is not an object")
    for key, kind in (("partition", str), ("snapshot_time", str), ("schema_fingerprint", str), ("plan", dict)):
        if not isinstance(d.get(key), kind):
            raise _garbled(record, f"has no {key!r} ({kind.__name__})")
    try:
        return Manifest.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise _garbled(record, f"is not a manifest ({type(e).__name__}: {str(e)[:80]})") from None


def read_table_data(records: Iterator[Record], write: Callable[[bytes], object] | None = None,
                    on_chunk: Callable[[int], None] | None = None) -> tuple[int, int, str, Record | None]:
    """One table's data records, up to the record that ends them: each payload hashed, its rows counted and
    handed to `write` (a COPY, a spool file; None: only read). Returns (rows, bytes, sha256, the record
    that ended the data) for check_table_end; `on_chunk(rows so far)` after each payload."""
    digest, rows, nbytes = hashlib.sha256(), 0, 0
    for rec in records:
        if rec.kind != DATA:
            return rows, nbytes, digest.hexdigest(), rec
        digest.update(rec.payload)
        rows += rec.payload.count(b"\n")
        nbytes += len(rec.payload)
        if write is not None:
            write(rec.payload)
        if on_chunk is not None:
            on_chunk(rows)
    return rows, nbytes, digest.hexdigest(), None


def check_table_end(end_record: Record | None, rows: int, nbytes: int, sha: str, *, what: str, target: str,
                    table: str, done: str) -> None:
    """The rows just copied (`done`: "restored", "read") are exactly what the table-end record says."""
    end = end_record.json() if end_record is not None else {}
    if (end.get("rows"), end.get("bytes"), end.get("sha256")) != (rows, nbytes, sha):
        raise VerificationError(f"restore of {what} into {target}: table {table} does not match its "
                                f"record: {rows} rows / sha256 {sha[:16]}… {done}, "
                                f"{end.get('rows')} rows / sha256 {str(end.get('sha256'))[:16]}… recorded")


def read_to_end(records: Iterator[Record], name: str) -> None:
    """Read the stream past its manifest: read_snapshot refuses anything there (found by fuzzing: a
    restore used to stop at the manifest and so accepted trailing garbage)."""
    for extra in records:
        raise SnapshotFormatError(name, f"{extra.kind_name} record at offset {extra.offset} after the manifest")
