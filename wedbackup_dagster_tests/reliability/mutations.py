"""A seeded mutation loop over real sealed archives and snapshot streams, fast enough for 100,000 inputs
(hypothesis, at that count, is not): each input is an original damaged by 1-3 random mutations (bit flips,
overwrites, insertions, deletions, truncations, appended junk, splices from another wedding's archive or
stream, header fields set to huge or odd values, sealed chunks swapped, duplicated, dropped or taken from
another archive; records with huge lengths, dropped, repeated, swapped, whole tables repeated or dropped,
garbled JSON). Archives are read through core/formats/archive.py's reader, streams through core/postgres/load_snapshot.py's
`read_snapshot` and the restore's own record checks, with no database.

The contract checked for every input:
- archive: it fails with the format's own error (ArchiveError) naming the archive, and every byte it
  released before failing is a prefix of the original; or it reads back exactly the original;
- stream: it fails with SnapshotFormatError or VerificationError (the restore's record checks) naming the
  archive; or it reads back the original; or only its metadata text (header, DDL, manifest text) changed
  while every table's data, columns, row count and checksum are the original's ("metadata altered":
  inside a stream nothing checksums that text — the archive's AEAD does, which the archive half shows);
- never another exception, never altered table data accepted. Either is a failure, kept with the
  (seed, index) that reproduces it. (A repeated table, a table-begin naming other columns than the
  manifest's, and JSON nested thousands deep were accepted or escaped until issue 14 fixed them; each
  has a regression test in test_mutations.py.)"""
from __future__ import annotations

import io
import random
import struct
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wedbackup_dagster.core.formats import snapshot_stream
from wedbackup_dagster.core.postgres import load_snapshot as restore
from wedbackup_dagster.core.formats.archive import seal_bytes
from wedbackup_dagster.core.errors import SnapshotFormatError, VerificationError
from wedbackup_dagster.core.formats.snapshot_stream import DATA, MANIFEST, POST_DATA, PRE_DATA, TABLE_BEGIN, TABLE_END

from wedbackup_dagster_tests.core.formats.test_archive_fuzz import (CHUNK, INTERESTING_U32, KEY, NAME, header_fields,
                                                                    mutate, read_through, records)

ARCHIVE_KINDS = ("flip", "overwrite", "insert", "delete", "truncate", "append", "splice", "field", "label",
                 "swap", "duplicate", "drop", "foreign")
STREAM_KINDS = ("flip", "overwrite", "insert", "delete", "truncate", "append", "splice", "length", "drop-record",
                "repeat-record", "swap-records", "repeat-table", "drop-table", "json")
HEADER_FIELDS = ("version", "header_len", "key_id_len", "key_id", "wrapped_len", "wrapped", "compression",
                 "nonce_prefix", "chunk_size", "label_len")
HUGE_LENGTHS = (0, 1, 8, (1 << 20) + 1, (256 << 20) + 1, 1 << 32, 1 << 40, (1 << 63) - 1, (1 << 64) - 1)
GARBLED_JSON = (b"", b"[]", b"{}", b"null", b"0", b'"x"', b"{", b'{"a": }', b"\xff\xfe\x00", b"NaN",
                b'{"tables": 5}', b'{"tables": [{"rows": -1}]}', b'{"tables": [null]}',
                b'{"format": "wedbackup-snapshot", "version": 1, "partition": 7}',
                b'{"format": "wedbackup-snapshot", "version": 1.0, "partition": "1", "schema_fingerprint": "a"}',
                b'{"schema": "public", "name": "weddings", "columns": ["id", 1]}',
                b'{"schema": "", "name": "x", "columns": ["id"]}', b'{"rows": 1e999, "bytes": 0, "sha256": ""}',
                b'{"rows": true, "bytes": 0, "sha256": "00"}', b'{"partition": {"a": 1}}',
                b"[" * 50_000 + b"]" * 50_000, b'{"a": ' * 20_000 + b"1" + b"}" * 20_000,
                b'{"tables": [], "partition": "1", "snapshot_time": "t", "schema_fingerprint": "f", "plan": {}}')


@dataclass
class Sample:
    """One original: its snapshot stream and that stream sealed (chunks of CHUNK bytes)."""
    name: str
    stream: bytes
    sealed: bytes


@dataclass
class MutationReport:
    seed: int
    archives_read: int = 0
    streams_read: int = 0
    mutations: Counter = field(default_factory=Counter)  # "archive:flip", "stream:json", ...
    outcomes: Counter = field(default_factory=Counter)  # "archive: rejected (ArchiveCorrupt)", ...
    failures: list[str] = field(default_factory=list)  # the first few, each with its reproduction
    failed_inputs: dict[str, bytes] = field(default_factory=dict)  # their damaged bytes, by "<layer>-<index>"
    failure_count: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.archives_read + self.streams_read

    def fail(self, what: str, key: str, data: bytes) -> None:
        self.failure_count += 1
        if len(self.failures) < 20:
            self.failures.append(what)
            self.failed_inputs[key] = data

    def figures(self) -> dict[str, Any]:
        return {"seed": self.seed, "inputs_read": self.total, "archives_read": self.archives_read,
                "streams_read": self.streams_read, "mutations_applied": sum(self.mutations.values()),
                "mutations_by_kind": dict(sorted(self.mutations.items())),
                "outcomes": dict(sorted(self.outcomes.items())), "failures": self.failure_count,
                "failure_samples": self.failures, "seconds": round(self.seconds, 1)}

    def text(self) -> str:
        by_layer = {layer: {k.split(":", 1)[1]: v for k, v in self.mutations.items() if k.startswith(layer)}
                    for layer in ("archive", "stream")}
        return "\n".join([
            f"mutation loop: seed {self.seed}, {self.total} mutated inputs read ({self.archives_read} sealed "
            f"archives, {self.streams_read} snapshot streams), {sum(self.mutations.values())} mutations, "
            f"{self.seconds:.0f} s",
            *[f"  {layer} mutations: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
              for layer, kinds in by_layer.items()],
            *[f"  {layer} outcomes: " + ", ".join(f"{k.split(': ', 1)[1]} {v}" for k, v in sorted(self.outcomes.items())
                                                  if k.startswith(layer)) for layer in ("archive", "stream")],
            f"other exceptions or altered data accepted: {self.failure_count}",
            *[f"  {f}" for f in self.failures[:5]],
        ])


# ------------------------------------------------------------------------------------------ streams

@dataclass(frozen=True)
class Parsed:
    """What a restore takes from a stream: metadata text, and every table's data (as a sorted multiset)."""
    metadata: tuple
    tables: tuple


def parse_stream(stream: bytes, *, piece: int = 777) -> Parsed:
    """Read a stream as restore_snapshot does, every check but the database's: the record grammar
    (read_snapshot), the header, each table's begin record, data against its table-end record, the
    manifest against the tables, nothing after the manifest. Raises what a restore raises."""
    records_ = snapshot_stream.read_snapshot((stream[i:i + piece] for i in range(0, len(stream), piece)), name=NAME)
    header = snapshot_stream.header_of(next(records_))
    pre_data = next(records_).text()
    post_data = next(records_).text()
    seen: dict[str, tuple[int, int, str]] = {}
    columns_of: dict[str, list[str]] = {}
    tables: list[tuple] = []
    manifest_record = None
    for record in records_:
        if record.kind == MANIFEST:
            manifest_record = record
            break
        schema, name, columns = snapshot_stream.table_begin_of(record)
        if f"{schema}.{name}" in seen:
            raise SnapshotFormatError(NAME, f"table {schema}.{name} appears twice in the stream")
        columns_of[f"{schema}.{name}"] = list(columns)
        rows, nbytes, sha, end = snapshot_stream.read_table_data(records_)
        table = f"{schema}.{name}"
        snapshot_stream.check_table_end(end, rows, nbytes, sha, what=f"wedding {header['partition']}",
                                        target=NAME, table=table, done="read")
        seen[table] = (rows, nbytes, sha)
        tables.append((table, tuple(columns), rows, nbytes, sha))
    if manifest_record is None:
        raise SnapshotFormatError(NAME, "the stream has no manifest")
    snapshot_stream.read_to_end(records_, NAME)
    manifest = snapshot_stream.manifest_of(manifest_record)
    restore.compare_with_manifest(manifest, seen, f"wedding {header['partition']}", NAME, columns_of)
    metadata = (repr(header), pre_data, post_data, manifest.to_json())
    return Parsed(metadata, tuple(sorted(tables)))


def _spans(stream: bytes) -> list[tuple[int, int, bytes]]:
    """(offset, length, kind) of every record of a well-formed stream."""
    return [(pos, size, stream[pos:pos + 1]) for pos, size in records(stream)]


def _table_spans(spans: list[tuple[int, int, bytes]]) -> list[tuple[int, int]]:
    """(offset, length) of every table's records, table-begin to table-end."""
    out, start = [], None
    for pos, size, kind in spans:
        if kind == TABLE_BEGIN:
            start = pos
        elif kind == TABLE_END and start is not None:
            out.append((start, pos + size - start))
    return out


def mutate_stream(stream: bytes, rng: random.Random, kind: str, other: bytes) -> bytes:
    try:
        spans = _spans(stream)
    except (IndexError, ValueError):
        spans = []
    if not spans and kind in ("length", "drop-record", "repeat-record", "swap-records", "repeat-table",
                              "drop-table", "json"):
        kind = "flip"  # an earlier mutation broke the framing: nothing left to aim at
    if kind in ("flip", "overwrite", "insert", "delete", "truncate", "append", "splice"):
        return _mutate_bytes(stream, rng, kind, other)
    pos, size, rkind = spans[rng.randrange(len(spans))]
    if kind == "length":
        return stream[:pos + 1] + rng.choice(HUGE_LENGTHS + (size - 9 + rng.choice((-1, 1)),)).to_bytes(
            8, "big") + stream[pos + 9:]
    if kind == "drop-record":
        return stream[:pos] + stream[pos + size:]
    if kind == "repeat-record":
        return stream[:pos + size] + stream[pos:pos + size] + stream[pos + size:]
    if kind == "swap-records":
        p2, s2, _ = spans[rng.randrange(len(spans))]
        (a, la), (b, lb) = sorted([(pos, size), (p2, s2)])
        if a == b:
            return stream
        return stream[:a] + stream[b:b + lb] + stream[a + la:b] + stream[a:a + la] + stream[b + lb:]
    if kind in ("repeat-table", "drop-table"):
        tables = _table_spans(spans)
        if not tables:
            return stream
        tpos, tsize = rng.choice(tables)
        if kind == "drop-table":
            return stream[:tpos] + stream[tpos + tsize:]
        return stream[:tpos + tsize] + stream[tpos:tpos + tsize] + stream[tpos + tsize:]
    # json: a metadata record's payload replaced by garbled JSON (a DATA record is left alone)
    if rkind == DATA:
        pos, size, rkind = rng.choice([s for s in spans if s[2] != DATA])
    payload = rng.choice(GARBLED_JSON)
    if rkind in (PRE_DATA, POST_DATA) and rng.random() < 0.5:
        payload = b"\xff" + payload  # DDL text that is not UTF-8
    return stream[:pos] + rkind + len(payload).to_bytes(8, "big") + payload + stream[pos + size:]


# ----------------------------------------------------------------------------------------- archives

def _mutate_bytes(data: bytes, rng: random.Random, kind: str, other: bytes) -> bytes:
    n = max(len(data), 1)
    if kind == "flip":
        return mutate(data, ("flip", rng.randrange(n), rng.randrange(1, 256)), data)
    if kind == "overwrite":
        return mutate(data, ("overwrite", rng.randrange(n), rng.randbytes(rng.randint(1, 16))), data)
    if kind == "insert":
        return mutate(data, ("insert", rng.randrange(n + 1), rng.randbytes(rng.randint(1, 64))), data)
    if kind == "delete":
        return mutate(data, ("delete", rng.randrange(n), rng.choice((1, 2, 7, 16, 100, 4096))), data)
    if kind == "truncate":
        return mutate(data, ("truncate", rng.randrange(n), 0), data)
    if kind == "append":
        return data + rng.choice((rng.randbytes(rng.randint(1, 64)), other[:rng.randint(1, 4096)]))
    # splice: a run of bytes of another wedding's archive or stream in place of (or inside) this one's
    start = rng.randrange(max(len(other), 1))
    piece = other[start:start + rng.choice((1, 16, 300, CHUNK + 16, 10_000))]
    at = rng.randrange(n)
    end = at + (len(piece) if rng.random() < 0.5 else 0)
    return data[:at] + piece + data[end:]


def _replace_label(blob: bytes, label: bytes) -> bytes:
    """The archive with its header label replaced, both length fields kept consistent."""
    try:
        offset, _ = header_fields(blob)["label_len"]
    except (IndexError, struct.error):
        return blob
    old = struct.unpack(">H", blob[offset:offset + 2])[0] if len(blob) >= offset + 2 else 0
    label = label[:0xFFFF]
    header_len = struct.unpack(">I", blob[7:11])[0] + len(label) - old
    return (blob[:7] + struct.pack(">I", header_len % (1 << 32)) + blob[11:offset] + struct.pack(">H", len(label))
            + label + blob[offset + 2 + old:])


def mutate_archive(blob: bytes, rng: random.Random, kind: str, other: bytes) -> bytes:
    if kind == "label":
        return _replace_label(blob, rng.choice(GARBLED_JSON[:-3] + (b"[" * 30_000 + b"]" * 30_000,)))
    if kind == "field":
        value = rng.choice(INTERESTING_U32) if rng.random() < 0.6 else rng.randrange(1 << 32)
        return mutate(blob, ("field", rng.choice(HEADER_FIELDS), value), other)
    if kind in ("swap", "duplicate", "drop", "foreign"):
        return mutate(blob, (kind, rng.randrange(1000), rng.randrange(1000)), other)
    return _mutate_bytes(blob, rng, kind, other)


# --------------------------------------------------------------------------------------------- loop

def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:160]}\n" + "".join(traceback.format_exception(exc)[-3:])[:600]


def check_archive(sample: Sample, damaged: bytes) -> str:
    got, exc = read_through(damaged)  # anything but ArchiveError escapes
    if not sample.stream.startswith(got):
        raise AssertionError("released plaintext that is not a prefix of the original")
    if exc is None:
        if got != sample.stream:
            raise AssertionError("read to its end but is not the original")
        return "archive: read back identical"
    if not str(exc).startswith(f"archive {NAME}:") or KEY.material.hex() in str(exc):
        raise AssertionError(f"error does not name the archive, or shows the key: {exc}")
    if damaged == sample.sealed:
        raise AssertionError(f"the unmodified archive was refused: {exc}")
    return f"archive: rejected ({type(exc).__name__})"


def check_stream(sample: Sample, original: Parsed, damaged: bytes) -> str:
    try:
        parsed = parse_stream(damaged)
    except (SnapshotFormatError, VerificationError) as exc:
        if NAME not in str(exc):
            raise AssertionError(f"error does not name the archive: {exc}") from None
        return f"stream: rejected ({type(exc).__name__})"
    if damaged == sample.stream or parsed == original:
        return "stream: read back identical"
    if parsed.tables != original.tables:
        raise AssertionError("ALTERED DATA ACCEPTED: tables differ from the original's "
                             f"({len(parsed.tables)} vs {len(original.tables)} tables)")
    return "stream: metadata altered, data intact"


def run(samples: list[Sample], count: int, *, seed: int, progress: Callable[[int], None] | None = None
        ) -> MutationReport:
    """`count` mutated inputs, half archives, half streams, each from 1-3 stacked mutations (seeded)."""
    report = MutationReport(seed)
    originals = [parse_stream(s.stream) for s in samples]
    started = time.monotonic()
    for index in range(count):
        rng = random.Random(f"{seed}:{index}")  # any single input reproduces from (seed, index)
        i = rng.randrange(len(samples))
        sample, other = samples[i], samples[(i + 1) % len(samples)]
        layer = "archive" if index % 2 == 0 else "stream"
        kinds = [rng.choice(ARCHIVE_KINDS if layer == "archive" else STREAM_KINDS)
                 for _ in range(rng.choice((1, 1, 1, 2, 3)))]
        data = sample.sealed if layer == "archive" else sample.stream
        try:
            for kind in kinds:
                report.mutations[f"{layer}:{kind}"] += 1
                if layer == "archive":
                    data = mutate_archive(data, rng, kind, other.sealed)
                else:
                    data = mutate_stream(data, rng, kind, other.stream)
            if layer == "archive":
                report.archives_read += 1
                outcome = check_archive(sample, data)
            else:
                report.streams_read += 1
                outcome = check_stream(sample, originals[i], data)
            report.outcomes[outcome] += 1
        except Exception as exc:  # noqa: BLE001 - every other exception is a finding, with its reproduction
            report.outcomes[f"{layer}: FAILED"] += 1
            report.fail(f"seed {seed} index {index} ({layer} {sample.name}, {'+'.join(kinds)}): {_describe(exc)}",
                        f"{layer}-{index}", data)
        if progress is not None and index % 10_000 == 0:
            progress(index)
    report.seconds = time.monotonic() - started
    return report


def samples_from(dsn: str, partitions: list[str]) -> list[Sample]:
    """Real snapshot streams of these partitions of a database, each also sealed with the fuzz key."""
    from wedbackup_dagster.core.postgres.snapshot import SnapshotSession

    out = []
    with SnapshotSession(dsn) as session:
        for partition in partitions:
            sink = io.BytesIO()
            session.snapshot(partition, sink)
            stream = sink.getvalue()
            sealed, _ = seal_bytes(stream, wedding_key=KEY, label={"partition": partition}, chunk_size=CHUNK)
            out.append(Sample(partition, stream, sealed))
    return out
