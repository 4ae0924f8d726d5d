"""`wedbackup backup` and `wedbackup demo`: backups through Dagster from the command line, so every
backup is a recorded run in the same instance the UI shows (restores: restore.py)."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from ..core.errors import WedbackupError
from wedbackup_dagster.core.partitions import check_partition, shown
from wedbackup_dagster.core.progress import show_on_terminal
from .common import QUIET, dagster_instance, print_runs
from wedbackup_dagster.core.partitions import PLATFORM


def _selected_keys(args: argparse.Namespace, all_keys: list[str]) -> list[str]:
    if getattr(args, "all", False):
        return all_keys
    if getattr(args, "platform", False):
        return [PLATFORM]
    unknown = [w for w in args.wedding if w not in all_keys]
    if unknown:
        raise WedbackupError(f"unknown wedding(s): {', '.join(map(shown, unknown[:10]))} (not in the source database, or erased)")
    return list(args.wedding)


def _check_weddings(ids: list[str] | None) -> None:
    """Wedding ids from the command line become partition keys, paths and object keys: refuse anything
    that is not one before touching a database or Dagster."""
    for wedding in ids or []:
        check_partition(wedding)


def cmd_backup(args: argparse.Namespace) -> int:
    from ..backups.launch import register_partitions, run_job_for
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from ..core.config import Settings

    _check_weddings(args.wedding)
    settings = Settings.from_env()
    instance = dagster_instance()
    catalogue = Catalogue(settings.catalogue_dsn)
    catalogue.migrate()
    keys = register_partitions(instance, settings.source_dsn, catalogue.erased_partitions())
    selected = _selected_keys(args, keys)
    _ensure_targets(settings)
    print(f"backing up {len(selected)} partition(s) through Dagster")
    show_on_terminal()
    started = time.perf_counter()
    results = run_job_for("backup_weddings", selected, instance=instance, run_config=QUIET)
    ok = print_runs(results)
    if os.environ.get("WEDBACKUP_MEDIA_SOURCE"):  # the weddings' media along with their rows (issue 19)
        print(f"backing up the media of {len(selected)} partition(s) through Dagster")
        ok = print_runs(run_job_for("backup_media", selected, instance=instance, run_config=QUIET)) and ok
    print(f"whole job (dump, seal, vault, S3, GCS, Azure, verified restore, checks): "
          f"{time.perf_counter() - started:.1f} s for {len(selected)} partition(s)")
    return 0 if ok else 1


def _ensure_targets(settings) -> None:
    """Create the replica buckets/containers when missing (the local stack starts empty)."""
    from wedbackup_dagster.core.storage.providers import ensure_targets

    ensure_targets(settings)


def _summary(instance, keys: list[str]) -> str:
    from wedbackup_dagster.core.catalogue.store import Catalogue
    from ..core.config import Settings

    settings = Settings.from_env()
    with Catalogue(settings.catalogue_dsn).connect() as conn:
        row = conn.execute(
            """SELECT count(DISTINCT b.partition) AS partitions, count(*) AS archives,
                      coalesce(sum(b.raw_bytes), 0)::bigint AS raw, coalesce(sum(b.size), 0)::bigint AS sealed,
                      coalesce(sum(b.rows), 0)::bigint AS rows
               FROM (SELECT DISTINCT ON (partition) * FROM wedbackup.backups WHERE partition = ANY(%(keys)s)
                     ORDER BY partition, snapshot_time DESC) b""", {"keys": keys}).fetchone()
        copies = conn.execute(
            """SELECT c.provider, count(*) AS n, count(c.verified_at) AS verified
               FROM wedbackup.copies c JOIN (SELECT DISTINCT ON (partition) id FROM wedbackup.backups
                                             WHERE partition = ANY(%(keys)s)
                                             ORDER BY partition, snapshot_time DESC) b ON b.id = c.backup_id
               GROUP BY c.provider ORDER BY c.provider""", {"keys": keys}).fetchall()
    lines = [
        f"partitions backed up: {row['partitions']} of {len(keys)} (weddings + platform)",
        f"rows: {row['rows']:,}   raw: {row['raw'] / 1e6:.1f} MB   sealed: {row['sealed'] / 1e6:.1f} MB"
        f"   ratio {row['raw'] / max(row['sealed'], 1):.1f}x",
    ]
    for c in copies:
        lines.append(f"  copies on {c['provider']:<6} {c['n']:>5}   verified by restore: {c['verified']}")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..backups.launch import register_partitions, run_job_for
    from wedbackup_dagster.dev import demo_data
    from ..core.config import Settings

    settings = Settings.from_env()
    started = time.perf_counter()
    print(f"1/4 demo database: {args.weddings} weddings (seed {args.seed})")
    demo_data.generate(settings.source_dsn, weddings=args.weddings, seed=args.seed)
    _ensure_targets(settings)
    instance = dagster_instance()
    keys = register_partitions(instance, settings.source_dsn)
    print(f"2/4 partitions registered in Dagster: {len(keys)}")
    print("3/4 backing up every partition through Dagster (dump, seal, vault, S3, GCS, Azure, verified restore)")
    show_on_terminal()
    job_started = time.perf_counter()
    results = run_job_for("backup_weddings", keys, instance=instance, run_config=QUIET)
    ok = print_runs(results)
    print(f"  whole job: {time.perf_counter() - job_started:.1f} s for {len(keys)} partitions")
    print("4/4 summary")
    print(_summary(instance, keys))
    print(f"done in {time.perf_counter() - started:.0f} s{'' if ok else ' (with failures, see above)'}")
    if not args.headless:
        url = start_ui()
        print(f"Dagster UI: {url}  (stop everything with: make stack-down)")
    return 0 if ok else 1


def start_ui() -> str:
    """Start `dagster dev` in the background as a stack service, so `wedbackup stack down` stops it."""
    from wedbackup_dagster.dev.stack import Stack, port, port_open, project_root

    stack = Stack.default()
    p = port("dagster")
    url = f"http://127.0.0.1:{p}"
    if port_open(p):
        return url
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")

    def reset_signals() -> None:
        # Started from a script, dagster dev would inherit ignored SIGINT/SIGTERM and never stop.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    stack.log_dir.mkdir(parents=True, exist_ok=True)
    log = open(stack.log_dir / "dagster.log", "ab")
    proc = subprocess.Popen([dagster, "dev", "-w", str(project_root() / "workspace.yaml"), "-h", "127.0.0.1",
                             "-p", str(p)], cwd=project_root(), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=reset_signals)
    stack.pid_dir.mkdir(parents=True, exist_ok=True)
    (stack.pid_dir / "dagster.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not port_open(p):
        if proc.poll() is not None:
            raise WedbackupError(f"dagster dev exited early; see {stack.log_dir / 'dagster.log'}")
        time.sleep(0.5)
    return url


def register(sub: argparse._SubParsersAction) -> None:
    backup = sub.add_parser("backup", help="back up weddings through Dagster")
    group = backup.add_mutually_exclusive_group(required=True)
    group.add_argument("--all", action="store_true", help="every wedding and the platform")
    group.add_argument("--wedding", nargs="+", metavar="ID", help="these weddings")
    group.add_argument("--platform", action="store_true", help="the platform partition only")
    backup.set_defaults(func=cmd_backup)

    demo = sub.add_parser("demo", help="fill a demo database, back it all up, print a summary, start the UI")
    demo.add_argument("--weddings", type=int, default=60)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--headless", action="store_true", help="stop after the summary")
    demo.set_defaults(func=cmd_demo)
