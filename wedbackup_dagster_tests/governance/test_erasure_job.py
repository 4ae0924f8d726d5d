"""The erase_wedding job through Dagster on the real stack: the wedding's copies are gone, its partition
is removed from the instance, the erasure is recorded, and wedding discovery does not add it back while
its row is still in the source database."""
from __future__ import annotations

import dagster as dg

from wedbackup_dagster.backups.sensors import wedding_discovery
from wedbackup_dagster.backups.launch import register_partitions
from wedbackup_dagster.core.keys.backup import (_provider_key_backups, back_up_key_store, newest_key_backup,
                                                vault_key_backup_dir)
from wedbackup_dagster.definitions import defs
from wedbackup_dagster.shared.resources import WedbackupEngineResource
from wedbackup_dagster_tests.governance_fleet import (  # noqa: F401 - fixtures
    back_up,
    governance_instance,
    make_governance_fleet,
)


def erase(instance, partition: str, requested_by: str = "dpo"):
    job = defs.resolve_job_def("erase_wedding")
    return job.execute_in_process(instance=instance, raise_on_error=False, run_config={
        "ops": {"erase_wedding_backups": {"config": {"partition": partition, "requested_by": requested_by}}}})


def test_erase_job_removes_copies_and_the_partition_and_discovery_keeps_it_out(make_governance_fleet,
                                                                                governance_instance):
    instance = governance_instance
    fleet = make_governance_fleet()
    cat = fleet["catalogue"]
    back_up(fleet, "2")
    back_up(fleet, "3")
    keys = register_partitions(instance, fleet["source"])
    assert "2" in instance.get_dynamic_partitions("weddings")
    engine = fleet["engine"]
    before = back_up_key_store(engine.settings, cat, fleet["replicas"], engine.keyring)
    assert before.key_count >= 2

    result = erase(instance, "2")
    assert result.success
    [output] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    meta = output.event_specific_data.metadata
    assert meta["copies_deleted"].value == 4 and meta["copies_locked"].value == 0 and meta["complete"].value
    assert meta["dr_pack_objects_deleted"].value == 0  # no DR pack was built
    assert "2" not in instance.get_dynamic_partitions("weddings")
    assert [e["partition"] for e in cat.erasures()] == ["2"]
    assert cat.backups_with_copies("2") == []
    assert {c.provider for c in cat.copies(cat.require_latest_backup("3").id)} == {"vault", "s3", "gcs", "azure"}

    # The key-store backups were replaced by one without wedding 2's key: the older one is gone everywhere,
    # and what is left holds wedding 3's key but not wedding 2's.
    assert meta["complete"].value
    for provider, replica in fleet["replicas"].items():
        sha, contents = newest_key_backup(replica, engine.keyring)
        assert sha != before.sha256, provider
        held = {e.partition for e in contents.entries}
        assert "3" in held and "2" not in held, provider
        assert [s for s, _ in _provider_key_backups(replica)] == [sha], provider
    assert [p.stem for p in vault_key_backup_dir(engine.settings).glob("*.wbk")] == [sha]

    # The wedding's row is still in the source: discovery must not bring the partition back.
    with dg.build_sensor_context(instance=instance, resources={"wedbackup": WedbackupEngineResource()}) as context:
        data = wedding_discovery.evaluate_tick(context)
    added = [k for r in data.dynamic_partitions_requests or [] if isinstance(r, dg.AddDynamicPartitionsRequest)
             for k in r.partition_keys]
    assert "2" not in added
    assert "2" not in cat.live_partitions() and "3" in cat.live_partitions()
    assert "2" not in register_partitions(instance, fleet["source"], cat.erased_partitions())
    assert set(keys) - {"2"} <= set(instance.get_dynamic_partitions("weddings"))

    # Running it again is harmless and succeeds (idempotent).
    assert erase(instance, "2", requested_by="again").success
    assert cat.erasures()[0]["requested_by"] == "dpo"


def test_erase_job_fails_naming_a_platform_request(make_governance_fleet, governance_instance):
    make_governance_fleet(weddings=1)
    result = erase(governance_instance, "platform")
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "platform partition cannot be erased" in failure.step_failure_data.error.cause.message
