"""Progress of long per-wedding work that a person can see: weddings done out of the total, the rate and
an ETA, every `every` weddings or `seconds` seconds and at the end. Each line goes to the step's own log
(`context.log`, so the run's log in the UI shows it) and to the Python logger `wedbackup.progress`, which
the command line prints (`show_on_terminal`), since its Dagster console logger is kept quiet."""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator

LOGGER = logging.getLogger("wedbackup.progress")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """`step()` once per wedding done (failed ones count: they are done too)."""

    def __init__(self, what: str, total: int, emit: Callable[[str], object] | None = None, *,
                 every: int = 100, seconds: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.done = what, total, 0
        self._emit, self._every, self._seconds, self._clock = emit, max(1, every), seconds, clock
        self._started = self._last = clock()
        self._last_done = 0

    def step(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        if (self.done >= self.total or self.done - self._last_done >= self._every
                or now - self._last >= self._seconds):
            self._last, self._last_done = now, self.done
            self._say(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((self._clock() if now is None else now) - self._started, 1e-9)
        rate = self.done / elapsed
        pct = 100 * self.done // max(1, self.total)
        text = f"{self.what}: {self.done:,} of {self.total:,} weddings ({pct}%), {rate * 60:,.0f}/min"
        if self.done >= self.total:
            return f"{text}, done in {_duration(elapsed)}"
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        return f"{text}, about {_duration(left) if left != float('inf') else '?'} left"

    def _say(self, text: str) -> None:
        LOGGER.info(text)
        if self._emit is not None:
            self._emit(text)


def show_on_terminal() -> None:
    """Print progress lines on stderr (the command line's runs are in-process)."""
    if not any(getattr(h, "_wedbackup_progress", False) for h in LOGGER.handlers):
        handler = logging.StreamHandler(sys.__stderr__)
        handler.setFormatter(logging.Formatter("  %(message)s"))
        handler._wedbackup_progress = True  # type: ignore[attr-defined]
        LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False


@contextlib.contextmanager
def printed_on_stderr(logger: logging.Logger) -> Iterator[None]:
    """While the block runs, `logger`'s INFO lines (a restore's progress) are printed on stderr and not
    passed on; afterwards the logger is as it was."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("  %(message)s"))
    logger.addHandler(handler)
    previous_level, previous_propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        logger.propagate = previous_propagate
