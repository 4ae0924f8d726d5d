"""Launching in-process runs from the command line (backups/launch.py)."""
import subprocess
import sys

_PROBE = """
import signal
import dagster as dg
from wedbackup_dagster.backups.launch import execute_in_process

signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a shell's background job
signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not whatever the test process passed down

@dg.op
def nothing():
    return None

@dg.job
def probe():
    nothing()

instance = dg.DagsterInstance.ephemeral()
assert execute_in_process(probe, instance=instance).success
print("kept", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
assert probe.execute_in_process(instance=instance).success
print("dagster alone", signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)
"""


def test_an_in_process_run_leaves_sigterm_as_it_found_it():
    """Dagster leaves SIGTERM mapped to SIGINT's handler after an in-process run: ignored in a background
    job, and so in every child started after it. execute_in_process puts it back."""
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kept True" in out.stdout
    assert "dagster alone True" in out.stdout  # what it guards against is still there to guard against
