"""Paths of the production deployment files, shared by the deployment tests."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENTS = REPO / "deployments"
COMPOSE_DIR = DEPLOYMENTS / "docker-compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
PRODUCTION_DAGSTER_YAML = COMPOSE_DIR / "dagster.yaml"
HELM_VALUES = DEPLOYMENTS / "helm" / "values.yaml"

# Settings only the local stack uses, or that the image itself fixes: never passed to run workers.
LOCAL_ONLY_VARIABLES = frozenset({"STORAGE_EMULATOR_HOST", "WEDBACKUP_STATE_DIR", "DAGSTER_HOME",
                                  "WEDBACKUP_VAULT_DIR"})
