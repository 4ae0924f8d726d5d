"""`wedbackup restore --all` (the whole platform into an empty database, through the `restore_platform` Dagster
job, resumable), `wedbackup dr plan` (the runbook of a disaster scenario from the catalogue's state),
`wedbackup dr kit` (the master-key recovery kit's sheet, and a check of a kit's key file; never a key) and
`wedbackup dr pack` (a DR pack built from the vault and published at the providers, core/disaster/pack_build.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..core.errors import WedbackupError
from wedbackup_dagster.core.progress import printed_on_stderr


def cmd_restore_all(args: argparse.Namespace) -> int:
    from ..backups.restore_job import TARGET_DSN_VARIABLE, progress_logger
    from .common import QUIET, dagster_instance, step_failures
    from wedbackup_dagster.core import disaster
    from wedbackup_dagster.core.postgres import restore_wedding as recovery
    from ..core.config import Settings, redact

    if not args.target_dsn:
        raise WedbackupError("restore --all needs the empty database to restore into: --target-dsn DSN")
    if args.in_place or args.into_schema or args.dry_run:
        raise WedbackupError("restore --all writes a whole platform into a new database: it goes without "
                             "--in-place, --into-schema and --dry-run (see `wedbackup dr plan` for what it would use)")
    if args.jobs < 1:
        raise WedbackupError(f"--jobs {args.jobs}: at least 1")
    Settings.from_env()
    if args.as_of:
        recovery.parse_as_of(args.as_of)  # a bad time stops here, before a run is made
    disaster.copy_order(args.source)
    config = {"jobs": args.jobs, "resume": bool(args.resume), "include_unverified": bool(args.include_unverified)}
    if args.as_of:
        config["as_of"] = args.as_of
    if args.source:
        config["copy_from"] = args.source
    if args.no_packs:
        config["packs"] = False
    os.environ[TARGET_DSN_VARIABLE] = args.target_dsn  # read by the op; never put in the run config
    from ..backups.launch import execute_in_process
    from ..definitions import defs

    job = defs.resolve_job_def("restore_platform")
    # Progress on stderr as the run goes; the run's own log (the UI) has the same lines.
    with printed_on_stderr(progress_logger):
        result = execute_in_process(job, instance=dagster_instance(), raise_on_error=False,
                                    tags={"wedbackup/restore_mode": "all"},
                                    run_config={**QUIET, "ops": {"restore_all_partitions": {"config": config}}})
    if result.success:
        report = result.output_for_node("restore_all_partitions")
        if args.json:
            print(redact(json.dumps(report, indent=2, default=str)))
        else:
            print(redact("\n".join(disaster.PlatformReport(**report).lines())))
        return 0 if report["complete"] else 1
    for text in step_failures(result):
        print(redact(f"restore --all failed: {text}"), file=sys.stderr)
    return 1


def cmd_dr_plan(args: argparse.Namespace) -> int:
    from ..core import disaster
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from ..core.config import Settings

    disaster.parse_scenario(args.scenario)  # a bad scenario stops here, before any database is read
    catalogue = Catalogue(Settings.from_env().catalogue_dsn)
    try:
        catalogue.migrate()
        plan = disaster.recovery_plan(catalogue, args.scenario, jobs=args.jobs)
    finally:
        catalogue.close()
    print(json.dumps(plan.to_dict(), indent=2, default=str) if args.json else "\n".join(plan.lines()))
    return 1 if plan.missing else 0


def cmd_dr_kit(args: argparse.Namespace) -> int:
    from ..core import disaster
    from ..core.config import Settings

    settings = Settings.from_env()
    if args.check:
        from ..core.storage.providers import replica_for

        if not args.provider:
            raise WedbackupError("dr kit --check FILE needs the provider holding the key-store backups: "
                                 "--from s3|gcs|azure")
        result = disaster.check_kit_key_file(args.check, replica_for(args.provider, settings))
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            keys = ", ".join(f"{k['id']} (fingerprint {k['fingerprint']})" for k in result["master_keys"])
            print(f"key file {result['key_file']}: master key(s) {keys} open the newest key-store backup at "
                  f"{result['provider']} ({result['key_backup'][:12]}, sealed by {result['sealed_by']}, "
                  f"{result['wedding_keys']} wedding key(s), made {result['created_at']})")
        return 0
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from wedbackup_dagster.core.keys.keyring import load_master_keyring

    catalogue = Catalogue(settings.catalogue_dsn)
    try:
        catalogue.migrate()
        sheet = disaster.kit_sheet(load_master_keyring(os.environ), catalogue, settings)
    finally:
        catalogue.close()
    if args.json:
        print(json.dumps(sheet, indent=2))
        return 0
    print("recovery kit sheet (no secret here: keep it with the sealed copy of the master key file)")
    for k in sheet["master_keys"]:
        print(f"  master key {k['id']}{' (current)' if k['current'] else ''}: fingerprint {k['fingerprint']}")
    newest = sheet["newest_key_backup"]
    print("  newest key-store backup: " + ("none: run `wedbackup keys backup`" if newest is None else
          f"{newest['sha256'][:12]} sealed by {newest['sealed_by']}, {newest['wedding_keys']} wedding key(s), "
          f"{newest['created_at']}, copies at {', '.join(newest['copies'])}"))
    for where, what in sheet["locations"].items():
        print(f"  {where}: {what}")
    print("  to recover:")
    for step in sheet["recover"]:
        print(f"    {step}")
    return 0


def cmd_dr_pack(args: argparse.Namespace) -> int:
    from ..core.config import Settings, redact
    from ..core.disaster import pack_build
    from ..core.engine import Engine
    from ..core.storage.providers import PROVIDERS, replica_for
    from wedbackup_dagster.core.keys.keyring import load_master_keyring

    settings = Settings.from_env()
    wanted = set(args.to or PROVIDERS)
    engine = Engine(settings, load_master_keyring(os.environ))
    try:
        replicas = {p: replica_for(p, settings) for p in PROVIDERS if p in wanted}
        # Progress on stderr as the build goes; the report on stdout.
        report = pack_build.build_pack(engine, replicas, progress=lambda line: print(redact(line), file=sys.stderr))
    finally:
        engine.catalogue.close()
    print(redact(json.dumps(report.to_dict(), indent=2, default=str) if args.json else "\n".join(report.lines())))
    return 0 if report.ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    dr = sub.add_parser("dr", help="disaster recovery: runbooks per scenario, the recovery kit, DR packs (the "
                                   "restore is `restore --all`)")
    verbs = dr.add_subparsers(dest="verb", required=True)
    plan = verbs.add_parser("plan", help="the runbook of a disaster scenario, from the catalogue's actual state")
    plan.add_argument("--scenario", required=True, metavar="SCENARIO",
                      help="source-lost | vault-lost | catalogue-lost | provider-lost:NAME (s3, gcs, azure)")
    plan.add_argument("--jobs", type=int, default=4, metavar="N", help="workers the estimate assumes")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_dr_plan)
    kit = verbs.add_parser("kit", help="the master-key recovery kit: its sheet (ids, fingerprints, locations), or "
                                       "--check a kit's key file against a provider's key-store backup")
    kit.add_argument("--check", metavar="FILE", help="a master key file (the kit's copy) to prove")
    kit.add_argument("--from", dest="provider", choices=["s3", "gcs", "azure"],
                     help="with --check: the provider whose newest key-store backup it must open")
    kit.add_argument("--json", action="store_true")
    kit.set_defaults(func=cmd_dr_kit)
    pack = verbs.add_parser("pack", help="build a DR pack (every wedding's newest verified archive, a few large "
                                         "objects per provider) from the vault and publish it; exit 1 when a "
                                         "provider did not get it")
    pack.add_argument("--to", action="append", choices=["s3", "gcs", "azure"], metavar="PROVIDER",
                      help="s3, gcs or azure; repeat for several (default: every provider)")
    pack.add_argument("--json", action="store_true")
    pack.set_defaults(func=cmd_dr_pack)
