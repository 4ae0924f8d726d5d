"""`wedbackup changes …`: the change feed from the command line — check a source, start and stop the feed,
run one drain pass (for scripts and tests), copy segments to the providers, and show the slot, the lag and
each wedding's newest captured change. Restoring to a second is `wedbackup restore --as-of`."""
from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from typing import Any

from wedbackup_dagster.core.storage.providers import PROVIDERS, replica_for


def _feed():
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from wedbackup_dagster.core.changefeed.drain import ChangeFeed
    from wedbackup_dagster.core.changefeed.slot import slot_from_env
    from wedbackup_dagster.core.config import Settings
    from wedbackup_dagster.core.keys.keyring import load_master_keyring

    settings = Settings.from_env()
    feed = ChangeFeed.from_settings(settings, load_master_keyring(os.environ), Catalogue(settings.catalogue_dsn),
                                    slot=slot_from_env(os.environ))
    return settings, feed


def _json(obj) -> str:
    return json.dumps(obj, indent=2, default=str)


def cmd_check(args: argparse.Namespace) -> int:
    import psycopg

    from wedbackup_dagster.core.postgres import tenancy
    from wedbackup_dagster.core.changefeed.slot import check_source
    from wedbackup_dagster.core.config import Settings

    settings = Settings.from_env()
    with psycopg.connect(settings.source_dsn, autocommit=True) as conn:
        check = check_source(conn, tenancy.discover(conn))
    if args.json:
        print(_json(check.to_dict()))
    else:
        print("change feed source check: " + ("ready" if check.ok else "NOT ready"))
        for p in check.problems:
            print(f"  MISSING  {p}")
        for w in check.warnings:
            print(f"  warning  {w}")
        for t in check.tables:
            print(f"  {t['table']:<32} replica identity {t['replica_identity']:<8} routed by {t['routed_by']}")
    return 0 if check.ok else 1


def cmd_start(args: argparse.Namespace) -> int:
    _, feed = _feed()
    print(_json(feed.start()))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    _, feed = _feed()
    print(f"slot {feed.slot}: " + ("dropped" if feed.stop() else "was not there"))
    return 0


def _stop_on_sigterm() -> Any:
    """An event set by SIGTERM (and SIGINT), for a long-running drainer: the pass under way finishes, then the
    loop ends; the event's `signal_name` says which signal set it. Installed explicitly because an inherited
    disposition cannot be trusted: a process started with SIGINT ignored (a shell's background job) that ran
    Dagster in-process without backups/launch.execute_in_process has SIGTERM ignored too (Dagster maps SIGTERM
    to SIGINT's handler, dagster/_utils/interrupts.py), and its children inherit that."""
    import signal
    import threading

    stop = threading.Event()
    stop.signal_name = ""  # type: ignore[attr-defined]

    def handler(signum: int, _frame: Any) -> None:
        stop.signal_name = signal.Signals(signum).name  # type: ignore[attr-defined]
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def cmd_drain(args: argparse.Namespace) -> int:
    import time

    _, feed = _feed()
    stop = _stop_on_sigterm() if args.follow else None
    while True:
        started = time.monotonic()
        result = feed.drain()
        if args.json:
            print(_json(result.to_dict()))
        else:
            print(f"drained {result.transactions:,} transaction(s), {result.changes:,} change(s) into "
                  f"{len(result.segments)} segment(s) in {result.seconds:.2f} s; captured up to "
                  f"{result.covered_until.isoformat() if result.covered_until else '-'}; slot lag "
                  f"{result.lag_bytes or 0:,} bytes")
            for b in result.barriers:
                print(f"  barrier: wedding {b['partition'] or 'ALL'} at {b['at']}: {b['reason']}")
            if result.erased:
                print(f"  not sealed (erased): {', '.join(result.erased)}")
        if stop is not None:  # --follow: a long-running drainer, one pass every --follow seconds (lag in seconds)
            if not result.more:
                stop.wait(max(0.0, args.follow - (time.monotonic() - started)))
            if stop.is_set():
                print(f"stopped ({stop.signal_name}): the last pass was finished and sealed")
                return 0
            continue
        if not (args.until_caught_up and result.more):
            return 0


def cmd_replicate(args: argparse.Namespace) -> int:
    settings, feed = _feed()
    failed = 0
    for provider in PROVIDERS:
        if args.provider not in (None, provider):
            continue
        out = feed.replicate(replica_for(provider, settings))
        print(f"{provider}: {out['uploaded']} segment(s) uploaded" + (f", {len(out['failed'])} failed" if out["failed"]
                                                                      else ""))
        failed += len(out["failed"])
    return 1 if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    _, feed = _feed()
    status = feed.status()
    if args.json:
        print(_json(status))
        return 0
    state, live = status["slot_state"], status["feed"]
    now = datetime.now(timezone.utc)
    if state is None:
        hint = (" (the feed is recorded: it was dropped; run `wedbackup changes drain` to record the gap, then "
                "`changes start`)" if live else "")
        print(f"slot {feed.slot}: NOT on the source{hint}")
    else:
        print(f"slot {feed.slot}: {state['wal_status']}, lag {state['lag_bytes'] or 0:,} bytes, retained WAL "
              f"{state['retained_bytes'] or 0:,} bytes, safe WAL size {state['safe_wal_size']}")
    if live:
        behind = (now - live["covered_until"]).total_seconds()
        print(f"captured up to {live['covered_until'].isoformat()} ({behind:.0f} s ago)")
    print(f"  {'wedding':<12}{'newest change (UTC)':<34}{'segments':>9}{'changes':>9}")
    for w in status["weddings"]:
        print(f"  {w['partition']:<12}{w['newest_commit'].isoformat():<34}{w['segments']:>9}{w['changes']:>9}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    changes = sub.add_parser("changes", help="the change feed: restore any wedding to any second (docs/CHANGEFEED.md)")
    verbs = changes.add_subparsers(dest="verb", required=True)
    check = verbs.add_parser("check", help="what the source lacks for the change feed (exit 1 when something)")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_check)
    verbs.add_parser("start", help="create the slot and publication and seed the routing map").set_defaults(
        func=cmd_start)
    verbs.add_parser("stop", help="drop the slot and publication (coverage ends at the last drain)").set_defaults(
        func=cmd_stop)
    drain = verbs.add_parser("drain", help="one drain pass: seal the captured changes, then advance the slot")
    drain.add_argument("--json", action="store_true")
    drain.add_argument("--until-caught-up", action="store_true", help="drain again while a pass was cut short")
    drain.add_argument("--follow", type=float, metavar="SECONDS",
                       help="keep draining, one pass every SECONDS (a long-running process; stop it with SIGTERM)")
    drain.set_defaults(func=cmd_drain)
    rep = verbs.add_parser("replicate", help="copy sealed segments to the providers that lack them")
    rep.add_argument("--provider", choices=PROVIDERS)
    rep.set_defaults(func=cmd_replicate)
    status = verbs.add_parser("status", help="the slot, the lag and each wedding's newest captured change")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
