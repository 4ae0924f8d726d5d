"""The backup partition: one per wedding (its id as the source writes it) plus `platform` for the rows
that belong to no wedding. The one home of the name `platform`, of what a valid partition id is, and of
how a hostile value is shown in an error."""
from __future__ import annotations

import re

from wedbackup_dagster.core.errors import WedbackupError

PLATFORM = "platform"
# A wedding id or `platform`: characters that can never escape a path, an object key or a prefix. Only ever
# fullmatch it (is_partition): `$` would let a trailing newline through.
_PARTITION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
PARTITION_RULE = "a wedding id ([A-Za-z0-9_-], at most 64) or 'platform'"


def shown(value: object) -> str:
    """A hostile value in an error message: escaped (repr) and bounded, so it cannot flood or forge a log."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_partition(value: object) -> bool:
    """fullmatch, not match: `$` would let a trailing newline through."""
    return isinstance(value, str) and _PARTITION_ID.fullmatch(value) is not None


def check_partition(partition: str) -> str:
    """`partition` itself when it is a wedding id or `platform`; anything else could escape a path or prefix."""
    if not is_partition(partition):
        raise WedbackupError(f"partition {shown(partition)} is not {PARTITION_RULE}")
    return partition


_INTEGER_ID = re.compile(r"(-?)0*([0-9]+)")
_UUID_ID = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def other_spellings(partition: str) -> str | None:
    """A PostgreSQL regular expression matching every way of writing the same wedding id as `partition`
    ("7", "07", "007" for an integer key; any letter case for a uuid), or None when the id has no other
    spelling. The source's own text of the key is the one canonical form (README, Hostile input)."""
    if (m := _INTEGER_ID.fullmatch(partition)) is not None:
        return f"^{m.group(1)}0*{m.group(2)}$"
    if _UUID_ID.fullmatch(partition):
        return f"(?i)^{partition}$"
    return None


def partition_label(partition: str) -> str:
    """How a partition is named to a person: `wedding 12`, or `the platform partition`."""
    return "the platform partition" if partition == PLATFORM else f"wedding {partition}"
