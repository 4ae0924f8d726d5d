"""backup_inventory: every object on every provider (and in the vault) reconciled against the catalogue,
shown as a table and a markdown summary; its findings feed the `inventory_consistent` check."""
from collections.abc import Iterator
from typing import Any

import dagster as dg

from ..backups.constants import OWNERS
from ..shared.resources import ProviderReplicasResource, WedbackupEngineResource
from wedbackup_dagster.core.catalogue import inventory as inv

BACKUP_INVENTORY = dg.AssetKey("backup_inventory")
FINDINGS_SHOWN = 200  # the UI table stays readable; the counts cover everything


class InventoryConfig(dg.Config):
    # One HEAD per catalogued object compares the provider's stored checksum with ours; turn off for a
    # listing-only pass over a very large fleet.
    check_checksums: bool = True


TOTALS_COLUMNS = [("provider", "string"), ("storage_class", "string"), ("objects", "int"), ("bytes", "int"),
                  ("usd_per_gb_month", "float"), ("monthly_cost_usd", "float")]


def _frame_table(frame: Any, columns: list[tuple[str, str]]) -> dg.MetadataValue:
    schema = dg.TableSchema(columns=[dg.TableColumn(name, type_) for name, type_ in columns])
    records = []
    for row in frame.to_dict("records"):
        records.append(dg.TableRecord({name: _plain(row.get(name), type_) for name, type_ in columns}))
    return dg.MetadataValue.table(records=records, schema=schema)


def _plain(value: Any, type_: str) -> Any:
    if value is None or value != value:  # NaN
        return None
    if type_ == "int":
        return int(value)
    if type_ == "float":
        return round(float(value), 4)
    return str(value)


@dg.asset(
    key=BACKUP_INVENTORY, owners=OWNERS, group_name="inventory", kinds={"pandas"},
    check_specs=[dg.AssetCheckSpec("inventory_consistent", asset=BACKUP_INVENTORY,
                                   description="Every catalogued copy is on its provider with the recorded size and "
                                               "checksum (ERROR otherwise); no orphaned archives (WARN).")],
    description="Every object on every provider and in the vault reconciled against the catalogue: missing "
                "copies, orphans, size or checksum mismatches; objects, bytes and an estimated monthly cost per "
                "provider and storage class (prices: WEDBACKUP_STORAGE_PRICES).",
)
def backup_inventory(context: dg.AssetExecutionContext, config: InventoryConfig, wedbackup: WedbackupEngineResource,
                     replicas: ProviderReplicasResource) -> Iterator[Any]:
    engine = wedbackup.engine()
    every_replica = replicas.all()
    found = inv.take_inventory(engine.catalogue, every_replica, engine.vault, prices=inv.prices_from_env(),
                               check_checksums=config.check_checksums)
    counts = found.counts()
    summary = found.summary_markdown()
    serious = sum(counts[k] for k in inv.SERIOUS)
    findings = found.findings.head(FINDINGS_SHOWN)
    metadata = {
        "summary": dg.MetadataValue.md(summary),
        "totals": _frame_table(found.totals, TOTALS_COLUMNS),
        # Wedding media's part of the totals (its packs and snapshots at the providers), on its own.
        "media_totals": _frame_table(found.media_totals, TOTALS_COLUMNS),
        "media_monthly_cost_usd": dg.MetadataValue.float(round(float(found.media_totals["monthly_cost_usd"].fillna(0)
                                                                     .sum()), 4)),
        "findings": _frame_table(findings, [("provider", "string"), ("key", "string"), ("partition", "string"),
                                            ("finding", "string"), ("size", "int"), ("recorded_size", "int")]),
        "objects": dg.MetadataValue.int(len(found.rows)),
        "monthly_cost_usd": dg.MetadataValue.float(round(found.monthly_cost, 4)),
        **{f"{kind}_count": dg.MetadataValue.int(n) for kind, n in counts.items()},
    }
    check = dg.AssetCheckResult(
        check_name="inventory_consistent", passed=serious == 0 and counts[inv.ORPHAN] == 0,
        severity=dg.AssetCheckSeverity.ERROR if serious else dg.AssetCheckSeverity.WARN,
        description=summary.splitlines()[0] if not (serious or counts[inv.ORPHAN]) else
        "; ".join(f"{n} {k}" for k, n in counts.items() if n),
        metadata={**{k: dg.MetadataValue.int(n) for k, n in counts.items()},
                  "unreachable": dg.MetadataValue.text(", ".join(sorted(found.unreachable)))})
    yield dg.MaterializeResult(asset_key=BACKUP_INVENTORY, metadata=metadata, check_results=[check])


reconcile_inventory = dg.define_asset_job(
    name="reconcile_inventory", selection=dg.AssetSelection.assets(BACKUP_INVENTORY),
    executor_def=dg.in_process_executor,
    description="List every provider and the vault and reconcile them with the catalogue.")
