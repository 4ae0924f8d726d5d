"""One benchmark part in a new Python process, as a user's command starts (`wedbackup backup --all`,
`wedbackup verify`, `wedbackup restore --all`): `make bench` does not time wedbackup inside its own
long-lived process after the parts before it, with their heap, code location and fork server still there.
Measured on 2026-12-06 (README, Benchmarks, seventh session), within the hour: the fleet's whole job took
162.8 s inside the bench's process and 85.8 s in a new one; re-verification ran at 2,421 and 5,666 weddings
a minute. The demo's whole job and restore --all showed no such difference. Their peers (pg_dump, psql)
run in other processes either way.

The part's module is run with `python -m benchmarks.<part> ARGS --json-out FILE`; its figures come back
through that file, so nothing it prints can garble them."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_part(part: str, *args: str) -> dict[str, Any]:
    """`benchmarks.<part>`'s figures, measured in a new process (its stderr passes through)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{part}-") as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, "-m", f"benchmarks.{part}", *args, "--json-out", str(out)], check=True,
                       cwd=ROOT, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def write_result(result: dict[str, Any], json_out: str | None) -> None:
    """A part's `main`: its figures to `--json-out` when given, and to stdout as before."""
    if json_out:
        Path(json_out).write_text(json.dumps(result, default=str))
    print(json.dumps(result, indent=2, default=str))
