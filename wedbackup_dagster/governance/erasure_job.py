"""The `erase_wedding` job: GDPR erasure of one wedding's backups (core.erasure.erase_wedding), then its
Dagster partition is removed. Fails, listing what is left, when a provider could not be reached; a re-run
completes it. Locked copies are reported in the metadata, not failures."""
import dagster as dg

from ..backups.partitions import validated_keys, weddings_partitions
from ..shared.resources import ProviderReplicasResource, WedbackupEngineResource
from wedbackup_dagster.core.governance import erasure


class EraseConfig(dg.Config):
    partition: str  # the wedding id
    requested_by: str  # who asked (a person or ticket): recorded with the erasure


@dg.op(tags={"kind": "erasure"})
def erase_wedding_backups(context: dg.OpExecutionContext, config: EraseConfig, wedbackup: WedbackupEngineResource,
                          replicas: ProviderReplicasResource) -> dg.Output:
    partition = validated_keys([config.partition])[0]
    engine = wedbackup.engine()
    report = erasure.erase_wedding(engine.catalogue, engine.vault, replicas.all(),
                                   partition, requested_by=config.requested_by, settings=engine.settings)
    if context.instance.has_dynamic_partition(weddings_partitions.name, partition):
        context.instance.delete_dynamic_partition(weddings_partitions.name, partition)
    locked = [f"{c.get('provider') or c.get('uri')}: "
              + (f"until {c['locked_until']:%Y-%m-%d}" if c["locked_until"] else "legal hold, no end date")
              for c in report.locked]
    context.log.info(f"wedding {partition}: {report.keys_shredded} key(s) destroyed, {report.copies_deleted} "
                     f"copies deleted, {len(locked)} locked (unreadable), {len(report.dr_pack_deleted)} DR pack "
                     f"object(s) naming it deleted")
    metadata = {
        "partition": partition,
        "keys_shredded": dg.MetadataValue.int(report.keys_shredded),
        "copies_deleted": dg.MetadataValue.int(report.copies_deleted),
        "copies_locked": dg.MetadataValue.int(len(locked)),
        "dr_pack_objects_deleted": dg.MetadataValue.int(len(report.dr_pack_deleted)),
        "locked": dg.MetadataValue.json(locked),
        "complete": report.complete,
    }
    if not report.complete:
        failed = report.detail()["failed"]
        raise dg.Failure(description=f"wedding {partition}: key destroyed, but {len(failed)} copy deletion(s) "
                                     f"failed; run erase again to finish: {'; '.join(failed[:3])}",
                         metadata=metadata)
    return dg.Output(None, metadata=metadata)


@dg.job(executor_def=dg.in_process_executor,
        description="GDPR erasure: destroy a wedding's keys, delete every copy retention allows, remove its partition.")
def erase_wedding():
    erase_wedding_backups()
