"""The upload steps' one retry policy: its first pause from WEDBACKUP_UPLOAD_RETRY_DELAY, used by the wedding
backups' and the media's replica steps alike."""
from __future__ import annotations

import dagster as dg
import pytest

from wedbackup_dagster.core.errors import ConfigError
from wedbackup_dagster.shared.retry import UPLOAD_RETRY, upload_retry


def test_the_policy_pauses_as_configured_and_doubles(monkeypatch):
    monkeypatch.setenv("WEDBACKUP_UPLOAD_RETRY_DELAY", "3")
    policy = upload_retry()
    assert (policy.max_retries, policy.delay, policy.backoff) == (3, 3.0, dg.Backoff.EXPONENTIAL)
    monkeypatch.setenv("WEDBACKUP_UPLOAD_RETRY_DELAY", "three")
    with pytest.raises(ConfigError, match="WEDBACKUP_UPLOAD_RETRY_DELAY"):
        upload_retry()


def test_every_upload_step_retries_with_the_one_policy():
    from wedbackup_dagster.backups.assets import replicate_to_providers
    from wedbackup_dagster.media.assets import media_assets
    from wedbackup_dagster.media.constants import MEDIA_REPLICA_KEYS

    assert replicate_to_providers.op.retry_policy is UPLOAD_RETRY
    media_replicas = [a for a in media_assets if a.key in set(MEDIA_REPLICA_KEYS.values())]
    assert len(media_replicas) == 3 and all(a.op.retry_policy is UPLOAD_RETRY for a in media_replicas)
