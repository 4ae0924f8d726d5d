"""Progress lines (wedbackup_dagster/core/progress.py): done of total, rate and ETA, at most every N weddings or
S seconds, always at the end."""
from __future__ import annotations

from wedbackup_dagster.core.progress import Progress


def test_progress_says_done_of_total_rate_and_eta_every_n_weddings_or_seconds_and_at_the_end():
    now = [0.0]
    lines: list[str] = []
    progress = Progress("verified restore", 2000, lines.append, every=500, seconds=30, clock=lambda: now[0])
    for _ in range(499):
        now[0] += 0.01
        progress.step()
    assert lines == []  # neither 500 weddings nor 30 s yet
    now[0] += 0.01
    progress.step()
    assert lines == ["verified restore: 500 of 2,000 weddings (25%), 6,000/min, about 15 s left"]
    now[0] += 40  # a slow wedding: a line after 30 s even without 500 more
    progress.step()
    assert lines[-1].startswith("verified restore: 501 of 2,000 weddings (25%)") and "min" in lines[-1]
    progress.step(1499)
    assert lines[-1].startswith("verified restore: 2,000 of 2,000 weddings (100%)") and "done in 45 s" in lines[-1]
