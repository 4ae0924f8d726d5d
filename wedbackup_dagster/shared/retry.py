"""The upload steps' retry policy, one for the wedding backups' replica steps and the media replica steps: a
provider hiccup is retried with growing pauses (WEDBACKUP_UPLOAD_RETRY_DELAY, then twice that, and twice again,
with jitter). Uploads are content-addressed, so a retry after a partial success is a no-op for the weddings
already uploaded."""
from __future__ import annotations

import dagster as dg

from ..core.config import upload_retry_delay_from


def upload_retry() -> dg.RetryPolicy:
    """Read when the code location loads: a malformed delay is a ConfigError naming the variable."""
    return dg.RetryPolicy(max_retries=3, delay=upload_retry_delay_from(), backoff=dg.Backoff.EXPONENTIAL,
                          jitter=dg.Jitter.PLUS_MINUS)


UPLOAD_RETRY = upload_retry()
