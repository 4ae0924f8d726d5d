"""Which partitions to re-verify: every one, the named ones, or those not restored successfully for N days.
Plain Python (no Dagster import), shared by `wedbackup verify` and the reverify_wedding_list job."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from ..core.errors import WedbackupError
from wedbackup_dagster.core.partitions import shown


def select_for_verify(verified: dict[str, datetime | None], *, all_: bool = False, weddings: list[str] | None = None,
                      older_than_days: float | None = None, now: datetime | None = None) -> list[str]:
    """Which partitions to re-verify, from {partition with a backup: when its newest backup last restored}."""
    if all_:
        return sorted(verified, key=_order)
    if weddings:
        unknown = [w for w in weddings if w not in verified]
        if unknown:
            raise WedbackupError(f"wedding(s) without a backup in the catalogue: {', '.join(map(shown, unknown[:10]))}")
        return list(dict.fromkeys(weddings))
    if older_than_days is None or older_than_days < 0:
        raise WedbackupError("--older-than needs a number of days ≥ 0")
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=older_than_days)
    return sorted((p for p, at in verified.items() if at is None or at < cutoff), key=_order)


def _order(partition: str) -> tuple[int, str]:
    return (0, f"{int(partition):020d}") if partition.isdigit() else (1, partition)
