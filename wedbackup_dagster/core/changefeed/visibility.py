"""Which transactions a snapshot saw: `pg_current_snapshot()`'s text form (`xmin:xmax:xip,…`, 64-bit ids)
parsed, pgoutput's 32-bit xids widened next to it, and pg_visible_in_snapshot's rule evaluated in Python.
The drain uses it to skip what the feed's seed saw; replay, to apply exactly what a snapshot did not see."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ChangeFeedError


@dataclass(frozen=True)
class TxSnapshot:
    xmin: int
    xmax: int
    xip: frozenset[int]


def parse_snapshot(text: str) -> TxSnapshot:
    """`xmin:xmax:xip,…` as pg_current_snapshot() prints it (64-bit transaction ids)."""
    try:
        xmin, xmax, xip = str(text).split(":")
        return TxSnapshot(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))
    except ValueError:
        raise ChangeFeedError(f"{text!r} is not a transaction snapshot (xmin:xmax:xip,…)") from None


def widen_xid(xid: int, near: int) -> int:
    """The 64-bit id of a 32-bit `xid` (as pgoutput sends it) nearest to the 64-bit `near`."""
    candidate = ((near >> 32) << 32) | (xid & 0xFFFFFFFF)
    if candidate > near + (1 << 31):
        candidate -= 1 << 32
    elif candidate < near - (1 << 31):
        candidate += 1 << 32
    return candidate


def visible(xid: int, snap: TxSnapshot) -> bool:
    """pg_visible_in_snapshot(xid, snap) for a committed transaction: did the snapshot see its changes?"""
    full = widen_xid(xid, snap.xmax)
    return full < snap.xmin or (full < snap.xmax and full not in snap.xip)
