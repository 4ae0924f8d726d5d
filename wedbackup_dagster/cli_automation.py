"""`wedbackup catalogue …` and `wedbackup health`: rebuild the catalogue from storage, show its counts,
and run one provider canary round by hand."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .core.storage.providers import PROVIDERS


def _replica_for(provider: str, settings):
    from wedbackup_dagster.core.storage.providers import replica_for

    return replica_for(provider, settings)


def cmd_catalogue_rebuild(args: argparse.Namespace) -> int:
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from .core.config import Settings
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
    report = rebuild_from(_replica_for(args.provider, settings), catalogue, load_master_keyring(os.environ),
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
    from .core.config import Settings

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


def cmd_health(args: argparse.Namespace) -> int:
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from .core.config import Settings
    from wedbackup_dagster.core.storage.health import (HealthSettings, canary_replicas, check_providers,
                                                       states_from_catalogue)

    settings = Settings.from_env()
    health = HealthSettings.from_env()
    catalogue = Catalogue(settings.catalogue_dsn)
    catalogue.migrate()
    checks = check_providers(canary_replicas(settings, health.canary_timeout), catalogue,
                             states_from_catalogue(catalogue), settings=health)
    catalogue.close()
    for provider, check in checks.items():
        verdict = "ok" if check.probe.ok else f"FAILED: {check.probe.error}"
        state = "up" if check.state.ok else f"DOWN since {check.state.since}"
        print(f"{provider:<6} canary {verdict} ({check.probe.seconds:.2f} s); {state}, "
              f"{check.state.consecutive_failures} consecutive failure(s)")
    return 0 if all(c.probe.ok for c in checks.values()) else 1


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

    health = sub.add_parser("health", help="one canary write/read/delete per provider, recorded in the catalogue")
    health.set_defaults(func=cmd_health)

