"""The guarantees of a partition's media as plain outcomes (passed, description, details) for Dagster's
checks: integrity of the newest snapshot's vault copy, 3-2-1 of everything it needs, and freshness."""
from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from wedbackup_dagster.core.errors import WedbackupError
from wedbackup_dagster.core.keys.keyring import SecretKey

from .snapshot import read_snapshot
from .store import SNAPSHOT, VAULT, MediaStore

# Media changes less often than rows and is confirmed by every media backup (a listing when nothing
# changed): a day plus the time a backup may take.
MEDIA_MAX_AGE = timedelta(hours=26)

Outcome = tuple[bool, str, dict[str, Any]]


def integrity(store: MediaStore, partition: str, resolve_key: Callable[[str], SecretKey]) -> Outcome:
    """The newest snapshot's vault copy has its SHA-256, opens with the wedding's key and reads through, and
    every pack it needs is in the vault with the size the catalogue recorded."""
    rows = store.snapshots(partition)
    if not rows:
        return False, f"{partition} has no media snapshot", {}
    row = rows[0]
    buf = io.BytesIO()
    try:
        store.fetch(partition, SNAPSHOT, row.sha256, buf, VAULT)
        buf.seek(0)
        snapshot = read_snapshot(buf, name=f"media snapshot {row.sha256}", resolve_key=resolve_key)
    except WedbackupError as exc:
        return False, str(exc), {"snapshot": row.sha256}
    packs, missing_chunks = store.packs_holding(row.key_id, snapshot.chunk_ids())
    bad = []
    for sha in sorted(packs):
        copy = store.copies_of(sha).get(VAULT)
        path = store.vault_path(partition, "pack", sha)
        if copy is None or not path.exists() or path.stat().st_size != copy["size"]:
            bad.append(sha)
    passed = not bad and not missing_chunks
    text = (f"snapshot {row.sha256[:16]} opens; {len(snapshot.files)} files, {len(packs)} packs in the vault"
            if passed else f"{len(bad)} pack(s) missing or of the wrong size in the vault, {missing_chunks} "
                           f"chunk(s) in no pack: {', '.join(bad[:5])}")
    return passed, text, {"snapshot": row.sha256, "files": len(snapshot.files), "packs": len(packs)}


def three_two_one(store: MediaStore, partition: str) -> Outcome:
    """Every object of the newest snapshot (the snapshot and the packs it needs) has 3 copies, on 2 kinds of
    media, 1 of them offsite."""
    rows = store.snapshots(partition)
    if not rows:
        return False, f"{partition} has no media snapshot", {}
    with store.catalogue.connect() as conn:
        objects = conn.execute(
            """SELECT o.sha, count(c.provider) AS copies, count(DISTINCT c.media) AS media,
                      bool_or(c.offsite) AS offsite
               FROM (SELECT %s::text AS sha UNION SELECT DISTINCT k.pack_sha256 FROM wedbackup.media_chunks k
                     JOIN wedbackup.media_packs p ON p.pack_sha256 = k.pack_sha256
                     WHERE p.partition = %s AND k.key_id = %s) o
               LEFT JOIN wedbackup.media_copies c ON c.object_sha256 = o.sha GROUP BY o.sha""",
            (rows[0].sha256, partition, rows[0].key_id)).fetchall()
    short = [o["sha"] for o in objects if o["copies"] < 3 or o["media"] < 2 or not o["offsite"]]
    fewest = min((o["copies"] for o in objects), default=0)
    if short:
        return False, f"{len(short)} of {len(objects)} media object(s) lack 3 copies on 2 media with 1 offsite", \
            {"objects": len(objects), "short": len(short), "fewest_copies": fewest}
    return True, f"{len(objects)} media object(s), each with at least {fewest} copies", \
        {"objects": len(objects), "fewest_copies": fewest}


def freshness(store: MediaStore, partition: str, now: datetime | None = None,
              max_age: timedelta = MEDIA_MAX_AGE) -> Outcome:
    now = now or datetime.now(timezone.utc)
    rows = store.snapshots(partition)
    if not rows:
        return False, f"{partition} has no media snapshot", {}
    row = rows[0]
    age = now - row.confirmed_at
    if age > max_age:
        return False, f"media last confirmed {age} ago (more than {max_age})", {"confirmed_at": str(row.confirmed_at)}
    if row.verified_at is None:
        return False, "the newest media snapshot was never verified by restore", {"confirmed_at": str(row.confirmed_at)}
    return True, f"confirmed {age.total_seconds() / 3600:.1f} h ago, verified {row.verifications} time(s)", \
        {"confirmed_at": str(row.confirmed_at), "verified_at": str(row.verified_at)}
