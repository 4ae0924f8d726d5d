"""`wedbackup verify (--all | --wedding ID … | --older-than DAYS)`: re-verify existing backups through
Dagster (verified_restore and its checks, no new dump), in batched multi-wedding runs; `wedbackup ack`:
acknowledge a wedding's flagged drop in rows (the shrinkage check), or list the open flags."""
from __future__ import annotations

import argparse
import time

from ..backups.verify_selection import select_for_verify
from ..core.errors import WedbackupError
from wedbackup_dagster.core.partitions import shown

DEFAULT_BATCH = 500  # a run's verified_restore loads its weddings into one scratch database per 500


def batches(keys: list[str], ordered: list[str], size: int) -> list[list[str]]:
    """Keys in the partitions' insertion order, cut into runs of at most `size` weddings: a run per batch
    keeps a failure or a retry small, and lets several run workers share a large re-verification."""
    wanted = set(keys)
    in_order = [k for k in ordered if k in wanted]
    return [in_order[i:i + size] for i in range(0, len(in_order), size)]


def reverify(keys: list[str], *, instance, batch_size: int = DEFAULT_BATCH) -> dict:
    """Run reverify_weddings over `keys` in batched runs; for runs that failed, run the checks again so every
    wedding of those runs has its own check results. Returns counts, failures and the runs."""
    from ..backups.launch import run_job_for
    from ..backups.partitions import weddings_partitions
    from ..backups.launch import run_checks_for

    ordered = list(instance.get_dynamic_partitions(weddings_partitions.name))
    from wedbackup_dagster.core.progress import Progress

    started = time.perf_counter()
    results = []
    progress = Progress("re-verification", len(keys), every=1)
    for batch in batches(keys, ordered, max(1, batch_size)):
        results.extend(run_job_for("reverify_weddings", batch, instance=instance))
        progress.step(len(batch))
    seconds = time.perf_counter() - started
    check_results = []
    for r in results:
        if not r.success:
            span = ordered[ordered.index(r.first):ordered.index(r.last) + 1]
            check_results.extend(run_checks_for(span, instance=instance))
    return {"weddings": len(keys), "runs": results, "check_runs": check_results, "seconds": seconds,
            "weddings_per_minute": round(len(keys) / seconds * 60, 1) if seconds and keys else 0.0}


def cmd_verify(args: argparse.Namespace) -> int:
    import dagster as dg

    from ..backups.launch import register_partitions
    from .common import print_runs
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from ..core.config import Settings
    from wedbackup_dagster.core.policy.rules import CheckQueries

    settings = Settings.from_env()
    instance = dg.DagsterInstance.get()
    catalogue = Catalogue(settings.catalogue_dsn)
    catalogue.migrate()
    # An erased wedding's locked leftovers cannot be opened (key destroyed): nothing to verify there.
    erased = catalogue.erased_partitions()
    register_partitions(instance, settings.source_dsn, erased)
    verified = {p: at for p, at in CheckQueries(catalogue).last_verified().items() if p not in erased}
    catalogue.close()
    keys = select_for_verify(verified, all_=args.all, weddings=args.wedding, older_than_days=args.older_than)
    if not keys:
        print("nothing to verify")
        return 0
    print(f"re-verifying {len(keys)} partition(s) through Dagster (verified_restore, no new dump)")
    from wedbackup_dagster.core.progress import show_on_terminal

    show_on_terminal()
    outcome = reverify(keys, instance=instance, batch_size=args.batch_size)
    ok = print_runs(outcome["runs"])
    if outcome["check_runs"]:
        print("checks re-run for the weddings of failed runs:")
        print_runs(outcome["check_runs"])
    print(f"{outcome['weddings']} partition(s) in {len(outcome['runs'])} run(s), {outcome['seconds']:.1f} s, "
          f"{outcome['weddings_per_minute']} per minute")
    return 0 if ok else 1


def cmd_ack(args: argparse.Namespace) -> int:
    from ..backups.shrinkage_ack import acknowledge
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from ..core.config import Settings

    catalogue = Catalogue(Settings.from_env().catalogue_dsn)
    catalogue.migrate()
    try:
        if args.list or not args.wedding:
            if not args.list:
                raise WedbackupError("ack needs --wedding ID (and --by WHO), or --list")
            flags = catalogue.shrinkage_flags(open_only=True)
            for f in flags:
                print(f"  {f['partition']:<10} backup #{f['backup_id']:<6} {f['level'].upper():<5} "
                      f"flagged {f['flagged_at']:%Y-%m-%d %H:%M}  {f['summary']}")
            print(f"{len(flags)} unacknowledged shrinkage flag(s)")
            return 0
        if not args.by:
            raise WedbackupError(f"wedding {shown(args.wedding)}: ack needs --by WHO (recorded in the audit trail)")
        rows = acknowledge(catalogue, args.wedding, by=args.by, backup_id=args.backup, note=args.note)
    finally:
        catalogue.close()
    for r in rows:
        print(f"  acknowledged backup #{r['backup_id']} ({r['level'].upper()}): {r['summary']}")
    print(f"wedding {args.wedding}: {len(rows)} flag(s) acknowledged by {args.by}; retention may now delete the "
          "backups they held")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    verify = sub.add_parser("verify", help="re-verify existing backups (restore and check) without new dumps")
    which = verify.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every partition that has a backup")
    which.add_argument("--wedding", nargs="+", metavar="ID", help="these weddings (or platform)")
    which.add_argument("--older-than", type=float, metavar="DAYS",
                       help="partitions whose newest backup was last verified more than DAYS days ago, or never")
    verify.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, metavar="N",
                        help=f"weddings per Dagster run (default {DEFAULT_BATCH})")
    verify.set_defaults(func=cmd_verify)

    ack = sub.add_parser("ack", help="acknowledge a wedding's flagged drop in rows (shrinkage check) once checked")
    ack.add_argument("--wedding", metavar="ID", help="the wedding whose drop a person checked")
    ack.add_argument("--backup", type=int, metavar="ID",
                     help="only the flag naming this backup id (flagged, baseline or previous); default: all open")
    ack.add_argument("--by", metavar="WHO", help="who checked it (recorded in the audit trail)")
    ack.add_argument("--note", help="why the drop is fine (recorded with the acknowledgement)")
    ack.add_argument("--list", action="store_true", help="list the unacknowledged flags of every wedding")
    ack.set_defaults(func=cmd_ack)
