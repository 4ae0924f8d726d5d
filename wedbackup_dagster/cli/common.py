"""What every command group of the command line shares: the Dagster instance runs are recorded in, the
quiet run config, how a list of runs is printed, and the provider replicas the commands read and write."""
from __future__ import annotations



# Dagster's console logger prints every event at DEBUG; the command line shows its own summary instead.
# Every event is still stored in the instance, so the UI shows the runs in full.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def dagster_instance():
    """The instance the UI reads ($DAGSTER_HOME): every command's runs are recorded there."""
    import dagster as dg

    return dg.DagsterInstance.get()


def print_runs(results) -> bool:
    """One line per launched run (and its failures' first lines); True when every run succeeded."""
    ok = True
    for r in results:
        span = r.first if r.first == r.last else f"{r.first}..{r.last}"
        print(f"  run {r.run_id[:8]}  partitions {span:<20} {'ok' if r.success else 'FAILED'}")
        for f in r.failures:
            print(f"      {f.splitlines()[0][:200]}")
        ok = ok and r.success
    return ok


def step_failures(result) -> list[str]:
    """Each failed step's own words in an in-process run's result (our Failure's description, else the error)."""
    texts = []
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            data = event.step_failure_data
            texts.append(data.user_failure_data.description
                         if data.user_failure_data and data.user_failure_data.description
                         else data.error.message.strip() if data.error else "the restore step failed")
    return texts


