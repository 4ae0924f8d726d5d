"""backup_inventory through Dagster: a table and markdown summary, and inventory_consistent passing on a
healthy fleet, failing once a replica is deleted."""
from __future__ import annotations

import dagster as dg
import pytest

from wedbackup_dagster.providers.inventory_reconciliation import BACKUP_INVENTORY

from ..backups.conftest import make_fleet


@pytest.fixture(scope="module")
def small_fleet(stack):
    with make_fleet(stack, 3, through_dagster=False) as f:
        yield f


def _run(instance):
    from wedbackup_dagster.definitions import defs

    result = defs.resolve_job_def("reconcile_inventory").execute_in_process(instance=instance, raise_on_error=False)
    assert result.success
    check = result.get_asset_check_evaluations()[0]
    mat = result.asset_materializations_for_node("backup_inventory")[0]
    return check, mat


def test_inventory_asset_and_its_check(small_fleet):
    instance, cat = small_fleet["instance"], small_fleet["catalogue"]
    check, mat = _run(instance)
    assert check.passed, check.description
    assert mat.metadata["objects"].value == 12  # 3 weddings x (vault, s3, gcs, azure)
    totals = {(r.data["provider"], r.data["storage_class"]) for r in mat.metadata["totals"].records}
    assert ("vault", "local-disk") in totals and ("azure", "Cool") in totals
    assert "objects** reconciled" in mat.metadata["summary"].value

    backup = cat.require_latest_backup(small_fleet["weddings"][1])
    gone = next(c for c in cat.copies(backup.id) if c.provider == "s3")
    small_fleet["s3"].delete_object(Bucket=small_fleet["engine"].settings.s3.bucket, Key=gone.object_key)
    check, mat = _run(instance)
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert check.metadata["missing"].value == 1
    rows = [r.data for r in mat.metadata["findings"].records]
    assert rows == [{"provider": "s3", "key": gone.object_key, "partition": small_fleet["weddings"][1],
                     "finding": "missing", "size": None, "recorded_size": gone.size}]
    assert instance.get_latest_materialization_event(BACKUP_INVENTORY) is not None
