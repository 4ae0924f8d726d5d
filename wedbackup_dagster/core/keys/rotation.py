"""Master key rotation and the key status report. Rotation re-wraps every live wedding key with the
current (first) master key, a batch per transaction; archives are never touched, since their data keys
are wrapped by the wedding keys, which do not change. Status says which master key wraps what, whether
any key is unreadable, and when an old master key can be retired — never any key material."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timezone
from typing import Any

from wedbackup_dagster.core.catalogue.store import Catalogue, wedding_key_context
from wedbackup_dagster.core.errors import CryptoKeyError
from wedbackup_dagster.core.keys.backup import key_set_fingerprint, keys_awaiting_backup
from wedbackup_dagster.core.keys.keyring import MasterKeyring, unwrap_key, wrap_key

DEFAULT_BATCH = 500


@dataclass
class RotationReport:
    master_key_id: str
    rewrapped: dict[str, int] = field(default_factory=dict)  # old master key id -> wedding keys re-wrapped
    already_current: int = 0

    @property
    def total(self) -> int:
        return sum(self.rewrapped.values())

    def to_dict(self) -> dict[str, Any]:
        return {"master_key_id": self.master_key_id, "rewrapped": self.rewrapped, "total": self.total,
                "already_current": self.already_current}


def _wrapped_by(catalogue: Catalogue) -> dict[str, int]:
    with catalogue.connect() as conn:
        rows = conn.execute("SELECT master_key_id, count(*) AS n FROM wedbackup.wedding_keys "
                            "WHERE wrapped IS NOT NULL GROUP BY master_key_id").fetchall()
    return {r["master_key_id"]: r["n"] for r in rows}


def rotate_master_key(catalogue: Catalogue, keyring: MasterKeyring, *, batch_size: int = DEFAULT_BATCH,
                      progress: Callable[[int], None] | None = None) -> RotationReport:
    """Re-wrap every live wedding key that an older master key wraps with `keyring.current`.

    Each batch is one transaction that changes `wrapped` and `master_key_id` of a row together, so a crash
    leaves every row either under its old or its new master key, both still in the keyring: every key stays
    readable, and running again carries on where it stopped (rows already current are not touched). Stops,
    before changing anything, when a wrapped key's master key is not configured (it could not be read)."""
    catalogue.migrate()
    current = keyring.current
    report = RotationReport(current.key_id)
    by_master = _wrapped_by(catalogue)
    missing = {m: n for m, n in by_master.items() if m not in keyring}
    if missing:
        raise CryptoKeyError("cannot rotate: wedding keys are wrapped by master key(s) that are not configured: "
                        + ", ".join(f"{m} ({n} keys)" for m, n in sorted(missing.items()))
                        + "; add them to WEDBACKUP_MASTER_KEY after the new current key")
    report.already_current = by_master.get(current.key_id, 0)
    old_ids = [m for m in by_master if m != current.key_id]
    while old_ids:
        with catalogue.connect() as conn:
            # FOR UPDATE: an erasure shredding one of these rows meanwhile waits, and is never undone by us.
            rows = conn.execute(
                "SELECT key_id, partition, wrapped, master_key_id FROM wedbackup.wedding_keys "
                "WHERE wrapped IS NOT NULL AND master_key_id = ANY(%s) ORDER BY key_id LIMIT %s FOR UPDATE",
                (old_ids, batch_size)).fetchall()
            if not rows:
                break
            for r in rows:
                context = wedding_key_context(r["partition"], r["key_id"])
                material = unwrap_key(keyring.get(r["master_key_id"]), bytes(r["wrapped"]), context)
                rewrapped = wrap_key(current, material, context)
                # Proven before it replaces the only stored copy of the key.
                if unwrap_key(current, rewrapped, context) != material:
                    raise CryptoKeyError(f"wedding key {r['key_id']}: re-wrapped key does not open; nothing changed")
                conn.execute("UPDATE wedbackup.wedding_keys SET wrapped = %s, master_key_id = %s WHERE key_id = %s",
                             (rewrapped, current.key_id, r["key_id"]))
                report.rewrapped[r["master_key_id"]] = report.rewrapped.get(r["master_key_id"], 0) + 1
        if progress:
            progress(report.total)
    catalogue.audit("key-rotation", None, report.to_dict())
    return report


@dataclass
class MasterKeyUse:
    master_key_id: str
    configured: bool
    current: bool
    wedding_keys: int  # live wedding keys it wraps
    key_backups: int  # key backups (not deleted) sealed with it
    retire_safe: bool  # configured, not current, wraps nothing and seals no key backup

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class KeyStatus:
    current: str
    configured: list[str]
    masters: list[MasterKeyUse]
    live_keys: int
    shredded_keys: int
    unreadable: dict[str, int]  # master key id not configured -> live wedding keys it wraps
    newest_backup: dict[str, Any] | None  # sha256, created_at, master_key_id, key_count, providers
    backup_current: bool  # the newest key backup holds exactly today's live keys under the current master key
    keys_since_backup: int  # live wedding keys created after the newest key backup
    keys_only_in_catalogue: int = 0  # live wedding keys in no key backup at the vault and a provider

    def to_dict(self) -> dict[str, Any]:
        return {"current": self.current, "configured": self.configured,
                "masters": [m.to_dict() for m in self.masters], "live_keys": self.live_keys,
                "shredded_keys": self.shredded_keys, "unreadable": self.unreadable,
                "newest_backup": self.newest_backup, "backup_current": self.backup_current,
                "keys_since_backup": self.keys_since_backup, "keys_only_in_catalogue": self.keys_only_in_catalogue}

    def lines(self) -> list[str]:
        out = [f"master keys configured: {', '.join(self.configured)} (current: {self.current})",
               f"wedding keys: {self.live_keys} live, {self.shredded_keys} shredded"]
        out.append(f"  {'master key':<24}{'configured':<12}{'wraps':>7}{'key backups':>13}  retire")
        for m in self.masters:
            retire = ("current" if m.current else "safe to retire" if m.retire_safe
                      else "not configured" if not m.configured else "NOT safe: rotate first")
            out.append(f"  {m.master_key_id:<24}{'yes' if m.configured else 'NO':<12}{m.wedding_keys:>7}"
                       f"{m.key_backups:>13}  {retire}")
        for master, n in sorted(self.unreadable.items()):
            out.append(f"UNREADABLE: {n} wedding key(s) wrapped by master key {master}, which is not configured")
        b = self.newest_backup
        if b is None:
            out.append("key backup: NONE (run `wedbackup keys backup`)")
        else:
            state = "up to date" if self.backup_current else (
                f"out of date ({self.keys_since_backup} key(s) newer)" if self.keys_since_backup
                else "out of date (key set or master key changed)")
            when = b["created_at"].astimezone(timezone.utc)
            out.append(f"key backup: {b['sha256'][:16]}… {when:%Y-%m-%d %H:%M} UTC, {b['key_count']} keys, "
                       f"sealed with {b['master_key_id']}, copies: {', '.join(b['providers']) or 'none'}; {state}")
        if self.keys_only_in_catalogue:
            out.append(f"wedding keys only in the catalogue: {self.keys_only_in_catalogue} (in no key backup at the "
                       "vault and a provider; their backups do not count for 3-2-1): run `wedbackup keys backup`")
        return out


def key_status(catalogue: Catalogue, keyring: MasterKeyring) -> KeyStatus:
    """Which master key wraps how many wedding keys and seals which key backups; no key material."""
    catalogue.migrate()
    by_master = _wrapped_by(catalogue)
    with catalogue.connect() as conn:
        shredded = conn.execute("SELECT count(*) AS n FROM wedbackup.wedding_keys "
                                "WHERE wrapped IS NULL").fetchone()["n"]
        sealed = {r["master_key_id"]: r["n"] for r in conn.execute(
            "SELECT master_key_id, count(*) AS n FROM wedbackup.key_backups WHERE deleted_at IS NULL "
            "GROUP BY master_key_id").fetchall()}
        newest = conn.execute(
            "SELECT k.sha256, k.created_at, k.master_key_id, k.key_count, k.key_set, "
            "coalesce(array_agg(c.provider ORDER BY c.provider) FILTER (WHERE c.provider IS NOT NULL), '{}') "
            "AS providers FROM wedbackup.key_backups k "
            "LEFT JOIN wedbackup.key_backup_copies c ON c.key_backup_id = k.id WHERE k.deleted_at IS NULL "
            "GROUP BY k.id ORDER BY k.created_at DESC, k.id DESC LIMIT 1").fetchone()
        since = 0
        if newest is not None:
            since = conn.execute("SELECT count(*) AS n FROM wedbackup.wedding_keys WHERE wrapped IS NOT NULL "
                                 "AND created_at > %s", (newest["created_at"],)).fetchone()["n"]
    ids = list(keyring.key_ids) + sorted((set(by_master) | set(sealed)) - set(keyring.key_ids))
    masters = []
    for m in ids:
        configured, is_current = m in keyring, m == keyring.current.key_id
        masters.append(MasterKeyUse(m, configured, is_current, by_master.get(m, 0), sealed.get(m, 0),
                                    configured and not is_current and not by_master.get(m) and not sealed.get(m)))
    fingerprint, live = key_set_fingerprint(catalogue, keyring.current.key_id)
    newest_dict = None
    if newest is not None:
        newest_dict = {k: newest[k] for k in ("sha256", "created_at", "master_key_id", "key_count")}
        newest_dict["providers"] = list(newest["providers"])
    return KeyStatus(current=keyring.current.key_id, configured=list(keyring.key_ids), masters=masters,
                     live_keys=live, shredded_keys=shredded,
                     unreadable={m: n for m, n in by_master.items() if m not in keyring},
                     newest_backup=newest_dict,
                     backup_current=newest is not None and newest["key_set"] == fingerprint,
                     keys_since_backup=since, keys_only_in_catalogue=keys_awaiting_backup(catalogue))
