"""Replicas against the real stand-ins (moto, gcp-storage-emulator, Azurite): verified uploads that are
idempotent and self-repairing, verified downloads, full deletes, canaries, down providers, and hostile keys."""
from __future__ import annotations

import hashlib
import io
import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from wedbackup_dagster.core.config import AzureTarget, GCSTarget, S3Target
from wedbackup_dagster.core.errors import ArchiveError, ProviderError, ReplicaChecksumMismatch, ReplicaKeyRejected
from wedbackup_dagster.core.storage.replicas import (AzureReplica, GCSReplica, ListedObject, Replica, S3Replica,
                                                     archive_key, azure_service_from, digest_file, ensure_bucket,
                                                     ensure_container, ensure_gcs_bucket, gcs_client_from,
                                                     parse_archive_key, s3_client_from)

MiB = 1 << 20
PREFIX = "wedbackup"
WEDDING = "4711"
from wedbackup_dagster.core.storage.providers import PROVIDERS  # noqa: E402


@dataclass(frozen=True)
class Archive:
    path: Path
    sha256: str
    size: int


def _make_archive(directory: Path, size: int) -> Archive:
    path = directory / f"archive-{size}.bin"
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            block = os.urandom(min(MiB, remaining))
            f.write(block)
            sha.update(block)
            remaining -= len(block)
    return Archive(path, sha.hexdigest(), size)


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Archive]:
    directory = tmp_path_factory.mktemp("vault")
    # 12 MiB + a ragged tail: 3 S3 parts of 5 MiB, 13 GCS chunks of 1 MiB, 3 Azure blocks of 4 MiB.
    return {"small": _make_archive(directory, 1024), "large": _make_archive(directory, 12 * MiB + 12345)}


# ------------------------------------------------------------------------------------- replicas


@dataclass
class Harness:
    """One replica plus the raw SDK handles a test needs to tamper with or inspect what the provider holds."""

    replica: Any
    overwrite: Callable[[str, bytes], None]  # write other bytes at a key, behind the replica's back
    versions: Callable[[str], list]
    exists: Callable[[str], bool]


def _s3_target(bucket: str, env: dict[str, str]) -> S3Target:
    return S3Target(bucket=bucket, region=env["WEDBACKUP_S3_REGION"], prefix=PREFIX,
                    endpoint_url=env["WEDBACKUP_S3_ENDPOINT_URL"], storage_class="STANDARD_IA", sse="AES256")


def _gcs_target(bucket: str, env: dict[str, str]) -> GCSTarget:
    return GCSTarget(bucket=bucket, project=env["WEDBACKUP_GCS_PROJECT"], prefix=PREFIX, storage_class="NEARLINE",
                     emulator_host=env["STORAGE_EMULATOR_HOST"])


def _azure_target(container: str, env: dict[str, str]) -> AzureTarget:
    return AzureTarget(container=container, prefix=PREFIX, tier="Cool",
                       connection_string=env["WEDBACKUP_AZURE_CONNECTION_STRING"])


def _s3(stack, s3_client, s3_bucket, *, lean_put: bool = True) -> Harness:
    replica = S3Replica(s3_client, _s3_target(s3_bucket, stack.env()), multipart_threshold=5 * MiB,
                        part_size=5 * MiB, lean_put=lean_put)

    def overwrite(key: str, data: bytes) -> None:
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256",
                             Metadata={"sha256": parse_archive_key(PREFIX, key)[1] or ""})

    def exists(key: str) -> bool:
        return "Contents" in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix=key)

    return Harness(replica, overwrite, replica.versions, exists)


def _gcs(stack, gcs_client, gcs_bucket) -> Harness:
    replica = GCSReplica(gcs_client, _gcs_target(gcs_bucket, stack.env()), chunk_size=MiB)

    def overwrite(key: str, data: bytes) -> None:
        gcs_client.bucket(gcs_bucket).blob(key).upload_from_string(data)

    def exists(key: str) -> bool:
        return gcs_client.bucket(gcs_bucket).get_blob(key) is not None

    return Harness(replica, overwrite, replica.generations, exists)


def _azure(stack, azure_service, azure_container) -> Harness:
    replica = AzureReplica(azure_service, _azure_target(azure_container, stack.env()), max_single_put_size=MiB,
                           max_block_size=4 * MiB)

    def overwrite(key: str, data: bytes) -> None:
        azure_service.get_blob_client(azure_container, key).upload_blob(data, overwrite=True)

    def exists(key: str) -> bool:
        return azure_service.get_blob_client(azure_container, key).exists()

    return Harness(replica, overwrite, replica.versions, exists)


@pytest.fixture(params=PROVIDERS)
def harness(request, stack) -> Iterator[Harness]:
    if request.param == "s3":
        h = _s3(stack, request.getfixturevalue("s3_client"), request.getfixturevalue("s3_bucket"))
    elif request.param == "gcs":
        h = _gcs(stack, request.getfixturevalue("gcs_client"), request.getfixturevalue("gcs_bucket"))
    else:
        h = _azure(stack, request.getfixturevalue("azure_service"), request.getfixturevalue("azure_container"))
    yield h
    _empty(h.replica)


def _empty(replica) -> None:
    """The stand-ins keep everything in memory: drop this test's archives (and bucket or container)."""
    if replica.provider == "s3":
        client, bucket = replica.client, replica.target.bucket
        listing = client.list_object_versions(Bucket=bucket)
        doomed = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                  for v in listing.get("Versions", []) + listing.get("DeleteMarkers", [])]
        if doomed:
            client.delete_objects(Bucket=bucket, Delete={"Objects": doomed})
        client.delete_bucket(Bucket=bucket)
    elif replica.provider == "gcs":
        from google.api_core.exceptions import Conflict

        try:
            replica.bucket.delete(force=True)
        except Conflict:
            pass  # the emulator refuses to drop a bucket holding an abandoned resumable upload; its objects are gone
    else:
        replica.container.delete_container()


def _upload(replica, archive: Archive, partition: str = WEDDING, **kwargs):
    return replica.upload(archive.path, partition=partition, sha256=archive.sha256, size=archive.size,
                          metadata={"wedding_id": partition}, **kwargs)


def _download(replica, key: str, expected: str | None) -> bytes:
    out = io.BytesIO()
    n = replica.download(key, out, expected_sha256=expected)
    assert n == len(out.getvalue())
    return out.getvalue()


# ------------------------------------------------------------------------------- upload/download


@pytest.mark.parametrize("size", ["small", "large"])
def test_upload_records_a_confirmed_copy_that_downloads_verified(harness, archives, size):
    archive = archives[size]
    replica = harness.replica
    assert isinstance(replica, Replica)
    record = _upload(replica, archive)
    key = f"{PREFIX}/weddings/{WEDDING}/{archive.sha256}.wbk"
    assert (record.provider, record.key, record.size, record.sha256) == (replica.provider, key, archive.size,
                                                                        archive.sha256)
    assert not record.already_present and not record.repaired
    assert record.media == "object-storage" and record.offsite
    digests = digest_file(archive.path, md5=True, crc32c=True)
    if replica.provider == "s3":
        assert record.uri == f"s3://{replica.target.bucket}/{key}"
        assert record.version_id and record.version_id != "null"
        assert record.storage_class == "STANDARD_IA" and record.region == "eu-west-1"
        if size == "small":
            assert record.provider_checksum == digests.sha256_b64
        else:  # the checksum of the three part checksums, which moto reports without the "-3" suffix
            assert record.provider_checksum == digest_file(archive.path, part_size=5 * MiB).s3_composite()
            assert record.etag.endswith("-3")
    elif replica.provider == "gcs":
        assert record.uri == f"gs://{replica.target.bucket}/{key}"
        assert record.version_id and int(record.version_id) > 0
        assert record.storage_class == "NEARLINE"
        import base64

        assert record.provider_checksum == (f"crc32c:{base64.b64encode(digests.crc32c).decode()} "
                                            f"md5:{base64.b64encode(digests.md5).decode()}")
    else:
        assert record.uri.startswith("http://127.0.0.1:") and record.uri.endswith(f"/{replica.target.container}/{key}")
        assert "?" not in record.uri and "sig=" not in record.uri
        assert record.storage_class == "Cool" and record.etag
        import base64

        assert record.provider_checksum == base64.b64encode(digests.md5).decode()
    head = replica.head(key)
    assert head is not None and head.sha256 == archive.sha256 and head.size == archive.size
    assert head.version_id == record.version_id
    assert hashlib.sha256(_download(replica, key, archive.sha256)).hexdigest() == archive.sha256


@pytest.mark.parametrize("size", ["small", "large"])
def test_second_upload_is_a_no_op_leaving_one_version(harness, archives, size):
    archive = archives[size]
    first = _upload(harness.replica, archive)
    second = _upload(harness.replica, archive)
    assert second.already_present and not first.already_present
    assert (second.key, second.version_id, second.sha256, second.provider_checksum) == (
        first.key, first.version_id, first.sha256, first.provider_checksum)
    assert len(harness.versions(first.key)) == 1


def test_large_uploads_take_the_multipart_path(harness, archives, s3_client):
    archive = archives["large"]
    reads: list[int] = []
    record = _upload(harness.replica, archive, progress=reads.append)
    provider = harness.replica.provider
    if provider == "s3":
        part = s3_client.head_object(Bucket=harness.replica.target.bucket, Key=record.key, PartNumber=1)
        assert part["PartsCount"] == 3 and part["ContentLength"] == 5 * MiB
        whole = s3_client.head_object(Bucket=harness.replica.target.bucket, Key=record.key)
        assert whole["ServerSideEncryption"] == "AES256" and whole["StorageClass"] == "STANDARD_IA"
    elif provider == "gcs":
        # Resumable: the SDK reads one 1 MiB chunk per request instead of the whole file at once.
        assert len(reads) >= 13 and max(reads) <= MiB
    else:
        blocks = harness.replica.container.get_blob_client(record.key).get_block_list("committed")[0]
        assert [b.size for b in blocks] == [4 * MiB, 4 * MiB, 4 * MiB, 12345]
    assert sum(r for r in reads if r > 0) >= archive.size


@pytest.mark.parametrize("size", ["small", "large"])
def test_object_with_other_content_at_the_key_is_detected_and_replaced(harness, archives, size):
    archive = archives[size]
    key = harness.replica.object_key(WEDDING, archive.sha256)
    harness.overwrite(key, os.urandom(archive.size))  # same size, other bytes: bit rot or tampering
    record = _upload(harness.replica, archive)
    assert record.repaired and not record.already_present
    assert key in record.note and "not this archive" in record.note
    assert _download(harness.replica, key, archive.sha256)
    # and now it is the right object, so the next run is a no-op
    assert _upload(harness.replica, archive).already_present


def test_download_of_a_tampered_object_names_provider_and_key(harness, archives):
    archive = archives["small"]
    record = _upload(harness.replica, archive)
    harness.overwrite(record.key, b"x" * archive.size)
    with pytest.raises(ReplicaChecksumMismatch) as caught:
        _download(harness.replica, record.key, archive.sha256)
    assert isinstance(caught.value, ProviderError)
    assert f"provider {harness.replica.provider}" in str(caught.value) and record.key in str(caught.value)
    # without an expected checksum the bytes come back as they are
    assert _download(harness.replica, record.key, None) == b"x" * archive.size


def test_delete_removes_every_version(harness, archives):
    archive = archives["small"]
    record = _upload(harness.replica, archive)
    harness.overwrite(record.key, b"y" * 10)  # a second version where the provider keeps versions
    if harness.replica.provider == "s3":
        assert len(harness.versions(record.key)) == 2
    harness.replica.delete(record.key)
    assert harness.versions(record.key) == []
    assert harness.replica.head(record.key) is None and not harness.exists(record.key)
    harness.replica.delete(record.key)  # deleting what is gone is fine


def test_canary_writes_reads_and_deletes(harness):
    seconds = harness.replica.canary()
    assert 0 < seconds < 10
    assert list(harness.replica.list("_canary/")) == []


def test_list_reports_partition_and_sha_from_the_key(harness, archives):
    _upload(harness.replica, archives["small"], partition=WEDDING)
    _upload(harness.replica, archives["small"], partition="platform")
    listed = sorted(harness.replica.list(), key=lambda o: o.key)
    assert all(isinstance(o, ListedObject) for o in listed)
    assert [(o.partition, o.sha256, o.size) for o in listed] == [
        ("platform", archives["small"].sha256, 1024), (WEDDING, archives["small"].sha256, 1024)]
    assert listed[0].key == f"{PREFIX}/platform/{archives['small'].sha256}.wbk"
    assert [o.partition for o in harness.replica.list(f"weddings/{WEDDING}/")] == [WEDDING]


def test_vault_file_that_is_not_the_archive_is_refused_before_upload(harness, archives, tmp_path):
    archive = archives["small"]
    other = tmp_path / "other.bin"
    other.write_bytes(b"z" * archive.size)
    with pytest.raises(ArchiveError, match="sha256"):
        harness.replica.upload(other, partition=WEDDING, sha256=archive.sha256, size=archive.size, metadata={})
    assert not harness.exists(harness.replica.object_key(WEDDING, archive.sha256))


# ------------------------------------------------------------------------------- failures


class InjectedFailure(OSError):
    pass


def _fail_after(limit: int) -> Callable[[int], None]:
    seen = [0]

    def progress(n: int) -> None:
        seen[0] += n
        if seen[0] > limit:
            raise InjectedFailure("disk read failed half way")

    return progress


def test_upload_failing_half_way_leaves_no_object(harness, archives, s3_client):
    archive = archives["large"]
    key = harness.replica.object_key(WEDDING, archive.sha256)
    with pytest.raises(ProviderError) as caught:
        _upload(harness.replica, archive, progress=_fail_after(6 * MiB))
    assert f"provider {harness.replica.provider}" in str(caught.value) and key in str(caught.value)
    assert "InjectedFailure" in str(caught.value)
    assert not harness.exists(key)
    if harness.replica.provider == "s3":
        uploads = s3_client.list_multipart_uploads(Bucket=harness.replica.target.bucket)
        assert uploads.get("Uploads", []) == []
    # a later run succeeds normally
    assert not _upload(harness.replica, archive).already_present


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_down_provider_fails_fast_naming_it_without_secrets(stack, archives, provider):
    env = stack.env()
    port = _closed_port()
    secrets: list[str] = []
    if provider == "s3":
        target = replace(_s3_target("wb-down", env), endpoint_url=f"http://127.0.0.1:{port}")
        replica: Any = S3Replica(s3_client_from(target, env), target)
        secrets = [env["AWS_SECRET_ACCESS_KEY"]]
    elif provider == "gcs":
        target = replace(_gcs_target("wb-down", env), emulator_host=f"http://127.0.0.1:{port}")
        replica = GCSReplica(gcs_client_from(target), target)
    else:
        cs = env["WEDBACKUP_AZURE_CONNECTION_STRING"]
        live = env["WEDBACKUP_AZURE_CONNECTION_STRING"].split("BlobEndpoint=")[1].split(";")[0]
        down = cs.replace(live, live.replace(live.split("/")[2], f"127.0.0.1:{port}"))
        target = _azure_target("wb-down", {"WEDBACKUP_AZURE_CONNECTION_STRING": down})
        replica = AzureReplica(azure_service_from(target), target)
        account_key = dict(p.split("=", 1) for p in cs.split(";") if "=" in p)["AccountKey"]
        secrets = [cs, down, account_key]
    archive = archives["small"]
    for action in (lambda: _upload(replica, archive), replica.canary):
        start = time.monotonic()
        with pytest.raises(ProviderError) as caught:
            action()
        elapsed = time.monotonic() - start
        message = str(caught.value)
        assert caught.value.provider == provider and message.startswith(f"provider {provider}: ")
        assert elapsed < 10, f"{provider} took {elapsed:.1f}s to fail"
        for secret in secrets:
            assert secret not in message
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert replica.object_key(WEDDING, archive.sha256) in message or "_canary" in message


# --------------------------------------------------------------------------------- hostile input

HOSTILE_PARTITIONS = ["../x", "1/../../etc", "", "a" * 65, "4711/", "we dding", "..", ".", "x\n", "ü", None]
HOSTILE_SHAS = ["A" * 64, "a" * 63, "a" * 65, "../" + "a" * 61, "g" * 64, "", None]


@pytest.mark.parametrize("partition", HOSTILE_PARTITIONS)
def test_hostile_partition_is_rejected(harness, archives, partition):
    with pytest.raises(ReplicaKeyRejected) as caught:
        _upload(harness.replica, archives["small"], partition=partition)
    assert isinstance(caught.value, ValueError) and "partition" in str(caught.value)
    assert repr(partition)[:20] in str(caught.value)


@pytest.mark.parametrize("sha", HOSTILE_SHAS)
def test_hostile_sha256_is_rejected(sha):
    with pytest.raises(ReplicaKeyRejected, match="sha256"):
        archive_key("s3", PREFIX, WEDDING, sha)


@pytest.mark.parametrize("key", [f"{PREFIX}/../etc/passwd", f"{PREFIX}/weddings/../../x", "elsewhere/x.wbk",
                                 f"{PREFIX}x/y", f"{PREFIX}/", f"{PREFIX}//x", f"{PREFIX}/a b", "/" + PREFIX + "/x"])
def test_keys_outside_the_prefix_are_refused_for_every_operation(harness, key):
    replica = harness.replica
    for action in (lambda: replica.head(key), lambda: replica.download(key, io.BytesIO()),
                   lambda: replica.delete(key)):
        with pytest.raises(ReplicaKeyRejected):
            action()
    with pytest.raises(ReplicaKeyRejected):
        list(replica.list("../"))


def test_reserved_or_unportable_metadata_is_rejected(harness, archives):
    archive = archives["small"]
    for metadata in ({"sha256": "0" * 64}, {"partition": "other"}, {"key-id": "a", "key_id": "b"},
                     {"Bad-Name": "x"}, {"note": "line\nbreak"}, {"note": "é"}):
        with pytest.raises(ReplicaKeyRejected):
            harness.replica.upload(archive.path, partition=WEDDING, sha256=archive.sha256, size=archive.size,
                                   metadata=metadata)
    assert not harness.exists(harness.replica.object_key(WEDDING, archive.sha256))


def test_metadata_is_stored_alike_at_every_provider(harness, archives, s3_client):
    archive = archives["small"]
    record = harness.replica.upload(archive.path, partition=WEDDING, sha256=archive.sha256, size=archive.size,
                                    metadata={"partition": WEDDING, "key-id": "k2026"})
    replica = harness.replica
    if replica.provider == "s3":
        stored = s3_client.head_object(Bucket=replica.target.bucket, Key=record.key)["Metadata"]
    elif replica.provider == "gcs":
        stored = replica.bucket.get_blob(record.key).metadata
    else:
        stored = replica.container.get_blob_client(record.key).get_blob_properties().metadata
    assert stored == {"sha256": archive.sha256, "partition": WEDDING, "key_id": "k2026"}


def test_platform_and_wedding_keys_are_content_addressed():
    sha = "ab" * 32
    assert archive_key("s3", "p", "platform", sha) == f"p/platform/{sha}.wbk"
    assert archive_key("s3", "p", "123", sha) == f"p/weddings/123/{sha}.wbk"
    assert parse_archive_key("p", f"p/weddings/123/{sha}.wbk") == ("123", sha)
    assert parse_archive_key("p", f"p/_canary/{sha}.wbk") == (None, None)


# ----------------------------------------------------------------------------------- helpers


def test_ensure_helpers_create_once(stack, s3_client, gcs_client, azure_service):
    import uuid

    env = stack.env()
    name = f"wb-ensure-{uuid.uuid4().hex[:8]}"
    s3_target = _s3_target(name, env)
    assert ensure_bucket(s3_client, s3_target) and not ensure_bucket(s3_client, s3_target)
    assert s3_client.get_bucket_versioning(Bucket=name)["Status"] == "Enabled"
    gcs_target = _gcs_target(name, env)
    assert ensure_gcs_bucket(gcs_client, gcs_target) and not ensure_gcs_bucket(gcs_client, gcs_target)
    azure_target = _azure_target(name, env)
    assert ensure_container(azure_service, azure_target) and not ensure_container(azure_service, azure_target)
    s3_client.delete_bucket(Bucket=name)
    gcs_client.bucket(name).delete()
    azure_service.delete_container(name)


def test_s3_recognises_its_copy_uploaded_with_another_part_size(stack, s3_client, s3_bucket, archives):
    archive = archives["large"]
    first = _upload(_s3(stack, s3_client, s3_bucket).replica, archive)
    # a later deployment with 6 MiB parts: S3's composite checksum differs, yet it is the same archive
    later = S3Replica(s3_client, _s3_target(s3_bucket, stack.env()), multipart_threshold=5 * MiB, part_size=6 * MiB)
    try:
        again = _upload(later, archive)
        assert again.already_present and again.version_id == first.version_id
        assert len(later.versions(first.key)) == 1
    finally:
        _empty(later)


def test_azure_sas_never_reaches_uris_or_errors(request, stack, azure_service, azure_container, archives):
    from datetime import datetime, timedelta, timezone

    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

    sas = generate_account_sas(
        azure_service.account_name, azure_service.credential.account_key,
        resource_types=ResourceTypes(service=True, container=True, object=True),
        permission=AccountSasPermissions(read=True, write=True, delete=True, list=True, create=True, add=True),
        expiry=datetime.now(timezone.utc) + timedelta(hours=1))
    cs = f"BlobEndpoint={azure_service.url.rstrip('/')};SharedAccessSignature={sas}"
    target = _azure_target(azure_container, {"WEDBACKUP_AZURE_CONNECTION_STRING": cs})
    replica = AzureReplica(azure_service_from(target), target)
    record = _upload(replica, archives["small"])
    request.addfinalizer(lambda: _empty(replica))
    assert "?" not in record.uri and "sig" not in record.uri
    assert [o.uri for o in replica.list()] == [record.uri]
    signature = dict(p.split("=", 1) for p in sas.split("&"))["sig"]
    with pytest.raises(ProviderError) as caught:
        replica.download(f"{PREFIX}/weddings/{WEDDING}/{'0' * 64}.wbk", io.BytesIO())
    assert signature not in str(caught.value) and sas not in str(caught.value)


# ------------------------------------------------------------------------------------ Object Lock


@pytest.mark.parametrize("size", [1024, 6 * MiB], ids=["single-put", "multipart"])
def test_s3_object_lock_upload_records_the_lock_and_refuses_deletion(stack, s3_client, s3_lock_bucket, tmp_path,
                                                                      size):
    from datetime import datetime, timedelta, timezone

    from wedbackup_dagster.core.errors import ReplicaLocked

    target = replace(_s3_target(s3_lock_bucket, stack.env()), object_lock="compliance", object_lock_days=2)
    replica = S3Replica(s3_client, target, multipart_threshold=5 * MiB, part_size=5 * MiB)
    path = tmp_path / "archive.wbk"
    path.write_bytes(os.urandom(size))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    record = replica.upload(path, partition="42", sha256=sha, size=size, metadata={})
    soon = datetime.now(timezone.utc) + timedelta(days=2)
    assert record.lock_mode == "compliance"
    assert abs((record.locked_until - soon).total_seconds()) < 120
    assert replica.head(record.key).locked_until == record.locked_until
    assert replica.upload(path, partition="42", sha256=sha, size=size, metadata={}).already_present

    with pytest.raises(ReplicaLocked, match="Object Lock") as refused:
        replica.delete(record.key)
    assert refused.value.locked_until == record.locked_until and refused.value.mode == "compliance"
    assert replica.versions(record.key) == [record.version_id]  # still there, unchanged


def test_ensure_bucket_enables_object_lock_when_configured(stack, s3_client):
    from wedbackup_dagster_tests.conftest import unique_name

    target = replace(_s3_target(unique_name("wbl"), stack.env()), object_lock="governance")
    assert ensure_bucket(s3_client, target)
    config = s3_client.get_object_lock_configuration(Bucket=target.bucket)["ObjectLockConfiguration"]
    assert config["ObjectLockEnabled"] == "Enabled"
    assert s3_client.get_bucket_versioning(Bucket=target.bucket)["Status"] == "Enabled"


def test_s3_legal_hold_is_reported_as_a_lock_without_end(stack, s3_client, s3_lock_bucket, tmp_path):
    from wedbackup_dagster.core.errors import ReplicaLocked

    replica = S3Replica(s3_client, _s3_target(s3_lock_bucket, stack.env()))
    path = tmp_path / "archive.wbk"
    path.write_bytes(os.urandom(2048))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    record = replica.upload(path, partition="7", sha256=sha, size=2048, metadata={})
    assert record.locked_until is None  # no lock configured
    s3_client.put_object_legal_hold(Bucket=s3_lock_bucket, Key=record.key, VersionId=record.version_id,
                                    LegalHold={"Status": "ON"})
    with pytest.raises(ReplicaLocked, match="legal hold") as refused:
        replica.delete(record.key)
    assert refused.value.locked_until is None and refused.value.mode == "legal-hold"
    s3_client.put_object_legal_hold(Bucket=s3_lock_bucket, Key=record.key, VersionId=record.version_id,
                                    LegalHold={"Status": "OFF"})
    replica.delete(record.key)
    assert replica.versions(record.key) == []



def test_only_multipart_uploads_older_than_the_threshold_count_as_abandoned():
    """Pure: another run may be uploading the same wedding right now, so a fresh multipart upload is left
    alone. (On the stack this cannot be shown: moto reports every upload as initiated in 2010.)"""
    from datetime import datetime, timedelta, timezone

    from wedbackup_dagster.core.storage.replicas.s3 import abandoned_uploads

    now = datetime.now(timezone.utc)
    uploads = [{"UploadId": "fresh", "Initiated": now - timedelta(minutes=5)},
               {"UploadId": "old", "Initiated": now - timedelta(hours=4)},
               {"UploadId": "undated"}]
    cutoff = now - timedelta(hours=3)
    assert [u["UploadId"] for u in abandoned_uploads(uploads, cutoff)] == ["old", "undated"]
    assert [u["UploadId"] for u in abandoned_uploads(uploads, now)] == ["fresh", "old", "undated"]


# ------------------------------------------------- GCS: the upload's own answer confirms the copy


@pytest.mark.parametrize("size", ["small", "large"])
def test_gcs_confirms_an_upload_from_its_answer_without_asking_again(stack, gcs_client, gcs_bucket, archives,
                                                                     monkeypatch, size):
    """The object resource GCS answers an upload with carries size, crc32c and md5: no second request; the
    record still agrees with what an independent read of the object says."""
    from google.cloud import storage

    h = _gcs(stack, gcs_client, gcs_bucket)
    reloads = []
    real_reload = storage.Blob.reload
    monkeypatch.setattr(storage.Blob, "reload", lambda self, *a, **k: (reloads.append(self.name),
                                                                        real_reload(self, *a, **k))[1])
    try:
        record = _upload(h.replica, archives[size])
        # No read at all: the create-only upload (ifGenerationMatch=0, which the stack's emulator honours,
        # dev/gcs_stand_in.py) is the whole conversation for a new archive.
        assert reloads == []
        stored = gcs_client.bucket(gcs_bucket).get_blob(record.key)
        assert record.provider_checksum == f"crc32c:{stored.crc32c} md5:{stored.md5_hash}"
        assert (record.size, record.version_id) == (stored.size, str(stored.generation))
    finally:
        _empty(h.replica)


def test_gcs_refuses_an_upload_whose_answer_reports_other_content(stack, gcs_client, gcs_bucket, archives,
                                                                    monkeypatch):
    """Fault injected into the answer of the upload itself: an md5 that is not the archive's is a mismatch."""
    from google.cloud import storage

    h = _gcs(stack, gcs_client, gcs_bucket)
    real_set = storage.Blob._set_properties

    def corrupt(self, value):
        if isinstance(value, dict) and value.get("md5Hash"):
            value = {**value, "md5Hash": "AAAAAAAAAAAAAAAAAAAAAA=="}
        return real_set(self, value)

    monkeypatch.setattr(storage.Blob, "_set_properties", corrupt)
    try:
        with pytest.raises(ReplicaChecksumMismatch, match="md5"):
            _upload(h.replica, archives["small"])
    finally:
        monkeypatch.undo()
        _empty(h.replica)


# ----------------------------------- S3 and Azure: a new small archive is one create-only request


def _count_s3_calls(s3_client) -> list[str]:
    calls: list[str] = []
    s3_client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name),
                                   unique_id="count-s3-calls")
    return calls


def test_s3_writes_a_new_small_archive_in_one_request_confirmed_by_its_answer(stack, s3_client, s3_bucket, archives):
    """A create-only PUT carrying our SHA-256: S3's answer (the checksum it stored) confirms the copy, so no
    look before or after; the record agrees with an independent read. Again: refused (412), then one look.
    Through boto3's put_object, whose calls its events count (the lean PUT's own: test_s3_lean.py)."""
    h = _s3(stack, s3_client, s3_bucket, lean_put=False)
    calls = _count_s3_calls(s3_client)
    try:
        record = _upload(h.replica, archives["small"])
        assert calls == ["PutObject"] and not record.already_present
        stored = s3_client.head_object(Bucket=s3_bucket, Key=record.key, ChecksumMode="ENABLED")
        assert (record.version_id, record.size, record.provider_checksum, record.etag) == (
            stored["VersionId"], stored["ContentLength"], stored["ChecksumSHA256"], stored["ETag"].strip('"'))
        assert stored["StorageClass"] == record.storage_class == "STANDARD_IA"
        assert stored["ServerSideEncryption"] == "AES256"
        calls.clear()
        again = _upload(h.replica, archives["small"])
        assert calls[:2] == ["PutObject", "HeadObject"] and "PutObject" not in calls[1:]
        assert again.already_present and again.version_id == record.version_id
        assert h.versions(record.key) == [record.version_id]
    finally:
        s3_client.meta.events.unregister("before-call.s3", unique_id="count-s3-calls")
        _empty(h.replica)


@pytest.mark.parametrize("answer", ["without", "other"])
def test_s3_answer_that_does_not_confirm_the_checksum_is_checked_by_a_look(stack, s3_client, s3_bucket, archives,
                                                                           answer):
    """Fault injected into the PUT's answer: no checksum, or another one. The copy is then confirmed only by
    what S3 says it holds (a look), and recorded from that, never from the answer. Through boto3's put_object
    (the lean PUT's own: test_s3_lean.py)."""
    h = _s3(stack, s3_client, s3_bucket, lean_put=False)
    calls = _count_s3_calls(s3_client)

    def tamper(parsed, **_):
        if answer == "without":
            parsed.pop("ChecksumSHA256", None)
        else:
            parsed["ChecksumSHA256"] = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="

    s3_client.meta.events.register("after-call.s3.PutObject", tamper, unique_id="tamper-put")
    try:
        record = _upload(h.replica, archives["small"])
        assert calls == ["PutObject", "HeadObject"] and not record.already_present
        stored = s3_client.head_object(Bucket=s3_bucket, Key=record.key, ChecksumMode="ENABLED")
        assert record.provider_checksum == stored["ChecksumSHA256"] == digest_file(archives["small"].path).sha256_b64
    finally:
        s3_client.meta.events.unregister("after-call.s3.PutObject", unique_id="tamper-put")
        s3_client.meta.events.unregister("before-call.s3", unique_id="count-s3-calls")
        _empty(h.replica)


def test_s3_step_tidy_aborts_only_abandoned_multipart_uploads_under_its_prefix(stack, s3_client, s3_bucket):
    """A single PUT never lists multipart uploads, so an upload step tidies once (engine.replicate_each):
    abandoned uploads under the replica's prefix go, others' stay."""
    mine = s3_client.create_multipart_upload(Bucket=s3_bucket, Key=f"{PREFIX}/weddings/9/dead.wbk")["UploadId"]
    theirs = s3_client.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/dead.wbk")["UploadId"]
    # (moto dates every multipart upload 2010-11-10, so the age cutoff is tested on its own above.)
    S3Replica(s3_client, _s3_target(s3_bucket, stack.env()), abandoned_after=0).abort_abandoned_uploads()
    left = {u["UploadId"] for u in s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])}
    assert mine not in left and theirs in left
    s3_client.abort_multipart_upload(Bucket=s3_bucket, Key="elsewhere/dead.wbk", UploadId=theirs)


def test_azure_writes_a_new_small_archive_in_one_request_confirmed_by_its_answer(stack, azure_service,
                                                                               azure_container, archives,
                                                                               monkeypatch):
    """Create-only Put Blob with the body's MD5 checked by Azure: its answer (the MD5 it computed) confirms
    the copy without a look; again, Azure refuses the create and one look finds the same blob."""
    h = _azure(stack, azure_service, azure_container)
    looks: list[str] = []
    real = AzureReplica._properties
    monkeypatch.setattr(AzureReplica, "_properties", lambda self, key: (looks.append(key), real(self, key))[1])
    try:
        record = _upload(h.replica, archives["small"])
        assert looks == [] and not record.already_present
        stored = azure_service.get_blob_client(azure_container, record.key).get_blob_properties()
        import base64

        assert (record.size, record.etag, record.storage_class) == (stored.size, stored.etag, str(stored.blob_tier))
        assert record.provider_checksum == base64.b64encode(bytes(stored.content_settings.content_md5)).decode()
        again = _upload(h.replica, archives["small"])
        assert again.already_present and len(looks) == 1 and again.etag == record.etag
    finally:
        monkeypatch.undo()
        _empty(h.replica)


@pytest.mark.parametrize("path", ["upload_blob", "lean"])
def test_azure_answer_without_the_md5_is_checked_by_a_look(stack, azure_service, azure_container, archives,
                                                           monkeypatch, path):
    from azure.storage.blob import BlobClient

    from wedbackup_dagster.core.storage.replicas.azure_lean import LeanPut

    h = _azure(stack, azure_service, azure_container)
    if path == "lean":
        assert h.replica._lean is not None  # noqa: SLF001
        real_put = LeanPut.put_new
        monkeypatch.setattr(LeanPut, "put_new", lambda self, *a, **k: {**real_put(self, *a, **k), "content_md5": None})
    else:
        h.replica._lean = None  # noqa: SLF001 - the SDK's upload_blob
        real_upload = BlobClient.upload_blob
        monkeypatch.setattr(BlobClient, "upload_blob",
                            lambda self, *a, **k: {**real_upload(self, *a, **k), "content_md5": None})
    looks: list[str] = []
    real = AzureReplica._properties
    monkeypatch.setattr(AzureReplica, "_properties", lambda self, key: (looks.append(key), real(self, key))[1])
    try:
        record = _upload(h.replica, archives["small"])
        assert looks == [record.key] and not record.already_present
        stored = azure_service.get_blob_client(azure_container, record.key).get_blob_properties()
        assert record.etag == stored.etag and record.size == stored.size
    finally:
        monkeypatch.undo()
        _empty(h.replica)
