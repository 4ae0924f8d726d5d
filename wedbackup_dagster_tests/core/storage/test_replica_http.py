"""The GCS and Azure clients' requests sessions (replicas/base.py environment_http): they read the environment
once, not per request, when no proxy or netrc is configured, keeping the CA bundle the variables name; a
configured proxy (and NO_PROXY) is still honoured, on the real stand-ins."""
from __future__ import annotations

import socket

import pytest

from wedbackup_dagster.core.config import Settings
from wedbackup_dagster.core.storage.replicas.azure import azure_service_from
from wedbackup_dagster.core.storage.replicas.base import environment_http
from wedbackup_dagster.core.storage.replicas.gcs import gcs_client_from

BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@pytest.fixture
def no_netrc(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    return tmp_path


def test_no_proxy_and_no_netrc_reads_the_environment_once_with_its_ca_bundle(no_netrc):
    assert environment_http({"REQUESTS_CA_BUNDLE": BUNDLE}) == environment_http({"CURL_CA_BUNDLE": BUNDLE})
    http = environment_http({"REQUESTS_CA_BUNDLE": BUNDLE, "NO_PROXY": "127.0.0.1"})
    assert http.lean and http.ca_bundle == BUNDLE
    assert environment_http({}).lean and environment_http({}).ca_bundle is None


@pytest.mark.parametrize("name", ["HTTPS_PROXY", "http_proxy", "ALL_PROXY"])
def test_a_proxy_keeps_the_per_request_reading(no_netrc, name):
    assert not environment_http({name: "http://proxy.example:3128"}).lean
    assert environment_http({name: ""}).lean  # set but empty: no proxy, as requests reads it


def test_a_netrc_keeps_the_per_request_reading(no_netrc, monkeypatch):
    (no_netrc / ".netrc").write_text("machine example.com login a password b\n")
    assert not environment_http({}).lean
    (no_netrc / ".netrc").unlink()
    assert environment_http({}).lean
    monkeypatch.setenv("NETRC", str(no_netrc / "elsewhere"))
    assert not environment_http().lean


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gcs_reachable(settings: Settings) -> bool:
    try:
        gcs_client_from(settings.gcs).lookup_bucket(settings.gcs.bucket, timeout=(2, 5), retry=None)
        return True
    except Exception:  # noqa: BLE001 - any failure to get through counts
        return False


def _azure_reachable(settings: Settings) -> bool:
    try:
        azure_service_from(settings.azure, connection_timeout=2, read_timeout=5, retry_total=0
                           ).get_container_client(settings.azure.container).exists()
        return True
    except Exception:  # noqa: BLE001
        return False


def test_the_clients_go_through_a_configured_proxy_and_skip_it_for_no_proxy(stack, no_netrc, monkeypatch):
    settings = Settings.from_env()
    gcs, azure = gcs_client_from(settings.gcs), azure_service_from(settings.azure)
    assert gcs._http.trust_env is False and azure._pipeline._transport._use_env_settings is False
    assert _gcs_reachable(settings) and _azure_reachable(settings)

    # A proxy that is down: both clients must try it, and so fail.
    dead = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HTTP_PROXY", dead)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert gcs_client_from(settings.gcs)._http.trust_env is True
    assert not _gcs_reachable(settings) and not _azure_reachable(settings)

    # NO_PROXY naming the stand-ins' host: straight there again.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert _gcs_reachable(settings) and _azure_reachable(settings)
