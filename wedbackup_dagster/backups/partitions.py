"""The one partitions object of the project: a dynamic partition per wedding, plus `platform`."""
import dagster as dg

from wedbackup_dagster.core.partitions import check_partition

weddings_partitions = dg.DynamicPartitionsDefinition(name="weddings")


def validated_keys(keys: list[str]) -> list[str]:
    """Partition keys become paths and object keys: refuse anything that is not a wedding id or platform."""
    return [check_partition(k) for k in keys]
