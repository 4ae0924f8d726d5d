"""Inspection schemas (`restore --into-schema` in the source database) are kept out of platform backups and
do not outlive an erasure (issue 14, defect 8): restore_into_schema marks the schema with the wedding it
copies, tenancy discovery skips marked schemas, and erase_wedding drops the wedding's own inspection schemas
and deletes its rows from platform ones."""
from __future__ import annotations

import psycopg

from wedbackup_dagster.core.postgres import tenancy
from wedbackup_dagster.core.governance.erasure import erase_wedding
from wedbackup_dagster.core.postgres.restore_wedding import RecoveryRequest, recover
from wedbackup_dagster_tests.governance_fleet import back_up, make_governance_fleet  # noqa: F401 - fixture


def schemas(dsn: str) -> dict[str, str | None]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT nspname::text, obj_description(oid, 'pg_namespace') FROM pg_namespace "
                                 "WHERE nspname LIKE 'inspect%'").fetchall())


def test_inspection_schemas_stay_out_of_platform_backups_and_go_with_the_erasure(make_governance_fleet):
    fleet = make_governance_fleet()
    engine, replicas, source = fleet["engine"], fleet["replicas"], fleet["source"]
    back_up(fleet, "2")
    back_up(fleet, "platform")
    for partition, schema in (("2", "inspect_2"), ("platform", "inspect_platform")):
        recover(engine, RecoveryRequest(partition=partition, mode="schema", schema=schema, include_unverified=True),
                replicas)
    made = schemas(source)
    assert made == {"inspect_2": f"{tenancy.INSPECTION_MARKER}2",
                               "inspect_platform": f"{tenancy.INSPECTION_MARKER}platform"}
    with psycopg.connect(source) as conn:
        named = conn.execute("SELECT count(*) FROM inspect_platform.platform_audit "
                             "WHERE entity = 'wedding' AND entity_id = 2").fetchone()[0]
        assert named >= 1 and conn.execute("SELECT count(*) FROM inspect_2.guests").fetchone()[0] >= 1
        plan = tenancy.discover(conn)
    found = {t.table.schema for t in (*plan.tenant_tables, *plan.platform_tables)}
    assert found and not found & {"inspect_2", "inspect_platform"}

    # A platform backup taken now holds no inspection copy (those rows would be sealed with the platform key).
    back_up(fleet, "platform")
    tables = fleet["catalogue"].require_latest_backup("platform").manifest["tables"]
    assert tables and not [t["schema"] for t in tables if t["schema"].startswith("inspect")]

    report = erase_wedding(fleet["catalogue"], engine.vault, replicas, "2", requested_by="dpo",
                           settings=engine.settings)
    assert report.complete, report.failed
    left = schemas(source)  # (a local: pytest would print the call, DSN and all)
    assert "inspect_2" not in left and "inspect_platform" in left
    assert any(line.startswith("schema inspect_2: dropped") for line in report.inspection)
    with psycopg.connect(source) as conn:
        assert conn.execute("SELECT count(*) FROM inspect_platform.platform_audit "
                            "WHERE entity = 'wedding' AND entity_id = 2").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM inspect_platform.platform_audit").fetchone()[0] >= 1
