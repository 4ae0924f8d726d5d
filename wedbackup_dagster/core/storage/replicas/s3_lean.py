"""Lean S3 requests for the hot paths: the GET of a download (restore --all fetches thousands of small archives)
and the create-only PUT of a small archive (every backup uploads one per wedding), each signed with botocore's
own SigV4 signer and sent through the boto3 client's own HTTP session, without botocore's event system,
endpoint rules, response parsing and body wrapping (about 1.4 ms of CPU a GET and 1.6 ms a PUT on this machine,
most of the client-side cost of either).

Everything a request depends on comes from the client itself, so it honours the same target settings: the
object URL is the one botocore's endpoint resolution builds (endpoint URL, region, path or virtual-host
addressing; resolved once per client with a presigned probe URL), the credentials are the client's (read per
request, so refreshed or session-token credentials work), payload signing follows the client's `s3` config as
botocore's S3 signer reads it, and the HTTP session is the client's (CA bundle or verify, proxies, connect and
read timeouts, pool size). Retries follow botocore's standard mode as the client is configured (attempts in
all; connection errors, 5xx and throttling answers, exponential backoff with jitter); a retried PUT stays
create-only (If-None-Match), so an attempt that landed unseen is found by the caller, never written twice. A
client this path cannot serve the same way (unsigned or non-SigV4 signing, no credentials, not a botocore
client) gets None from `lean_s3`, and its replica keeps boto3's get_object and put_object."""
from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any
from urllib.parse import quote, urlsplit

import urllib3.exceptions
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import BotoCoreError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from wedbackup_dagster.core.errors import ReplicaError
from wedbackup_dagster.core.storage.replicas.base import READ_BLOCK, scrub

PROVIDER = "s3"
_PROBE = "wedbackup-probe-key"
# What botocore's standard retry mode retries (botocore/retries/standard.py): these statuses and error codes.
_TRANSIENT_STATUS = frozenset({500, 502, 503, 504})
_TRANSIENT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete",
                              "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
                              "TooManyRequestsException", "ProvisionedThroughputExceededException",
                              "TransactionInProgressException", "RequestLimitExceeded", "BandwidthLimitExceeded",
                              "LimitExceededException", "RequestThrottled", "SlowDown", "EC2ThrottledException"})
_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{0,300})</Message>")
_MAX_BACKOFF = 20.0


class RequestFailed(Exception):
    """One attempt's failure, or the last one's: `transient` when botocore's standard mode would try again;
    `code`, S3's error code (or the HTTP status) when S3 answered."""

    def __init__(self, text: str, *, transient: bool, status: int | None = None, code: str | None = None):
        super().__init__(text)
        self.transient = transient
        self.status = status
        self.code = code


def error_of(status: int, body: bytes) -> RequestFailed:
    """The failure an S3 error answer stands for: its <Code> and <Message>, and whether it is transient."""
    code_m, message_m = _CODE.search(body or b""), _MESSAGE.search(body or b"")
    code = code_m.group(1).decode("utf-8", "replace") if code_m else str(status)
    message = message_m.group(1).decode("utf-8", "replace") if message_m else ""
    transient = status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES
    return RequestFailed(f"{code} (HTTP {status}){': ' + message if message else ''}", transient=transient,
                     status=status, code=code)


def total_attempts(retries: dict[str, Any] | None) -> int:
    """Attempts in all from a botocore `retries` config: `total_max_attempts`, or `max_attempts` retries + 1
    (botocore's own reading); 3 when neither is set (standard mode's default)."""
    retries = retries or {}
    if retries.get("total_max_attempts") is not None:
        return max(1, int(retries["total_max_attempts"]))
    if retries.get("max_attempts") is not None:
        return max(1, int(retries["max_attempts"]) + 1)
    return 3


def backoff(attempt: int) -> float:
    """Standard mode's wait before retry `attempt` (1, 2, ...): full jitter up to 2**(attempt-1) s, at most 20."""
    return random.random() * min(_MAX_BACKOFF, 2.0 ** (attempt - 1))


@dataclass
class LeanS3:
    """GETs and create-only PUTs of one bucket's objects over the client's session, signed by botocore's SigV4
    signer."""

    base_url: str  # the bucket's URL, ending in '/', as botocore's endpoint resolution builds it
    region: str
    credentials: Any  # botocore Credentials (get_frozen_credentials() per request)
    send: Callable[[Any], Any]  # the client's http_session.send
    attempts: int
    client_config: Any = None  # the client's botocore Config: its `s3` payload_signing_enabled, as the signer reads it
    sleep: Callable[[float], None] = time.sleep

    def url(self, key: str, version_id: str | None = None) -> str:
        # botocore quotes keys with '/' and '~' left as they are; check_key keeps our keys to [A-Za-z0-9._-/]
        url = self.base_url + quote(key, safe="/~")
        return url + "?versionId=" + quote(version_id, safe="") if version_id else url

    def signed(self, url: str, headers: dict[str, str] | None = None, *, method: str = "GET",
               body: bytes | None = None) -> Any:
        """The request signed (SigV4, as botocore signs S3 requests) and prepared; a GET to stream its answer."""
        request = AWSRequest(method=method, url=url, headers=dict(headers or {}), data=body)
        if self.client_config is not None:
            request.context["client_config"] = self.client_config
        S3SigV4Auth(self.credentials.get_frozen_credentials(), "s3", self.region).add_auth(request)
        prepared = request.prepare()
        prepared.stream_output = method == "GET"
        return prepared

    def _sent(self, request: Any) -> Any:
        """The answer to one attempt; RequestFailed, transient or not as botocore's standard mode would see it,
        when none came."""
        try:
            return self.send(request)
        except (BotoConnectionError, HTTPClientError) as exc:
            raise RequestFailed(f"{type(exc).__name__}: {exc}", transient=True) from None
        except BotoCoreError as exc:
            raise RequestFailed(f"{type(exc).__name__}: {exc}", transient=False) from None

    def put_new(self, key: str, body: bytes, headers: dict[str, str]) -> dict[str, str | None]:
        """PUT `body` at `key` only if no object is there (If-None-Match: *), with `headers` (the checksum S3 is
        to check the body against, metadata, storage class...). Returns what S3 answered: its ChecksumSHA256,
        VersionId and ETag (None for any it did not send). RequestFailed when S3 refuses (its `code`: the
        caller tells "already there" from a fault) or fails every attempt; the message carries no secret."""
        url = self.url(key)
        headers = {**headers, "If-None-Match": "*", "Content-Length": str(len(body))}
        failure: RequestFailed | None = None
        for attempt in range(self.attempts):
            if attempt:
                self.sleep(backoff(attempt))
            try:
                response = self._sent(self.signed(url, headers, method="PUT", body=body))
            except RequestFailed as exc:
                failure = exc
                if exc.transient:
                    continue
                break
            if response.status_code >= 300:
                failure = error_of(response.status_code, response.content[:64 << 10])
                if failure.transient:
                    continue
                break
            answer = response.headers
            return {"ChecksumSHA256": answer.get("x-amz-checksum-sha256"), "VersionId": answer.get("x-amz-version-id"),
                    "ETag": answer.get("etag")}
        assert failure is not None
        raise RequestFailed(scrub(str(failure), self._secrets()), transient=failure.transient,
                            status=failure.status, code=failure.code)

    def get(self, key: str, write: Callable[[bytes], Any], version_id: str | None = None) -> int:
        """Stream the object at `key` into `write`; the bytes written. ReplicaError naming the key when the
        object is missing, refused, or the provider fails every attempt; an answer cut short is an error
        (never a short download passed on)."""
        url = self.url(key, version_id)
        failure: RequestFailed | None = None
        for attempt in range(self.attempts):
            if attempt:
                self.sleep(backoff(attempt))
            try:
                response = self._sent(self.signed(url))
            except RequestFailed as exc:
                failure = exc
                if exc.transient:
                    continue
                break
            raw = response.raw
            finished = False
            try:
                if response.status_code >= 300:
                    failure = error_of(response.status_code, raw.read(64 << 10))
                    if failure.transient:
                        continue
                    break
                count = _stream(raw, response.headers.get("content-length"), write)
                finished = True
                return count
            except GetCut as exc:
                raise ReplicaError(PROVIDER, key, scrub(f"download failed: {exc}", self._secrets())) from None
            finally:
                if not finished:
                    raw.close()  # a connection left mid-answer is not reused as it is (urllib3 reconnects it)
                raw.release_conn()
        assert failure is not None
        secrets = self._secrets()
        raise ReplicaError(PROVIDER, key, scrub(f"download failed: {failure}", secrets)) from None

    def _secrets(self) -> list[str | None]:
        return credential_secrets(self.credentials)


def credential_secrets(credentials: Any) -> list[str | None]:
    """What to scrub from a message: the secret key and session token of botocore `credentials` (none when
    they cannot be read)."""
    try:
        frozen = credentials.get_frozen_credentials() if credentials else None
        return [frozen.secret_key, frozen.token] if frozen else []
    except Exception:  # noqa: BLE001 - only to know what to scrub
        return []


def _stream(raw: Any, length: str | None, write: Callable[[bytes], Any]) -> int:
    """The answer's body into `write`. Only a failed read is the provider's (GetCut); a failed write (the local
    spool) passes through as it is."""
    count = 0
    while True:
        try:
            chunk = raw.read(READ_BLOCK)
        except (OSError, BotoCoreError, HTTPException, urllib3.exceptions.HTTPError) as exc:
            # urllib3's ProtocolError, ReadTimeoutError... are not OSErrors
            raise GetCut(f"the answer broke off after {count} bytes: {type(exc).__name__}: {exc}") from None
        if not chunk:
            break
        write(chunk)
        count += len(chunk)
    if length is not None and count != int(length):
        raise GetCut(f"the answer was cut short: {count} of {length} bytes")
    return count


class GetCut(Exception):
    """The body of an answer broke off: the download is incomplete (the caller retries from the start)."""


def lean_s3(client: Any, bucket: str) -> LeanS3 | None:
    """The lean requests for `bucket` over the boto3 `client`, or None when this client is not one it can serve
    exactly as boto3 would (then the caller keeps get_object and put_object)."""
    try:
        config = client.meta.config
        if getattr(config, "signature_version", None) not in (None, "s3v4", "v4"):
            return None  # unsigned (anonymous) or legacy signing: boto3's own path
        signer = client._request_signer  # noqa: SLF001 - the client's own credentials and region
        credentials = signer._credentials  # noqa: SLF001
        region = signer._region_name  # noqa: SLF001
        send = client._endpoint.http_session.send  # noqa: SLF001 - the client's session: verify, proxies, timeouts
        if credentials is None or credentials.get_frozen_credentials().access_key is None or not region:
            return None
        # botocore's endpoint resolution (endpoint URL, region, addressing style) for a probe key: the URL up to
        # the key is the bucket's, for every key.
        probe = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": _PROBE}, ExpiresIn=60)
    except (AttributeError, BotoCoreError):
        return None
    parts = urlsplit(probe)
    if not parts.path.endswith("/" + _PROBE):
        return None
    base = f"{parts.scheme}://{parts.netloc}{parts.path[: -len(_PROBE)]}"
    return LeanS3(base_url=base, region=region, credentials=credentials, send=send,
                  attempts=total_attempts(getattr(config, "retries", None)), client_config=config)


__all__ = ["GetCut", "RequestFailed", "LeanS3", "backoff", "credential_secrets", "error_of", "lean_s3",
           "total_attempts"]
