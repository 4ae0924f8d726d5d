"""The `acknowledge_shrinkage` job: a person who checked a wedding's flagged drop in rows acknowledges it
from the UI (Launchpad config: wedding, by, optional backup_id and note), as `wedbackup ack` does from the
command line. Audited in the catalogue; retention may then delete the backups the flag held."""
import dagster as dg

from .partitions import validated_keys
from ..shared.resources import WedbackupEngineResource
from ..core.errors import WedbackupError


class AcknowledgeShrinkageConfig(dg.Config):
    wedding: str  # the partition key (wedding id)
    by: str  # who checked the drop: recorded with the acknowledgement
    backup_id: int | None = None  # only the flag naming this backup (flagged, baseline or previous); default all
    note: str | None = None


def acknowledge(catalogue, wedding: str, *, by: str, backup_id: int | None, note: str | None) -> list[dict]:
    """Acknowledge the wedding's open flags; an error naming the wedding when there is none to acknowledge."""
    [wedding] = validated_keys([wedding])
    rows = catalogue.acknowledge_shrinkage(wedding, by=by, note=note, backup_id=backup_id)
    if not rows:
        which = f" naming backup #{backup_id}" if backup_id is not None else ""
        raise WedbackupError(f"wedding {wedding}: no unacknowledged shrinkage flag{which} (nothing to acknowledge; "
                             f"open flags are listed by `wedbackup ack --list`)")
    return rows


@dg.op(tags={"kind": "checks"})
def acknowledge_shrinkage_op(context: dg.OpExecutionContext, config: AcknowledgeShrinkageConfig,
                             wedbackup: WedbackupEngineResource) -> dg.Output:
    engine = wedbackup.engine()
    try:
        rows = acknowledge(engine.catalogue, config.wedding, by=config.by, backup_id=config.backup_id,
                           note=config.note)
    except WedbackupError as exc:
        raise dg.Failure(description=str(exc)) from None
    context.log.info(f"wedding {config.wedding}: {len(rows)} shrinkage flag(s) acknowledged by {config.by}")
    return dg.Output(None, metadata={
        "acknowledged": len(rows), "by": config.by,
        "flags": dg.MetadataValue.json([{"backup_id": r["backup_id"], "level": r["level"], "summary": r["summary"]}
                                        for r in rows])})


@dg.job(executor_def=dg.in_process_executor,
        description="Acknowledge a wedding's flagged drop in rows (the shrinkage check) once a person checked it: "
                    "retention may then delete the backups taken before the drop.")
def acknowledge_shrinkage():
    acknowledge_shrinkage_op()
