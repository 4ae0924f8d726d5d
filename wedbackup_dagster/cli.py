"""The `wedbackup` command line: the local stack, demo data, and the backup/restore round trip for people
working without the UI. Backups and restores go through Dagster so every materialization is recorded."""
from __future__ import annotations

import argparse
import json
import sys

from .core.config import load_dotenv_if_present, redact
from .core.errors import WedbackupError


def _cmd_stack(args: argparse.Namespace) -> int:
    from wedbackup_dagster.dev.stack import Stack, export_lines

    stack = Stack.default()
    if args.verb == "up":
        stack.up()
        print(f"stack up (state in {stack.root})")
        for row in stack.status():
            if row["service"] != "dagster":
                print(f"  {row['service']:<9} 127.0.0.1:{row['port']}")
        print('load its settings with:  eval "$(wedbackup stack env)"')
    elif args.verb == "down":
        stack.down()
        print("stack down")
    elif args.verb == "status":
        rows = stack.status()
        if args.json:
            print(json.dumps(rows))
        else:
            print(f"{'service':<10}{'address':<18}{'answering':<11}{'pid (ours)'}")
            for r in rows:
                pid = f"{r['pid']}" if r["ours"] else "-"
                print(f"{r['service']:<10}{'127.0.0.1:' + str(r['port']):<18}{'yes' if r['answering'] else 'no':<11}{pid}")
    elif args.verb == "env":
        print(export_lines(stack.env()))
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from wedbackup_dagster.dev import demo_data
    from .core.config import Settings

    settings = Settings.from_env()
    summary = demo_data.generate(settings.source_dsn, weddings=args.weddings, seed=args.seed)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wedbackup", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    stack = sub.add_parser("stack", help="the local PostgreSQL and storage stand-ins")
    stack.add_argument("verb", choices=["up", "down", "status", "env"])
    stack.add_argument("--json", action="store_true", help="status as JSON")
    stack.set_defaults(func=_cmd_stack)

    demo = sub.add_parser("demo-data", help="create and fill a demo wedding-platform database (deterministic)")
    demo.add_argument("--weddings", type=int, default=200)
    demo.add_argument("--seed", type=int, default=7)
    demo.set_defaults(func=_cmd_demo_data)

    from . import cli_automation, cli_backup, cli_checks, cli_disaster, cli_governance, cli_keys, cli_restore

    cli_backup.register(sub)
    cli_automation.register(sub)
    cli_checks.register(sub)
    cli_restore.register(sub)
    cli_governance.register(sub)
    cli_keys.register(sub)
    cli_disaster.register(sub)
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


if __name__ == "__main__":
    sys.exit(main())
