"""Provider health on the real stand-ins: canaries pass on live providers, fail fast on a closed port and
on a server that never answers, and the up / down state follows consecutive failures into the catalogue."""
from __future__ import annotations

import socket
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.config import Settings
from wedbackup_dagster.core.errors import ConfigError
from wedbackup_dagster.core.storage.health import (HealthSettings, ProbeResult, ProviderState, canary_replicas,
                                                   catchup_ranges, check_providers, next_state, probe_all,
                                                   states_from_catalogue)

T0 = datetime(2026, 6, 6, 12, 0, tzinfo=timezone.utc)


def ok(provider: str = "s3") -> ProbeResult:
    return ProbeResult(provider, True, 0.01)


def failed(provider: str = "s3") -> ProbeResult:
    return ProbeResult(provider, False, 0.01, "canary write failed")


def test_down_after_n_consecutive_failures_and_up_after_one_success():
    state, transition = next_state(None, failed(), down_after=2, now=T0)
    assert (state.ok, state.consecutive_failures, transition) == (True, 1, None)
    state, transition = next_state(state, failed(), down_after=2, now=T0 + timedelta(seconds=30))
    assert (state.ok, state.consecutive_failures, transition) == (False, 2, "down")
    assert state.since == "2026-06-06T12:00:30+00:00"
    state, transition = next_state(state, failed(), down_after=2, now=T0 + timedelta(seconds=60))
    assert (state.ok, state.consecutive_failures, transition) == (False, 3, None)
    assert state.since == "2026-06-06T12:00:30+00:00"  # still the same outage
    state, transition = next_state(state, ok(), down_after=2, now=T0 + timedelta(seconds=90))
    assert (state.ok, state.consecutive_failures, transition) == (True, 0, "recovered")
    assert state.since == state.last_checked == "2026-06-06T12:01:30+00:00"


def test_one_blip_is_not_an_outage_and_a_success_resets_the_count():
    state, _ = next_state(None, ok(), down_after=2, now=T0)
    state, _ = next_state(state, failed(), down_after=2, now=T0)
    state, transition = next_state(state, ok(), down_after=2, now=T0)
    assert (state.ok, state.consecutive_failures, transition) == (True, 0, None)
    state, transition = next_state(state, failed(), down_after=2, now=T0)
    assert (state.ok, state.consecutive_failures, transition) == (True, 1, None)


def test_state_survives_a_json_round_trip():
    state = ProviderState("gcs", False, 4, "2026-06-06T12:00:00+00:00", "2026-06-06T12:02:00+00:00")
    assert ProviderState.from_json(state.to_json()) == state


@pytest.mark.parametrize("name,value", [("WEDBACKUP_PROVIDER_DOWN_AFTER", "0"),
                                        ("WEDBACKUP_PROVIDER_DOWN_AFTER", "two"),
                                        ("WEDBACKUP_CANARY_TIMEOUT", "soon"),
                                        ("WEDBACKUP_CANARY_TIMEOUT", "0")])
def test_bad_health_settings_name_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        HealthSettings.from_env({name: value})
    assert HealthSettings.from_env({}) == HealthSettings(down_after=2, canary_timeout=10.0)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def settings(stack, monkeypatch, s3_bucket, gcs_bucket, azure_container, make_database) -> Settings:
    monkeypatch.setenv("WEDBACKUP_SOURCE_DSN", make_database())
    monkeypatch.setenv("WEDBACKUP_CATALOGUE_DSN", make_database())
    monkeypatch.setenv("WEDBACKUP_S3_BUCKET", s3_bucket)
    monkeypatch.setenv("WEDBACKUP_GCS_BUCKET", gcs_bucket)
    monkeypatch.setenv("WEDBACKUP_AZURE_CONTAINER", azure_container)
    return Settings.from_env()


def test_live_providers_pass_the_canary_and_leave_nothing_behind(settings, s3_client):
    replicas = canary_replicas(settings, timeout=5)
    results = probe_all(replicas, timeout=5)
    assert {p: r.ok for p, r in results.items()} == {"s3": True, "gcs": True, "azure": True}, results
    assert all(r.error is None and r.seconds < 5 for r in results.values())
    assert s3_client.list_objects_v2(Bucket=settings.s3.bucket).get("KeyCount", 0) == 0


def test_closed_port_fails_fast_and_names_the_provider(settings):
    dead = replace(settings, s3=replace(settings.s3, endpoint_url=f"http://127.0.0.1:{closed_port()}"))
    started = time.monotonic()
    result = probe_all(canary_replicas(dead, timeout=2, providers=("s3",)), timeout=2)["s3"]
    assert not result.ok and "s3" in result.error and "canary write" in result.error
    assert time.monotonic() - started < 3
    assert "AWS_SECRET_ACCESS_KEY" not in result.error


def test_a_server_that_never_answers_is_given_up_on_after_the_timeout(settings):
    with socket.socket() as silent:  # accepts connections (backlog) but never reads or replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        hung = replace(settings, s3=replace(settings.s3, endpoint_url=f"http://127.0.0.1:{port}"))
        started = time.monotonic()
        result = probe_all(canary_replicas(hung, timeout=1, providers=("s3",)), timeout=1)["s3"]
        elapsed = time.monotonic() - started
    assert not result.ok and result.error
    assert elapsed < 2.5, elapsed


def test_checks_are_recorded_as_history_and_state(settings):
    catalogue = Catalogue(settings.catalogue_dsn)
    catalogue.migrate()
    dead = replace(settings, s3=replace(settings.s3, endpoint_url=f"http://127.0.0.1:{closed_port()}"))
    health = HealthSettings(down_after=2, canary_timeout=2)
    previous: dict[str, ProviderState] = {}
    for i in range(2):
        checks = check_providers(canary_replicas(dead, 2), catalogue, previous, settings=health,
                                 now=T0 + timedelta(seconds=30 * i))
        previous = {p: c.state for p, c in checks.items()}
    assert checks["s3"].transition == "down" and checks["gcs"].transition is None
    assert states_from_catalogue(catalogue) == previous
    assert [(r["ok"], bool(r["error"])) for r in catalogue.provider_history("s3")] == [(False, True)] * 2
    assert [r["ok"] for r in catalogue.provider_history("gcs")] == [True, True]

    checks = check_providers(canary_replicas(settings, 2), catalogue, previous, settings=health,
                             now=T0 + timedelta(seconds=60))
    assert checks["s3"].transition == "recovered"
    state = states_from_catalogue(catalogue)["s3"]
    assert (state.ok, state.consecutive_failures, state.since) == (True, 0, "2026-06-06T12:01:00+00:00")


ORDER = ["platform", "1", "2", "3", "4", "5", "6", "7", "8", "9"]


def test_catchup_ranges_are_exact_ranges_of_insertion_order():
    ranges, unknown = catchup_ranges({"2", "3", "4", "6", "9", "77"}, ORDER, harmless={"5", "7", "8"}, max_runs=50)
    assert ranges == [("2", "4"), ("6", "6"), ("9", "9")] and unknown == ["77"]
    assert catchup_ranges(set(), ORDER, harmless=set(), max_runs=50) == ([], [])


def test_too_many_ranges_fold_the_smallest_gaps_of_partitions_that_already_have_their_copy():
    missing, harmless = {"1", "3", "6", "9"}, {"2", "4", "5", "7", "8"}
    assert catchup_ranges(missing, ORDER, harmless, max_runs=3)[0] == [("1", "3"), ("6", "6"), ("9", "9")]
    assert catchup_ranges(missing, ORDER, harmless, max_runs=1)[0] == [("1", "9")]
    assert catchup_ranges(missing, ORDER, harmless, max_runs=50, max_gap=2)[0] == [("1", "9")]
    assert catchup_ranges(missing, ORDER, harmless, max_runs=50, max_gap=1)[0] == [("1", "3"), ("6", "6"),
                                                                                    ("9", "9")]
    # Partition 7 has no backup at all: replicating it would fail, so the gap 7-8 is never folded.
    assert catchup_ranges(missing, ORDER, harmless - {"7"}, max_runs=1)[0] == [("1", "6"), ("9", "9")]


def test_missing_copies_are_of_newest_live_backups_only(settings):
    catalogue = Catalogue(settings.catalogue_dsn)
    catalogue.migrate()
    manifest = {"snapshot_time": "2026-06-01T10:00:00+00:00", "tables": [{"rows": 1, "bytes": 10}]}
    copy = dict(uri="s3://b/k", object_key="k", version_id=None, size=1, checksum=None, storage_class=None,
                region=None, media="object-storage", offsite=True)

    def backup(partition: str, sha: str, hour: int, s3: bool) -> None:
        record = catalogue.record_backup(partition=partition, archive_sha256=sha * 64, size=1, key_id=f"k{partition}",
                                         manifest={**manifest, "snapshot_time": f"2026-06-01T{hour:02d}:00:00+00:00"})
        if s3:
            catalogue.record_copy(record.id, provider="s3", **copy)

    backup("1", "a", 10, s3=True)
    backup("2", "b", 10, s3=False)
    backup("3", "c", 10, s3=True)
    backup("3", "d", 11, s3=False)  # newer, not copied
    backup("4", "e", 11, s3=True)
    backup("4", "f", 10, s3=False)  # older, not copied: does not matter
    backup("5", "0", 10, s3=False)  # removed from the source
    backup("6", "9", 10, s3=False)  # erased: key destroyed
    with catalogue.connect() as conn:
        conn.execute("INSERT INTO wedbackup.partitions (partition, removed_at) VALUES ('5', now())")
        conn.execute("INSERT INTO wedbackup.wedding_keys (key_id, partition, wrapped, master_key_id, shredded_at) "
                     "VALUES ('k6', '6', NULL, 'm', now())")
    assert catalogue.partitions_missing_copy("s3") == ["2", "3"]
    assert catalogue.copy_coverage("s3") == {"1": True, "2": False, "3": False, "4": True}
    assert catalogue.partitions_missing_copy("gcs") == ["1", "2", "3", "4"]


def test_cli_health_prints_each_provider_and_fails_when_one_is_down(settings, monkeypatch, capsys):
    from wedbackup_dagster import cli

    monkeypatch.setenv("WEDBACKUP_CANARY_TIMEOUT", "2")
    assert cli.main(["health"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == ["s3", "gcs", "azure"]
    assert "canary ok" in out and "FAILED" not in out
    monkeypatch.setenv("WEDBACKUP_S3_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    assert cli.main(["health"]) == 1
    assert "s3     canary FAILED: provider s3:" in capsys.readouterr().out
