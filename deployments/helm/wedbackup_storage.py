#!/usr/bin/env python3
"""Helm post-renderer: the Dagster instance of the chart's release stores its events through wedbackup's
event log, as the docker-compose deployment does (deployments/docker-compose/dagster.yaml).

The chart writes dagster-postgres's three storages (`run_storage`, `event_log_storage`, `schedule_storage`)
into its instance ConfigMap and has no value to change them. This filter reads the rendered manifests on
stdin and, in that ConfigMap only, replaces the three by one `storage:` block with the same `postgres_db`
config: `wedbackup_dagster.instance.storage.PooledPostgresStorage` (dagster-postgres's own tables and code;
its event log keeps its connection and stores a run's per-wedding events a batch per transaction). Every
other manifest passes through unchanged. The webserver and daemon then need the wedbackup image (which holds
that class): values.yaml sets it. Use:

    helm upgrade --install wedbackup dagster/dagster --version 1.13.27 -n wedbackup -f values.yaml \\
        --post-renderer ./wedbackup_storage.py

It fails, writing nothing, when the rendering holds no instance ConfigMap or its storages are not the three
dagster-postgres ones it expects (a chart change this filter does not know): never a silent half-change."""
from __future__ import annotations

import sys

import yaml

STORAGE = {"module": "wedbackup_dagster.instance.storage", "class": "PooledPostgresStorage"}
EXPECTED = {
    "run_storage": ("dagster_postgres.run_storage", "PostgresRunStorage"),
    "event_log_storage": ("dagster_postgres.event_log", "PostgresEventLogStorage"),
    "schedule_storage": ("dagster_postgres.schedule_storage", "PostgresScheduleStorage"),
}


class PostRenderError(Exception):
    pass


def instance_with_wedbackup_storage(instance_yaml: str) -> str:
    """The chart's dagster.yaml with its three dagster-postgres storages replaced by one `storage:` block."""
    instance = yaml.safe_load(instance_yaml)
    if not isinstance(instance, dict):
        raise PostRenderError("the instance ConfigMap's dagster.yaml is not a mapping")
    configs = []
    for part, (module, cls) in EXPECTED.items():
        block = instance.get(part)
        if not isinstance(block, dict) or (block.get("module"), block.get("class")) != (module, cls):
            raise PostRenderError(f"the instance ConfigMap's {part} is not {module}.{cls}: {block!r:.200}")
        configs.append(block.get("config"))
    if any(c != configs[0] for c in configs[1:]) or not configs[0]:
        raise PostRenderError("the chart's three storages do not share one PostgreSQL config")
    if "storage" in instance:
        raise PostRenderError("the instance ConfigMap already has a `storage:` block")
    for part in EXPECTED:
        del instance[part]
    instance["storage"] = {"custom": {**STORAGE, "config": configs[0]}}
    return yaml.safe_dump(instance, sort_keys=False)


def post_render(manifests: str) -> str:
    documents = list(yaml.safe_load_all(manifests))
    changed = 0
    for doc in documents:
        if (isinstance(doc, dict) and doc.get("kind") == "ConfigMap"
                and str((doc.get("metadata") or {}).get("name", "")).endswith("-instance")
                and "dagster.yaml" in (doc.get("data") or {})):
            doc["data"]["dagster.yaml"] = instance_with_wedbackup_storage(doc["data"]["dagster.yaml"])
            changed += 1
    if changed != 1:
        raise PostRenderError(f"expected one Dagster instance ConfigMap (name ending -instance), found {changed}")
    return yaml.safe_dump_all([d for d in documents if d is not None], sort_keys=False)


def main() -> int:
    try:
        sys.stdout.write(post_render(sys.stdin.read()))
    except (PostRenderError, yaml.YAMLError) as exc:
        print(f"wedbackup_storage post-renderer: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
