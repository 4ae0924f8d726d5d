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


def test_a_payload_with_values_encoded_ahead_is_the_same_bytes_as_encoding_it_whole():
    from wedbackup_dagster.core.formats.snapshot_stream import json_payload, json_payload_with, json_text

    large = {"schema": [["table", "public.gäste", "x\n\"y\""]], "plan": {"z": 1, "a": [None, True, 1.5]},
             "foreign_keys": []}
    small = {"partition": "7", "txid": 12, "format": "wedbackup-snapshot", "snapshot_time": "2026-12-06T04:00:00+00:00",
             "zeta": {"b": 1, "a": 2}}
    assert json_payload_with(small, {k: json_text(v) for k, v in large.items()}) == json_payload({**small, **large})
