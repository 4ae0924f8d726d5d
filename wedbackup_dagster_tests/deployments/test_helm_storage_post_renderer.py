"""deployments/helm/wedbackup_storage.py, the Helm post-renderer that gives the chart's Dagster instance
wedbackup's event log: run as helm runs it (manifests on stdin, manifests on stdout) over an instance
ConfigMap laid out as the chart's template renders it for values.yaml; the dagster.yaml it writes, pointed at
a fresh database of the local PostgreSQL, makes an instance with PooledPostgresEventLogStorage. (helm itself
cannot be installed here, so the ConfigMap is written out by hand from the chart's template.)"""
from __future__ import annotations

import subprocess
import sys

import dagster as dg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict

from .conftest import DEPLOYMENTS, HELM_VALUES

POST_RENDERER = DEPLOYMENTS / "helm" / "wedbackup_storage.py"

PG_CONFIG = {"postgres_db": {"username": "dagster", "password": {"env": "DAGSTER_PG_PASSWORD"},
                             "hostname": "dagster-postgres.example.internal", "db_name": "dagster", "port": 5432,
                             "params": {"sslmode": "require"}}}


def chart_instance_yaml(config: dict = PG_CONFIG, event_log_class: str = "PostgresEventLogStorage") -> str:
    """The instance dagster.yaml as the chart's configmap-instance.yaml template lays it out."""
    return yaml.safe_dump({
        "scheduler": {"module": "dagster.core.scheduler", "class": "DagsterDaemonScheduler"},
        "schedule_storage": {"module": "dagster_postgres.schedule_storage", "class": "PostgresScheduleStorage",
                             "config": config},
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher",
                         "config": {"load_incluster_config": True, "job_namespace": "wedbackup"}},
        "run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage", "config": config},
        "event_log_storage": {"module": "dagster_postgres.event_log", "class": event_log_class, "config": config},
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": {"dequeue_interval_seconds": 5}},
        "telemetry": {"enabled": False},
    }, sort_keys=False)


OTHER = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "wedbackup-dagster-daemon"},
         "spec": {"replicas": 1, "template": {"spec": {"containers": [
             {"name": "dagster", "image": "registry.example.com/wedbackup-dagster:0.1.0"}]}}}}


def rendered(instance_yaml: str, name: str = "wedbackup-dagster-instance") -> str:
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
                 "data": {"dagster.yaml": instance_yaml}}
    return "---\n# Source: dagster/templates/deployment-daemon.yaml\n" + yaml.safe_dump(OTHER) + \
        "---\n# Source: dagster/templates/configmap-instance.yaml\n" + yaml.safe_dump(configmap)


def post_render(manifests: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(POST_RENDERER)], input=manifests, capture_output=True, text=True,
                          timeout=60)


def instance_of(output: str) -> dict:
    [configmap] = [d for d in yaml.safe_load_all(output) if d and d["kind"] == "ConfigMap"]
    return yaml.safe_load(configmap["data"]["dagster.yaml"])


def test_the_instance_configmap_gets_one_wedbackup_storage_with_the_same_config():
    proc = post_render(rendered(chart_instance_yaml()))
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert [d for d in docs if d["kind"] == "Deployment"] == [OTHER]  # everything else passes unchanged
    instance = instance_of(proc.stdout)
    assert not {"run_storage", "event_log_storage", "schedule_storage"} & set(instance)
    assert instance["storage"] == {"custom": {"module": "wedbackup_dagster.instance.storage",
                                              "class": "PooledPostgresStorage", "config": PG_CONFIG}}
    original = yaml.safe_load(chart_instance_yaml())
    for part in ("scheduler", "run_launcher", "run_coordinator", "telemetry"):
        assert instance[part] == original[part]


def test_the_post_rendered_instance_uses_wedbackups_event_log(make_database, tmp_path, monkeypatch):
    """The post-rendered dagster.yaml, with its PostgreSQL config pointed at a fresh local database (the
    cluster's host and TLS are not here), loads as Dagster would load it in the webserver, daemon and runs."""
    from dagster_postgres import PostgresRunStorage, PostgresScheduleStorage

    from wedbackup_dagster.instance.storage import PooledPostgresEventLogStorage

    parts = conninfo_to_dict(make_database())
    local = {"postgres_db": {"username": parts["user"], "password": {"env": "DAGSTER_PG_PASSWORD"},
                             "hostname": parts["host"], "db_name": parts["dbname"], "port": int(parts["port"]),
                             "params": {}}}
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", parts.get("password", ""))
    proc = post_render(rendered(chart_instance_yaml(local)))
    assert proc.returncode == 0, proc.stderr
    instance_yaml = instance_of(proc.stdout)
    instance_yaml.pop("run_launcher")  # K8sRunLauncher is built only to launch; no cluster here
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.event_log_storage) is PooledPostgresEventLogStorage
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        instance.add_dynamic_partitions("weddings", ["w-1"])  # it writes to that database
        assert instance.get_dynamic_partitions("weddings") == ["w-1"]


@pytest.mark.parametrize("manifests, reason", [
    (rendered(chart_instance_yaml(event_log_class="SomethingElse")), "event_log_storage is not"),
    (rendered(chart_instance_yaml(), name="wedbackup-dagster-webserver-env"), "found 0"),
    (rendered("storage:\n  postgres: {}\n"), "run_storage is not"),
])
def test_an_unexpected_rendering_is_refused_and_nothing_is_written(manifests, reason):
    proc = post_render(manifests)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert reason in proc.stderr and "post-renderer" in proc.stderr


def test_values_run_the_webserver_and_daemon_on_the_wedbackup_image():
    """The instance names wedbackup's storage class, so every process loading it needs the wedbackup image."""
    values = yaml.safe_load(HELM_VALUES.read_text())
    [deployment] = values["dagster-user-deployments"]["deployments"]
    for component in ("dagsterWebserver", "dagsterDaemon"):
        assert values[component]["image"] == deployment["image"], component
    assert "--post-renderer ./wedbackup_storage.py" in HELM_VALUES.read_text()
