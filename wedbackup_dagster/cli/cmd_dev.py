"""`wedbackup stack …` and `wedbackup demo-data`: the local PostgreSQL and storage stand-ins, and a
deterministic demo wedding-platform database, for development without real providers."""
from __future__ import annotations

import argparse
import json


def cmd_stack(args: argparse.Namespace) -> int:
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


def cmd_demo_data(args: argparse.Namespace) -> int:
    from wedbackup_dagster.dev import demo_data
    from ..core.config import Settings

    settings = Settings.from_env()
    summary = demo_data.generate(settings.source_dsn, weddings=args.weddings, seed=args.seed)
    if args.media:  # wedding media in the stack's media bucket (dev/demo_media.py)
        from ..dev.demo_media import fill_demo_bucket

        summary["media"] = fill_demo_bucket(settings.source_dsn, weddings=args.media, seed=args.seed)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    stack = sub.add_parser("stack", help="the local PostgreSQL and storage stand-ins")
    stack.add_argument("verb", choices=["up", "down", "status", "env"])
    stack.add_argument("--json", action="store_true", help="status as JSON")
    stack.set_defaults(func=cmd_stack)

    demo = sub.add_parser("demo-data", help="create and fill a demo wedding-platform database (deterministic)")
    demo.add_argument("--weddings", type=int, default=200)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--media", type=int, default=0, metavar="N",
                      help="also fill the media bucket with demo photos and documents for N weddings")
    demo.set_defaults(func=cmd_demo_data)
