"""The pgoutput decoder against messages built byte by byte from PostgreSQL's "Logical Replication Message
Formats" (protocol 1), and the snapshot-visibility rule replay relies on."""
from __future__ import annotations

import struct
from datetime import datetime, timezone

import pytest

from wedbackup_dagster.core.changefeed.decode import (UNCHANGED, Begin, Change, Commit, Decoder, Relation, Truncate,
                                                      lsn_text, parse_lsn, transactions)
from wedbackup_dagster.core.changefeed.visibility import parse_snapshot, visible, widen_xid
from wedbackup_dagster.core.changefeed.errors import DecodeError

T0 = 786_000_000_000_000  # microseconds since 2000-01-01


def s(text: str) -> bytes:
    return text.encode() + b"\0"


def tup(*values) -> bytes:
    out = struct.pack(">h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v is UNCHANGED:
            out += b"u"
        else:
            raw = v.encode()
            out += b"t" + struct.pack(">i", len(raw)) + raw
    return out


RELATION = (b"R" + struct.pack(">I", 16401) + s("public") + s("guests") + b"d" + struct.pack(">h", 3)
            + b"\x01" + s("id") + struct.pack(">Ii", 20, -1)
            + b"\x00" + s("wedding_id") + struct.pack(">Ii", 20, -1)
            + b"\x00" + s("notes") + struct.pack(">Ii", 25, -1))
BEGIN = b"B" + struct.pack(">qqI", 0x16B374D848, T0, 742)
COMMIT = b"C" + struct.pack(">bqqq", 0, 0x16B374D848, 0x16B374D880, T0 + 5)


def test_a_transaction_with_every_kind_of_change_decodes_in_order():
    insert = b"I" + struct.pack(">I", 16401) + b"N" + tup("1", "12", "hello")
    update = b"U" + struct.pack(">I", 16401) + b"N" + tup("1", "12", UNCHANGED)
    update_key = b"U" + struct.pack(">I", 16401) + b"K" + tup("1", None, None) + b"N" + tup("2", "14", None)
    delete = b"D" + struct.pack(">I", 16401) + b"K" + tup("2", None, None)
    truncate = b"T" + struct.pack(">ib", 1, 1) + struct.pack(">I", 16401)
    [txn] = list(transactions([BEGIN, RELATION, insert, update, update_key, delete, truncate, COMMIT]))
    assert (txn.xid, txn.end_lsn, lsn_text(txn.commit_lsn)) == (742, 0x16B374D880, "16/B374D848")
    assert txn.commit_time == datetime(2024, 11, 27, 5, 20, 0, 5, tzinfo=timezone.utc)
    ops = [(c.op, c.new, c.old, c.old_kind) for c in txn.changes]
    assert ops == [("I", ("1", "12", "hello"), None, None), ("U", ("1", "12", UNCHANGED), None, None),
                   ("U", ("2", "14", None), ("1", None, None), "K"), ("D", None, ("2", None, None), "K")]
    assert txn.changes[0].relation.key_names == ("id",) and txn.changes[0].relation.table == "public.guests"
    assert txn.truncates[0].cascade and txn.truncates[0].relations[0].name == "guests"


def test_message_kinds_are_decoded_one_by_one():
    d = Decoder()
    assert isinstance(d.decode(BEGIN), Begin) and isinstance(d.decode(COMMIT), Commit)
    assert isinstance(d.decode(RELATION), Relation)
    assert isinstance(d.decode(b"I" + struct.pack(">I", 16401) + b"N" + tup("1", None, "x")), Change)
    assert isinstance(d.decode(b"T" + struct.pack(">ib", 1, 0) + struct.pack(">I", 16401)), Truncate)
    assert d.decode(b"Y" + struct.pack(">I", 1) + s("public") + s("mood")) is None


@pytest.mark.parametrize("message, error", [
    (b"I" + struct.pack(">I", 99) + b"N" + tup("1"), "relation OID 99 before its Relation message"),
    (b"I" + struct.pack(">I", 16401) + b"N" + struct.pack(">h", 1) + b"t" + struct.pack(">i", 10) + b"ab",
     "cut short"),
    (b"I" + struct.pack(">I", 16401) + b"N" + struct.pack(">h", 1) + b"b" + struct.pack(">i", 1) + b"a",
     "kind b'b'"),
    (b"Z", "message type b'Z'"),
    (b"", "empty"),
    (b"R" + struct.pack(">I", 1) + b"public", "unterminated string"),
])
def test_garbled_or_unsupported_messages_are_named(message, error):
    d = Decoder()
    d.decode(RELATION)
    with pytest.raises(DecodeError, match=error):
        d.decode(message)


def test_a_stream_cut_inside_a_transaction_is_an_error_not_fewer_changes():
    with pytest.raises(DecodeError, match="ended inside transaction 742"):
        list(transactions([BEGIN, RELATION]))


def test_lsn_text_round_trips():
    assert parse_lsn("16/B374D848") == 0x16B374D848 and lsn_text(parse_lsn("0/0")) == "0/0"
    with pytest.raises(DecodeError):
        parse_lsn("nope")


def test_visibility_follows_pg_visible_in_snapshot():
    snap = parse_snapshot("100:110:103,107")
    assert visible(99, snap) and visible(104, snap)
    assert not visible(103, snap) and not visible(107, snap) and not visible(110, snap) and not visible(200, snap)


def test_32_bit_xids_widen_across_the_epoch_boundary():
    near = (5 << 32) + 10  # epoch 5, just after wraparound
    assert widen_xid(0xFFFFFFF0, near) == (4 << 32) + 0xFFFFFFF0
    assert widen_xid(20, near) == (5 << 32) + 20
    snap = parse_snapshot(f"{(5 << 32) + 5}:{(5 << 32) + 12}:")
    assert visible(0xFFFFFFF0, snap) and visible(7, snap) and not visible(12, snap)
