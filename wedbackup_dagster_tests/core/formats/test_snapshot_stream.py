"""The snapshot stream's record checks (core/formats/snapshot_stream.py) that need no database."""
from __future__ import annotations

import json

import pytest


def test_a_header_like_one_already_checked_is_not_walked_again_but_still_checked_where_it_differs():
    from wedbackup_dagster.core.errors import SnapshotFormatError
    from wedbackup_dagster.core.formats.snapshot_stream import FORMAT_NAME, FORMAT_VERSION, HEADER, Record, header_of

    good = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "partition": "7", "schema_fingerprint": "f",
            "schema": [["table", "public.guests", "x"]], "foreign_keys": [], "plan": {"tenant_tables": {}}}
    first = header_of(Record(HEADER, json.dumps(good).encode(), 0))
    assert header_of(Record(HEADER, json.dumps({**good, "partition": "8"}).encode(), 0), like=first)["partition"] == "8"
    for bad, words in (({"schema": [["table"]]}, "schema description"), ({"partition": "../x"}, "partition"),
                       ({"version": 99}, "version"), ({"schema_fingerprint": None}, "fingerprint"),
                       ({"plan": {"tenant_tables": []}}, "tenancy plan")):
        with pytest.raises(SnapshotFormatError, match=words):
            header_of(Record(HEADER, json.dumps({**good, **bad}).encode(), 0), like=first)


def _written_header(**changes):
    """A header record as the snapshot writer writes it (json_payload: sorted keys, no spaces)."""
    from wedbackup_dagster.core.formats.snapshot_stream import FORMAT_NAME, FORMAT_VERSION, HEADER, Record, json_payload

    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "partition": "7", "schema_fingerprint": "f",
              "schema": [["table", "public.guests", "x"], ["column", "public.guests.name", "text"]],
              "foreign_keys": [], "plan": {"tenant_tables": {"public.guests": {"partition": "7"}}},
              "snapshot_time": "2026-12-06T10:00:00+00:00"}
    header.update(changes)
    return Record(HEADER, json_payload(header), 0, "archive a.wbk")


def test_a_header_differing_from_the_last_only_in_its_partition_is_that_header_for_the_new_partition():
    from wedbackup_dagster.core.formats.snapshot_stream import header_of

    first = header_of(_written_header(plan={"tenant_tables": {}}))
    second = header_of(_written_header(partition="1234", plan={"tenant_tables": {}}), like=first)
    assert second == {**first, "partition": "1234"}
    assert second["schema"] is first["schema"]  # taken from the header already checked, not parsed again
    third = header_of(_written_header(partition="platform", plan={"tenant_tables": {}}), like=second)
    assert third == {**first, "partition": "platform"} and third["schema"] is first["schema"]
    assert first["partition"] == "7" and second["partition"] == "1234"  # each its own copy


@pytest.mark.parametrize("changes", [{"schema_fingerprint": "g"}, {"schema": [["table", "public.guests", "y"]]},
                                     {"server_version": "16.1"}])
def test_a_header_differing_elsewhere_too_is_parsed_and_checked_in_full(changes):
    from wedbackup_dagster.core.formats.snapshot_stream import header_of

    first = header_of(_written_header(plan={"tenant_tables": {}}))
    again = header_of(_written_header(partition="8", plan={"tenant_tables": {}}, **changes), like=first)
    assert again == {**first, "partition": "8", **changes}


_SNAPSHOT = {"snapshot": "440923:440925:440924", "snapshot_time": "2026-12-06T10:00:00.659375+00:00",
             "txid": 440923}


def test_a_header_differing_only_in_its_partition_and_its_own_snapshot_is_that_header_with_those_values():
    from wedbackup_dagster.core.formats.snapshot_stream import header_of

    first = header_of(_written_header(plan={"tenant_tables": {}}, **_SNAPSHOT))
    assert [name for name, _, _ in first.spans] == ["partition", "snapshot", "snapshot_time", "txid"]
    own = {"partition": "1234", "snapshot": "440925:440925:", "snapshot_time": "2026-12-06T10:00:01+00:00",
           "txid": 9_000_000_000}
    second = header_of(_written_header(plan={"tenant_tables": {}}, **own), like=first)
    assert second == {**first, **own} and second["schema"] is first["schema"]  # not parsed again
    third = header_of(_written_header(plan={"tenant_tables": {}}, **{**own, "partition": "platform", "txid": 0}),
                      like=second)
    assert third == {**first, **own, "partition": "platform", "txid": 0} and third["schema"] is first["schema"]
    assert first["partition"] == "7" and first["txid"] == 440923 and second["partition"] == "1234"  # each its own


def test_a_header_read_beside_one_already_checked_is_what_reading_it_alone_gives_or_refused_alike():
    """Differential: crafted per-wedding values (escapes, other spellings of a number, other types, members
    smuggled beside them, bytes that are not UTF-8) read with `like` give exactly what a full reading gives,
    or are refused as it refuses them."""
    from wedbackup_dagster.core.errors import SnapshotFormatError
    from wedbackup_dagster.core.formats.snapshot_stream import HEADER, Record, header_of

    first = header_of(_written_header(plan={"tenant_tables": {}}, **_SNAPSHOT))
    payload = first.payload
    crafted = [payload.replace(b'"txid":440923', b'"txid":' + v) for v in (
        b"0", b"012", b"-1", b"1.0", b"1e3", b"true", b"null", b'"440923"', b"99999999999999999999999",
        b"123456789012345678", b"1,\"format\":\"other\"", b"[1]")]
    crafted += [payload.replace(b'"snapshot":"440923:440925:440924"', b'"snapshot":' + v) for v in (
        b'"a\\u0041"', b'"x\\"y"', b'"\x01"', b'"\xff\xfe"', b"1", b"null", b'"ok","version":2', b'""',
        b'"' + b"9" * 201 + b'"', "\u00e9t\u00e9".encode().join([b'"', b'"']))]
    crafted += [payload.replace(b'"partition":"7"', b'"partition":' + v) for v in (
        b'"../x"', b'"8"', b'"platform"', b'"8\\u0000"', b"8", b'""')]
    crafted += [payload.replace(b'"snapshot_time":"2026-12-06T10:00:00.659375+00:00"', b'"snapshot_time":' + v)
                for v in (b'"2026-12-07T00:00:00+00:00"', b'"\\ud800"', b"{}")]
    crafted += [payload.replace(b'"format"', b'"format"', 1) + b" ", payload[:-1] + b',"txid":1}',
                payload.replace(b'"schema_fingerprint":"f"', b'"schema_fingerprint":"g"')]
    for bytes_ in crafted:
        assert bytes_ != payload
        record = Record(HEADER, bytes_, 0, "archive a.wbk")
        try:
            alone = header_of(record)
        except SnapshotFormatError as exc:
            with pytest.raises(SnapshotFormatError) as beside:
                header_of(record, like=first)
            assert str(beside.value) == str(exc), bytes_
            continue
        assert header_of(record, like=first) == alone, bytes_
        assert type(header_of(record, like=first)["txid"]) is type(alone["txid"]), bytes_


def test_a_partition_member_found_twice_or_spelled_otherwise_is_never_taken_as_the_headers_own():
    from wedbackup_dagster.core.errors import SnapshotFormatError
    from wedbackup_dagster.core.formats.snapshot_stream import HEADER, Record, header_of

    # the plan holds a nested member spelled exactly as the top-level one: the bytes do not say which is which
    twice = header_of(_written_header())
    assert "partition" not in [name for name, _, _ in twice.spans]
    moved = _written_header(partition="8", plan={"tenant_tables": {"public.guests": {"partition": "7"}}})
    assert header_of(moved, like=twice)["plan"]["tenant_tables"]["public.guests"]["partition"] == "7"
    # the top-level member spelled otherwise (a space), a nested one spelled as the writer spells it: the one
    # found is not the header's own, so a header differing in the nested value keeps its own partition
    respaced = header_of(Record(HEADER, _written_header().payload.replace(b'"partition":"7","plan"',
                                                                          b'"partition": "7","plan"'), 0, "a.wbk"))
    assert respaced["partition"] == "7" and respaced.spans == ()
    nested_changed = _written_header(plan={"tenant_tables": {"public.guests": {"partition": "8"}}}).payload
    nested_changed = nested_changed.replace(b'"partition":"7","plan"', b'"partition": "7","plan"')
    assert header_of(Record(HEADER, nested_changed, 0, "a.wbk"), like=respaced)["partition"] == "7"
    first = header_of(_written_header(plan={"tenant_tables": {}}))
    payload = _written_header(plan={"tenant_tables": {}}).payload
    # another member smuggled in beside the partition, an escaped value, a value no partition has
    for member in (b'"partition":"8","format":"other"', b'"partition":"8\\u0000"', b'"partition":"../x"',
                   b'"partition":"8"'.replace(b"8", b"\xff")):
        crafted = payload.replace(b'"partition":"7"', member)
        with pytest.raises(SnapshotFormatError):
            header_of(Record(HEADER, crafted, 0, "archive a.wbk"), like=first)


def test_a_payload_with_values_encoded_ahead_is_the_same_bytes_as_encoding_it_whole():
    from wedbackup_dagster.core.formats.snapshot_stream import json_payload, json_payload_with, json_text

    large = {"schema": [["table", "public.gäste", "x\n\"y\""]], "plan": {"z": 1, "a": [None, True, 1.5]},
             "foreign_keys": []}
    small = {"partition": "7", "txid": 12, "format": "wedbackup-snapshot", "snapshot_time": "2026-12-06T04:00:00+00:00",
             "zeta": {"b": 1, "a": 2}}
    assert json_payload_with(small, {k: json_text(v) for k, v in large.items()}) == json_payload({**small, **large})


def test_a_table_begin_record_read_before_gives_the_same_answer_and_a_list_the_caller_may_change():
    from wedbackup_dagster.core.errors import SnapshotFormatError
    from wedbackup_dagster.core.formats.snapshot_stream import TABLE_BEGIN, Record, json_payload, table_begin_of

    payload = json_payload({"schema": "public", "name": "guests", "columns": ["id", "wedding_id", "name"]})
    first = table_begin_of(Record(TABLE_BEGIN, payload, 0, "a.wbk"))
    first[2].append("mine")
    again = table_begin_of(Record(TABLE_BEGIN, payload, 90, "b.wbk"))
    assert again == ("public", "guests", ["id", "wedding_id", "name"])
    bad = json_payload({"schema": "public", "name": "guests", "columns": ["id", ""]})
    for _ in range(2):  # a refused record is never remembered
        with pytest.raises(SnapshotFormatError, match="does not name a table"):
            table_begin_of(Record(TABLE_BEGIN, bad, 0, "c.wbk"))
