"""The S3 stand-in: moto's application under cheroot keeps connections open, hands moto the request headers as
moto_server does (object metadata keeps its underscores; no underscored header stands in for a dashed one),
and falls back to moto_server when cheroot cannot run."""
from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from wedbackup_dagster.dev.s3_stand_in import header_environ, make_server
from wedbackup_dagster.dev.stack import port_open


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_headers_reach_moto_as_moto_servers_own_handler_passes_them():
    env = header_environ(
        {"REQUEST_METHOD": "PUT", "HTTP_X_AMZ_CONTENT_SHA256": "forged", "CONTENT_LENGTH": "3"},
        [("Content-Length", "3"), ("Content-Type", "application/octet-stream"),
         ("X-Amz-Content-Sha256", "UNSIGNED-PAYLOAD"), ("X_Amz_Content_Sha256", "forged"),
         ("X-Amz-Meta-Key_Id", "k1"), ("X-Amz-Meta-Sha256", "abc"), ("X_Other", "dropped"),
         ("X-Amz-Meta-Part-No", "1"), ("X-Amz-Meta-Part_No", "shadow")])
    assert env["REQUEST_METHOD"] == "PUT"
    assert env["CONTENT_LENGTH"] == "3" and env["CONTENT_TYPE"] == "application/octet-stream"
    assert env["HTTP_X_AMZ_CONTENT_SHA256"] == "UNSIGNED-PAYLOAD"  # the dashed header, never the underscored
    assert env["HTTP_X_AMZ_META_KEY_ID"] == "k1" and env["HTTP_X_AMZ_META_SHA256"] == "abc"
    assert env["HTTP_X_AMZ_META_PART_NO"] == "1"
    assert "HTTP_X_OTHER" not in env
    assert env["moto.preserved_header_names"] == {"HTTP_X_AMZ_META_KEY_ID": "X-Amz-Meta-Key_Id"}


@pytest.fixture
def own_server() -> Iterator[int]:
    """The stand-in's server in this process, on a free port."""
    port = _free_port()
    server = make_server("127.0.0.1", port)
    server.prepare()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        server.stop()
        thread.join(10)


def test_one_connection_serves_many_requests(own_server):
    conn = http.client.HTTPConnection("127.0.0.1", own_server, timeout=10)
    conn.connect()
    first_socket = conn.sock
    for _ in range(5):
        conn.request("GET", "/", headers={"Host": f"127.0.0.1:{own_server}"})
        answer = conn.getresponse()
        answer.read()
        assert answer.status == 200  # moto's ListBuckets
        assert (answer.getheader("Connection") or "").lower() != "close"
        assert conn.sock is first_socket  # still open, not reconnected
    conn.close()


def test_s3_behaviour_we_rely_on_through_the_stand_in(own_server):
    """Object metadata with underscores, create-only PUT (If-None-Match), ChecksumSHA256, versioning."""
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{own_server}", region_name="eu-west-1",
                      aws_access_key_id="local", aws_secret_access_key="local")
    s3.create_bucket(Bucket="stand-in-probe", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3.put_bucket_versioning(Bucket="stand-in-probe", VersioningConfiguration={"Status": "Enabled"})
    put = s3.put_object(Bucket="stand-in-probe", Key="k", Body=b"x" * 70_000, IfNoneMatch="*",
                        ChecksumAlgorithm="SHA256", Metadata={"key_id": "m1", "part-no": "2"})
    assert put["ChecksumSHA256"] and put["VersionId"]
    with pytest.raises(ClientError) as refused:
        s3.put_object(Bucket="stand-in-probe", Key="k", Body=b"y", IfNoneMatch="*")
    assert refused.value.response["Error"]["Code"] == "PreconditionFailed"
    head = s3.head_object(Bucket="stand-in-probe", Key="k", ChecksumMode="ENABLED")
    assert head["Metadata"] == {"key_id": "m1", "part-no": "2"}
    assert head["ChecksumSHA256"] == put["ChecksumSHA256"] and head["VersionId"] == put["VersionId"]
    assert s3.get_object(Bucket="stand-in-probe", Key="k")["Body"].read() == b"x" * 70_000


def test_object_keys_keep_percent_signs_and_escapes_as_written(own_server):
    """Keys are what the client wrote, escapes included: `%2E%2E` stays `%2E%2E` (not `..`), `100%` stays."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{own_server}", region_name="eu-west-1",
                      aws_access_key_id="local", aws_secret_access_key="local")
    s3.create_bucket(Bucket="stand-in-keys", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    keys = ["weddings/12/percent%2E%2E/100%.txt", "a+b c/%25/ü?x=1#y", "plain/key.txt"]
    for i, key in enumerate(keys):
        s3.put_object(Bucket="stand-in-keys", Key=key, Body=str(i).encode())
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket="stand-in-keys")["Contents"]]
    assert sorted(listed) == sorted(keys)
    for i, key in enumerate(keys):
        assert s3.get_object(Bucket="stand-in-keys", Key=key)["Body"].read() == str(i).encode()


def test_without_cheroot_the_launcher_runs_moto_server(tmp_path):
    port = _free_port()
    code = ("import sys; sys.modules['cheroot'] = None\n"
            "from wedbackup_dagster.dev.s3_stand_in import main\n"
            f"main(['-H', '127.0.0.1', '-p', '{port}'])\n")
    log = open(tmp_path / "s3.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ}, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not port_open(port) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        answer = conn.getresponse()
        answer.read()
        assert answer.status == 200
        assert answer.getheader("Connection") == "close"  # Werkzeug's development server: moto_server
        assert "falling back to moto_server" in (tmp_path / "s3.log").read_text()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_the_remembered_backend_is_the_one_moto_finds():
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    from wedbackup_dagster.dev.s3_stand_in import moto_application

    stock, ours = DomainDispatcherApplication(create_backend_app), moto_application()
    hosts = ["s3.eu-west-1.amazonaws.com", "s3control", "moto_api", "sqs.us-east-1.amazonaws.com", None,
             "unknown.example"]
    for _ in range(2):  # the second round is answered from memory
        assert [ours.get_backend_for_host(h) for h in hosts] == [stock.get_backend_for_host(h) for h in hosts]
    assert ours.get_backend_for_host("s3.eu-west-1.amazonaws.com") == "s3"
    assert set(ours.backend_by_host) == set(hosts)
