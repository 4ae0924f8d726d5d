"""Media checks per wedding partition: integrity of the newest snapshot (blocking: a damaged one is never
replicated), 3-2-1 of everything it needs, freshness. One evaluation per wedding of the run."""
from collections.abc import Callable, Iterator
from typing import Any

import dagster as dg

from ..backups.partitions import validated_keys, weddings_partitions
from ..shared.resources import ProviderReplicasResource, WedbackupEngineResource
from .assets import media_service
from .constants import MEDIA_SNAPSHOT, VERIFIED_MEDIA


def _evaluate(context: dg.AssetCheckExecutionContext, service: Any, asset_key: dg.AssetKey, name: str,
              outcome_of: Callable[[Any, str], tuple[bool, str, dict[str, Any]]], *, blocking: bool = False
              ) -> Iterator[Any]:
    for key in validated_keys(list(context.partition_keys)):
        passed, text, details = outcome_of(service, key)
        yield dg.AssetCheckEvaluation(
            asset_key=asset_key, check_name=name, passed=passed, partition=key, description=text,
            metadata={k: dg.MetadataValue.text(str(v)) for k, v in details.items()}, blocking=blocking,
            severity=dg.AssetCheckSeverity.ERROR)
    yield dg.Output(None)


@dg.asset_check(asset=MEDIA_SNAPSHOT, name="media_integrity", blocking=True, partitions_def=weddings_partitions,
                description="The newest media snapshot in the vault has its SHA-256, opens with the wedding's key, "
                            "and every pack it needs is in the vault. Blocking: nothing damaged is replicated.")
def media_integrity(context: dg.AssetCheckExecutionContext, wedbackup: WedbackupEngineResource,
                    replicas: ProviderReplicasResource) -> Iterator[Any]:
    from ..core.media import checks

    yield from _evaluate(context, media_service(wedbackup, replicas), MEDIA_SNAPSHOT, "media_integrity",
                         lambda s, k: checks.integrity(s.store, k, s.resolve_key), blocking=True)


@dg.asset_check(asset=VERIFIED_MEDIA, name="media_three_two_one", partitions_def=weddings_partitions,
                description="Every object of the newest media snapshot has 3 copies on 2 kinds of media, 1 offsite.")
def media_three_two_one(context: dg.AssetCheckExecutionContext, wedbackup: WedbackupEngineResource,
                        replicas: ProviderReplicasResource) -> Iterator[Any]:
    from ..core.media import checks

    yield from _evaluate(context, media_service(wedbackup, replicas), VERIFIED_MEDIA, "media_three_two_one",
                         lambda s, k: checks.three_two_one(s.store, k))


@dg.asset_check(asset=VERIFIED_MEDIA, name="media_freshness", partitions_def=weddings_partitions,
                description="The media was confirmed by a backup within a day and its snapshot verified by restore.")
def media_freshness(context: dg.AssetCheckExecutionContext, wedbackup: WedbackupEngineResource,
                    replicas: ProviderReplicasResource) -> Iterator[Any]:
    from ..core.media import checks

    yield from _evaluate(context, media_service(wedbackup, replicas), VERIFIED_MEDIA, "media_freshness",
                         lambda s, k: checks.freshness(s.store, k))


media_checks = [media_integrity, media_three_two_one, media_freshness]
