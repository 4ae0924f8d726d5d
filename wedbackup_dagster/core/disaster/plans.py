"""Recovery plans per disaster scenario (`wedbackup dr plan`): the runbook from the catalogue's actual state —
the commands in order, which copies will be used, what is missing or stale, the expected duration from the
last measured rates."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any


from wedbackup_dagster.core.partitions import PLATFORM, partition_label
from wedbackup_dagster.core.errors import WedbackupError

Progress = Callable[[str], None]
from .restore_all import LOCATIONS, partition_order

# --- recovery plans -----------------------------------------------------------------------------------

SCENARIOS = ("source-lost", "vault-lost", "catalogue-lost", "provider-lost:NAME")
PROVIDER_LOCATIONS = LOCATIONS[1:]


def parse_scenario(text: str) -> tuple[str, str | None]:
    """`source-lost`, `vault-lost`, `catalogue-lost` or `provider-lost:NAME` → (kind, provider)."""
    kind, _, name = (text or "").strip().partition(":")
    if kind == "provider-lost":
        if name not in PROVIDER_LOCATIONS:
            raise WedbackupError(f"--scenario {text!r}: name the lost provider, one of "
                                 f"{', '.join(PROVIDER_LOCATIONS)} (e.g. provider-lost:s3)")
        return kind, name
    if kind in SCENARIOS and not name:
        return kind, None
    raise WedbackupError(f"--scenario {text!r} is not one of {', '.join(SCENARIOS)}")


@dataclass
class RecoveryPlan:
    scenario: str
    surviving: list[str]  # copy locations the plan reads, in the order restore --all tries them
    steps: list[str]
    partitions: int = 0  # platform + weddings (erased ones excluded)
    uses: dict[str, int] = field(default_factory=dict)  # location -> partitions restored from it
    restore_bytes: int = 0
    missing: dict[str, str] = field(default_factory=dict)  # partition -> why nothing can be restored
    stale: dict[str, str] = field(default_factory=dict)  # partition -> newer backup not usable, older used
    estimate_seconds: float | None = None
    estimate_basis: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [f"recovery plan: {self.scenario} (from the catalogue as it is now)",
               f"  copies used, in order: {', '.join(self.surviving)}",
               f"  partitions: {self.partitions}, archive bytes to restore {self.restore_bytes:,}; per copy: "
               + (", ".join(f"{k} {v}" for k, v in self.uses.items()) or "none")]
        if self.estimate_seconds is not None:
            out.append(f"  expected duration: {self.estimate_seconds / 60:.1f} min ({self.estimate_basis})")
        else:
            out.append(f"  expected duration: unknown ({self.estimate_basis})")
        out.append("  steps:")
        out += [f"    {i}. {step}" for i, step in enumerate(self.steps, 1)]
        out += [f"  MISSING {partition_label(p)}: {why}" for p, why in self.missing.items()]
        out += [f"  STALE {partition_label(p)}: {why}" for p, why in self.stale.items()]
        out += [f"  note: {n}" for n in self.notes]
        return out


_RATES_SQL = """
SELECT r.provider, count(*) AS n, sum(r.seconds) AS seconds, sum(b.size) AS bytes
FROM wedbackup.restores r JOIN wedbackup.backups b ON b.id = r.backup_id
WHERE r.ok AND r.at > now() - interval '30 days'
GROUP BY r.provider
"""

_LAST_RESTORE_ALL_SQL = """
SELECT detail FROM wedbackup.audit WHERE action = 'restore-all' AND (detail->>'complete')::boolean
ORDER BY id DESC LIMIT 1
"""


def _age(newer: datetime, older: datetime) -> str:
    hours = (newer - older).total_seconds() / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def recovery_plan(catalogue: Any, scenario: str, *, jobs: int = 4, target: str = "postgresql://…/new_db"
                  ) -> RecoveryPlan:
    """The runbook of a disaster scenario from the catalogue's state: the commands in order, which copy each
    partition will come from, what is missing (no verified copy at a surviving location) or stale (a newer
    backup exists but cannot be used), and the expected duration from the last measured restore rates."""
    kind, lost = parse_scenario(scenario)
    backups = [b for b in catalogue.backups_with_copies() if b["deleting_since"] is None]
    erased = catalogue.erased_partitions()
    by_partition: dict[str, list[dict[str, Any]]] = {}
    for b in backups:
        if b["partition"] not in erased:
            by_partition.setdefault(b["partition"], []).append(b)
    for partition in catalogue.live_partitions():
        if partition not in erased:
            by_partition.setdefault(partition, [])
    by_partition.setdefault(PLATFORM, [])
    newest_copies = [{c["provider"] for c in max(bs, key=lambda b: b["snapshot_time"])["copies"]}
                     for bs in by_partition.values() if bs]
    coverage = {p: sum(p in copies for copies in newest_copies) for p in PROVIDER_LOCATIONS}
    best = max(PROVIDER_LOCATIONS, key=lambda p: (coverage[p], -PROVIDER_LOCATIONS.index(p)))
    need_verified = True
    if kind == "source-lost":
        surviving = list(LOCATIONS)
    elif kind == "vault-lost":
        surviving = list(PROVIDER_LOCATIONS)
    elif kind == "provider-lost":
        surviving = [p for p in LOCATIONS if p != lost]
    else:  # catalogue-lost: rebuilt from one provider's listing; verification history does not come back
        surviving, need_verified = [best], False
    plan = RecoveryPlan(scenario, surviving, [])
    chosen_from: dict[str, str] = {}
    chosen_sha: dict[str, str] = {}
    for partition in sorted(by_partition, key=lambda p: (p != PLATFORM, partition_order(p))):
        history = sorted(by_partition[partition], key=lambda b: (b["snapshot_time"], b["id"]), reverse=True)
        plan.partitions += 1
        if not history:
            plan.missing[partition] = "no backup at all in the catalogue"
            continue
        usable = None
        for b in history:
            at = [p for p in surviving if any(c["provider"] == p for c in b["copies"])]
            if at and (b["verified"] or not need_verified):
                usable, chosen_from[partition] = b, at[0]
                break
        newest = history[0]
        if usable is None:
            where = sorted({c["provider"] for b in history for c in b["copies"]})
            plan.missing[partition] = (f"no {'verified ' if need_verified else ''}copy at {', '.join(surviving)} "
                                       f"({len(history)} backup(s); copies at {', '.join(where) or 'no location'})")
            continue
        plan.uses[chosen_from[partition]] = plan.uses.get(chosen_from[partition], 0) + 1
        chosen_sha[partition] = usable["archive_sha256"]
        if usable is not newest:
            plan.stale[partition] = (f"newest backup {newest['snapshot_time'].isoformat()} has no "
                                     f"{'verified ' if need_verified else ''}copy at a surviving location; "
                                     f"{usable['snapshot_time'].isoformat()} is used "
                                     f"({_age(newest['snapshot_time'], usable['snapshot_time'])} older)")
    sizes = _sizes(catalogue)
    plan.restore_bytes = sum(sizes.get(sha, 0) for sha in chosen_sha.values())
    _estimate(catalogue, plan, jobs)
    plan.steps = _steps(kind, lost, surviving, best, target, jobs, bool(plan.missing))
    if kind == "catalogue-lost":
        plan.notes.append(f"the catalogue is rebuilt from {best} (it holds the newest backup of "
                          f"{coverage[best]} partition(s), the most of any provider); verification history is "
                          f"not in storage, so the restore takes the newest backup with --include-unverified "
                          f"(each is still checked against its manifest while it loads)")
    if erased:
        plan.notes.append(f"{len(erased)} erased wedding(s) are not restored; their rows in the platform "
                          f"partition are removed again by restore --all")
    return plan


def _sizes(catalogue: Any) -> dict[str, int]:
    """Archive size per archive SHA-256."""
    with catalogue.connect() as conn:
        rows = conn.execute("SELECT archive_sha256, size FROM wedbackup.backups WHERE deleting_since IS NULL")
        return {r["archive_sha256"]: int(r["size"]) for r in rows.fetchall()}


def _estimate(catalogue: Any, plan: RecoveryPlan, jobs: int) -> None:
    count = sum(plan.uses.values())
    with catalogue.connect() as conn:
        last = conn.execute(_LAST_RESTORE_ALL_SQL).fetchone()
        rates = {r["provider"]: r for r in conn.execute(_RATES_SQL).fetchall()}
    if last and last["detail"].get("restored"):
        per = float(last["detail"]["seconds"]) / int(last["detail"]["restored"])
        plan.estimate_seconds = round(per * count, 1)
        plan.estimate_basis = (f"the last complete restore --all: {per:.2f} s per partition over "
                               f"{last['detail']['restored']} partition(s)")
        return
    if not rates:
        plan.estimate_basis = "no restore measured in the last 30 days: run `wedbackup verify --all` or a drill"
        return
    seconds, basis = 0.0, []
    for location, n in plan.uses.items():
        r = rates.get(location) or max(rates.values(), key=lambda x: x["n"])
        per = float(r["seconds"]) / int(r["n"])
        seconds += per * n
        basis.append(f"{location}: {per:.2f} s per partition ({r['n']} verification restore(s), "
                     f"{'measured' if location in rates else 'from ' + r['provider']})")
    plan.estimate_seconds = round(seconds / max(1, jobs), 1)
    plan.estimate_basis = f"verification restores of the last 30 days on {jobs} worker(s): " + "; ".join(basis)


def _steps(kind: str, lost: str | None, surviving: list[str], best: str, target: str, jobs: int,
           missing: bool) -> list[str]:
    first = surviving[0]
    restore = f"wedbackup restore --all --target-dsn {target} --jobs {jobs}" + (
        "" if first == "vault" else f" --from {first}")
    check = ("read the report: every partition restored, no foreign key problem; if it stopped, run the same "
             "command with --resume")
    if kind == "source-lost":
        steps = ["create a new, empty database on a healthy server (createdb new_db)", restore, check,
                 "point the application and WEDBACKUP_SOURCE_DSN at the new database",
                 "wedbackup backup --all   # fresh backups of the restored platform"]
    elif kind == "vault-lost":
        steps = ["recreate the vault directory (WEDBACKUP_VAULT_DIR), empty",
                 "wedbackup backup --all   # new backups fill the vault again and go to every provider",
                 "wedbackup keys backup --force   # a key-store backup in the new vault",
                 f"until then every restore reads a provider; rehearse it: {restore} (into a scratch database)"]
    elif kind == "catalogue-lost":
        steps = ["create a new, empty catalogue database and set WEDBACKUP_CATALOGUE_DSN to it "
                 "(the master key, WEDBACKUP_MASTER_KEY, must be the one the key-store backups were sealed with)",
                 f"wedbackup catalogue rebuild --from {best}   # wedding keys from the key-store backup, then "
                 f"every archive's manifest",
                 "wedbackup catalogue status   # counts and copies per provider",
                 "wedbackup verify --all   # verification history is not in storage: verify again",
                 f"if the source is lost too: {restore} --include-unverified", check]
    else:
        steps = ["wedbackup health   # confirm the provider is down (recorded in the catalogue)",
                 f"restores read the others ({', '.join(surviving)}); a full restore: {restore}",
                 f"when {lost} is back (or replaced, same bucket settings): the provider_health sensor "
                 f"re-replicates every partition that missed it; `wedbackup catalogue status` shows what is "
                 f"still missing"]
    if missing:
        steps.append("the partitions listed MISSING cannot be restored from the surviving copies: back them up "
                     "now if the source still has them (wedbackup backup --wedding ID …)")
    return steps
