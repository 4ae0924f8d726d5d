"""restore --all's memory, for one run, of copy locations that keep failing. A location that refuses
connections or times out costs every wedding its retries before the next copy is tried (with the SDKs'
defaults about 5 s a wedding: 2,000 weddings would wait hours on a lost S3 before each reached its GCS copy).
After FAILURES_IN_A_ROW failures in a row at one location, for different weddings, the location is tried
last, after every other copy a wedding has, for COOL_DOWN_SECONDS; then one wedding tries it in its place
again, and a success puts it back there. Nothing is skipped: a wedding whose other copies fail (or that has
no other) still tries it, so no wedding is lost to this, and its report line names the location it passed
over and why."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

FAILURES_IN_A_ROW = 3
COOL_DOWN_SECONDS = 60.0


@dataclass
class _Location:
    failures_in_a_row: int = 0
    last_error: str = ""
    tried_last_until: float = 0.0  # monotonic time; 0: in its place
    probing: bool = False  # one wedding is trying it in its place after the cool-down
    passed_over: int = 0  # weddings that tried it last while it was failing
    times_demoted: int = 0


class CopyHealth:
    """Thread-safe: the fetchers and workers of one restore --all share one."""

    def __init__(self, failures_in_a_row: int = FAILURES_IN_A_ROW, cool_down: float = COOL_DOWN_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self._limit = max(1, failures_in_a_row)
        self._cool_down = cool_down
        self._clock = clock
        self._lock = threading.Lock()
        self._locations: dict[str, _Location] = {}

    def order(self, order: Iterable[str]) -> tuple[tuple[str, ...], list[str]]:
        """A wedding's usable copies `order` with the failing locations moved to the end (in their relative
        order), and a note for each one moved ("s3: tried last: 3 failures in a row, the last: …")."""
        now = self._clock()
        kept: list[str] = []
        last: list[str] = []
        notes: list[str] = []
        with self._lock:
            for copy in order:
                loc = self._locations.get(copy)
                if loc is None or not loc.tried_last_until:
                    kept.append(copy)
                elif now >= loc.tried_last_until and not loc.probing:
                    loc.probing = True  # this wedding tries it in its place; the others still try it last
                    kept.append(copy)
                else:
                    loc.passed_over += 1
                    last.append(copy)
                    notes.append(f"{copy}: tried last: {loc.failures_in_a_row} failures in a row, the last: "
                                 f"{loc.last_error[:200]}")
        return tuple(kept + last), notes

    def failed(self, copy: str, why: str) -> None:
        with self._lock:
            loc = self._locations.setdefault(copy, _Location())
            loc.failures_in_a_row += 1
            loc.last_error = why
            if loc.probing:  # the probe after the cool-down failed (or another try meanwhile): tried last again
                loc.probing = False
                loc.tried_last_until = self._clock() + self._cool_down
            elif not loc.tried_last_until and loc.failures_in_a_row >= self._limit:
                loc.tried_last_until = self._clock() + self._cool_down
                loc.times_demoted += 1

    def succeeded(self, copy: str) -> None:
        with self._lock:
            loc = self._locations.get(copy)
            if loc is not None:
                loc.failures_in_a_row = 0
                loc.tried_last_until = 0.0
                loc.probing = False

    def lines(self) -> list[str]:
        """For the run's report: each location that was tried last, for how many weddings, and why."""
        with self._lock:
            return [f"{copy} tried last for {loc.passed_over} wedding(s) after {self._limit} failures in a row "
                    f"(the last: {loc.last_error[:200]})"
                    for copy, loc in sorted(self._locations.items()) if loc.times_demoted]
