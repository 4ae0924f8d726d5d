"""`wedbackup restore` and `wedbackup points`: restore a wedding as of a time (into another database, into a
new schema to inspect, or in place; dry-run first) through the `restore_wedding` Dagster job, and list the
recovery points the catalogue holds for it."""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timezone

from ..core.errors import WedbackupError
from wedbackup_dagster.core.progress import printed_on_stderr
from wedbackup_dagster.core.partitions import PLATFORM


def _partition(args: argparse.Namespace) -> str:
    """The partition asked for; a wedding id that is not one is refused before any database or Dagster."""
    from wedbackup_dagster.core.partitions import check_partition

    return PLATFORM if args.platform else check_partition(args.wedding)


def _refuse_other_spelling(catalogue, partition: str) -> None:
    """A wedding id with no backups of its own that the catalogue records under another spelling ("02" for
    2): one wedding has one partition, so say which name to use instead of finding nothing."""
    from wedbackup_dagster.core.partitions import other_spellings

    pattern = other_spellings(partition)
    if pattern is None:
        return
    with catalogue.connect() as conn:
        names = [r["partition"] for r in conn.execute(
            "SELECT DISTINCT partition FROM wedbackup.backups WHERE partition ~ %s ORDER BY 1", (pattern,))]
    if names and partition not in names:
        raise WedbackupError(f"wedding {partition!r} is recorded as wedding {names[0]!r} (the source's spelling of "
                             f"its key): use --wedding {names[0]}")


def cmd_points(args: argparse.Namespace) -> int:
    from wedbackup_dagster.core.postgres import restore_wedding as recovery
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from ..core.config import Settings

    partition = _partition(args)  # a hostile id stops here, before any setting or database is read
    settings = Settings.from_env()
    catalogue = Catalogue(settings.catalogue_dsn)
    try:
        catalogue.migrate()
        _refuse_other_spelling(catalogue, partition)
        points = recovery.recovery_points(catalogue, partition)
        from ..core.changefeed.replay import continuous_ranges  # the change feed's reach past each snapshot

        ranges = continuous_ranges(catalogue, partition, points)
    finally:
        catalogue.close()
    if args.json:
        print(json.dumps([p.to_dict() for p in points], indent=2))
        return 0
    label = "the platform partition" if partition == PLATFORM else f"wedding {partition}"
    if not points:
        print(f"{label}: no recovery points (no backup in the catalogue)")
        return 1
    print(f"recovery points of {label}, newest first")
    print(f"  {'snapshot time (UTC)':<27}{'sha256':<14}{'size':>10}{'rows':>9}  {'copies':<22}verified")
    for p in points:
        when = p.snapshot_time.astimezone(timezone.utc).isoformat(timespec="seconds")
        verified = f"yes ({p.verified_at.astimezone(timezone.utc):%Y-%m-%d %H:%M})" if p.verified else "no"
        print(f"  {when:<27}{p.archive_sha256[:12]:<14}{p.size:>10,}{p.rows:>9,}  {','.join(p.copies):<22}{verified}")
        if p.archive_sha256 in ranges:
            start, end, why = ranges[p.archive_sha256]
            print(f"    + change feed: any second from {start.astimezone(timezone.utc).isoformat(timespec='seconds')} "
                  f"to {end.astimezone(timezone.utc).isoformat(timespec='seconds')} ({why})")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from ..backups.restore_job import TARGET_DSN_VARIABLE, progress_logger
    from .common import QUIET, dagster_instance, step_failures
    from wedbackup_dagster.core.postgres import restore_wedding as recovery
    from ..core.config import Settings, redact

    from wedbackup_dagster.core.catalogue.store import Catalogue

    partition = _partition(args)  # a hostile id stops here, before any setting or database is read
    settings = Settings.from_env()
    recovery.parse_as_of(args.as_of)  # a bad time stops here, before a run is made
    catalogue = Catalogue(settings.catalogue_dsn)
    try:
        catalogue.migrate()
        _refuse_other_spelling(catalogue, partition)
    finally:
        catalogue.close()
    if args.in_place:
        mode = "in_place"
        if partition == PLATFORM:
            raise WedbackupError("--in-place replaces one wedding's rows; restore the platform partition "
                                 "--into-schema NAME or --target-dsn DSN instead")
    elif args.into_schema:
        mode = "schema"
    else:
        mode = "target"
    config: dict = {"partition": partition, "mode": mode, "dry_run": bool(args.dry_run),
                    "include_unverified": bool(args.include_unverified)}
    if args.as_of:
        config["as_of"] = args.as_of
    if args.into_schema:
        config["schema_name"] = args.into_schema
        config["schema_in_target"] = bool(args.target_dsn)
    if args.source:
        config["provider"] = args.source
    if args.lock_timeout is not None:
        config["lock_timeout_seconds"] = float(args.lock_timeout)
    if args.skip_moved_rows:
        config["skip_moved_rows"] = True
    if args.target_dsn:
        os.environ[TARGET_DSN_VARIABLE] = args.target_dsn  # read by the op; never put in the run config
    from ..backups.launch import execute_in_process
    from ..definitions import defs

    job = defs.resolve_job_def("restore_wedding")
    # Progress on stderr as the run goes; the run's own log (the UI) has the same lines.
    with printed_on_stderr(progress_logger):
        result = execute_in_process(
            job, instance=dagster_instance(), raise_on_error=False,
            tags={"wedbackup/restore_mode": mode, "wedbackup/dry_run": str(bool(args.dry_run)).lower()},
            run_config={**QUIET, "ops": {"restore_partition": {"config": config}}})
    if result.success:
        report = result.output_for_node("restore_partition")
        if args.json:
            print(json.dumps(report, indent=2, default=str))
        else:
            done = f"dry run: nothing written for {partition}" if args.dry_run else f"restored {partition}"
            print(f"{done} (run {result.run_id[:8]})")
            print(_report_lines(report))
        return 0
    for text in step_failures(result):
        print(redact(f"restore failed: {text}"), file=sys.stderr)
    return 1


def _report_lines(report: dict) -> str:
    from wedbackup_dagster.core.postgres.restore_wedding import RecoveryReport

    return "\n".join(RecoveryReport.from_dict(report).lines())


def register(sub: argparse._SubParsersAction) -> None:
    restore = sub.add_parser("restore", help="restore a wedding (or the platform) as of a time, through Dagster",
                             description="Restore the newest verified backup at or before --as-of: into another "
                                         "database, into a new schema to inspect, or in place in the live database.")
    which = restore.add_mutually_exclusive_group(required=True)
    which.add_argument("--wedding", metavar="ID")
    which.add_argument("--platform", action="store_true", help="the platform partition (not --in-place)")
    which.add_argument("--all", action="store_true",
                       help="disaster recovery: the platform and every wedding into an empty --target-dsn "
                            "(see cli/cmd_disaster.py: --jobs, --resume)")
    restore.add_argument("--jobs", type=int, default=4, metavar="N", help="--all: weddings restored at once")
    restore.add_argument("--no-packs", action="store_true",
                         help="--all: read every wedding from its own object, not from the provider's DR pack")
    restore.add_argument("--resume", action="store_true",
                         help="--all: finish an interrupted restore --all in the same target")
    restore.add_argument("--as-of", metavar="TIME",
                         help="ISO 8601 time with timezone, e.g. 2026-11-30T18:00:00+00:00 (default: now)")
    restore.add_argument("--target-dsn", metavar="DSN",
                         help="restore into another database (with --into-schema: make the schema there)")
    restore.add_argument("--into-schema", metavar="NAME",
                         help="restore into a new schema NAME (of the source database, or of --target-dsn), "
                              "to inspect")
    restore.add_argument("--in-place", action="store_true",
                         help="replace the wedding's rows in the live source database, in one transaction")
    restore.add_argument("--dry-run", action="store_true",
                         help="print per table the rows to add, remove and change; write nothing")
    restore.add_argument("--from", dest="source", choices=["vault", "s3", "gcs", "azure"],
                         help="which copy to restore (default: the vault)")
    restore.add_argument("--include-unverified", action="store_true",
                         help="also consider backups that no restore has verified yet")
    restore.add_argument("--lock-timeout", type=float, metavar="SECONDS",
                         help="--in-place: how long to wait for one of the wedding's rows to be free (default 30)")
    restore.add_argument("--skip-moved-rows", action="store_true",
                         help="--in-place: rows of the wedding's state that another wedding holds now are left "
                              "there (listed) instead of refusing the restore")
    restore.add_argument("--json", action="store_true", help="the report as JSON")
    restore.set_defaults(func=_restore_entry)

    points = sub.add_parser("points", help="list a wedding's recovery points (backups), newest first")
    which = points.add_mutually_exclusive_group(required=True)
    which.add_argument("--wedding", metavar="ID")
    which.add_argument("--platform", action="store_true")
    points.add_argument("--json", action="store_true")
    points.set_defaults(func=cmd_points)


def _restore_entry(args: argparse.Namespace) -> int:
    if args.all:
        from .cmd_disaster import cmd_restore_all

        return cmd_restore_all(args)
    if args.in_place and (args.target_dsn or args.into_schema):
        raise WedbackupError("--in-place restores into the live source database: it goes without --target-dsn "
                             "and --into-schema")
    if not (args.in_place or args.target_dsn or args.into_schema):
        raise WedbackupError("say where to restore: --target-dsn DSN, --into-schema NAME or --in-place")
    return cmd_restore(args)
