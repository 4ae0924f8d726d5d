"""`wedbackup erase` (GDPR erasure of one wedding's backups) and `wedbackup prune` (retention): both run
through Dagster like `wedbackup backup`, so each is a recorded run; `erase` without --confirm and
`prune --dry-run` only say what would be destroyed."""
from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from .common import QUIET, dagster_instance
from ..core.config import redact


def _step_metadata(result) -> dict:
    for event in result.all_events:
        if event.event_type_value == "STEP_OUTPUT":
            return {k: getattr(v, "value", v) for k, v in event.event_specific_data.metadata.items()}
    return {}


def _print_failures(result, what: str) -> None:
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            data = event.step_failure_data
            if data.user_failure_data and data.user_failure_data.description:
                text = data.user_failure_data.description
            elif data.error:
                error = data.error
                while error.cause is not None:  # Dagster wraps our error: its own words are innermost
                    error = error.cause
                text = error.message.strip()
            else:
                text = event.message or "step failed"
            print(redact(f"{what} failed: {text}"), file=sys.stderr)



def _run_job(job_name: str, op_name: str, config: dict[str, Any], what: str):
    """Run a one-op job in-process in the instance the UI reads: (result, the op's output metadata), or
    None after printing each failing step's message (redacted)."""
    from ..backups.launch import execute_in_process
    from ..definitions import defs

    result = execute_in_process(
        defs.resolve_job_def(job_name), instance=dagster_instance(), raise_on_error=False,
        run_config={**QUIET, "ops": {op_name: {"config": config}}})
    if not result.success:
        _print_failures(result, what)
        return None
    return result, _step_metadata(result)

def cmd_erase(args: argparse.Namespace) -> int:
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from ..core.config import Settings
    from wedbackup_dagster.core.governance.erasure import erasure_preview

    settings = Settings.from_env()
    catalogue = Catalogue(settings.catalogue_dsn)
    catalogue.migrate()
    preview = erasure_preview(catalogue, args.wedding)
    copies = ", ".join(f"{p} {n}" for p, n in sorted(preview["copies"].items())) or "none"
    print(f"wedding {args.wedding}: destroys {preview['live_keys']} live key(s); deletes {preview['backups']} "
          f"backup(s), copies: {copies}; any stray object under the wedding's folder at every provider; every "
          f"DR pack naming it; its Dagster partition. Copies under Object Lock stay, unreadable.")
    if preview["already_erased_at"]:
        print(f"  already erased at {preview['already_erased_at']:%Y-%m-%d %H:%M}: running again completes it")
    if not args.confirm:
        print("refusing without --confirm (this cannot be undone)", file=sys.stderr)
        return 1
    config = {"partition": args.wedding, "requested_by": args.requested_by or getpass.getuser()}
    ran = _run_job("erase_wedding", "erase_wedding_backups", config, "erasure")
    if ran is None:
        return 1
    result, meta = ran
    print(f"erased wedding {args.wedding} (run {result.run_id[:8]}): {meta.get('keys_shredded')} key(s) destroyed, "
          f"{meta.get('copies_deleted')} copies deleted, {meta.get('copies_locked')} locked")
    if meta.get("dr_pack_objects_deleted"):
        print(f"  DR pack objects naming it deleted: {meta['dr_pack_objects_deleted']} (speed copies, not counted "
              f"as copies; the next pack holds the other weddings again)")
    for line in meta.get("locked") or []:
        print(f"  locked, unreadable (key destroyed): {line}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from wedbackup_dagster.core.governance import retention
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from ..core.config import Settings
    from wedbackup_dagster.core.policy.backup_policy import Policy

    settings = Settings.from_env()
    if args.dry_run:
        catalogue = Catalogue(settings.catalogue_dsn)
        catalogue.migrate()
        policy = Policy.from_env()
        report = retention.prune(catalogue, None, {}, policy, dry_run=True, partition=args.wedding)
        media = _media_dry_run(settings, catalogue, policy, args.wedding)
        if args.json:
            print(json.dumps({"summary": report.summary(), "delete": [d.as_dict() for d in report.deletions],
                              "held": report.held, "media": media.summary(),
                              "media_delete": [{"partition": r.partition, "snapshots": r.deleted_snapshots,
                                                "packs": r.deleted_packs} for r in media.reports],
                              "media_failures": media.failed}, default=str))
            return 0
        for d in report.deletions:
            print(f"  would delete {d.partition:<10} {d.snapshot_time:%Y-%m-%d %H:%M}  {d.archive_sha256[:12]}  "
                  f"{d.reason}")
        for h in report.held:
            print(f"  keeps        {h['partition']:<10} {h['snapshot_time']:%Y-%m-%d %H:%M}  backup #{h['backup_id']}  "
                  f"{h['reason']}")
        print(f"dry run: {len(report.deletions)} backup(s) to delete, {report.kept} kept")
        m = media.summary()
        for r in media.reports:
            if r.deleted_snapshots or r.deleted_packs or r.repacked:
                print(f"  media {r.partition:<10} would delete {len(r.deleted_snapshots)} snapshot(s) and "
                      f"{len(r.deleted_packs)} pack(s), {r.freed_bytes / 1e6:.1f} MB; would repack {len(r.repacked)}")
        print(f"media: {m['media_snapshots_deleted']} snapshot(s) and {m['media_packs_deleted']} pack(s) to delete, "
              f"{m['media_packs_repacked']} to repack, {m['media_snapshots_kept']} snapshot(s) kept")
        for f in media.failed[:10]:
            print(f"  media FAILED {f}")
        return 0
    ran = _run_job("retention_sweep", "prune_backups", {"dry_run": False, "partition": args.wedding}, "prune")
    if ran is None:
        return 1
    result, meta = ran
    print(f"pruned (run {result.run_id[:8]}): {meta.get('deleted')} backup(s) deleted, {meta.get('kept')} kept, "
          f"{meta.get('copies_locked')} locked copies left")
    print(f"media: {meta.get('media_snapshots_deleted')} snapshot(s) and {meta.get('media_packs_deleted')} pack(s) "
          f"deleted, {meta.get('media_packs_repacked')} repacked ({(meta.get('media_bytes_freed') or 0) / 1e6:.1f} MB "
          f"freed), {meta.get('media_snapshots_kept')} snapshot(s) kept")
    for line in meta.get("held") or []:
        print(f"  held: {line}")
    for line in meta.get("locked") or []:
        print(f"  locked: {line}")
    return 0


def _media_dry_run(settings, catalogue, policy, partition: str | None):
    """What the sweep would do to media (the same rules as the daily retention_sweep), deleting nothing; on
    the settings and catalogue connection the rows' plan already uses."""
    import os

    from wedbackup_dagster.core.engine import Engine
    from wedbackup_dagster.core.keys.keyring import load_master_keyring
    from wedbackup_dagster.core.media.retention import sweep_engine_media
    from wedbackup_dagster.core.storage.providers import PROVIDERS, replica_for

    engine = Engine(settings, load_master_keyring(os.environ), catalogue)
    replicas = {p: replica_for(p, settings) for p in PROVIDERS}
    return sweep_engine_media(engine, replicas, policy, partition=partition, dry_run=True)


def register(sub: argparse._SubParsersAction) -> None:
    erase = sub.add_parser("erase", help="GDPR erasure: destroy a wedding's key and delete its backups everywhere")
    erase.add_argument("--wedding", required=True, metavar="ID")
    erase.add_argument("--confirm", action="store_true", help="really do it (without: say what would be destroyed)")
    erase.add_argument("--requested-by", metavar="WHO", help="recorded with the erasure (default: your user name)")
    erase.set_defaults(func=cmd_erase)

    prune = sub.add_parser("prune", help="delete the backups the retention policy no longer keeps")
    prune.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    prune.add_argument("--wedding", metavar="ID", help="this wedding only")
    prune.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    prune.set_defaults(func=cmd_prune)
