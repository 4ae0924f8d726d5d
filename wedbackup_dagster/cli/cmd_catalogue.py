"""`wedbackup catalogue …`: rebuild the catalogue from storage (one provider's listing and the manifests inside
the archives), and show its counts of backups and copies with each provider's state."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..core.storage.providers import PROVIDERS, replica_for


def cmd_catalogue_rebuild(args: argparse.Namespace) -> int:
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from ..core.config import Settings
    from wedbackup_dagster.core.keys.keyring import load_master_keyring
    from wedbackup_dagster.core.catalogue.rebuild_from_storage import NOT_RECOVERABLE, rebuild_from
    from wedbackup_dagster.core.storage.vault import Vault

    settings = Settings.from_env()
    catalogue = Catalogue(settings.catalogue_dsn)
    vault = None if args.no_vault or not settings.vault_dir.is_dir() else Vault(settings.vault_dir)

    def progress(n: int, key: str) -> None:
        if n % 100 == 0:
            print(f"  {n} archives read …", file=sys.stderr)

    print(f"rebuilding the catalogue from {args.provider}" + (f" and the vault {vault.root}" if vault else ""))
    report = rebuild_from(replica_for(args.provider, settings), catalogue, load_master_keyring(os.environ),
                          vault=vault, progress=progress)
    catalogue.close()
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        if report.key_backup:
            print(f"  {report.keys_restored} wedding key(s) restored from {report.key_backup}")
        print(f"  {report.listed} archive(s) listed; {report.backups_added} backup(s) added, "
              f"{report.backups_known} already known")
        for provider, n in sorted(report.copies_written.items()):
            print(f"  {n} {provider} copy row(s) written")
        for line in report.skipped:
            print(f"  skipped {line}")
        print(f"  not recoverable from storage: {', '.join(NOT_RECOVERABLE)}")
    return 1 if report.skipped else 0


def cmd_catalogue_status(args: argparse.Namespace) -> int:
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from ..core.config import Settings

    catalogue = Catalogue(Settings.from_env().catalogue_dsn)
    catalogue.migrate()
    counts = catalogue.counts()
    states = catalogue.provider_states()
    counts["missing_copies"] = {p: len(catalogue.partitions_missing_copy(p)) for p in PROVIDERS}
    counts["providers"] = {r["provider"]: {"ok": r["ok"], "consecutive_failures": r["consecutive_failures"],
                                           "since": r["since"].isoformat()} for r in states}
    catalogue.close()
    if args.json:
        print(json.dumps(counts))
        return 0
    print(f"backups: {counts['backups']} over {counts['partitions']} partition(s)")
    for provider in ("vault", *PROVIDERS):
        print(f"  {provider:<6} {counts['copies'].get(provider, 0)} copies", end="")
        if provider in PROVIDERS:
            state = counts["providers"].get(provider)
            health = "unknown" if state is None else ("up" if state["ok"] else "DOWN") + f" since {state['since']}"
            print(f"; newest backup missing here: {counts['missing_copies'][provider]}; {health}", end="")
        print()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    catalogue = sub.add_parser("catalogue", help="the catalogue of backups: rebuild from storage, status")
    verbs = catalogue.add_subparsers(dest="verb", required=True)
    rebuild = verbs.add_parser("rebuild", help="reconstruct backups and copies from one provider's listing and "
                                               "the manifests inside the archives (missing wedding keys come from the "
                                               "provider's newest key backup)")
    rebuild.add_argument("--from", dest="provider", choices=PROVIDERS, required=True)
    rebuild.add_argument("--no-vault", action="store_true", help="do not record vault copies")
    rebuild.add_argument("--json", action="store_true")
    rebuild.set_defaults(func=cmd_catalogue_rebuild)
    status = verbs.add_parser("status", help="counts of backups and copies, provider state, missing copies")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_catalogue_status)
