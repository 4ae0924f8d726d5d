"""Standing verification, the plain half: which weddings one tick of the rolling re-verification restores
again (every wedding's newest backup at least once per window, least recently verified first, spread over the
window's ticks), and which weddings are overdue (not re-verified within the window). Pure functions of the
catalogue's last-verified times, now and the window; the schedule and the asset check are thin wiring
(disaster/standing.py)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta


@dataclass(frozen=True)
class TickShare:
    """One tick's re-verification: `weddings` in the order they should be restored (never verified first, then
    oldest verification first), of which `overdue` would be past the window before the next tick."""

    weddings: list[str] = field(default_factory=list)
    overdue: list[str] = field(default_factory=list)
    share: int = 0  # total / ticks per window, rounded up: the steady-state part of the tick
    total: int = 0


def _order(partition: str) -> tuple[int, int, str]:
    return (0, int(partition), "") if partition.isdigit() else (1, 0, partition)


def _staleness(item: tuple[str, datetime | None]) -> tuple[int, datetime | None, tuple[int, int, str]]:
    partition, at = item
    return (0, None, _order(partition)) if at is None else (1, at, _order(partition))  # type: ignore[return-value]


def ticks_per_window(window: timedelta, every: timedelta) -> int:
    """How many ticks fall in one window (at least one)."""
    if window <= timedelta(0) or every <= timedelta(0):
        raise ValueError("the window and the time between ticks must be positive")
    return max(1, math.floor(window / every))


def tick_share(last_verified: Mapping[str, datetime | None], now: datetime, window: timedelta,
               every: timedelta) -> TickShare:
    """The weddings this tick re-verifies, from {partition: when its newest backup last restored (None:
    never)}, least recently verified first: its share (total / ticks per window, rounded up), extended to every
    wedding that would be overdue before the next tick (`every` from now: not re-verified within `window` by
    then). Taking the least recent share each tick brings every wedding round within the window at an even
    load; the overdue (a new fleet, failed restores, missed ticks) are caught up at once rather than added on
    top of every tick's share, which would bunch the verifications and never settle into an even rhythm."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    total = len(last_verified)
    share = math.ceil(total / ticks_per_window(window, every)) if total else 0
    cutoff = now + every - window  # verified before this: past the window before the next tick
    ordered = [p for p, _ in sorted(last_verified.items(), key=_staleness)]
    overdue = [p for p in ordered if last_verified[p] is None or last_verified[p] < cutoff]  # type: ignore[operator]
    count = max(share, len(overdue))
    return TickShare(weddings=ordered[:count], overdue=overdue, share=share, total=total)


def not_reverified(last_verified: Mapping[str, datetime | None], now: datetime, window: timedelta) -> list[str]:
    """The weddings whose newest backup has not restored successfully within `window` of `now` (or never),
    least recently verified first."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    cutoff = now - window
    return [p for p, at in sorted(last_verified.items(), key=_staleness) if at is None or at < cutoff]
