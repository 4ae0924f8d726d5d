"""The `dr_pack` job and its daily `dr_pack_schedule`: a DR pack (every wedding's newest verified archive, a few
large objects per provider) built from the vault and published at every provider, older packs pruned. Thin wiring
over core/disaster/pack_build.build_pack; its metadata says what a person checks in the UI: weddings packed, segments,
bytes, per provider what was published or why not, and how many weddings were left to their own objects. A pack is
a speed copy for `restore --all`, never a counted copy. The schedule's time, zone and whether it starts on come from
the policy file's `dr_pack` settings."""
import dagster as dg

from ..core.config import redact
from ..core.disaster import pack_build
from ..shared.metadata import metadata_table
from ..shared.resources import ProviderReplicasResource, WedbackupEngineResource
from wedbackup_dagster.core.policy.backup_policy import Policy

PROVIDER_COLUMNS = [("provider", "string"), ("published", "string"), ("failed", "string"),
                    ("segments_written", "int"), ("segments_already_there", "int"), ("older_objects_deleted", "int")]


def pack_metadata(report: pack_build.PackReport) -> dict:
    providers = sorted(set(report.published) | set(report.failed))
    return {
        "summary": dg.MetadataValue.md(redact("\n".join(f"- {line.strip()}" for line in report.lines()))),
        "weddings": dg.MetadataValue.int(report.weddings),
        "segments": dg.MetadataValue.int(report.segments),
        "bytes": dg.MetadataValue.int(report.bytes),
        "providers": metadata_table(
            [{"provider": p, "published": report.published.get(p, ""), "failed": redact(report.failed.get(p, "")),
              "segments_written": report.uploaded.get(p, 0), "segments_already_there": report.already_there.get(p, 0),
              "older_objects_deleted": report.pruned.get(p, 0)} for p in providers], PROVIDER_COLUMNS),
        "published": ", ".join(sorted(report.published)) or "none",
        "failed": ", ".join(sorted(report.failed)) or "none",
        "left_out": dg.MetadataValue.int(len(report.left_out)),
        "left_out_weddings": dg.MetadataValue.json({p: redact(why) for p, why in report.to_dict()["left_out"].items()}),
        "seconds": dg.MetadataValue.float(float(report.seconds)),
    }


@dg.op(tags={"kind": "disaster"})
def build_dr_pack(context: dg.OpExecutionContext, wedbackup: WedbackupEngineResource,
                  replicas: ProviderReplicasResource) -> dg.Output:
    report = pack_build.build_pack(wedbackup.engine(), replicas.all(), progress=lambda m: context.log.info(redact(m)))
    metadata = pack_metadata(report)
    if not report.ok:
        why = "; ".join(f"{p}: {e}" for p, e in sorted(report.failed.items())) or "no provider to publish at"
        raise dg.Failure(description=redact(f"DR pack not published everywhere ({why}); those providers keep their "
                                            f"older packs, restore --all reads each wedding's own object where a "
                                            f"pack lacks it")[:2000], metadata=metadata)
    return dg.Output(None, metadata=metadata)


@dg.job(executor_def=dg.in_process_executor,
        description="Build a DR pack from the vault (every wedding's newest verified archive, concatenated into a "
                    "few content-addressed segments) and publish it at every provider; older packs pruned.")
def dr_pack():
    build_dr_pack()


_PACK = Policy.from_env().dr_pack  # the cron, zone and status must be known when the code location loads

dr_pack_schedule = dg.ScheduleDefinition(
    name="dr_pack_schedule",
    job=dr_pack,
    cron_schedule=_PACK.cron,  # default daily 03:00: after the night's re-verification, before Sunday's drill
    execution_timezone=_PACK.timezone,
    default_status=dg.DefaultScheduleStatus.RUNNING if _PACK.enabled else dg.DefaultScheduleStatus.STOPPED,
    description="Daily: a DR pack at every provider, so restore --all and the drills read the platform in few "
                "requests (policy file: dr_pack).",
)
