"""`wedbackup media backup | restore | verify`: wedding media (photos, videos, documents, vendor
portfolios) backed up deduplicated and encrypted per wedding, restored by wedding, verified by restore."""
from __future__ import annotations

import argparse
import json
import sys

from wedbackup_dagster.core.errors import WedbackupError
from wedbackup_dagster.core.partitions import check_partition
from wedbackup_dagster.core.partitions import PLATFORM


def _service():
    from wedbackup_dagster.core.media.service import MediaService

    return MediaService.from_env()


def _partitions(args: argparse.Namespace, service) -> list[str]:
    if getattr(args, "all", False):
        return service.partitions()
    if getattr(args, "platform", False):
        return [PLATFORM]
    return [check_partition(w) for w in args.wedding]


def back_up_partitions(service, partitions: list[str], out=None) -> bool:
    """Back up and replicate each partition's media; one line per partition. True when all succeeded."""
    out = sys.stdout if out is None else out  # looked up per call: a caller (or a test) may have replaced it
    from wedbackup_dagster.core.media.service import PROVIDERS

    ok = True
    for partition, result in service.back_up_each(partitions):
        if isinstance(result, WedbackupError):
            print(f"  {partition:<10} FAILED: {result}", file=out)
            ok = False
            continue
        uploaded = 0
        for provider in PROVIDERS:
            try:
                uploaded += service.replicate(partition, provider)[0]
            except WedbackupError as exc:
                print(f"  {partition:<10} {provider} FAILED: {exc}", file=out)
                ok = False
        state = "unchanged" if result.unchanged else f"new {result.new_bytes / 1e6:.1f} MB"
        print(f"  {partition:<10} {result.files} files, {result.bytes / 1e6:.1f} MB, {state}, "
              f"{result.packs} pack(s), {uploaded} object(s) uploaded, {len(result.skipped)} skipped", file=out)
        for s in result.skipped[:10]:
            print(f"      skipped {s.path!r}: {s.reason}", file=out)
    return ok


def cmd_media_backup(args: argparse.Namespace) -> int:
    service = _service()
    try:
        partitions = _partitions(args, service)
        print(f"backing up the media of {len(partitions)} partition(s) from {service.require_source().description}")
        return 0 if back_up_partitions(service, partitions) else 1
    finally:
        service.close()


def cmd_media_restore(args: argparse.Namespace) -> int:
    from wedbackup_dagster.core.media.service import progress_printer
    from wedbackup_dagster.core.media.source import S3Source, media_s3_client

    partition = PLATFORM if args.platform else check_partition(args.wedding)
    service = _service()
    try:
        kwargs = {"as_of": args.as_of, "path_glob": args.path, "provider": args.source,
                  "progress": progress_printer(f"media of {partition}", sys.stderr)}
        if args.to.startswith("s3://"):
            import os

            bucket, _, prefix = args.to[5:].partition("/")
            kwargs["to_bucket"] = S3Source(media_s3_client(os.environ), bucket, prefix)
        else:
            kwargs["to_dir"] = args.to
        result = service.restore(partition, **kwargs)
    finally:
        service.close()
    if args.json:
        print(json.dumps({"partition": partition, "snapshot": result.snapshot_sha256, "files": result.files,
                          "bytes": result.bytes, "renamed": result.renamed, "damaged": result.damaged,
                          "locations": result.locations, "seconds": round(result.seconds, 3)}))
    else:
        print(f"restored {result.files} file(s), {result.bytes / 1e6:.1f} MB of {partition} to {args.to} "
              f"in {result.seconds:.1f} s (packs from {', '.join(f'{k}: {v}' for k, v in result.locations.items())})")
        for src, dst in result.renamed:
            print(f"  {src!r} written as {dst!r} (not a safe file name as it was)")
        for d in result.damaged:
            print(f"  damaged copy skipped: {d}")
    return 0


def cmd_media_verify(args: argparse.Namespace) -> int:
    service = _service()
    ok = True
    try:
        for partition in _partitions(args, service):
            provider = args.source or service.next_provider(partition)
            try:
                r = service.verify(partition, provider, args.sample)
            except WedbackupError as exc:
                print(f"  {partition:<10} FAILED: {exc}")
                ok = False
                continue
            print(f"  {partition:<10} {provider:<6} {'ok' if r.ok else 'FAILED'}: {r.files_checked} of "
                  f"{r.files_total} files ({r.bytes_checked / 1e6:.1f} MB) match, {r.packs_checked} pack(s)")
            for p in r.problems[:10]:
                print(f"      {p}")
            ok = ok and r.ok
    finally:
        service.close()
    return 0 if ok else 1


def cmd_media_prune(args: argparse.Namespace) -> int:
    from wedbackup_dagster.core.media.repack import repack_threshold
    from wedbackup_dagster.core.media.retention import prune_all_media
    from wedbackup_dagster.core.policy.backup_policy import Policy

    service = _service()
    policy = Policy.from_env()
    try:
        catalogue = service.catalogue
        kwargs = {"wedding_dates": catalogue.live_partitions(), "erased": catalogue.erased_partitions(),
                  "dry_run": args.dry_run, "repack_below": repack_threshold()}
        wanted = [None] if args.all else _partitions(args, service)
        sweeps = [prune_all_media(service.store, policy, service.resolve_key, partition=p, **kwargs) for p in wanted]
    finally:
        service.close()
    verb = "would delete" if args.dry_run else "deleted"
    for sweep in sweeps:
        for r in sweep.reports:
            print(f"  {r.partition:<10} kept {len(r.kept)} snapshot(s); {verb} {len(r.deleted_snapshots)} snapshot(s) "
                  f"and {len(r.deleted_packs)} pack(s), {r.freed_bytes / 1e6:.1f} MB; repacked {len(r.repacked)} "
                  f"sparse pack(s) ({r.repacked_live_bytes / 1e6:.1f} MB live)")
        for p in sweep.erased:
            print(f"  {p:<10} erased wedding: what its erasure left behind deleted")
        for f in sweep.failed[:10]:
            print(f"      FAILED {f}")
    return 0 if not any(s.failed for s in sweeps) else 1


def register(sub: argparse._SubParsersAction) -> None:
    media = sub.add_parser("media", help="wedding media: back up, restore, verify (WEDBACKUP_MEDIA_SOURCE)")
    verbs = media.add_subparsers(dest="verb", required=True)

    def which(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--all", action="store_true", help="every partition the source has media for")
        g.add_argument("--wedding", nargs="+", default=[])
        g.add_argument("--platform", action="store_true")

    backup = verbs.add_parser("backup", help="back up media to the vault, S3, GCS and Azure")
    which(backup)
    backup.set_defaults(func=cmd_media_backup)

    restore = verbs.add_parser("restore", help="restore a wedding's media, or single files, from any copy")
    g = restore.add_mutually_exclusive_group(required=True)
    g.add_argument("--wedding")
    g.add_argument("--platform", action="store_true")
    restore.add_argument("--as-of", help="ISO 8601 time with a timezone: the newest snapshot at or before it")
    restore.add_argument("--path", help="only files whose path matches this glob")
    restore.add_argument("--to", required=True, help="a directory, or s3://bucket/prefix")
    restore.add_argument("--from", dest="source", choices=["vault", "s3", "gcs", "azure"],
                         help="only this location (default: the first intact copy)")
    restore.add_argument("--json", action="store_true")
    restore.set_defaults(func=cmd_media_restore)

    verify = verbs.add_parser("verify", help="restore-test the newest media snapshot (SHA-256 of every file)")
    which(verify)
    verify.add_argument("--from", dest="source", choices=["vault", "s3", "gcs", "azure"],
                        help="default: rotate through the locations")
    verify.add_argument("--sample", type=int, default=None,
                        help="files per verification (0: all; default WEDBACKUP_MEDIA_VERIFY_SAMPLE)")
    verify.set_defaults(func=cmd_media_verify)

    prune = verbs.add_parser("prune", help="retention: prune media snapshots by the tier's rules, collect "
                                           "packs no kept snapshot needs")
    which(prune)
    prune.add_argument("--dry-run", action="store_true")
    prune.set_defaults(func=cmd_media_prune)
