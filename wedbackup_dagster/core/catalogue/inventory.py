"""Inventory: every object on every provider (and in the vault) reconciled against the catalogue with
pandas — missing copies, orphans, size or checksum mismatches — with bytes and a monthly cost estimate
per provider and storage class, and the same for wedding media's packs and snapshots on their own."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.errors import ConfigError, WedbackupError

PRICES_VARIABLE = "WEDBACKUP_STORAGE_PRICES"
GB = 1_000_000_000  # providers bill decimal gigabytes

# USD per GB-month, list prices of a European region (late 2025); override with WEDBACKUP_STORAGE_PRICES.
DEFAULT_PRICES: dict[tuple[str, str], float] = {
    ("vault", "local-disk"): 0.0,
    ("s3", "STANDARD"): 0.023, ("s3", "STANDARD_IA"): 0.0125, ("s3", "ONEZONE_IA"): 0.01,
    ("s3", "INTELLIGENT_TIERING"): 0.023, ("s3", "GLACIER_IR"): 0.004, ("s3", "GLACIER"): 0.0036,
    ("s3", "DEEP_ARCHIVE"): 0.00099,
    ("gcs", "STANDARD"): 0.020, ("gcs", "NEARLINE"): 0.010, ("gcs", "COLDLINE"): 0.004, ("gcs", "ARCHIVE"): 0.0012,
    ("azure", "Hot"): 0.018, ("azure", "Cool"): 0.01, ("azure", "Cold"): 0.0036, ("azure", "Archive"): 0.00099,
}

# Finding kinds, worst first. Orphans waste money; the others mean a copy we count on is not there.
MISSING = "missing"
SIZE_MISMATCH = "size_mismatch"
CHECKSUM_MISMATCH = "checksum_mismatch"
UNREACHABLE = "unreachable"
ORPHAN = "orphan"
SERIOUS = (MISSING, SIZE_MISMATCH, CHECKSUM_MISMATCH, UNREACHABLE)

# A media pack's or snapshot's key at a provider (core/media/store.py object_key), whatever the prefix.
MEDIA_KEY = r"(?:^|/)media/(?:weddings/[^/]+|platform)/(?:packs|snapshots)/[0-9a-f]{64}\.(?:pack|wbk)$"

OBJECT_COLUMNS = ["provider", "key", "size", "storage_class", "partition", "sha256"]
COPY_COLUMNS = ["provider", "key", "recorded_size", "checksum", "recorded_class", "partition", "archive_sha256"]


def prices_from_env(environ: Mapping[str, str] | None = None) -> dict[tuple[str, str], float]:
    """Default prices, overridden by `provider:CLASS=USD_PER_GB_MONTH,…` in WEDBACKUP_STORAGE_PRICES."""
    env = os.environ if environ is None else environ
    prices = dict(DEFAULT_PRICES)
    text = env.get(PRICES_VARIABLE, "").strip()
    for item in filter(None, (part.strip() for part in text.split(","))):
        where, _, price = item.partition("=")
        provider, _, storage_class = where.partition(":")
        try:
            value = float(price)
        except ValueError:
            value = -1.0
        if not provider or not storage_class or value < 0:
            raise ConfigError(PRICES_VARIABLE, f"entry {item[:60]!r} is not provider:CLASS=USD_PER_GB_MONTH")
        prices[(provider.strip(), storage_class.strip())] = value
    return prices


@dataclass
class Inventory:
    """The reconciliation: one row per object or catalogued copy, plus the findings and totals."""

    rows: pd.DataFrame
    findings: pd.DataFrame
    totals: pd.DataFrame
    unreachable: dict[str, str] = field(default_factory=dict)
    media_totals: pd.DataFrame | None = None  # the part of `totals` that is wedding media (provider listings)

    @property
    def serious(self) -> pd.DataFrame:
        return self.findings[self.findings["finding"].isin(SERIOUS)]

    @property
    def orphans(self) -> pd.DataFrame:
        return self.findings[self.findings["finding"] == ORPHAN]

    def counts(self) -> dict[str, int]:
        counts = self.findings["finding"].value_counts().to_dict()
        return {kind: int(counts.get(kind, 0)) for kind in (*SERIOUS, ORPHAN)}

    @property
    def monthly_cost(self) -> float:
        return float(self.totals["monthly_cost_usd"].fillna(0).sum())

    def summary_markdown(self) -> str:
        c = self.counts()
        lines = [f"**{len(self.rows)} objects** reconciled, "
                 f"{self.totals['bytes'].sum() / 1e6:,.1f} MB, about **${self.monthly_cost:,.2f}/month**.", ""]
        if not len(self.findings):
            lines.append("Every catalogued copy is where the catalogue says, with its size and checksum; no orphans.")
        else:
            lines.append("| finding | count |\n|---|---|")
            lines.extend(f"| {kind} | {n} |" for kind, n in c.items() if n)
        for provider, error in sorted(self.unreachable.items()):
            lines.append(f"\n- provider **{provider}** could not be listed: {error[:200]}")
        if self.media_totals is not None and len(self.media_totals):
            media = self.media_totals
            lines.append(f"\nOf which wedding media at the providers: {int(media['objects'].sum())} objects, "
                         f"{media['bytes'].sum() / 1e6:,.1f} MB, about "
                         f"${float(media['monthly_cost_usd'].fillna(0).sum()):,.2f}/month.")
        unpriced = self.totals[self.totals["monthly_cost_usd"].isna()]
        if len(unpriced):
            names = ", ".join(f"{r.provider}/{r.storage_class}" for r in unpriced.itertuples())
            lines.append(f"\nNo price configured for {names} ({PRICES_VARIABLE}).")
        return "\n".join(lines)


def catalogue_copies(catalogue: Catalogue) -> pd.DataFrame:
    """Every copy of every backup the catalogue records (older backups too: they are still stored)."""
    with catalogue.connect() as conn:
        cur = conn.execute(
            "SELECT c.provider, c.object_key AS key, c.size AS recorded_size, c.checksum, "
            "c.storage_class AS recorded_class, b.partition, b.archive_sha256 "
            "FROM wedbackup.copies c JOIN wedbackup.backups b ON b.id = c.backup_id")
        frames = []
        while batch := cur.fetchmany(10_000):
            frames.append(pd.DataFrame(batch, columns=COPY_COLUMNS))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COPY_COLUMNS)


def listed_objects(listings: Mapping[str, Callable[[], Iterable[Any]]]) -> tuple[pd.DataFrame, dict[str, str]]:
    """Every object of every provider, from `listings[provider]()` (Replica.list or the vault's entries);
    a provider that cannot be listed is reported, not fatal."""
    frames, unreachable = [], {}
    for provider, listing in listings.items():
        rows = []
        try:
            for obj in listing():
                rows.append((provider, obj.key, int(obj.size), obj.storage_class, obj.partition, obj.sha256))
        except WedbackupError as exc:
            unreachable[provider] = str(exc)
            continue
        frames.append(pd.DataFrame(rows, columns=OBJECT_COLUMNS))
    objects = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=OBJECT_COLUMNS)
    return objects, unreachable


def reconcile(objects: pd.DataFrame, copies: pd.DataFrame, *, unreachable: Mapping[str, str] | None = None,
              prices: Mapping[tuple[str, str], float] | None = None,
              head_checksum: Callable[[str, str], str | None] | None = None) -> Inventory:
    """Outer-join the listings with the catalogue on (provider, key). `head_checksum(provider, key)`, when
    given, asks the provider for its stored checksum of each matched object (one HEAD each)."""
    unreachable = dict(unreachable or {})
    prices = DEFAULT_PRICES if prices is None else prices
    rows = objects.merge(copies, on=["provider", "key"], how="outer", indicator=True)
    rows["partition"] = rows["partition_x"].fillna(rows["partition_y"])
    rows = rows.drop(columns=["partition_x", "partition_y"])
    rows["finding"] = ""
    # Objects that are not archives of ours (canaries in flight, files someone put there) are counted in the
    # totals but are not orphans of a backup.
    only_listed = (rows["_merge"] == "left_only") & rows["sha256"].notna()
    only_catalogued = rows["_merge"] == "right_only"
    both = rows["_merge"] == "both"
    rows.loc[only_listed, "finding"] = ORPHAN
    down = rows["provider"].isin(list(unreachable))
    rows.loc[only_catalogued & down, "finding"] = UNREACHABLE
    rows.loc[only_catalogued & ~down, "finding"] = MISSING
    size_off = both & (rows["size"].astype("float") != rows["recorded_size"].astype("float"))
    rows.loc[size_off, "finding"] = SIZE_MISMATCH
    if head_checksum is not None:
        for idx in rows.index[both & ~size_off]:
            provider, key = rows.at[idx, "provider"], rows.at[idx, "key"]
            try:
                stored = head_checksum(provider, key)
            except WedbackupError as exc:
                unreachable.setdefault(provider, str(exc))
                rows.at[idx, "finding"] = UNREACHABLE
                continue
            if stored is not None and stored != rows.at[idx, "checksum"]:
                rows.at[idx, "finding"] = CHECKSUM_MISMATCH
    rows = rows.drop(columns=["_merge"])
    rows["storage_class"] = rows["storage_class"].fillna(rows["recorded_class"])
    findings = rows[rows["finding"] != ""][["provider", "key", "partition", "finding", "size", "recorded_size"]]
    stored = rows[rows["finding"].isin(["", ORPHAN, CHECKSUM_MISMATCH, SIZE_MISMATCH])].copy()
    stored["size"] = stored["size"].astype("float")
    media = stored[stored["key"].astype("string").str.contains(MEDIA_KEY, regex=True, na=False)]
    return Inventory(rows=rows.reset_index(drop=True), findings=findings.reset_index(drop=True),
                     totals=_totals(stored, prices), unreachable=unreachable, media_totals=_totals(media, prices))


def _totals(stored: pd.DataFrame, prices: Mapping[tuple[str, str], float]) -> pd.DataFrame:
    """Objects, bytes and monthly cost per provider and storage class (cost unknown without a price)."""
    totals = (stored.groupby(["provider", "storage_class"], dropna=False)
              .agg(objects=("key", "count"), bytes=("size", "sum")).reset_index())
    totals["bytes"] = totals["bytes"].astype("int64")
    totals["usd_per_gb_month"] = [prices.get((p, str(c))) for p, c in zip(totals["provider"], totals["storage_class"])]
    totals["usd_per_gb_month"] = totals["usd_per_gb_month"].astype("float")
    totals["monthly_cost_usd"] = totals["bytes"] / GB * totals["usd_per_gb_month"]
    return totals.sort_values(["provider", "storage_class"]).reset_index(drop=True)


def take_inventory(catalogue: Catalogue, replicas: Mapping[str, Any], vault: Any | None = None, *,
                   prices: Mapping[tuple[str, str], float] | None = None, check_checksums: bool = True) -> Inventory:
    """List every provider (and the vault), reconcile with the catalogue, optionally HEAD every matched
    object to compare the provider's stored checksum with the one recorded at upload."""
    listings: dict[str, Callable[[], Iterable[Any]]] = {p: r.list for p, r in replicas.items()}
    if vault is not None:
        listings["vault"] = lambda: _vault_objects(vault)
    objects, unreachable = listed_objects(listings)

    def head_checksum(provider: str, key: str) -> str | None:
        if provider == "vault" or provider not in replicas:
            return None  # the vault's bytes are proven by the archive_integrity check, not here
        record = replicas[provider].head(key)
        return record.provider_checksum if record is not None else ""

    return reconcile(objects, catalogue_copies(catalogue), unreachable=unreachable, prices=prices,
                     head_checksum=head_checksum if check_checksums else None)


@dataclass(frozen=True)
class _VaultObject:
    key: str
    size: int
    storage_class: str
    partition: str
    sha256: str


def _vault_objects(vault: Any) -> Iterable[_VaultObject]:
    # The catalogue records a vault copy's object key as the file name (content-addressed, so unique).
    if not vault.root.exists():
        return
    for entry in vault.entries():
        yield _VaultObject(entry.path.name, entry.size, "local-disk", entry.partition, entry.sha256)
