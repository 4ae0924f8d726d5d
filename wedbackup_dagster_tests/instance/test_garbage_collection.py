"""The run process's collector settings (instance/garbage_collection.py): what is loaded is frozen, garbage
is collected first and never frozen, and what a run makes afterwards is still collected."""
from __future__ import annotations

import gc
import weakref

import pytest

from wedbackup_dagster.instance.garbage_collection import YOUNG_THRESHOLD, settle_loaded_objects


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture
def restored_collector():
    threshold = gc.get_threshold()
    yield
    gc.set_threshold(*threshold)


def test_loaded_objects_are_frozen_garbage_first_collected_and_later_cycles_still_freed(restored_collector):
    garbage = _Node()
    dead = weakref.ref(garbage)
    del garbage  # unreachable before the call: must be collected, not frozen for the process's life
    kept = _Node()
    frozen_before = gc.get_freeze_count()
    settle_loaded_objects()
    assert dead() is None
    assert gc.get_freeze_count() > frozen_before  # `kept` (and everything loaded) is out of the traversal
    assert not any(o is kept for g in range(3) for o in gc.get_objects(generation=g))
    assert gc.get_threshold()[0] >= YOUNG_THRESHOLD
    # What a run makes afterwards is collected as before.
    later = _Node()
    freed = weakref.ref(later)
    del later
    gc.collect()
    assert freed() is None
