"""`wedbackup media backup | restore | verify` on the real stack, and the media schedule's requests."""
from __future__ import annotations

import datetime as dt
import hashlib

import dagster as dg

from wedbackup_dagster.cli.app import main
from wedbackup_dagster.dev.demo_media import S3Sink, generate_media, wedding_media
from wedbackup_dagster.media.schedules import media_requests

from .conftest import TEST_SCALE
from .test_media_assets import _env


def test_media_commands(media_world, monkeypatch, capsys, tmp_path):
    world = media_world
    _env(world, monkeypatch)
    generate_media(S3Sink(world.s3, world.bucket), ["31"], seed=13, scale=TEST_SCALE)
    assert main(["media", "backup", "--all"]) == 0
    out = capsys.readouterr().out
    assert "31 " in out and "platform" in out and "0 skipped" in out

    assert main(["media", "backup", "--wedding", "31"]) == 0
    again = capsys.readouterr().out
    assert "unchanged" in again and "0 object(s) uploaded" in again

    assert main(["media", "restore", "--wedding", "31", "--to", str(tmp_path / "out"), "--from", "gcs"]) == 0
    for path, content in wedding_media("31", 13, TEST_SCALE):
        data = content if isinstance(content, bytes) else content.read()
        assert hashlib.sha256((tmp_path / "out" / path).read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()

    assert main(["media", "verify", "--wedding", "31", "--sample", "2"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert "ok: 2 of" in line

    assert main(["media", "prune", "--all", "--dry-run"]) == 0
    pruned = capsys.readouterr().out
    assert "31 " in pruned and "kept 1 snapshot(s); would delete 0 snapshot(s) and 0 pack(s)" in pruned
    # `wedbackup prune --dry-run` says what the daily sweep would do to media too.
    assert main(["prune", "--dry-run", "--wedding", "31"]) == 0
    assert "media: 0 snapshot(s) and 0 pack(s) to delete, 0 to repack, 1 snapshot(s) kept" in capsys.readouterr().out

    assert main(["media", "restore", "--wedding", "99", "--to", str(tmp_path / "none")]) == 2
    assert "no media snapshot" in capsys.readouterr().err


def test_media_schedule_requests():
    when = dt.datetime(2026, 12, 5, 10, 17, tzinfo=dt.timezone.utc)
    skip = media_requests(["1", "2"], when, None)
    assert isinstance(skip, dg.SkipReason) and "WEDBACKUP_MEDIA_SOURCE" in skip.skip_message
    assert isinstance(media_requests([], when, "s3://m"), dg.SkipReason)
    [request] = media_requests(["1", "2", "platform"], when, "s3://m")
    assert request.run_key == "media-20261205T1017"
    assert request.tags["dagster/asset_partition_range_start"] == "1"
    assert request.tags["dagster/asset_partition_range_end"] == "platform"
