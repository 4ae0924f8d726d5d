"""`wedbackup health`: one provider canary round by hand (write, read, delete per provider), recorded in
the catalogue as the provider_health sensor records its own."""
from __future__ import annotations

import argparse


def cmd_health(args: argparse.Namespace) -> int:
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from ..core.config import Settings
    from wedbackup_dagster.core.storage.health import HealthSettings, canary_replicas, check_providers, states_from_catalogue

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
    health = sub.add_parser("health", help="one canary write/read/delete per provider, recorded in the catalogue")
    health.set_defaults(func=cmd_health)

