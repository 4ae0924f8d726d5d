"""deployments/helm/values.yaml for the official Dagster chart: it parses, uses the chart's own value
names for this code location, the K8sRunLauncher, PostgreSQL and the queue, takes every secret from a
Kubernetes Secret, sizes run pods above the measured memory, and its queue and pool settings form an
instance configuration Dagster accepts. (helm itself cannot be installed on these machines, so the
chart is not rendered here.)"""
from __future__ import annotations

import re

import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config

from wedbackup_dagster.core.config import SECRET_VARIABLES, VARIABLES

from .conftest import HELM_VALUES, REPO

# Measured (README "Benchmarks" and "Running in production"): peak RSS of one backup worker on batches
# of 32 weddings, and Python with the code location loaded.
BACKUP_PEAK_MB = 124
PROCESS_BASELINE_MB = 250


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load(HELM_VALUES.read_text())


def mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(Mi|Gi|M|G)", str(quantity)).groups()
    return float(number) * {"Mi": 1, "Gi": 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20}[unit]


def test_code_location_is_a_user_deployment_of_the_project_image(values):
    subchart = values["dagster-user-deployments"]
    assert subchart["enabled"] and subchart["enableSubchart"]
    [deployment] = subchart["deployments"]
    assert deployment["name"] == "wedbackup"
    assert set(deployment["image"]) == {"repository", "tag", "pullPolicy"}
    assert deployment["image"]["tag"] != "latest"  # run pods must start exactly the code server's image
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "wedbackup_dagster.definitions"]
    assert deployment["port"] == 4000
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": True}
    assert deployment["podSecurityContext"]["runAsNonRoot"] is True


def test_secrets_come_only_from_kubernetes_secrets(values):
    [deployment] = values["dagster-user-deployments"]["deployments"]
    plain = {item["name"] for item in deployment["env"]}
    assert plain <= set(VARIABLES) | {"GOOGLE_APPLICATION_CREDENTIALS"}, plain - set(VARIABLES)
    assert not plain & SECRET_VARIABLES, "a secret setting is written in plain env"
    secret_names = {s["name"] for s in deployment["envSecrets"]}
    assert secret_names == {"wedbackup-dsns", "wedbackup-providers"}
    launcher = values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    assert {s["name"] for s in launcher["config"]["k8sRunLauncher"]["envSecrets"]} == secret_names
    # The master key and the GCS key are files from a Secret volume, read-only.
    volumes = {v["name"]: v for v in deployment["volumes"]}
    assert volumes["wedbackup-files"]["secret"]["secretName"] == "wedbackup-files"
    mounts = {m["name"]: m for m in deployment["volumeMounts"]}
    assert mounts["wedbackup-files"]["readOnly"] is True
    env = {item["name"]: item["value"] for item in deployment["env"]}
    assert env["WEDBACKUP_MASTER_KEY_FILE"].startswith(mounts["wedbackup-files"]["mountPath"] + "/")
    assert env["WEDBACKUP_VAULT_DIR"] == mounts["wedbackup-vault"]["mountPath"]
    # Dagster's own PostgreSQL password: a Secret the operator creates, not a value in this file.
    assert values["global"]["postgresqlSecretName"] and values["generatePostgresqlPasswordSecret"] is False
    assert not values["postgresql"]["postgresqlPassword"]


def test_every_setting_is_either_plain_env_or_in_a_named_secret(values):
    """README's `kubectl create secret` commands name the keys of wedbackup-dsns / wedbackup-providers."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Running in production", 1)[1].split("\n## ", 1)[0]
    [deployment] = values["dagster-user-deployments"]["deployments"]
    plain = {item["name"] for item in deployment["env"]}
    for name in SECRET_VARIABLES - {"WEDBACKUP_MASTER_KEY"}:  # the master key is a file
        assert f"--from-literal={name}=" in section, f"README's kubectl secret commands lack {name}"
        assert name not in plain


def test_postgresql_and_run_launcher_use_the_chart_value_names(values):
    pg = values["postgresql"]
    assert {"enabled", "postgresqlHost", "postgresqlUsername", "postgresqlPassword", "postgresqlDatabase",
            "service"} <= set(pg)
    assert pg["service"]["port"] == 5432
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert set(k8s["runK8sConfig"]) <= {"containerConfig", "podSpecConfig", "podTemplateSpecMetadata",
                                        "jobSpecConfig", "jobMetadata"}


def test_run_pods_are_sized_above_the_measured_peak(values):
    resources = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["containerConfig"]["resources"]
    request = mebibytes(resources["requests"]["memory"])
    limit = mebibytes(resources["limits"]["memory"])
    assert request >= BACKUP_PEAK_MB + PROCESS_BASELINE_MB
    assert limit >= 2 * request  # a 2 GB wedding (82 MB) or a larger batch still fits
    assert resources["requests"]["cpu"] in ("1", 1)  # COPY + zstd + AES-GCM keep one core busy
    [deployment] = values["dagster-user-deployments"]["deployments"]
    assert mebibytes(deployment["resources"]["requests"]["memory"]) >= PROCESS_BASELINE_MB


def test_queue_and_pools_form_an_instance_config_dagster_accepts(values, tmp_path):
    """The chart writes these into dagster.yaml (QueuedRunCoordinator, `concurrency.runs`, `concurrency.
    pools`, run_monitoring); Dagster refuses, for one, run limits on the coordinator next to pools."""
    daemon = values["dagsterDaemon"]
    coordinator = daemon["runCoordinator"]
    assert coordinator["enabled"] and coordinator["type"] == "QueuedRunCoordinator"
    queued = coordinator["config"]["queuedRunCoordinator"]
    concurrency = values["concurrency"]
    assert concurrency["enabled"]
    runs, pools = concurrency["runs"], concurrency["pools"]
    assert {t["key"] for t in runs["tagConcurrencyLimits"]} >= {"dagster/backfill", "wedbackup/catchup"}
    snake = {"maxConcurrentRuns": "max_concurrent_runs", "tagConcurrencyLimits": "tag_concurrency_limits",
             "dequeueIntervalSeconds": "dequeue_interval_seconds", "defaultLimit": "default_limit",
             "granularity": "granularity", "enabled": "enabled", "startTimeoutSeconds": "start_timeout_seconds",
             "maxRuntimeSeconds": "max_runtime_seconds", "pollIntervalSeconds": "poll_interval_seconds"}
    instance = {
        "run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": {snake[k]: v for k, v in queued.items()}},
        "concurrency": {"runs": {snake[k]: v for k, v in runs.items()},
                        "pools": {snake[k]: v for k, v in pools.items()}},
        "run_monitoring": {snake[k]: v for k, v in daemon["runMonitoring"].items()},
    }
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(instance))
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["concurrency"]["runs"]["max_concurrent_runs"] == runs["maxConcurrentRuns"]
    assert config["concurrency"]["pools"]["default_limit"] == pools["defaultLimit"]
