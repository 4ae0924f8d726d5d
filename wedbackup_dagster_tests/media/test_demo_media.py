"""`wedbackup demo-data --media N` fills the stack's media bucket with the demo weddings' media: skewed sizes,
an empty file, and the duplicates real platforms have."""
from __future__ import annotations

import json

from wedbackup_dagster.cli.app import main
from wedbackup_dagster.core.media.source import media_s3_client
from wedbackup_dagster.dev.demo_media import MEDIA_BUCKET


def test_demo_data_fills_the_media_bucket(stack, make_database, monkeypatch, capsys):
    import os

    monkeypatch.setenv("WEDBACKUP_SOURCE_DSN", make_database())
    monkeypatch.setenv("WEDBACKUP_CATALOGUE_DSN", make_database())
    assert main(["demo-data", "--weddings", "3", "--seed", "7", "--media", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)["media"]
    assert summary["source"] == f"s3://{MEDIA_BUCKET}" and summary["weddings"] == 1
    client = media_s3_client(os.environ)
    objects = {o["Key"]: (o["Size"], o["ETag"]) for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=MEDIA_BUCKET) for o in page.get("Contents", [])}
    wedding = [k for k in objects if k.startswith("weddings/")]
    vendors = [k for k in objects if k.startswith("vendors/")]
    assert wedding and vendors
    sizes = sorted(objects[k][0] for k in wedding)
    assert sizes[0] == 0 and sizes[-1] >= 2 << 20 and sum(1 for s in sizes if s < 200_000) >= 5
    by_etag: dict[str, list[str]] = {}
    for key in wedding:
        by_etag.setdefault(objects[key][1], []).append(key)
    assert any(len(keys) >= 3 for keys in by_etag.values())  # the same photo under three names
