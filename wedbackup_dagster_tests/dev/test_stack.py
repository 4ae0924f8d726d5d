"""The local stack answers, its settings reach every service, and env output is shell-safe."""
from __future__ import annotations

import subprocess

import psycopg

from wedbackup_dagster.core.config import Settings
from wedbackup_dagster.dev.stack import SERVICES, export_lines, port_open


def test_every_service_answers_and_is_recorded(stack):
    rows = {r["service"]: r for r in stack.status()}
    for name in SERVICES:
        assert rows[name]["answering"], name
        assert port_open(rows[name]["port"])


def test_settings_from_stack_env_reach_postgres(stack):
    settings = Settings.from_env(stack.env())
    with psycopg.connect(settings.source_dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == "wedding_platform"
    with psycopg.connect(settings.catalogue_dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == "wedbackup_catalogue"


def test_buckets_and_containers_are_isolated(s3_client, s3_bucket, gcs_client, gcs_bucket, azure_service,
                                             azure_container):
    s3_client.put_object(Bucket=s3_bucket, Key="probe", Body=b"x")
    assert s3_client.get_object(Bucket=s3_bucket, Key="probe")["Body"].read() == b"x"
    gcs_client.bucket(gcs_bucket).blob("probe").upload_from_string(b"y")
    assert gcs_client.bucket(gcs_bucket).blob("probe").download_as_bytes() == b"y"
    azure_service.get_blob_client(azure_container, "probe").upload_blob(b"z")
    assert azure_service.get_blob_client(azure_container, "probe").download_blob().readall() == b"z"


def test_env_output_round_trips_through_a_shell(stack):
    env = stack.env()
    script = export_lines(env) + '\nprintf %s "$WEDBACKUP_SOURCE_DSN"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out == env["WEDBACKUP_SOURCE_DSN"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_second_stack_up_twice_then_down_leaves_no_process(tmp_path, monkeypatch):
    """A stack in its own state dir and ports: `up` twice is harmless, `down` stops exactly what it started."""
    import os

    from wedbackup_dagster.dev.stack import Stack, _pid_alive

    for name in ("postgres", "s3", "gcs"):
        monkeypatch.setenv(f"WEDBACKUP_{name.upper()}_PORT", str(_free_port()))
    other = Stack(tmp_path / "state")
    services = ("postgres", "s3", "gcs")
    try:
        other.up(services)
        pids = {name: other.recorded_pid(name) for name in services}
        other.up(services)  # again: nothing new is started
        assert {name: other.recorded_pid(name) for name in services} == pids
        for name in services:
            assert _pid_alive(pids[name]), name
        with psycopg.connect(other.dsn("postgres")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        other.down()
    for name, pid in pids.items():
        assert not _pid_alive(pid), f"{name} (pid {pid}) still running after down"
        assert not port_open(int(os.environ[f"WEDBACKUP_{name.upper()}_PORT"]))
    assert list((tmp_path / "state" / "pids").glob("*.pid")) == []


def test_stand_in_stopped_then_started_at_once_answers_from_a_new_process(tmp_path, monkeypatch):
    """What the benchmarks do before each part (fresh stand-ins): a start right after a stop gets a new,
    answering server, not the old one's port still closing (the start then returned at once, or the GCS
    emulator failed to bind and lived on without a listener)."""
    import os

    from wedbackup_dagster.dev.stack import Stack, _pid_alive

    services = ("s3", "gcs")
    for name in services:
        monkeypatch.setenv(f"WEDBACKUP_{name.upper()}_PORT", str(_free_port()))
    other = Stack(tmp_path / "state")
    try:
        other.up(services)
        for name in services:
            old = other.recorded_pid(name)
            other.stop_service(name)
            assert not _pid_alive(old), name
            other.up((name,))
            new = other.recorded_pid(name)
            assert new is not None and new != old and _pid_alive(new), name
            assert port_open(int(os.environ[f"WEDBACKUP_{name.upper()}_PORT"])), name
    finally:
        other.down()


def test_processes_restarting_a_stand_in_at_once_take_turns_and_leave_none_unrecorded(tmp_path, monkeypatch):
    """Three processes each restart the S3 stand-in at the same moment (as benchmark parts and test sessions
    may): they take turns on the state directory's lock, so the one recorded is the one answering, and `down`
    then leaves the port closed (before, the loser of a race for the port was recorded and the winner ran on,
    unrecorded, after every `down`)."""
    import os
    import subprocess
    import sys

    from wedbackup_dagster.dev.stack import Stack, _pid_alive

    monkeypatch.setenv("WEDBACKUP_S3_PORT", str(_free_port()))
    state = tmp_path / "state"
    other = Stack(state)
    restart = ("import pathlib, sys, time; from wedbackup_dagster.dev.stack import Stack; "
               "s = Stack(pathlib.Path(sys.argv[1])); time.sleep(float(sys.argv[2])); "
               "s.stop_service('s3'); s.up(('s3',))")
    try:
        other.up(("s3",))
        procs = [subprocess.Popen([sys.executable, "-c", restart, str(state), str(0.3 - i * 0.001)],
                                  env=dict(os.environ)) for i in range(3)]
        assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
        pid = other.recorded_pid("s3")
        assert pid is not None and _pid_alive(pid)
    finally:
        other.down()
    assert not port_open(int(os.environ["WEDBACKUP_S3_PORT"])), "a stand-in nobody recorded still answers"


def test_default_ports_lie_outside_the_kernels_ephemeral_range():
    """The kernel gives every outgoing connection a port from its ephemeral range: a stand-in whose default port
    lay there could find it held by some client connection when it starts (EADDRINUSE)."""
    from pathlib import Path

    from wedbackup_dagster.dev.stack import DEFAULT_PORTS

    configured = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low, high = map(int, configured.read_text().split()) if configured.exists() else (32768, 60999)
    inside = {name: p for name, p in DEFAULT_PORTS.items() if low <= p <= high}
    assert not inside, f"default ports inside the ephemeral range {low}-{high}: {inside}"
    assert len(set(DEFAULT_PORTS.values())) == len(DEFAULT_PORTS)
