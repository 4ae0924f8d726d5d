"""The lean S3 requests (core/storage/replicas/s3_lean.py): SigV4 signing against AWS's own published example,
the bucket URL and settings taken from the boto3 client, and downloads and create-only uploads against the real
moto stand-in — through a real fault proxy for transient answers, answers cut short or lost, and a provider
that stays down."""
from __future__ import annotations

import datetime
import hashlib
import io
import os

import boto3
import pytest
from botocore.config import Config
from botocore.credentials import Credentials

from wedbackup_dagster.core.config import S3Target
from wedbackup_dagster.core.errors import ReplicaChecksumMismatch, ReplicaError
from wedbackup_dagster.core.storage.replicas import S3Replica, s3_client_from
from wedbackup_dagster.core.storage.replicas.s3 import client_config
from wedbackup_dagster.core.storage.replicas.s3_lean import (
    LeanS3,
    error_of,
    lean_s3,
    total_attempts,
)
from wedbackup_dagster_tests.reliability.faultproxy import (
    FailingAfter,
    FaultProxy,
    FaultSchedule,
)

PREFIX = "wedbackup"
BUCKET = "wedding-bk"  # DNS-compatible: botocore may address it as a virtual host

# AWS's SigV4 example for S3 "GET Object" (Amazon S3 API reference, "Signature Calculations for the Authorization
# Header: Example: GET Object"): its inputs and the signature the documentation gives.
AWS_ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_EXAMPLE_SIGNATURE = "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"


def test_signing_matches_aws_published_sigv4_example(monkeypatch):
    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda *a, **k: datetime.datetime(2013, 5, 24))
    getter = LeanS3(base_url="https://examplebucket.s3.amazonaws.com/", region="us-east-1",
                        credentials=Credentials(AWS_ACCESS_KEY, AWS_SECRET_KEY), send=lambda r: None, attempts=1)
    request = getter.signed(getter.url("test.txt"), {"Range": "bytes=0-9"})
    auth = request.headers["Authorization"]
    assert auth == ("AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
                    "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
                    f"Signature={AWS_EXAMPLE_SIGNATURE}")
    assert request.headers["x-amz-date"] == "20130524T000000Z"


def test_a_session_token_is_signed_and_sent():
    getter = LeanS3(base_url="https://b.s3.amazonaws.com/", region="eu-west-1",
                        credentials=Credentials("AKID", "secret", token="the-session-token"), send=lambda r: None,
                        attempts=1)
    request = getter.signed(getter.url("a/b.wbk", version_id="v 1"))
    assert request.headers["X-Amz-Security-Token"] == "the-session-token"
    assert "x-amz-security-token" in request.headers["Authorization"]
    assert request.url == "https://b.s3.amazonaws.com/a/b.wbk?versionId=v%201"


def _client(**kw):
    return boto3.client("s3", aws_access_key_id="AKID", aws_secret_access_key="secret", **kw)


def test_the_bucket_url_is_botocores_for_each_addressing_style():
    virtual = lean_s3(_client(region_name="eu-west-1", config=Config(s3={"addressing_style": "virtual"})), BUCKET)
    path = lean_s3(_client(region_name="eu-west-1", config=Config(s3={"addressing_style": "path"})), BUCKET)
    custom = lean_s3(_client(region_name="eu-west-1", endpoint_url="http://127.0.0.1:1234"), BUCKET)
    assert virtual.base_url == "https://wedding-bk.s3.eu-west-1.amazonaws.com/"
    assert path.base_url == "https://s3.eu-west-1.amazonaws.com/wedding-bk/"
    assert custom.base_url == "http://127.0.0.1:1234/wedding-bk/"
    assert virtual.region == "eu-west-1"


def test_clients_it_cannot_serve_keep_boto3():
    from botocore import UNSIGNED

    assert lean_s3(_client(region_name="eu-west-1", config=Config(signature_version=UNSIGNED)), BUCKET) is None
    assert lean_s3(object(), BUCKET) is None


def test_attempts_and_errors_are_read_as_botocore_reads_them():
    assert total_attempts({"max_attempts": 2, "mode": "standard"}) == 3
    assert total_attempts({"total_max_attempts": 5}) == 5
    assert total_attempts(None) == 3
    missing = error_of(404, b"<Error><Code>NoSuchKey</Code><Message>The key does not exist.</Message></Error>")
    assert (missing.code, missing.transient) == ("NoSuchKey", False)
    assert error_of(503, b"<Error><Code>SlowDown</Code></Error>").transient
    assert error_of(400, b"<Error><Code>RequestTimeout</Code></Error>").transient
    assert not error_of(403, b"<Error><Code>AccessDenied</Code></Error>").transient


# ------------------------------------------------------------------------------- against the stand-in


def _target(bucket: str, env: dict[str, str], endpoint: str | None = None) -> S3Target:
    return S3Target(bucket=bucket, region=env["WEDBACKUP_S3_REGION"], prefix=PREFIX,
                    endpoint_url=endpoint or env["WEDBACKUP_S3_ENDPOINT_URL"], storage_class="STANDARD", sse="none")


@pytest.fixture
def stored(stack, s3_bucket, s3_client):
    """An archive-shaped object (3 MiB and a ragged tail: several reads) at its content address."""
    data = os.urandom(3 * (1 << 20) + 4321)
    sha = hashlib.sha256(data).hexdigest()
    key = f"{PREFIX}/weddings/7/{sha}.wbk"
    s3_client.put_object(Bucket=s3_bucket, Key=key, Body=data)
    return {"env": stack.env(), "bucket": s3_bucket, "key": key, "sha": sha, "data": data}


def _replica(stored, endpoint: str | None = None, max_attempts: int = 2) -> S3Replica:
    target = _target(stored["bucket"], stored["env"], endpoint)
    replica = S3Replica(s3_client_from(target, stored["env"], config=client_config(
        connect_timeout=1, read_timeout=2, max_attempts=max_attempts)), target)
    assert replica._lean_s3() is not None  # noqa: SLF001 - these tests are about the lean path
    replica._lean.sleep = lambda s: None  # noqa: SLF001 - no backoff waits in tests
    return replica


@pytest.mark.stack
def test_downloads_every_byte_checked_and_versions(stored, s3_client):
    replica = _replica(stored)
    out = io.BytesIO()
    assert replica.download(stored["key"], out, expected_sha256=stored["sha"]) == len(stored["data"])
    assert out.getvalue() == stored["data"]
    first = s3_client.head_object(Bucket=stored["bucket"], Key=stored["key"])["VersionId"]
    s3_client.put_object(Bucket=stored["bucket"], Key=stored["key"], Body=b"newer")
    old = io.BytesIO()
    replica.download(stored["key"], old, expected_sha256=stored["sha"], version_id=first)
    assert old.getvalue() == stored["data"]


@pytest.mark.stack
def test_a_missing_object_and_a_wrong_digest_name_the_key(stored):
    replica = _replica(stored)
    missing = f"{PREFIX}/weddings/7/{'0' * 64}.wbk"
    with pytest.raises(ReplicaError, match="NoSuchKey") as caught:
        replica.download(missing, io.BytesIO())
    assert caught.value.key == missing and "s3" in str(caught.value)
    with pytest.raises(ReplicaChecksumMismatch) as caught:
        replica.download(stored["key"], io.BytesIO(), expected_sha256="f" * 64)
    assert caught.value.key == stored["key"] and stored["sha"] in str(caught.value)


def _upstream(env) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(env["WEDBACKUP_S3_ENDPOINT_URL"])
    return parts.hostname, parts.port


@pytest.mark.stack
def test_a_transient_answer_is_retried_as_botocore_would(stored):
    with FaultProxy("s3", _upstream(stored["env"]),
                    FaultSchedule(seed=3, rate=1.0, weights={"http_503": 1}, limit=1)) as proxy:
        replica = _replica(stored, endpoint=f"http://{proxy.address}")
        out = io.BytesIO()
        replica.download(stored["key"], out, expected_sha256=stored["sha"])
        assert out.getvalue() == stored["data"] and proxy.counts["http_503"] == 1 and proxy.requests == 2


@pytest.mark.stack
def test_a_provider_that_stays_down_fails_after_every_attempt_naming_the_key(stored):
    with FailingAfter("s3", _upstream(stored["env"]), good=0, kind="http_503") as proxy:
        replica = _replica(stored, endpoint=f"http://{proxy.address}", max_attempts=2)
        with pytest.raises(ReplicaError, match="503") as caught:
            replica.download(stored["key"], io.BytesIO())
        assert caught.value.key == stored["key"] and proxy.requests == 3  # three tries in all, as configured


@pytest.mark.stack
def test_an_answer_cut_short_is_an_error_never_a_short_download(stored):
    with FailingAfter("s3", _upstream(stored["env"]), good=0, kind="truncate") as proxy:
        replica = _replica(stored, endpoint=f"http://{proxy.address}")
        with pytest.raises(ReplicaError, match="cut short|broke off") as caught:
            replica.download(stored["key"], io.BytesIO())
        assert caught.value.key == stored["key"] and proxy.counts["truncate"] == 1
        proxy.good = 10**6  # the provider is well again: the same replica (its pooled connections) recovers
        out = io.BytesIO()
        replica.download(stored["key"], out, expected_sha256=stored["sha"])
        assert out.getvalue() == stored["data"]


class _FullDisk(io.BytesIO):
    def write(self, data) -> int:  # noqa: ANN001 - any bytes-like
        raise OSError(28, "No space left on device")


@pytest.mark.stack
def test_a_failed_local_write_is_not_blamed_on_the_provider(stored):
    replica = _replica(stored)
    with pytest.raises(OSError, match="No space left") as caught:
        replica.download(stored["key"], _FullDisk())
    assert not isinstance(caught.value, ReplicaError)
    out = io.BytesIO()  # the connection it left mid-answer is not reused as it was
    replica.download(stored["key"], out, expected_sha256=stored["sha"])
    assert out.getvalue() == stored["data"]


def test_the_secrets_to_scrub_are_the_credentials_secret_key_and_token_and_none_when_unreadable():
    from botocore.credentials import Credentials

    from wedbackup_dagster.core.storage.replicas.s3_lean import credential_secrets

    class Broken:
        def get_frozen_credentials(self):
            raise RuntimeError("no credentials here")

    assert credential_secrets(Credentials("AKIDEXAMPLE", "secret-key", "session-token")) == ["secret-key",
                                                                                              "session-token"]
    assert credential_secrets(None) == [] and credential_secrets(Broken()) == []


# ------------------------------------------------------------------------------- the lean PUT


def _stored_as(s3_client, bucket: str, key: str) -> dict:
    head = s3_client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    versions = s3_client.list_object_versions(Bucket=bucket, Prefix=key).get("Versions", [])
    return {"body": body, "versions": len(versions), "checksum": head.get("ChecksumSHA256"),
            "metadata": head["Metadata"], "type": head["ContentType"], "class": head.get("StorageClass", "STANDARD")}


@pytest.mark.stack
def test_a_small_archive_goes_up_by_the_lean_put_stored_exactly_as_put_object_stores_it(stored, s3_client, archive,
                                                                                          monkeypatch):
    lean = _replica(stored)
    boto = S3Replica(lean.client, lean.target, lean_put=False)
    sent = []
    monkeypatch.setattr(lean.client, "put_object", lambda **kw: sent.append(kw))  # the lean path never calls it
    by_lean = archive.upload(lean, "7")
    monkeypatch.undo()
    by_boto3 = archive.upload(boto, "8")
    assert not sent and not by_lean.already_present
    a, b = (_stored_as(s3_client, stored["bucket"], r.key) for r in (by_lean, by_boto3))
    assert a["body"] == archive.data and a["versions"] == 1
    assert a["metadata"] == {**b["metadata"], "partition": "7"} and b["metadata"]["partition"] == "8"
    assert (a["checksum"], a["type"], a["class"]) == (b["checksum"], b["type"], b["class"])
    assert by_lean.provider_checksum == by_boto3.provider_checksum == a["checksum"]
    assert by_lean.version_id and by_lean.version_id == s3_client.head_object(
        Bucket=stored["bucket"], Key=by_lean.key)["VersionId"]


@pytest.mark.stack
def test_the_same_archive_uploaded_again_is_found_there_not_written_twice(stored, s3_client, archive):
    replica = _replica(stored)
    first = archive.upload(replica)
    again = archive.upload(replica)
    assert again.already_present and again.key == first.key
    assert _stored_as(s3_client, stored["bucket"], first.key)["versions"] == 1


@pytest.mark.stack
def test_a_transient_answer_to_the_put_is_retried_and_the_archive_stored_once(stored, s3_client, archive):
    with FaultProxy("s3", _upstream(stored["env"]),
                    FaultSchedule(seed=3, rate=1.0, weights={"http_503": 1}, limit=1)) as proxy:
        replica = _replica(stored, endpoint=f"http://{proxy.address}")
        record = archive.upload(replica)
        assert proxy.counts["http_503"] == 1 and not record.already_present
    assert _stored_as(s3_client, stored["bucket"], record.key)["versions"] == 1


@pytest.mark.stack
# reset: cut before S3 saw it (retried); truncate: S3 stored it and its answer was cut (confirmed by a look, or
# found there by the retry's If-None-Match): either way one version, checked
@pytest.mark.parametrize("fault", ["reset", "truncate"])
def test_a_put_cut_off_is_retried_and_one_that_landed_unseen_is_found_never_written_twice(stored, s3_client, archive,
                                                                                          fault):
    with FaultProxy("s3", _upstream(stored["env"]),
                    FaultSchedule(seed=3, rate=1.0, weights={fault: 1}, limit=1)) as proxy:
        replica = _replica(stored, endpoint=f"http://{proxy.address}")
        record = archive.upload(replica)
        assert proxy.counts[fault] == 1
    after = _stored_as(s3_client, stored["bucket"], record.key)
    assert after["body"] == archive.data and after["versions"] == 1
    assert record.provider_checksum == after["checksum"]


@pytest.mark.stack
def test_a_provider_that_refuses_every_put_fails_the_upload_naming_the_key(stored, s3_client, archive):
    with FailingAfter("s3", _upstream(stored["env"]), good=0, kind="http_503") as proxy:
        replica = _replica(stored, endpoint=f"http://{proxy.address}", max_attempts=2)
        with pytest.raises(ReplicaError, match="503") as caught:
            archive.upload(replica)
        assert proxy.requests == 3 and "wedbackup/weddings/7/" in caught.value.key
        assert stored["env"]["AWS_SECRET_ACCESS_KEY"] not in str(caught.value)


def test_a_put_is_signed_with_its_checksum_and_only_if_absent():
    getter = LeanS3(base_url="https://b.s3.amazonaws.com/", region="eu-west-1",
                    credentials=Credentials("AKID", "secret"), send=lambda r: None, attempts=1)
    request = getter.signed(getter.url("a/b.wbk"), {"If-None-Match": "*", "x-amz-checksum-sha256": "c2hh"},
                            method="PUT", body=b"body")
    signed = request.headers["Authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    assert request.method == "PUT" and {"if-none-match", "x-amz-checksum-sha256", "x-amz-content-sha256"} <= set(signed)
    # botocore's S3 signer signs the body itself (its SHA-256) when the request carries no Content-MD5
    assert request.headers["x-amz-content-sha256"] == hashlib.sha256(b"body").hexdigest()


@pytest.mark.stack
@pytest.mark.parametrize("answer", ["confirmed", "without", "other"])
def test_the_lean_put_is_one_request_when_its_answer_confirms_the_checksum_else_checked_by_a_look(stored, s3_client,
                                                                                                  archive, answer):
    with FaultProxy("s3", _upstream(stored["env"]), FaultSchedule(seed=3, rate=0.0)) as proxy:
        replica = _replica(stored, endpoint=f"http://{proxy.address}")
        lean = replica._lean  # noqa: SLF001 - the answer S3 gave, tampered with as a faulty provider might
        put_new = lean.put_new

        def tampered(*args, **kwargs):
            got = put_new(*args, **kwargs)
            if answer != "confirmed":
                got["ChecksumSHA256"] = None if answer == "without" else "A" * 43 + "="
            return got

        lean.put_new = tampered
        record = archive.upload(replica)
        assert proxy.requests == (1 if answer == "confirmed" else 2)  # the PUT, and a HEAD when not confirmed
    after = _stored_as(s3_client, stored["bucket"], record.key)
    assert record.provider_checksum == after["checksum"] and after["versions"] == 1 and not record.already_present
