"""One small type for "this wedding failed" in a step that goes on with the others, and the text a step
fails with."""
from __future__ import annotations

from wedbackup_dagster.core.errors import ProviderError
from wedbackup_dagster.core.outcomes import WeddingFailure, describe_failures


def test_a_failure_keeps_the_errors_own_words():
    failure = WeddingFailure.of("12", "s3 upload", ProviderError("s3", "bucket b is not reachable"))
    assert failure == WeddingFailure("12", "s3 upload", str(ProviderError("s3", "bucket b is not reachable")))
    assert failure.line() == f"- wedding 12: {failure.message}"
    assert WeddingFailure.of("platform", "backup", RuntimeError()).line() == "- the platform partition: RuntimeError"


def test_a_steps_failure_text_counts_and_lists_in_partition_order():
    failures = [WeddingFailure("7", "verify", "b"), WeddingFailure("12", "verify", "a")]
    assert describe_failures("verified restore", failures, succeeded=3) == (
        "verified restore failed for 2 of 5 partition(s):\n- wedding 12: a\n- wedding 7: b")
