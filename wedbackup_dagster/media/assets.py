"""The media assets. Each step loops over the run's weddings (`context.partition_keys`), records each
wedding's metadata, and fails naming the weddings that failed after recording the others. The media service
is made over the run's resources, as the row assets' engine is: `wedbackup` (settings, catalogue, keys) and
`replicas` (S3, GCS, Azure), so tests and deployments configure both in one place."""
from collections.abc import Callable, Iterator
from typing import Any

import dagster as dg

from ..backups.partitions import validated_keys, weddings_partitions
from ..core.errors import WedbackupError
from ..core.progress import Progress
from ..shared.resources import ProviderReplicasResource, WedbackupEngineResource
from ..shared.retry import UPLOAD_RETRY
from ..shared.wedding_outcomes import WeddingOutcomes
from .constants import GROUP, MEDIA_POOL, MEDIA_REPLICA_KEYS, MEDIA_SNAPSHOT, OWNERS, VERIFIED_MEDIA

BATCHED = dg.BackfillPolicy.single_run()


def media_service(wedbackup: WedbackupEngineResource, replicas: ProviderReplicasResource) -> Any:
    """The run's MediaService over its resources. Not closed by the step: the catalogue is the resource's,
    closed when the run ends."""
    from ..core.media.service import MediaService

    return MediaService.over(wedbackup.settings(), wedbackup.catalogue(), wedbackup.keyring(), replicas.all())


def each_wedding(context: dg.AssetExecutionContext, asset_key: dg.AssetKey, what: str,
                 work: Callable[[str], dict[str, Any]]) -> Iterator[Any]:
    """Run `work` per wedding of the run: its metadata recorded per wedding, failures named together (the
    wiring's one model of a failed wedding, shared/wedding_outcomes.py)."""
    keys = validated_keys(list(context.partition_keys))
    progress = Progress(what, len(keys), context.log.info)
    outcomes = WeddingOutcomes(what)
    for key in keys:
        try:
            outcomes.done[key] = {asset_key: work(key)}
        except WedbackupError as exc:
            context.log.error(f"wedding {key}: {exc}")
            outcomes.failed[key] = str(exc)
        progress.step()
    yield from outcomes.finish_assets(context, [asset_key])


@dg.asset(key=MEDIA_SNAPSHOT, partitions_def=weddings_partitions, backfill_policy=BATCHED, pool=MEDIA_POOL,
          kinds={"s3", "file"}, owners=OWNERS, group_name=GROUP,
          description="The wedding's media (WEDBACKUP_MEDIA_SOURCE) chunked by content, deduplicated within the "
                      "wedding, sealed with its key into packs and a snapshot in the vault. Unchanged media costs "
                      "a listing and writes nothing.")
def media_snapshot(context: dg.AssetExecutionContext, wedbackup: WedbackupEngineResource,
                   replicas: ProviderReplicasResource) -> Iterator[Any]:
    service = media_service(wedbackup, replicas)

    def work(key: str) -> dict[str, Any]:
        r = service.back_up(key)
        for s in r.skipped[:20]:
            context.log.warning(f"wedding {key}: skipped {s.path!r}: {s.reason}")
        ratio = r.read_bytes / r.new_bytes if r.new_bytes else None
        return {"files": dg.MetadataValue.int(r.files), "bytes": dg.MetadataValue.int(r.bytes),
                "read_bytes": dg.MetadataValue.int(r.read_bytes), "new_bytes": dg.MetadataValue.int(r.new_bytes),
                "stored_bytes": dg.MetadataValue.int(r.stored_bytes),
                "dedup_ratio": dg.MetadataValue.float(round(ratio, 2)) if ratio else dg.MetadataValue.text("-"),
                "packs": dg.MetadataValue.int(r.packs), "packs_written": dg.MetadataValue.int(r.packs_written),
                "skipped": dg.MetadataValue.int(len(r.skipped)), "unchanged": dg.MetadataValue.bool(r.unchanged),
                "snapshot_sha256": dg.MetadataValue.text(r.snapshot_sha256),
                "seconds": dg.MetadataValue.float(round(r.seconds, 3))}

    yield from each_wedding(context, MEDIA_SNAPSHOT, "media snapshot", work)


def _replica_asset(provider: str):
    @dg.asset(key=MEDIA_REPLICA_KEYS[provider], deps=[MEDIA_SNAPSHOT], partitions_def=weddings_partitions,
              backfill_policy=BATCHED, pool=f"upload_{provider}", retry_policy=UPLOAD_RETRY, kinds={provider},
              owners=OWNERS, group_name=GROUP,
              description=f"Every media pack and snapshot of the wedding not yet at {provider}, uploaded under "
                          "its content address and confirmed by the provider's checksum; a re-run uploads nothing.")
    def replica(context: dg.AssetExecutionContext, wedbackup: WedbackupEngineResource,
                replicas: ProviderReplicasResource) -> Iterator[Any]:
        service = media_service(wedbackup, replicas)

        def work(key: str) -> dict[str, Any]:
            uploaded, sent = service.replicate(key, provider)
            copies = [c for c in service.store.copies(key) if c["provider"] == provider]
            return {"uploaded_objects": dg.MetadataValue.int(uploaded), "uploaded_bytes": dg.MetadataValue.int(sent),
                    "objects": dg.MetadataValue.int(len(copies)),
                    "bytes": dg.MetadataValue.int(sum(c["size"] for c in copies))}

        yield from each_wedding(context, MEDIA_REPLICA_KEYS[provider], f"media {provider} upload", work)

    return replica


class VerifyMediaConfig(dg.Config):
    provider: str | None = None  # which location to restore from; default: rotate vault, s3, gcs, azure
    sample: int | None = None  # files per verification; default WEDBACKUP_MEDIA_VERIFY_SAMPLE (0: all)


@dg.asset(key=VERIFIED_MEDIA, deps=list(MEDIA_REPLICA_KEYS.values()), partitions_def=weddings_partitions,
          backfill_policy=BATCHED, kinds={"python"}, owners=OWNERS, group_name=GROUP,
          description="The newest media snapshot restored from one location (rotating), every chosen file's "
                      "SHA-256 compared with the snapshot's; a damaged pack is named.")
def verified_media(context: dg.AssetExecutionContext, config: VerifyMediaConfig, wedbackup: WedbackupEngineResource,
                   replicas: ProviderReplicasResource) -> Iterator[Any]:
    service = media_service(wedbackup, replicas)

    def work(key: str) -> dict[str, Any]:
        provider = config.provider or service.next_provider(key)
        r = service.verify(key, provider, config.sample)
        if not r.ok:
            raise WedbackupError(f"media at {provider} does not restore: " + "; ".join(r.problems[:5]))
        return {"checked_copy": dg.MetadataValue.text(provider), "files_checked": dg.MetadataValue.int(r.files_checked),
                "files": dg.MetadataValue.int(r.files_total), "bytes_checked": dg.MetadataValue.int(r.bytes_checked),
                "packs_checked": dg.MetadataValue.int(r.packs_checked),
                "seconds": dg.MetadataValue.float(round(r.seconds, 3))}

    yield from each_wedding(context, VERIFIED_MEDIA, "verified media", work)


media_assets = [media_snapshot, *(_replica_asset(p) for p in MEDIA_REPLICA_KEYS), verified_media]
