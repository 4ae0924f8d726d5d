"""Retention of change segments: a segment lives exactly as long as a snapshot it extends. Replay from a
snapshot reads the segments whose last commit is no older than the snapshot (less replay's selection
margin), so a segment goes once every kept snapshot of its wedding is newer than that, and with the last
snapshot of an erased or pruned-away wedding. Called by `core.retention.prune` after the backups are pruned."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from .replay import SELECTION_MARGIN
from .segments import VAULT_DIR, provider_key
from .store import FeedStore


def doomed_segments(segments: Iterable[Mapping[str, Any]], oldest_kept: Mapping[str, datetime]) -> list[int]:
    """Ids of the segments no kept snapshot needs (pure). `oldest_kept`: per wedding, its oldest kept
    snapshot's time; a wedding missing from it has none."""
    out = []
    for s in segments:
        oldest = oldest_kept.get(s["partition"])
        if oldest is None or s["last_commit"] < oldest - SELECTION_MARGIN:
            out.append(s["id"])
    return out


def prune_segments(catalogue: Any, vault: Any, replicas: Mapping[str, Any], *, dry_run: bool,
                   partition: str | None = None) -> dict[str, Any]:
    """Delete the segments no kept snapshot needs: every copy (providers, then the vault), then the row."""
    from wedbackup_dagster.core.storage.vault import Vault

    with catalogue.connect() as conn:
        if conn.execute("SELECT pg_catalog.to_regclass('wedbackup.changefeed_segments') IS NULL AS absent"
                        ).fetchone()["absent"]:
            return {"deleted": 0, "failed": {}}
        segments = conn.execute("SELECT id, partition, sha256, last_commit FROM wedbackup.changefeed_segments "
                                "WHERE %s::text IS NULL OR partition = %s", (partition, partition)).fetchall()
        oldest = {r["partition"]: r["t"] for r in conn.execute(
            "SELECT partition, min(snapshot_time) AS t FROM wedbackup.backups WHERE deleting_since IS NULL "
            "GROUP BY partition").fetchall()}
    ids = set(doomed_segments(segments, oldest))
    if dry_run:
        return {"would_delete": len(ids), "failed": {}}
    store = FeedStore(catalogue)
    segment_vault = Vault(Path(vault.root) / VAULT_DIR) if vault is not None else None
    failed: dict[str, str] = {}
    gone = []
    for s in segments:
        if s["id"] not in ids:
            continue
        copies = {c["provider"] for c in store.segment_copies(s["id"])}
        try:
            for provider, replica in replicas.items():
                if provider in copies:
                    replica.delete(provider_key(provider, replica.prefix, s["partition"], s["sha256"]))
            if segment_vault is not None:
                segment_vault.remove(s["partition"], s["sha256"])
        except Exception as exc:  # noqa: BLE001 - kept for the next run, named in the report
            failed[s["sha256"][:12]] = str(exc)
            continue
        gone.append(s["id"])
    store.forget_segments(gone)
    if gone:
        catalogue.audit("prune-changes", partition, {"segments": len(gone)})
    return {"deleted": len(gone), "failed": failed}
