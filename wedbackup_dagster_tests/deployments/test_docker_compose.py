"""docker-compose.yml validates with Debian's docker-compose (`config` needs no Docker engine) with the
example settings, has every service wired as README says, and hands every setting wedbackup reads to
the code server and, through the run launcher, to every run worker."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from wedbackup_dagster.core.config import SECRET_VARIABLES, VARIABLES, Settings

from .conftest import COMPOSE_DIR, COMPOSE_FILE, ENV_EXAMPLE, LOCAL_ONLY_VARIABLES, PRODUCTION_DAGSTER_YAML, REPO

GRPC_COMMAND = ["dagster", "api", "grpc", "-m", "wedbackup_dagster.definitions", "-h", "0.0.0.0", "-p", "4000"]


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    # `make test` installs Debian's docker-compose when it is missing; CI runs `make test`.
    assert binary, "docker-compose not found: `apt-get install docker-compose` (make test does it)"
    return subprocess.run([binary, "-f", str(COMPOSE_FILE), *args], capture_output=True, text=True, timeout=120,
                          env=env if env is not None else _without_compose_variables())


def _without_compose_variables() -> dict[str, str]:
    """This process's environment without anything the compose file interpolates (the test session sets
    the local stack's WEDBACKUP_* settings), so only the env file given decides."""
    text = COMPOSE_FILE.read_text()
    return {k: v for k, v in os.environ.items() if f"${{{k}" not in text and k not in VARIABLES}


@pytest.fixture(scope="module")
def resolved() -> dict:
    proc = compose("--env-file", str(ENV_EXAMPLE), "config")
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_compose_file_validates_with_the_example_settings(resolved):
    assert set(resolved["services"]) == {"dagster-postgres", "wedbackup-code", "dagster-webserver",
                                         "dagster-daemon", "dagster-pools"}


def test_a_missing_required_secret_stops_compose_naming_it(tmp_path):
    env_file = tmp_path / "partial.env"
    env_file.write_text("\n".join(line for line in ENV_EXAMPLE.read_text().splitlines()
                                  if not line.startswith("DAGSTER_POSTGRES_PASSWORD=")))
    proc = compose("--env-file", str(env_file), "config")
    assert proc.returncode != 0
    assert "DAGSTER_POSTGRES_PASSWORD" in proc.stderr


def test_code_server_is_built_from_the_project_dockerfile_and_serves_grpc(resolved):
    code = resolved["services"]["wedbackup-code"]
    dockerfile = (REPO / "Dockerfile")
    assert os.path.samefile(code["build"]["context"], REPO)
    assert code["build"]["dockerfile"] == "Dockerfile" and dockerfile.is_file()
    assert code["command"] == GRPC_COMMAND
    text = dockerfile.read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert "CMD " + str(GRPC_COMMAND).replace("'", '"') in text
    assert "\nUSER wedbackup" in text  # never root
    # Run containers start the code server's own image.
    assert code["environment"]["DAGSTER_CURRENT_IMAGE"] == code["image"]
    for name in ("dagster-webserver", "dagster-daemon", "dagster-pools"):
        assert resolved["services"][name]["image"] == code["image"], name


def test_webserver_and_daemon_load_the_code_server_and_the_production_instance(resolved):
    workspace = yaml.safe_load((COMPOSE_DIR / "workspace.yaml").read_text())
    grpc = workspace["load_from"][0]["grpc_server"]
    assert (grpc["host"], grpc["port"], grpc["location_name"]) == ("wedbackup-code", 4000, "wedbackup")
    for name in ("dagster-webserver", "dagster-daemon"):
        service = resolved["services"][name]
        mounts = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
        assert os.path.samefile(mounts["/opt/dagster/dagster_home/dagster.yaml"], PRODUCTION_DAGSTER_YAML)
        assert "/opt/dagster/dagster_home/workspace.yaml" in service["command"]
        assert "/var/run/docker.sock" in mounts  # launching and terminating run containers
        assert service["environment"]["DAGSTER_POSTGRES_HOST"] == "dagster-postgres"


def test_webserver_is_published_on_loopback_only(resolved):
    """It has no authentication: only the SSO proxy on the host may reach it."""
    for service in resolved["services"].values():
        for port in service.get("ports", []):
            published = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port['published']}"
            assert published.startswith("127.0.0.1:"), port


def test_run_workers_join_the_compose_network_and_share_the_vault(resolved):
    launcher = yaml.safe_load(PRODUCTION_DAGSTER_YAML.read_text())["run_launcher"]["config"]
    assert launcher["network"] in resolved["networks"] and resolved["networks"][launcher["network"]]["name"] == \
        launcher["network"]
    mounts = {m.split(":")[1]: m for m in launcher["container_kwargs"]["volumes"]}
    code_mounts = resolved["services"]["wedbackup-code"]["volumes"]
    vault = mounts["/var/lib/wedbackup/vault"]
    assert f"{vault}:rw" in code_mounts and resolved["volumes"][vault.split(":")[0]]["name"] == vault.split(":")[0]
    assert mounts["/run/secrets/wedbackup"] in code_mounts  # the same secrets files, read-only
    assert mounts["/run/secrets/wedbackup"].endswith(":ro")
    # Steps' stdout/stderr written by run containers, read by the webserver.
    logs = mounts["/var/lib/dagster/compute-logs"].split(":")[0]
    assert resolved["volumes"][logs]["name"] == logs
    assert f"{logs}:/var/lib/dagster/compute-logs:ro" in resolved["services"]["dagster-webserver"]["volumes"]


def test_every_setting_reaches_the_code_server_and_every_run_worker(resolved):
    needed = set(VARIABLES) - LOCAL_ONLY_VARIABLES
    env_vars = set(yaml.safe_load(PRODUCTION_DAGSTER_YAML.read_text())["run_launcher"]["config"]["env_vars"])
    daemon = set(resolved["services"]["dagster-daemon"]["environment"])
    code = set(resolved["services"]["wedbackup-code"]["environment"])
    assert needed - env_vars == set(), "dagster.yaml run_launcher.config.env_vars lacks these"
    assert needed - code == set(), "docker-compose.yml wedbackup-code lacks these"
    # The launcher copies each name from the daemon's own environment; a missing one fails every run.
    assert env_vars - daemon == set(), "docker-compose.yml dagster-daemon lacks these"


def test_example_settings_are_valid_wedbackup_settings_and_hold_no_real_secret(resolved):
    env = resolved["services"]["wedbackup-code"]["environment"]
    settings = Settings.from_env(env)  # raises ConfigError naming a bad variable
    assert settings.s3.bucket == "example-wedbackup-replicas"
    example = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                   if line and not line.startswith("#"))
    for name in SECRET_VARIABLES | {"DAGSTER_POSTGRES_PASSWORD"}:
        value = example.get(name, "")
        assert value == "" or "change-me" in value or "EXAMPLE" in value, f"{name} looks like a real secret"


def test_the_real_env_file_is_never_committed():
    proc = subprocess.run(["git", "check-ignore", "-q", str(COMPOSE_DIR / ".env")], cwd=REPO)
    assert proc.returncode == 0, "deployments/docker-compose/.env must be git-ignored"
