"""`wedbackup keys …`: make a master key, rotate to a new one, show which key wraps what, and back up or
restore the encrypted key store. Nothing here prints key material, except `keys new`, whose whole job
is to print one fresh master key for the operator to store."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..core.storage.providers import PROVIDERS, replica_for


def _setup():
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from ..core.config import Settings
    from wedbackup_dagster.core.keys.keyring import load_master_keyring

    settings = Settings.from_env()
    return settings, Catalogue(settings.catalogue_dsn), load_master_keyring(os.environ)


def _replicas(settings, only: str | None = None) -> dict:
    return {p: replica_for(p, settings) for p in PROVIDERS if only in (None, p)}


def _print_backup(result) -> None:
    if result.skipped:
        print(f"  key backup {result.sha256[:16]}… kept: {result.skipped}")
        return
    print(f"  key backup {result.sha256[:16]}…: {result.key_count} wedding key(s), sealed with master key "
          f"{result.master_key_id}")
    for provider in sorted(result.copies):
        print(f"    {provider:<6} {result.copies[provider]}")
    for provider, n in sorted(result.deleted.items()):
        print(f"    {provider:<6} {n} older key backup(s) deleted")
    for provider, error in sorted(result.failures.items()):
        print(f"    {provider:<6} FAILED: {error}")


def cmd_keys_new(args: argparse.Namespace) -> int:
    from wedbackup_dagster.core.keys.keyring import generate_master_key_text

    print(generate_master_key_text(args.id))
    print("put it FIRST in WEDBACKUP_MASTER_KEY (keep the old keys after it), then run `wedbackup keys rotate`",
          file=sys.stderr)
    return 0


def cmd_keys_status(args: argparse.Namespace) -> int:
    from wedbackup_dagster.core.keys.rotation import key_status

    _, catalogue, keyring = _setup()
    status = key_status(catalogue, keyring)
    catalogue.close()
    if args.json:
        print(json.dumps(status.to_dict(), default=str))
    else:
        print("\n".join(status.lines()))
    return 1 if status.unreadable else 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from wedbackup_dagster.core.keys.backup import refresh_key_backups
    from wedbackup_dagster.core.keys.rotation import rotate_master_key

    settings, catalogue, keyring = _setup()
    print(f"re-wrapping every live wedding key with master key {keyring.current.key_id} (archives unchanged)")
    report = rotate_master_key(catalogue, keyring, batch_size=args.batch_size,
                               progress=lambda n: print(f"  {n} re-wrapped …", file=sys.stderr))
    for master, n in sorted(report.rewrapped.items()):
        print(f"  {n} wedding key(s) moved from {master}")
    print(f"  {report.already_current} already wrapped by {report.master_key_id}")
    if args.no_backup:
        return 0
    # Older key backups are sealed with the old master key: replace them, so that key can be retired.
    print("replacing the key backups with one sealed by the current master key")
    result = refresh_key_backups(settings, catalogue, _replicas(settings), keyring)
    _print_backup(result)
    catalogue.close()
    return 0


def cmd_keys_backup(args: argparse.Namespace) -> int:
    from wedbackup_dagster.core.keys.backup import back_up_key_store

    settings, catalogue, keyring = _setup()
    result = back_up_key_store(settings, catalogue, _replicas(settings), keyring, force=args.force)
    catalogue.close()
    _print_backup(result)
    return 0 if result.ok else 1


def cmd_keys_restore(args: argparse.Namespace) -> int:
    from wedbackup_dagster.core.keys.backup import restore_key_store

    settings, catalogue, keyring = _setup()
    report = restore_key_store(replica_for(args.provider, settings), catalogue, keyring, sha256=args.sha256)
    catalogue.close()
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(f"key backup {report.key_backup}: {report.in_backup} key(s); {report.restored} restored, "
              f"{report.known} already in the catalogue")
        for line in report.conflicts:
            print(f"  {line}")
    return 1 if report.conflicts else 0


def register(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="master keys, rotation, and the encrypted key-store backup")
    verbs = keys.add_subparsers(dest="verb", required=True)

    new = verbs.add_parser("new", help="print a fresh master key KEYID:BASE64 (the only command showing a key)")
    new.add_argument("--id", required=True, help="its key id, e.g. master-2026-12")
    new.set_defaults(func=cmd_keys_new)

    status = verbs.add_parser("status", help="which master key wraps how many wedding keys; retire-safe; backups")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_keys_status)

    rotate = verbs.add_parser("rotate", help="re-wrap every wedding key with the current (first) master key, "
                                             "then replace the key backups")
    rotate.add_argument("--batch-size", type=int, default=500, help="wedding keys per transaction")
    rotate.add_argument("--no-backup", action="store_true", help="do not replace the key backups afterwards")
    rotate.set_defaults(func=cmd_keys_rotate)

    backup = verbs.add_parser("backup", help="write an encrypted key-store backup to the vault and every provider")
    backup.add_argument("--force", action="store_true", help="even when the newest one holds the same keys")
    backup.set_defaults(func=cmd_keys_backup)

    restore = verbs.add_parser("restore", help="bring missing wedding keys back from a provider's newest key backup")
    restore.add_argument("--from", dest="provider", choices=PROVIDERS, required=True)
    restore.add_argument("--sha256", help="this key backup instead of the newest")
    restore.add_argument("--json", action="store_true")
    restore.set_defaults(func=cmd_keys_restore)
