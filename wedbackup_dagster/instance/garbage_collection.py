"""The cyclic garbage collector kept off the code location's own objects in a process that runs jobs.

A run of `backup_weddings` over 2,000 weddings creates hundreds of thousands of short-lived objects in the
run's process (Dagster's events, their metadata, serialized rows), and CPython's collector then traverses
every object the process holds: the modules of Dagster, SQLAlchemy, the providers' SDKs and the definitions
(about a million objects). Measured with `gc.callbacks` on the whole-job benchmark (2,000 weddings, the
run's process, i.e. the in-process executor): 11 full collections and 2,800 young ones, 4.2-4.6 s of a
44-49 s job on 2 cores (15.8 s of 128 s when the machine was loaded); after this, 5 full and 660 young
collections, 1.3-1.5 s.

`settle_loaded_objects()` runs one full collection (so no garbage is left behind) and then freezes what
remains: those objects live as long as the process does, and the collector no longer traverses them
(`gc.freeze`, Python's documented way). Nothing else changes: every object made afterwards is collected
as before (young collections included, so memory stays bounded per wedding), and an object frozen here
that is freed later by its reference count is freed as usual; only a reference cycle among objects that
exist now would outlive its use, and the code location's modules and definitions are never released."""
from __future__ import annotations

import gc

# Young-generation threshold: Python's 700 allocations trigger a young collection every few events; at
# 10,000 the young generation stays small (a few MB) while collecting 14 times less often.
YOUNG_THRESHOLD = 10_000


def settle_loaded_objects() -> None:
    """Collect once, then freeze every object alive now (the loaded code location) out of the collector's
    traversal, and make young collections less frequent. Idempotent: calling it again freezes what was
    made since (and collects first)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(max(YOUNG_THRESHOLD, gc.get_threshold()[0]), middle, old)
