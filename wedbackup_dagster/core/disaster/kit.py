"""The master-key recovery kit (`wedbackup dr kit`): what the operator keeps off-site to recover the master key,
and a check that a kept key file opens the key-store backup — without ever printing a key unasked."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


from wedbackup_dagster.core.errors import WedbackupError

Progress = Callable[[str], None]

# --- the master-key recovery kit ----------------------------------------------------------------------

_FINGERPRINT_LABEL = b"wedbackup recovery-kit fingerprint v1"


def key_fingerprint(key: Any) -> str:
    """16 hex characters of HMAC-SHA256(master key, a fixed label): tells keys apart and checks a kit's copy
    against the sheet without showing (or helping to guess) the 256-bit key."""
    import hashlib
    import hmac

    return hmac.new(key.material, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]


def kit_sheet(keyring: Any, catalogue: Any, settings: Any) -> dict[str, Any]:
    """The non-secret half of the recovery kit, to print and keep with the sealed copy of the master key
    file: key ids and fingerprints, where the key-store backups and archives are, and the newest key backup."""
    from wedbackup_dagster.core.keys.backup import newest_recorded_key_backup

    newest = newest_recorded_key_backup(catalogue)
    return {
        "master_keys": [{"id": k, "fingerprint": key_fingerprint(keyring.get(k)),
                         "current": k == keyring.current.key_id} for k in keyring.key_ids],
        "newest_key_backup": None if newest is None else {
            "sha256": newest["sha256"], "sealed_by": newest["master_key_id"], "wedding_keys": newest["key_count"],
            "created_at": str(newest["created_at"]), "copies": sorted(newest["providers"])},
        "locations": {"s3": f"{settings.s3.bucket}/{settings.s3.prefix}", "gcs": f"{settings.gcs.bucket}/"
                      f"{settings.gcs.prefix}", "azure": f"{settings.azure.container}/{settings.azure.prefix}",
                      "vault": str(settings.vault_dir)},
        "recover": ["put the kit's copy of the master key file in place and point WEDBACKUP_MASTER_KEY_FILE at it",
                    "wedbackup dr kit --check FILE --from s3   # proves it opens the newest key-store backup",
                    "if the catalogue is lost too: wedbackup catalogue rebuild --from s3"],
    }


def check_kit_key_file(key_file: str, replica: Any) -> dict[str, Any]:
    """Whether the master key file `key_file` (a kit's copy) opens the newest key-store backup at `replica`:
    its key ids and fingerprints, the backup, the master key that sealed it and how many wedding keys it
    holds. Raises a clear error otherwise; never shows key material."""
    from wedbackup_dagster.core.keys.backup import newest_key_backup
    from wedbackup_dagster.core.keys.keyring import MASTER_KEY_FILE_ENV, load_master_keyring

    keyring = load_master_keyring({MASTER_KEY_FILE_ENV: key_file})
    found = newest_key_backup(replica, keyring)
    if found is None:
        raise WedbackupError(f"{replica.provider} holds no key-store backup to check the key file against: "
                             f"run `wedbackup keys backup` first")
    sha, contents = found
    return {"key_file": key_file, "provider": replica.provider, "key_backup": sha,
            "sealed_by": contents.master_key_id, "wedding_keys": len(contents.entries),
            "created_at": contents.created_at,
            "master_keys": [{"id": k, "fingerprint": key_fingerprint(keyring.get(k))} for k in keyring.key_ids]}
