"""The `wedbackup` command line: the local stack, demo data, and the backup/restore round trip for people
working without the UI. Backups and restores go through Dagster so every materialization is recorded."""
from __future__ import annotations

import argparse
import sys

from ..core.config import load_dotenv_if_present, redact
from ..core.errors import WedbackupError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wedbackup", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from . import (cmd_backup, cmd_catalogue, cmd_changes, cmd_checks, cmd_dev, cmd_disaster, cmd_governance,
                   cmd_health, cmd_keys, cmd_media, cmd_restore)

    # In this order in `wedbackup --help`.
    for group in (cmd_dev, cmd_backup, cmd_catalogue, cmd_health, cmd_checks, cmd_restore, cmd_governance,
                  cmd_keys, cmd_disaster, cmd_changes, cmd_media):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    # Dagster flags the beta/preview APIs we rely on (backfill policies, partitioned checks) on every load.
    warnings.filterwarnings("ignore", message=r".*(beta|preview).*", module=r"dagster.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"dagster.*")
    load_dotenv_if_present()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except WedbackupError as exc:
        print(f"wedbackup: {redact(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`wedbackup stack status | head`): end quietly, as `ls | head` does, with
        # stdout pointed at /dev/null so the interpreter's own flush at exit does not raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command a closed pipe ended


if __name__ == "__main__":
    sys.exit(main())
