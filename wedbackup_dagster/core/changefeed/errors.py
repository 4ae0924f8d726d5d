"""Errors of the change feed: each names the slot, wedding or setting at fault."""
from __future__ import annotations

from wedbackup_dagster.core.errors import RestoreError, WedbackupError


class ChangeFeedError(WedbackupError):
    """The source cannot feed changes (a setting, a slot, a publication) or the feed is broken."""


class DecodeError(ChangeFeedError):
    """A pgoutput message this decoder cannot read: garbled, or a protocol feature it does not support."""


class SlotLost(ChangeFeedError):
    """The feed's replication slot is gone or invalidated: changes since its last drain are lost, and every
    wedding needs a fresh snapshot before it can be restored to a second again."""


class ReplayRefused(RestoreError):
    """A restore to a second that cannot be done exactly (before the first snapshot, in a gap, across a
    schema change); names the nearest restorable points."""
