"""Change segments: one wedding's changes over one drain, sealed with the wedding's key in the archive
format (docs/FORMAT.md; so erasure's crypto-shredding covers them), written to the vault (`changes.d/`,
temporary file, fsync, rename to its SHA-256) and replicated like archives under a content address
(`<prefix>/changes/<wedding>/<sha256>.wbk`, the provider's own checksum confirmed).

Inside (zstd-compressed JSON lines, documented in docs/CHANGEFEED.md): a header line (format, version,
wedding, feed, every table's columns as the feed saw them), one line per transaction (xid, commit and
end LSN, commit time, changes in order), and an end line with the counts, so a cut-off segment is an
error rather than fewer changes."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from wedbackup_dagster.core.formats.archive import ArchiveWriter, open_archive
from wedbackup_dagster.core.errors import ArchiveError
from wedbackup_dagster.core.keys.keyring import SecretKey
from wedbackup_dagster.core.storage.replicas.base import check_key, validate_partition, validate_sha256
from wedbackup_dagster.core.storage.vault import Vault, VaultEntry

from .errors import ChangeFeedError
from .routing import Routed

FORMAT_NAME = "wedbackup-changes"
FORMAT_VERSION = 1
VAULT_DIR = "changes.d"  # inside the vault root; the dot keeps it from being taken for a partition


def segment_vault(vault_dir: str | Path) -> Vault:
    return Vault(Path(vault_dir) / VAULT_DIR)


def provider_key(provider: str, prefix: str, partition: str, sha256: str) -> str:
    validate_partition(provider, partition)
    validate_sha256(provider, sha256)
    return check_key(provider, prefix, f"{prefix}/changes/{partition}/{sha256}.wbk")


@dataclass
class SegmentTransaction:
    xid: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime
    changes: list[Routed] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"xid": self.xid, "commit_lsn": self.commit_lsn, "end_lsn": self.end_lsn,
                "commit_time": self.commit_time.isoformat(),
                "changes": [[c.op, c.table, c.row, c.key] for c in self.changes]}


@dataclass
class SegmentDraft:
    """A wedding's changes of one drain, not yet sealed."""

    partition: str
    columns: dict[str, list[str]] = field(default_factory=dict)
    transactions: list[SegmentTransaction] = field(default_factory=list)

    def add(self, txn: SegmentTransaction) -> None:
        self.transactions.append(txn)

    @property
    def changes(self) -> int:
        return sum(len(t.changes) for t in self.transactions)

    def table_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for t in self.transactions:
            for c in t.changes:
                counts = out.setdefault(c.table, {"I": 0, "U": 0, "D": 0})
                counts[c.op] += 1
        return out


def _lines(draft: SegmentDraft, feed_id: int, slot: str) -> Iterator[bytes]:
    def line(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"

    yield line({"format": FORMAT_NAME, "version": FORMAT_VERSION, "partition": draft.partition, "feed": feed_id,
                "slot": slot, "columns": draft.columns})
    for txn in draft.transactions:
        yield line(txn.to_json())
    yield line({"end": {"transactions": len(draft.transactions), "changes": draft.changes}})


def seal(draft: SegmentDraft, vault: Vault, wedding_key: SecretKey, *, feed_id: int, slot: str,
         zstd_level: int = 3) -> dict[str, Any]:
    """Seal the draft into the vault; returns the catalogue row's fields (sha256, size, LSN and time ranges)."""
    vault.clean_incoming(draft.partition)
    with vault.incoming(draft.partition) as (fh, tmp):
        writer = ArchiveWriter(fh, wedding_key=wedding_key, level=zstd_level,
                               label={"partition": draft.partition, "app": "wedbackup", "kind": FORMAT_NAME})
        try:
            for chunk in _lines(draft, feed_id, slot):
                writer.write(chunk)
            stats = writer.close()
        except BaseException:
            writer.abort()
            raise
        entry: VaultEntry = vault.commit(fh, tmp, draft.partition, stats.sha256)
    first, last = draft.transactions[0], draft.transactions[-1]
    return {"partition": draft.partition, "sha256": stats.sha256, "size": stats.sealed_bytes, "key_id": stats.key_id,
            "first_lsn": first.end_lsn, "last_lsn": last.end_lsn, "first_commit": first.commit_time,
            "last_commit": last.commit_time, "transactions": len(draft.transactions), "changes": draft.changes,
            "tables": draft.table_counts(), "uri": entry.path.as_uri(), "object_key": entry.path.name}


@dataclass
class OpenedSegment:
    header: dict[str, Any]
    transactions: list[dict[str, Any]]


def read_segment(fileobj: BinaryIO, *, name: str, resolve_key) -> OpenedSegment:
    """Open a sealed segment (AEAD-checked chunk by chunk) and parse it; a cut-off or foreign stream is an
    error naming the segment."""
    buf = b""
    header: dict[str, Any] | None = None
    txns: list[dict[str, Any]] = []
    end: dict[str, Any] | None = None
    try:
        for chunk in open_archive(fileobj, name=name, resolve_key=resolve_key):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                obj = json.loads(raw)
                if header is None:
                    if obj.get("format") != FORMAT_NAME or obj.get("version") != FORMAT_VERSION:
                        raise ChangeFeedError(f"segment {name} is not a {FORMAT_NAME} v{FORMAT_VERSION} stream")
                    header = obj
                elif "end" in obj:
                    end = obj["end"]
                else:
                    txns.append(obj)
    except ArchiveError:
        raise
    except (ValueError, AttributeError) as exc:
        raise ChangeFeedError(f"segment {name} is garbled: {exc}") from None
    if header is None or end is None or buf:
        raise ChangeFeedError(f"segment {name} ends before its end line: cut off")
    if end.get("transactions") != len(txns) or end.get("changes") != sum(len(t["changes"]) for t in txns):
        raise ChangeFeedError(f"segment {name}: its end line counts {end} but it holds {len(txns)} transaction(s)")
    return OpenedSegment(header, txns)
