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
