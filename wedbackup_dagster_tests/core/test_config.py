"""Settings: every malformed or missing variable stops with an error naming it, never echoing a secret."""
from __future__ import annotations

import pytest

from wedbackup_dagster.core.config import VARIABLES, Settings, redact
from wedbackup_dagster.core.errors import ConfigError

GOOD = {
    "WEDBACKUP_SOURCE_DSN": "postgresql://app:s3cr3t-pass@127.0.0.1:5432/wedding_platform",
    "WEDBACKUP_CATALOGUE_DSN": "postgresql://app:s3cr3t-pass@127.0.0.1:5432/catalogue",
}


def test_defaults_fill_in_everything_but_the_databases():
    s = Settings.from_env(GOOD)
    assert s.s3.bucket == VARIABLES["WEDBACKUP_S3_BUCKET"][1]
    assert s.azure.tier == "Cool"
    assert "dbname=postgres" in s.scratch_dsn or s.scratch_dsn.endswith("/postgres")
    assert "s3cr3t-pass" not in repr(s)


@pytest.mark.parametrize("missing", ["WEDBACKUP_SOURCE_DSN", "WEDBACKUP_CATALOGUE_DSN"])
def test_missing_dsn_names_the_variable(missing):
    env = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    assert err.value.variable == missing
    assert missing in str(err.value)


@pytest.mark.parametrize("name,value", [
    ("WEDBACKUP_SOURCE_DSN", "postgresql://app:s3cr3t-pass@host:notaport/db"),
    ("WEDBACKUP_S3_BUCKET", "Bad_Bucket"),
    ("WEDBACKUP_S3_PREFIX", "../escape"),
    ("WEDBACKUP_GCS_PREFIX", "a/../../b"),
    ("WEDBACKUP_S3_STORAGE_CLASS", "SHINY"),
    ("WEDBACKUP_AZURE_TIER", "Lukewarm"),
    ("WEDBACKUP_S3_ENDPOINT_URL", "ftp://x"),
    ("WEDBACKUP_AZURE_CONNECTION_STRING", "s3cr3t-pass-without-structure"),
    ("WEDBACKUP_AZURE_CONTAINER", "UPPER"),
])
def test_malformed_value_names_variable_and_hides_value(name, value):
    with pytest.raises(ConfigError) as err:
        Settings.from_env({**GOOD, name: value})
    assert name in str(err.value)
    assert "s3cr3t-pass" not in str(err.value)


def test_redact_hides_secret_settings_and_dsn_passwords():
    env = {**GOOD, "AWS_SECRET_ACCESS_KEY": "AKIA-very-secret"}
    text = f"failed {GOOD['WEDBACKUP_SOURCE_DSN']} with AKIA-very-secret and postgresql://u:other@h/db"
    out = redact(text, env)
    assert "s3cr3t-pass" not in out and "AKIA-very-secret" not in out and "other@" not in out
    assert "postgresql://u:***@h/db" in out


@pytest.mark.parametrize("level", ["0", "20", "fast", "-1"])
def test_zstd_level_out_of_range(level):
    with pytest.raises(ConfigError, match="WEDBACKUP_ZSTD_LEVEL"):
        Settings.from_env({**GOOD, "WEDBACKUP_ZSTD_LEVEL": level})


@pytest.mark.parametrize("value", ["0", "-3", "ten", "601"])
def test_provider_timeout_out_of_range_names_the_variable(value):
    with pytest.raises(ConfigError, match="WEDBACKUP_PROVIDER_TIMEOUT"):
        Settings.from_env({**GOOD, "WEDBACKUP_PROVIDER_TIMEOUT": value})


def test_provider_timeout_reaches_the_pipelines_s3_and_azure_clients(monkeypatch):
    from wedbackup_dagster.shared.resources import AzureBlobResource, S3ReplicaResource

    for name, value in {**GOOD, "WEDBACKUP_PROVIDER_TIMEOUT": "2.5", "WEDBACKUP_S3_ENDPOINT_URL": "http://127.0.0.1:9",
                        "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}.items():
        monkeypatch.setenv(name, value)
    assert Settings.from_env().provider_timeout == 2.5
    client = S3ReplicaResource(max_attempts=2).get_client()
    assert client.meta.config.read_timeout == 2.5 and client.meta.config.connect_timeout == 2.5
    service = AzureBlobResource(connection_string="DefaultEndpointsProtocol=http;AccountName=a;AccountKey=YQ==;"
                                                  "BlobEndpoint=http://127.0.0.1:9/a;").get_service()
    assert service._pipeline._transport.connection_config.read_timeout == 2.5


@pytest.mark.parametrize("value", ["0", "-1", "soon", "301", "nan"])
def test_upload_retry_delay_out_of_range_names_the_variable(value):
    from wedbackup_dagster.core.config import upload_retry_delay_from

    with pytest.raises(ConfigError, match="WEDBACKUP_UPLOAD_RETRY_DELAY"):
        upload_retry_delay_from({"WEDBACKUP_UPLOAD_RETRY_DELAY": value})


def test_upload_retry_delay_defaults_to_a_second():
    from wedbackup_dagster.core.config import upload_retry_delay_from

    assert upload_retry_delay_from({}) == 1.0
    assert upload_retry_delay_from({"WEDBACKUP_UPLOAD_RETRY_DELAY": "2.5"}) == 2.5
