"""The lean Azure Put Blob (core/storage/replicas/azure_lean.py) against the real Azurite stand-in: stored exactly
as upload_blob stores it, found there rather than written twice, retried through a real fault proxy (an answer
refused, a connection cut before Azure saw the request, an answer cut after it stored it), a provider that stays
down; clients it cannot serve keep upload_blob."""
from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from wedbackup_dagster.core.config import AzureTarget
from wedbackup_dagster.core.errors import ReplicaError
from wedbackup_dagster.core.storage.replicas import AzureReplica, azure_service_from
from wedbackup_dagster.core.storage.replicas.azure_lean import lean_put, transient
from wedbackup_dagster_tests.reliability.faultproxy import FailingAfter, FaultProxy, FaultSchedule

PREFIX = "wedbackup"


def _target(container: str, connection_string: str) -> AzureTarget:
    return AzureTarget(container=container, prefix=PREFIX, tier="Cool", connection_string=connection_string)


def _through(connection_string: str, address: str) -> str:
    """The connection string with its blob endpoint's host and port replaced by `address` (a fault proxy)."""
    live = connection_string.split("BlobEndpoint=")[1].split(";")[0]
    return connection_string.replace(live, live.replace(live.split("/")[2], address))


def _replica(connection_string: str, container: str, *, lean: bool = True) -> AzureReplica:
    replica = AzureReplica(azure_service_from(_target(container, connection_string)),
                           _target(container, connection_string), lean_put=lean)
    if lean:
        assert replica._lean is not None  # noqa: SLF001 - these tests are about the lean path
        replica._lean.sleep = lambda s: None  # noqa: SLF001 - no backoff waits in tests
    return replica


def _stored_as(azure_service, container: str, key: str) -> dict:
    blob = azure_service.get_blob_client(container, key)
    props = blob.get_blob_properties()
    return {"body": blob.download_blob().readall(), "md5": bytes(props.content_settings.content_md5 or b""),
            "type": props.content_settings.content_type, "metadata": dict(props.metadata),
            "tier": props.blob_tier, "etag": props.etag}


@pytest.fixture
def azure(stack, azure_service, azure_container):
    return {"cs": stack.env()["WEDBACKUP_AZURE_CONNECTION_STRING"], "service": azure_service,
            "container": azure_container}


@pytest.mark.stack
def test_a_small_archive_goes_up_by_the_lean_put_stored_exactly_as_upload_blob_stores_it(azure, archive, monkeypatch):
    lean = _replica(azure["cs"], azure["container"])
    sdk = _replica(azure["cs"], azure["container"], lean=False)
    from azure.storage.blob import BlobClient

    monkeypatch.setattr(BlobClient, "upload_blob", lambda *a, **k: pytest.fail("the lean path called upload_blob"))
    by_lean = archive.upload(lean, "7")
    monkeypatch.undo()
    by_sdk = archive.upload(sdk, "8")
    a, b = (_stored_as(azure["service"], azure["container"], r.key) for r in (by_lean, by_sdk))
    assert a["body"] == archive.data and a["md5"] == hashlib.md5(archive.data).digest()
    assert (a["md5"], a["type"], a["tier"]) == (b["md5"], b["type"], b["tier"])
    assert a["metadata"] == {**b["metadata"], "partition": "7"} and b["metadata"]["partition"] == "8"
    assert by_lean.provider_checksum == by_sdk.provider_checksum and not by_lean.already_present
    assert by_lean.etag == a["etag"] and by_lean.uri == lean.container.get_blob_client(by_lean.key).url


@pytest.mark.stack
def test_the_same_archive_uploaded_again_is_found_there_not_written_again(azure, archive):
    replica = _replica(azure["cs"], azure["container"])
    first = archive.upload(replica)
    again = archive.upload(replica)
    assert again.already_present and again.key == first.key
    assert _stored_as(azure["service"], azure["container"], first.key)["etag"] == first.etag  # not rewritten


def _upstream(connection_string: str) -> tuple[str, int]:
    host, port = connection_string.split("BlobEndpoint=")[1].split(";")[0].split("/")[2].split(":")
    return host, int(port)


@pytest.mark.stack
@pytest.mark.parametrize("fault", ["http_503", "reset", "truncate"])
def test_a_put_refused_or_cut_off_is_retried_and_one_that_landed_unseen_is_found(azure, archive, fault):
    """http_503 and reset: Azure never saw the request (retried); truncate: Azure stored it and its answer was
    cut (an answer without the MD5 Azure stored is confirmed by a look; a retry's If-None-Match would find it
    there and compare it): the archive is stored, exactly, and recorded as Azure holds it."""
    with FaultProxy("azure", _upstream(azure["cs"]), FaultSchedule(seed=3, rate=1.0, weights={fault: 1},
                                                                   limit=1)) as proxy:
        replica = _replica(_through(azure["cs"], proxy.address), azure["container"])
        record = archive.upload(replica)
        assert proxy.counts[fault] == 1
    stored = _stored_as(azure["service"], azure["container"], record.key)
    assert stored["body"] == archive.data and record.provider_checksum and record.etag == stored["etag"]


@pytest.mark.stack
def test_a_provider_that_refuses_every_put_fails_the_upload_naming_the_key_without_secrets(azure, archive):
    account_key = dict(p.split("=", 1) for p in azure["cs"].split(";") if "=" in p)["AccountKey"]
    with FailingAfter("azure", _upstream(azure["cs"]), good=0, kind="http_503") as proxy:
        replica = _replica(_through(azure["cs"], proxy.address), azure["container"])
        with pytest.raises(ReplicaError, match="503") as caught:
            archive.upload(replica)
        assert proxy.requests == 2 and "wedbackup/weddings/7/" in caught.value.key  # one retry, as configured
    assert account_key not in str(caught.value) and caught.value.__cause__ is None


def test_clients_it_cannot_serve_keep_upload_blob_and_statuses_retry_as_the_sdk_retries():
    from azure.storage.blob import BlobServiceClient

    sas = BlobServiceClient("https://acct.blob.core.windows.net", credential="sv=2024&sig=abc")
    assert lean_put(sas.get_container_client("c")) is None
    assert lean_put(object()) is None
    key = BlobServiceClient("https://acct.blob.core.windows.net",
                            credential={"account_name": "acct", "account_key": "a2V5"})
    lean = lean_put(key.get_container_client("c"))
    assert lean is not None and lean.container_url == "https://acct.blob.core.windows.net/c"
    request = lean.request("wedbackup/weddings/7/x.wbk", b"body", hashlib.md5(b"body").digest(), {})
    assert request.headers["Authorization"].startswith("SharedKey acct:")
    assert request.headers["If-None-Match"] == "*" and request.headers["x-ms-blob-type"] == "BlockBlob"
    assert [s for s in (200, 404, 408, 409, 412, 500, 501, 503, 505) if transient(s)] == [408, 500, 503]


def test_the_recorded_uri_is_the_blob_clients_url_without_its_query():
    from azure.storage.blob import BlobServiceClient

    for url, credential in (("https://acct.blob.core.windows.net", {"account_name": "acct", "account_key": "a2V5"}),
                            ("http://127.0.0.1:10000/devstoreaccount1", "sv=2024&sig=abc")):
        service = BlobServiceClient(url, credential=credential)
        replica = AzureReplica(service, replace(_target("wb-c", ""), connection_string="unused"))
        for key in ("wedbackup/weddings/7/ab.wbk", "wedbackup/keys/x~y.json", "a b/c%d"):
            expected = service.get_blob_client("wb-c", key).url.split("?")[0]
            assert replica.uri(key) == expected
