"""The code location loads with nothing configured, and its assets say what they are."""
import dagster as dg

from wedbackup_dagster.backups.constants import GROUP, REPLICA_KEYS, UPLOAD_POOL
from wedbackup_dagster.definitions import defs


def test_definitions_load_and_validate():
    dg.Definitions.validate_loadable(defs)


def test_every_asset_has_kinds_owners_group_and_wedding_partitions():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"db_dump", "encrypted_archive", "s3_replica", "gcs_replica", "azure_replica",
            "verified_restore"} <= keys
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.owners, key
        assert node.kinds, key
        assert node.group_name, key
        if node.group_name == GROUP:  # the per-wedding backup chain (inventory is fleet-wide)
            assert node.partitions_def is not None and node.partitions_def.name == "weddings", key


def test_the_providers_upload_in_one_subsettable_step_in_the_upload_pool():
    graph = defs.resolve_asset_graph()
    steps = {graph.assets_def_for_key(key) for key in REPLICA_KEYS.values()}
    assert len(steps) == 1  # one step uploads to every provider at once
    step = steps.pop()
    assert step.op.pool == UPLOAD_POOL and step.can_subset
    assert set(step.keys) == set(REPLICA_KEYS.values())  # still three assets, each with its own partitions
    for key in REPLICA_KEYS.values():
        assert graph.get(key).partitions_def.name == "weddings"
    assert step.subset_for({REPLICA_KEYS["gcs"]}, selected_asset_check_keys=None).keys == {REPLICA_KEYS["gcs"]}


def test_automation_and_checks_are_registered():
    assert {s.name for s in defs.schedules} == {"backup_schedule", "retention_sweep", "key_store_backup_schedule",
                                                "dr_drill_schedule", "dr_pack_schedule", "media_schedule",
                                                "check_weddings_daily", "reconcile_inventory_daily",
                                                "rolling_reverification", "reverification_status_daily"}
    assert {s.name for s in defs.sensors} == {"wedding_discovery", "wedding_change_capture", "provider_health",
                                              "run_failure_alerts", "key_store_backup_after_backups",
                                              "wedding_backfill_consolidation", "change_feed_sensor"}
    assert {j.name for j in defs.jobs} >= {"backup_weddings", "backup_wedding_list", "reverify_weddings",
                                           "reverify_wedding_list",
                                           "restore_wedding", "check_weddings", "reconcile_inventory",
                                           "erase_wedding", "retention_sweep", "key_store_backup", "rotate_keys",
                                           "acknowledge_shrinkage", "restore_platform", "dr_drill", "dr_pack",
                                           "change_feed_drain", "backup_media"}
    checks = {key.name for key in defs.resolve_asset_graph().asset_check_keys}
    assert checks == {"archive_integrity", "replica_checksum", "three_two_one", "restore_matches_manifest",
                      "freshness", "inventory_consistent", "shrinkage", "drill_complete",
                      "drill_rto_within_target", "feed_lag_within_rpo", "slot_health", "media_integrity",
                      "media_three_two_one", "media_freshness", "weddings_reverified_within_window"}
