"""The provider-health sensor and the run-failure alerts on a real Dagster instance, catalogue and storage
stand-ins: an outage is counted and reported while backups go on reaching the other providers, and the
recovery asks for replica runs for exactly the partitions that missed the provider; failed runs are
logged and posted to a webhook (a small HTTP server of the test's own)."""
from __future__ import annotations

import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import dagster as dg
import pytest
from dagster._core.definitions.partitions.context import partition_loading_context
from dagster._core.events import DagsterEventType
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from wedbackup_dagster.providers.sensors import post_alert, provider_health, run_failure_alerts
from wedbackup_dagster.backups.constants import S3_REPLICA
from wedbackup_dagster.backups.launch import register_partitions
from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.config import Settings
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.errors import ProviderError
from wedbackup_dagster.core.storage.health import canary_replicas
from wedbackup_dagster.core.storage.replicas import S3Replica
from wedbackup_dagster.core.storage.providers import ensure_targets
from wedbackup_dagster.core.storage.replicas.s3 import s3_client_from


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tick(instance: dg.DagsterInstance, cursor: str | None):
    from wedbackup_dagster.definitions import defs

    # The code location's repository and the instance's partitions, as the daemon has them: run requests
    # are resolved against the jobs and their partition keys validated.
    with dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs,
                                 resources={"wedbackup": defs.resources["wedbackup"]}) as context, \
            partition_loading_context(dynamic_partitions_store=instance):
        return provider_health.evaluate_tick(context)


def states(cursor: str) -> dict[str, tuple[bool, int]]:
    return {p: (s["ok"], s["consecutive_failures"]) for p, s in json.loads(cursor).items()}


@pytest.fixture
def fleet(demo_env):
    """Nine demo weddings; the catalogue has backups of platform and weddings 1-7, only some copied to S3."""
    source = demo_env(weddings=9, seed=9, document_bytes=128, WEDBACKUP_CANARY_TIMEOUT="3",
                      WEDBACKUP_PROVIDER_DOWN_AFTER="2")["source"]
    engine = Engine.from_env()
    ensure_targets(engine.settings)
    s3 = S3Replica(s3_client_from(engine.settings.s3, os.environ), engine.settings.s3)
    with engine.snapshot_session() as session:
        for partition in ["platform", *map(str, range(1, 8))]:
            engine.back_up(partition, session)
    for partition in ["platform", "1", "3", "5", "7"]:
        engine.replicate(partition, s3)
    engine.share_seconds = 0
    with engine.snapshot_session() as session:
        engine.back_up("3", session)  # wedding 3's newest backup has not reached S3; its older one has
    with dg.instance_for_test() as instance:
        keys = register_partitions(instance, source)
        assert keys == ["platform", *map(str, range(1, 10))]  # also the partitions' insertion order
        yield {"instance": instance, "catalogue": Catalogue(engine.settings.catalogue_dsn), "engine": engine}


def test_outage_is_counted_reported_and_caught_up_for_exactly_the_partitions_that_missed_it(fleet, monkeypatch):
    instance, catalogue = fleet["instance"], fleet["catalogue"]

    # 1. Everything up: nothing to do.
    first = tick(instance, None)
    assert first.run_requests == [] and first.skip_message.startswith("all providers up")
    assert states(first.cursor) == {"s3": (True, 0), "gcs": (True, 0), "azure": (True, 0)}

    # 2. S3 unreachable: one failure is counted, not yet an outage.
    live_endpoint = fleet["engine"].settings.s3.endpoint_url
    monkeypatch.setenv("WEDBACKUP_S3_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    second = tick(instance, first.cursor)
    assert second.run_requests == []
    assert states(second.cursor) == {"s3": (True, 1), "gcs": (True, 0), "azure": (True, 0)}
    assert "s3 canary failed (1 of 2 before it counts as down)" in second.skip_message

    # 3. The second failure in a row: S3 is down, in the cursor and in the catalogue, and the gap is shown.
    third = tick(instance, second.cursor)
    assert third.run_requests == []
    assert states(third.cursor) == {"s3": (False, 2), "gcs": (True, 0), "azure": (True, 0)}
    recorded = {r["provider"]: (r["ok"], r["consecutive_failures"]) for r in catalogue.provider_states()}
    assert recorded == states(third.cursor)
    assert "s3 down since" in third.skip_message
    assert "newest backup of 4 partition(s) lacks a s3 copy" in third.skip_message  # 2, 3, 4, 6

    # While S3 is down a backup still reaches the vault, GCS and Azure: each provider is its own replica
    # (and its own Dagster step: backups/test_pipeline.py runs that through Dagster, with its retries).
    engine: Engine = fleet["engine"]
    with engine.snapshot_session() as session:
        engine.back_up("8", session)
    live = Settings.from_env()
    for provider, replica in canary_replicas(live, timeout=3).items():
        if provider == "s3":
            with pytest.raises(ProviderError, match="provider s3"):
                engine.replicate("8", replica)
        else:
            engine.replicate("8", replica)
    newest = catalogue.require_latest_backup("8")
    assert {c.provider for c in catalogue.copies(newest.id)} == {"vault", "gcs", "azure"}
    fourth = tick(instance, third.cursor)
    assert states(fourth.cursor)["s3"] == (False, 3)
    assert "newest backup of 5 partition(s) lacks a s3 copy" in fourth.skip_message
    assert catalogue.partitions_missing_copy("s3") == ["2", "3", "4", "6", "8"]

    # 4. S3 back: one success recovers it, and catch-up runs cover exactly 2-4, 6 and 8 (9 has no backup).
    monkeypatch.setenv("WEDBACKUP_S3_ENDPOINT_URL", live_endpoint)
    fifth = tick(instance, fourth.cursor)
    recovered_at = json.loads(fifth.cursor)["s3"]["since"]
    assert states(fifth.cursor) == {"s3": (True, 0), "gcs": (True, 0), "azure": (True, 0)}
    # (Dagster adds the sensor's name, and for a one-partition run its partition, when it resolves them.)
    tags = {"dagster/priority": "20", "wedbackup/catchup": "s3", "dagster/sensor_name": "provider_health"}
    one = {"dagster/partition_set": "backup_weddings_partition_set"}
    assert [(r.run_key, r.asset_selection, r.partition_key, r.tags) for r in fifth.run_requests] == [
        (f"catchup-s3-{recovered_at}-0", [S3_REPLICA], None,
         {**tags, ASSET_PARTITION_RANGE_START_TAG: "2", ASSET_PARTITION_RANGE_END_TAG: "4"}),
        (f"catchup-s3-{recovered_at}-1", [S3_REPLICA], "6", {**tags, **one, "dagster/partition": "6"}),
        (f"catchup-s3-{recovered_at}-2", [S3_REPLICA], "8", {**tags, **one, "dagster/partition": "8"}),
    ]

    # The requested runs do what they say (a range run and a one-partition run; each costs seconds here):
    # only the S3 replica is materialized, and those partitions no longer lack an S3 copy.
    from wedbackup_dagster.definitions import defs

    job = defs.resolve_job_def("backup_weddings")
    for request in fifth.run_requests[:2]:
        outcome = job.execute_in_process(instance=instance, partition_key=request.partition_key,
                                         tags=request.tags, asset_selection=request.asset_selection)
        materialized = {e.asset_key for e in outcome.get_asset_materialization_events()}
        assert outcome.success and materialized == {S3_REPLICA}
    assert catalogue.partitions_missing_copy("s3") == ["8"]

    # 5. Still up: no second catch-up.
    sixth = tick(instance, fifth.cursor)
    assert sixth.run_requests == [] and sixth.skip_message.startswith("all providers up")


def test_a_sensor_without_cursor_continues_from_the_catalogue(fleet, monkeypatch):
    instance = fleet["instance"]
    emulator = os.environ["STORAGE_EMULATOR_HOST"]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{closed_port()}")
    cursor = None
    for _ in range(2):
        cursor = tick(instance, cursor).cursor
    assert states(cursor)["gcs"] == (False, 2)

    # GCS back, and the sensor reset (no cursor): the catalogue still says GCS was down, so the recovery
    # is seen and caught up.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    after = tick(instance, None)
    assert states(after.cursor)["gcs"] == (True, 0)
    # Nothing was ever copied to GCS: every backed-up partition, in one range of insertion order.
    assert [(r.tags.get(ASSET_PARTITION_RANGE_START_TAG), r.tags.get(ASSET_PARTITION_RANGE_END_TAG))
            for r in after.run_requests] == [("platform", "7")]
    assert {r.tags["wedbackup/catchup"] for r in after.run_requests} == {"gcs"}


# ------------------------------------------------------------------------------------ run failures

class Webhook:
    """A local HTTP server recording each POSTed JSON body; answers `status`."""

    def __init__(self, status: int = 204):
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers["Content-Length"])
                outer.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/T0KEN-abc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


SECRET = "s3cr3t-for-the-test"


@dg.op
def upload_step():
    raise dg.Failure(description=f"wedding 7: upload failed with postgresql://backup:{SECRET}@db/x and {SECRET}")


@dg.job(tags={"dagster/partition": "7"})
def failing_job():
    upload_step()


def failure_context(instance: dg.DagsterInstance):
    result = failing_job.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    run = instance.get_run_by_id(result.run_id)
    event = instance.get_records_for_run(result.run_id, of_type=DagsterEventType.RUN_FAILURE
                                         ).records[0].event_log_entry.dagster_event
    return dg.build_run_status_sensor_context(sensor_name="run_failure_alerts", dagster_instance=instance,
                                              dagster_run=run, dagster_event=event).for_run_failure()


def test_failed_run_is_posted_to_the_webhook_readable_and_redacted(stack, monkeypatch, capfd):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with dg.instance_for_test() as instance, Webhook() as hook:
        context = failure_context(instance)
        monkeypatch.setenv("WEDBACKUP_ALERT_WEBHOOK_URL", hook.url)
        capfd.readouterr()  # the run's own logs are not the alert
        run_failure_alerts(context)
    assert len(hook.bodies) == 1
    alert = hook.bodies[0]
    assert (alert["source"], alert["kind"], alert["job"]) == ("wedbackup", "run_failure", "failing_job")
    assert alert["run_id"] == context.dagster_run.run_id and alert["partitions"] == {"partition": "7"}
    assert [s["step"] for s in alert["steps"]] == ["upload_step"]
    assert alert["steps"][0]["message"].startswith("wedding 7: upload failed with postgresql://backup:***@db/x")
    text = json.dumps(alert)
    assert SECRET not in text and "T0KEN" not in text
    logged = capfd.readouterr().err  # the sensor's log (in the daemon: the tick's log in the UI)
    assert "RUN FAILED: job failing_job partition 7" in logged and "step upload_step: wedding 7" in logged
    assert SECRET not in logged


def test_an_unreachable_or_refusing_webhook_is_logged_never_raised(stack, monkeypatch, capfd):
    with dg.instance_for_test() as instance:
        context = failure_context(instance)
        monkeypatch.setenv("WEDBACKUP_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{closed_port()}/hook")
        run_failure_alerts(context)  # does not raise
        assert "not posted: webhook not reachable" in capfd.readouterr().err
        monkeypatch.setenv("WEDBACKUP_ALERT_WEBHOOK_URL", "ftp://example.invalid/hook")
        run_failure_alerts(context)
        logged = capfd.readouterr().err
        assert "configuration WEDBACKUP_ALERT_WEBHOOK_URL: must be an http(s) URL" in logged
        assert "example.invalid" not in logged
    with Webhook(status=500) as hook:
        assert post_alert(hook.url, {"kind": "run_failure"}) == "webhook answered HTTP 500"
        assert hook.bodies == [{"kind": "run_failure"}]
