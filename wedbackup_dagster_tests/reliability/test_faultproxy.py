"""The fault proxy itself, against the real stand-ins: it passes traffic through untouched when no fault
is due, and each kind of fault reaches a real SDK client as the failure it imitates, counted by kind."""
from __future__ import annotations

import time

import boto3
import psycopg
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
from botocore.exceptions import ResponseStreamingError

from .conftest import fault_proxies
from .faultproxy import FaultSchedule


def _s3(env, proxy, read_timeout: float = 1.0):
    return boto3.client("s3", endpoint_url=f"http://{proxy.address}", region_name=env["WEDBACKUP_S3_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                        config=Config(connect_timeout=1, read_timeout=read_timeout,
                                      retries={"max_attempts": 1, "mode": "standard"}))


def test_no_fault_passes_every_byte_both_ways(stack, s3_bucket):
    env = stack.env()
    with fault_proxies(env, {"s3": FaultSchedule(seed=1, rate=0.0)}) as (proxies, _):
        client = _s3(env, proxies["s3"])
        payload = bytes(range(256)) * 4096  # 1 MiB, sent with Expect: 100-continue
        client.put_object(Bucket=s3_bucket, Key="k", Body=payload)
        assert client.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == payload
        assert client.head_object(Bucket=s3_bucket, Key="k")["ContentLength"] == len(payload)
        assert proxies["s3"].requests == 3 and sum(proxies["s3"].counts.values()) == 0


@pytest.mark.parametrize("kind, expected", [
    ("http_500", "500"), ("http_503", "503"), ("slowdown", "SlowDown"), ("http_429", "429"),
])
def test_answer_faults_reach_the_client_as_provider_errors(stack, s3_bucket, kind, expected):
    env = stack.env()
    with fault_proxies(env, {"s3": FaultSchedule(seed=1, rate=1.0, weights={kind: 1})}) as (proxies, _):
        with pytest.raises(ClientError) as caught:
            _s3(env, proxies["s3"]).put_object(Bucket=s3_bucket, Key="k", Body=b"x" * 1000)
        assert expected in str(caught.value)
        assert set(proxies["s3"].counts) == {kind}


def test_reset_stall_and_truncate_reach_the_client_as_network_errors(stack, s3_bucket, s3_client):
    env = stack.env()
    s3_client.put_object(Bucket=s3_bucket, Key="k", Body=b"y" * 100_000)
    with fault_proxies(env, {"s3": FaultSchedule(seed=1, rate=1.0, weights={"reset": 1})}) as (proxies, _):
        with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
            _s3(env, proxies["s3"]).get_object(Bucket=s3_bucket, Key="k")
    with fault_proxies(env, {"s3": FaultSchedule(seed=1, rate=1.0, weights={"stall": 1}, stall_seconds=3)}) as (
            proxies, _):
        started = time.monotonic()
        with pytest.raises(ReadTimeoutError):
            _s3(env, proxies["s3"], read_timeout=1).head_object(Bucket=s3_bucket, Key="k")
        assert time.monotonic() - started < 2.5  # the client's timeout, not the stall, ends the wait
    with fault_proxies(env, {"s3": FaultSchedule(seed=1, rate=1.0, weights={"truncate": 1})}) as (proxies, _):
        with pytest.raises(ResponseStreamingError):
            _s3(env, proxies["s3"]).get_object(Bucket=s3_bucket, Key="k")["Body"].read()
        assert set(proxies["s3"].counts) == {"truncate"}


def test_schedule_is_seeded(stack, s3_bucket):
    env = stack.env()
    seen = []
    for _ in range(2):
        with fault_proxies(env, {"s3": FaultSchedule(seed=42, rate=0.5, weights={"http_503": 1})}) as (proxies, _):
            client = _s3(env, proxies["s3"])
            outcomes = []
            for _ in range(12):
                try:
                    client.head_bucket(Bucket=s3_bucket)
                    outcomes.append("ok")
                except ClientError:
                    outcomes.append("503")
            seen.append(outcomes)
    assert seen[0] == seen[1] and "ok" in seen[0] and "503" in seen[0]


def test_postgres_through_the_proxy_and_a_reset(stack, make_database):
    env = stack.env()
    dsn = make_database()
    with fault_proxies({**env, "WEDBACKUP_SOURCE_DSN": dsn},
                       {"postgres": FaultSchedule(seed=3, rate=0.0)}) as (_, routed):
        with psycopg.connect(routed["WEDBACKUP_SOURCE_DSN"]) as conn:
            assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    with fault_proxies({**env, "WEDBACKUP_SOURCE_DSN": dsn},
                       {"postgres": FaultSchedule(seed=3, rate=1.0, weights={"reset": 1})}) as (proxies, routed):
        with pytest.raises(psycopg.OperationalError):
            with psycopg.connect(routed["WEDBACKUP_SOURCE_DSN"]) as conn:
                conn.execute("SELECT repeat('x', 1000000)").fetchone()
        assert proxies["postgres"].counts == {"reset": 1}


def test_a_database_fault_is_counted_only_when_it_strikes(stack, make_database):
    # Regression: a TCP fault was counted when chosen, so a connection that closed before its byte budget
    # counted a fault that never happened (inflating the soak's figures).
    env = stack.env()
    dsn = make_database()
    never = FaultSchedule(seed=3, rate=1.0, weights={"reset": 1}, tcp_after=(1 << 30, 1 << 30))
    with fault_proxies({**env, "WEDBACKUP_SOURCE_DSN": dsn}, {"postgres": never}) as (proxies, routed):
        with psycopg.connect(routed["WEDBACKUP_SOURCE_DSN"]) as conn:
            assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        assert proxies["postgres"].requests == 1 and proxies["postgres"].counts == {}
