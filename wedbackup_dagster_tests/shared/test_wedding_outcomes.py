"""One model of "this wedding failed": what a step records per wedding and how it fails naming them."""
from __future__ import annotations

import dagster as dg
import pytest

from wedbackup_dagster.core.errors import WedbackupError
from wedbackup_dagster.shared.wedding_outcomes import WeddingOutcomes, failure_of_steps

KEY = dg.AssetKey("db_dump")


class Log:
    def __init__(self):
        self.errors: list[str] = []

    def error(self, message: str) -> None:
        self.errors.append(message)


class Context:
    def __init__(self):
        self.log = Log()


def test_a_step_records_successes_with_their_metadata_and_names_each_failure():
    context = Context()
    outcomes = WeddingOutcomes("backup")
    outcomes.record(context, "1", {"rows": 3}, lambda o: {KEY: {"rows": o["rows"]}})
    outcomes.record(context, "2", WedbackupError("wedding 2: deleted meanwhile"), lambda o: {KEY: {}})
    outcomes.fail_the_rest(context, ["1", "2", "3"], WedbackupError("source connection lost"))
    assert outcomes.ok == ["1"] and outcomes.as_step() == {
        "ok": ["1"], "failed": {"2": "wedding 2: deleted meanwhile", "3": "source connection lost"}}
    assert context.log.errors == ["wedding 2: deleted meanwhile", "source connection lost"]
    [materialization] = outcomes.materializations()
    assert (materialization.asset_key, materialization.partition) == (KEY, "1")
    failure = outcomes.failure()
    assert failure.description == ("backup failed for 2 of 3 partition(s):\n- wedding 2: wedding 2: deleted "
                                   "meanwhile\n- wedding 3: source connection lost")


def test_the_list_pipeline_fails_naming_every_step_and_wedding_or_not_at_all():
    assert failure_of_steps([("backup", {"ok": ["1"], "failed": {}})]) is None
    failure = failure_of_steps([("backup", {"ok": [], "failed": {"2": "gone"}}),
                                ("s3", {"ok": ["1"], "failed": {"1": "refused"}})])
    assert failure.description == "2 step(s) failed for the listed weddings:\n- backup 2: gone\n- s3 1: refused"
    with pytest.raises(dg.Failure):
        raise failure
