"""The process the crash tests kill -9: one backup phase of one wedding, run with the engine exactly as a
step would, configured from the environment. Usage:
    python -m wedbackup_dagster_tests.reliability.crashdriver dump|upload|verify|restore WEDDING [TARGET_DSN]
Uploads report progress slowly (a sleep per chunk read) so the test can catch them mid-transfer; the
scratch database prefix comes from CRASH_SCRATCH_PREFIX so the test can find this run's database."""
from __future__ import annotations

import os
import sys
import time

from wedbackup_dagster.core.postgres import load_snapshot as restore
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.storage.replicas import S3Replica, s3_client_from

PART = 5 << 20


class SlowS3Replica(S3Replica):
    """The real S3 replica, multipart at 5 MiB, one part at a time, pausing on each chunk it reads."""

    def __init__(self, client, target):  # noqa: ANN001
        super().__init__(client, target, multipart_threshold=PART, part_size=PART, max_concurrency=1)

    def upload(self, path, **kwargs):  # noqa: ANN001, ANN003
        kwargs["progress"] = lambda n: time.sleep(0.02)
        return super().upload(path, **kwargs)


def main(argv: list[str]) -> int:
    phase, wedding = argv[0], argv[1]
    if os.environ.get("CRASH_SCRATCH_PREFIX"):
        restore.SCRATCH_PREFIX = os.environ["CRASH_SCRATCH_PREFIX"]
    engine = Engine.from_env()
    print(f"phase {phase} wedding {wedding} starting", flush=True)
    if phase == "dump":
        with engine.snapshot_session() as session:
            engine.back_up(wedding, session)
    elif phase == "upload":
        engine.replicate(wedding, SlowS3Replica(s3_client_from(engine.settings.s3, os.environ), engine.settings.s3))
    elif phase == "verify":
        engine.verify(wedding, {}, provider="vault")
    elif phase == "restore":
        engine.restore_to(wedding, argv[2], {}, provider="vault")
    else:
        raise SystemExit(f"unknown phase {phase!r}")
    print(f"phase {phase} wedding {wedding} finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
