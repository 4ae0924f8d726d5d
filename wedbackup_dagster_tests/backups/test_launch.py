"""Launching in-process runs from the command line (backups/launch.py)."""
import signal

import dagster as dg

from wedbackup_dagster.backups.launch import execute_in_process


@dg.op
def nothing():
    return None


@dg.job
def probe():
    nothing()


def test_an_in_process_run_leaves_sigterm_as_it_found_it():
    """Dagster leaves SIGTERM mapped to SIGINT's handler after an in-process run: ignored in a background
    job, and so in every child started after it. execute_in_process puts it back."""
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    instance = dg.DagsterInstance.ephemeral()
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a shell's background job
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        assert execute_in_process(probe, instance=instance).success
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        # What it guards against is still there to guard against: Dagster alone leaves SIGTERM ignored.
        assert probe.execute_in_process(instance=instance).success
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
        instance.dispose()
