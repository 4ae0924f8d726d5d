"""A decoder for PostgreSQL's built-in `pgoutput` plugin, protocol version 1 (the messages documented in
"Logical Replication Message Formats"): Begin, Commit, Relation, Type, Origin, Insert, Update, Delete,
Truncate. Plain bytes in, plain values out: no database, no Dagster.

Tuple values stay in PostgreSQL's text format (proto 1 sends nothing else), which is what the replay
hands back to the server's input functions, so no value is re-rendered by Python. An unchanged TOASTed
value (kind 'u') is the UNCHANGED marker: the UPDATE did not touch it and the server did not send it."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from .errors import DecodeError

PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)


class _Unchanged:
    """An unchanged TOASTed column of an UPDATE's new row: the value is not in the message."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()


def lsn_text(lsn: int) -> str:
    """An LSN as PostgreSQL prints it (`16/B374D848`)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, _, lo = str(text).partition("/")
    try:
        return (int(hi, 16) << 32) | int(lo, 16)
    except ValueError:
        raise DecodeError(f"{text!r} is not an LSN (like 16/B374D848)") from None


def pg_time(micros: int) -> datetime:
    return PG_EPOCH + timedelta(microseconds=micros)


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    key: bool  # part of the replica identity: present in a DELETE's (or key-changing UPDATE's) old key


@dataclass(frozen=True)
class Relation:
    oid: int
    schema: str
    name: str
    replica_identity: str  # d(efault, the primary key), n(othing), f(ull), i(ndex)
    columns: tuple[Column, ...]

    @property
    def table(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def key_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.key)


@dataclass(frozen=True)
class Begin:
    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(frozen=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True)
class Change:
    """One row change. `new`: the new row (INSERT, UPDATE); `old`: the old key ('K') or whole old row ('O',
    REPLICA IDENTITY FULL) of an UPDATE or DELETE, None when the UPDATE kept its key and identity is not FULL.
    Values are text or None (NULL) or UNCHANGED."""

    op: str  # "I", "U", "D"
    relation: Relation
    new: tuple | None
    old: tuple | None
    old_kind: str | None = None  # "K" (key columns only, others None) or "O" (the whole old row)


@dataclass(frozen=True)
class Truncate:
    relations: tuple[Relation, ...]
    cascade: bool
    restart_identity: bool


@dataclass
class Transaction:
    xid: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime
    changes: list[Change] = field(default_factory=list)
    truncates: list[Truncate] = field(default_factory=list)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise DecodeError(f"pgoutput message cut short: wanted {n} byte(s) at offset {self.pos} of "
                              f"{len(self.data)}")
        out = self.data[self.pos:end]
        self.pos = end
        return out

    def unpack(self, fmt: str) -> tuple:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size))

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise DecodeError(f"pgoutput message: unterminated string at offset {self.pos}")
        out = self.data[self.pos:end].decode("utf-8")
        self.pos = end + 1
        return out


def _tuple(r: _Reader) -> tuple:
    (n,) = r.unpack(">h")
    values: list = []
    for _ in range(n):
        kind = r.take(1)
        if kind == b"n":
            values.append(None)
        elif kind == b"u":
            values.append(UNCHANGED)
        elif kind == b"t":
            (length,) = r.unpack(">i")
            values.append(r.take(length).decode("utf-8"))
        else:  # 'b' (binary) exists from protocol 2 with binary=true only; we never ask for it
            raise DecodeError(f"pgoutput tuple column of kind {kind!r} (only n, u, t are used by protocol 1)")
    return tuple(values)


class Decoder:
    """Stateful over one decoding session: Relation messages are remembered by OID (the server sends one
    before a relation's first change in each session, and again when it changes)."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}

    def _relation(self, oid: int) -> Relation:
        try:
            return self.relations[oid]
        except KeyError:
            raise DecodeError(f"pgoutput change for relation OID {oid} before its Relation message") from None

    def decode(self, data: bytes):
        """One message: a Begin, Commit, Relation, Change or Truncate, or None for those ignored (Type,
        Origin, logical Message)."""
        data = bytes(data)
        if not data:
            raise DecodeError("empty pgoutput message")
        r = _Reader(data)
        tag = r.take(1)
        if tag == b"B":
            final_lsn, ts, xid = r.unpack(">qqI")
            return Begin(final_lsn, pg_time(ts), xid)
        if tag == b"C":
            _flags, commit_lsn, end_lsn, ts = r.unpack(">bqqq")
            return Commit(commit_lsn, end_lsn, pg_time(ts))
        if tag == b"R":
            (oid,) = r.unpack(">I")
            schema, name = r.string(), r.string()
            ident = r.take(1).decode("ascii")
            (ncols,) = r.unpack(">h")
            cols = []
            for _ in range(ncols):
                (flags,) = r.unpack(">b")
                cname = r.string()
                type_oid, _typmod = r.unpack(">Ii")
                cols.append(Column(cname, type_oid, bool(flags & 1)))
            rel = Relation(oid, schema or "pg_catalog", name, ident, tuple(cols))
            self.relations[oid] = rel
            return rel
        if tag == b"I":
            (oid,) = r.unpack(">I")
            if r.take(1) != b"N":
                raise DecodeError("pgoutput Insert without its new tuple")
            return Change("I", self._relation(oid), _tuple(r), None)
        if tag == b"U":
            (oid,) = r.unpack(">I")
            old = old_kind = None
            kind = r.take(1)
            if kind in (b"K", b"O"):
                old_kind = kind.decode()
                old = _tuple(r)
                kind = r.take(1)
            if kind != b"N":
                raise DecodeError(f"pgoutput Update: expected the new tuple, found {kind!r}")
            return Change("U", self._relation(oid), _tuple(r), old, old_kind)
        if tag == b"D":
            (oid,) = r.unpack(">I")
            kind = r.take(1)
            if kind not in (b"K", b"O"):
                raise DecodeError(f"pgoutput Delete: expected the old key or row, found {kind!r}")
            return Change("D", self._relation(oid), None, _tuple(r), kind.decode())
        if tag == b"T":
            nrels, options = r.unpack(">ib")
            oids = [r.unpack(">I")[0] for _ in range(nrels)]
            return Truncate(tuple(self._relation(o) for o in oids), bool(options & 1), bool(options & 2))
        if tag in (b"Y", b"O", b"M"):  # Type, Origin, logical decoding Message: nothing to replay
            return None
        raise DecodeError(f"pgoutput message type {tag!r} is not one protocol 1 sends")


def transactions(messages, decoder: Decoder | None = None):
    """Group decoded messages (an iterable of raw pgoutput bytes) into Transactions, in commit order."""
    decoder = decoder or Decoder()
    current: Transaction | None = None
    for data in messages:
        msg = decoder.decode(data)
        if isinstance(msg, Begin):
            if current is not None:
                raise DecodeError(f"pgoutput Begin of xid {msg.xid} inside transaction {current.xid}")
            current = Transaction(msg.xid, msg.final_lsn, 0, msg.commit_time)
        elif isinstance(msg, Commit):
            if current is None:
                raise DecodeError("pgoutput Commit outside a transaction")
            current.commit_lsn, current.end_lsn, current.commit_time = msg.commit_lsn, msg.end_lsn, msg.commit_time
            yield current
            current = None
        elif isinstance(msg, Change):
            if current is None:
                raise DecodeError("pgoutput change outside a transaction")
            current.changes.append(msg)
        elif isinstance(msg, Truncate):
            if current is None:
                raise DecodeError("pgoutput Truncate outside a transaction")
            current.truncates.append(msg)
    if current is not None:
        raise DecodeError(f"pgoutput stream ended inside transaction {current.xid} (no Commit)")
