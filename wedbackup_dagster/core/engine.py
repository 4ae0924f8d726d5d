"""The backup engine: for one partition (a wedding or `platform`), take the snapshot and seal it into
the vault in one stream, record it in the catalogue, upload it to every provider at once, and prove it restores.
Plain Python: the Dagster assets are thin calls into this class."""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from queue import Empty, SimpleQueue
from typing import Any

import psycopg

from wedbackup_dagster.core.formats.archive import ArchiveStats, ArchiveWriter, open_archive
from wedbackup_dagster.core.catalogue.store import BackupRecord, Catalogue
from .config import Settings
from wedbackup_dagster.core.postgres.identity import check_catalogue_not_source, check_restore_target
from .errors import (ArchiveError, PartitionBusyError, ProviderError, ReplicaChecksumMismatch, ReplicaError,
                     RestoreError, SnapshotRetryable, VerificationError, WedbackupError)
from wedbackup_dagster.core.keys.keyring import MasterKeyring, SecretKey, load_master_keyring
from wedbackup_dagster.core.catalogue.locks import partition_lock
from wedbackup_dagster.core.partitions import PLATFORM, partition_label
from wedbackup_dagster.core.formats.snapshot_stream import Manifest
from wedbackup_dagster.core.postgres.snapshot import count_mismatches, database_label
from wedbackup_dagster.core.storage.providers import PROVIDERS
from wedbackup_dagster.core.storage.replicas.base import DigestNeeds, digest_archive
from wedbackup_dagster.core.storage.vault import Vault, VaultEntry
from wedbackup_dagster.core.partitions import check_partition
from wedbackup_dagster.core.outcomes import BackupOutcome, ReplicaOutcome, VerifyOutcome

# One archive to upload: (partition, its newest backup, its vault file, the providers it goes to).
UploadSource = tuple[str, BackupRecord, VaultEntry, list[str]]
# One upload done: (provider, partition, backup, its ReplicaRecord or WedbackupError, seconds).
UploadResult = tuple[str, str, BackupRecord, Any, float]



class _CountingSink:
    """Passes snapshot bytes into the sealer; the sealer does the counting and hashing."""

    def __init__(self, writer: ArchiveWriter):
        self._writer = writer

    def write(self, data: bytes) -> int:
        self._writer.write(data)
        return len(data)


def _accept_broken_on_source(verify: Any, manifest: Manifest) -> None:
    """A platform restore holds the rows that broke a validated foreign key on the source (they reach no
    wedding): as many orphans as the snapshot counted for that key are the source's own state, faithfully
    kept, not a failed restore. They stay visible: their status says so, and db_dump's metadata lists them."""
    expected = {(f"{fk['schema']}.{fk['table']}", fk["constraint"]): fk.get("rows")
                for fk in manifest.broken_foreign_keys or [] if isinstance(fk, dict)
                if all(isinstance(fk.get(k), str) for k in ("schema", "table", "constraint"))}
    for check in verify.foreign_keys:
        if check.status == "orphans" and expected.get((check.table, check.constraint)) == check.orphans:
            check.status = "broken on the source, rows kept"


class Engine:
    share_seconds = 5.0  # see SnapshotSession: how long consecutive weddings may share one snapshot
    batch_size = 32  # weddings per back_up_many call: fewer query plans, at ~2 archive chunks of memory each

    def __init__(self, settings: Settings, keyring: MasterKeyring, catalogue: Catalogue | None = None):
        self.settings = settings
        self.keyring = keyring
        # The catalogue must not be the source (its keys would be sealed into platform archives), however
        # the two DSNs are written: compared by the database each reaches.
        check_catalogue_not_source(settings.source_dsn, settings.catalogue_dsn, connect=True)
        self.catalogue = catalogue or Catalogue(settings.catalogue_dsn)
        self.vault = Vault(settings.vault_dir)
        self.catalogue.migrate()
        # One backup or restore of a partition at a time (core/catalogue/locks.py); others wait this long for it.
        self.catalogue.partition_locks.timeout = settings.lock_timeout

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Engine:
        env = os.environ if environ is None else environ
        return cls(Settings.from_env(env), load_master_keyring(env))

    # ---- keys --------------------------------------------------------------------------------------
    def resolve_key(self, key_id: str) -> SecretKey:
        return self.catalogue.key_by_id(key_id, self.keyring)

    # ---- db_dump + encrypted_archive -------------------------------------------------------------
    @contextmanager
    def snapshot_session(self) -> Iterator[Any]:
        from wedbackup_dagster.core.postgres.snapshot import SnapshotSession

        # Weddings backed up within a few seconds of each other share one consistent snapshot.
        with SnapshotSession(self.settings.source_dsn, share_seconds=self.share_seconds,
                             lock_timeout=self.settings.snapshot_lock_timeout) as session:
            yield session

    @staticmethod
    def _fresh_snapshot_after(session: Any, moment: float) -> None:
        # A snapshot shared from before the lock was taken could predate a restore that just committed.
        start_after = getattr(session, "start_after", None)
        if start_after is not None:
            start_after(moment)

    def back_up(self, partition: str, session: Any) -> BackupOutcome:
        """Snapshot → zstd → AES-256-GCM → vault (atomic) → catalogue. Plaintext never touches disk.
        Holds the partition's lock throughout, waiting (bounded) for another backup or restore of it."""
        check_partition(partition)
        with partition_lock(self.catalogue, partition, purpose="backup"):
            self._fresh_snapshot_after(session, time.monotonic())
            return self._back_up_locked(partition, session)

    def _back_up_locked(self, partition: str, session: Any) -> BackupOutcome:
        started = time.perf_counter()
        self.vault.clean_incoming(partition)  # what a killed run of this partition left behind
        with self.vault.incoming(partition) as (fh, tmp):
            writer = self._archive_writer(partition, fh)
            try:
                manifest = session.snapshot(partition, _CountingSink(writer))
            except BaseException:
                writer.abort()
                raise
            stats = writer.close()
            entry = self.vault.commit(fh, tmp, partition, stats.sha256)
        return self._record(partition, manifest, stats, entry, time.perf_counter() - started)

    def back_up_each(self, partitions: list[str], session: Any) -> Iterator[tuple[str, BackupOutcome | WedbackupError]]:
        """Back up every partition given, in order: the platform on its own, weddings in batches of
        `batch_size` (one COPY per table per batch), side by side in `snapshot_workers` processes when there
        is more than one batch (then in the order batches end). Yields each partition's outcome or its error.
        A wedding whose lock another backup or restore holds is left out of its batch and, after every
        batch, backed up alone once the lock is free (waiting at most the lock timeout)."""
        weddings = [p for p in partitions if p != PLATFORM]
        if PLATFORM in partitions:
            try:
                yield PLATFORM, self._retrying(lambda: self.back_up(PLATFORM, session))
            except WedbackupError as exc:
                yield PLATFORM, exc
            # The weddings do not share the platform's snapshot: it began before the platform backup (which
            # reads every tenant table for rows in no wedding), so a batch whose locks are granted at once
            # would read from before another run's backups of its weddings committed meanwhile.
            self._fresh_snapshot_after(session, time.monotonic())
        busy: list[str] = []
        workers = self.settings.snapshot_workers
        if workers > 1 and len(weddings) > self.batch_size:
            # Batches side by side in worker processes (core/parallel_backup.py), each wedding's outcome kept.
            from wedbackup_dagster.core.parallel_backup import BUSY, back_up_in_workers

            for partition, outcome in back_up_in_workers(type(self), weddings, self.batch_size, workers):
                if isinstance(outcome, str) and outcome == BUSY:
                    busy.append(partition)
                else:
                    yield partition, outcome
            weddings = []
        for i in range(0, len(weddings), self.batch_size):
            batch = weddings[i:i + self.batch_size]
            for partition, outcome in self._retrying(lambda: self.back_up_many(batch, session)).items():
                if isinstance(outcome, PartitionBusyError):
                    busy.append(partition)
                else:
                    yield partition, outcome
        for partition in busy:
            try:
                yield partition, self._retrying(lambda: self.back_up(partition, session))
            except WedbackupError as exc:
                yield partition, exc

    snapshot_attempts = 3  # a snapshot that met concurrent DDL is taken this many times in all before failing

    def _retrying(self, work: Any) -> Any:
        """`work()`, taken again (with a fresh snapshot, after a short pause) when it fails with
        SnapshotRetryable: a table rewritten or truncated under the snapshot, or a lock not granted in
        WEDBACKUP_SNAPSHOT_LOCK_TIMEOUT. Nothing of a failed attempt is kept (no vault file, no record)."""
        for attempt in range(self.snapshot_attempts):
            try:
                return work()
            except SnapshotRetryable:
                if attempt == self.snapshot_attempts - 1:
                    raise
                time.sleep(min(5.0, 0.5 * 2 ** attempt))
        raise AssertionError("unreachable")

    def back_up_many(self, partitions: list[str], session: Any) -> dict[str, BackupOutcome | WedbackupError]:
        """`back_up` for a batch of weddings read from one snapshot with one COPY per table for the whole
        batch (`SnapshotSession.snapshot_many`): each wedding still gets its own archive, sealed with its
        own key, committed to the vault and recorded in the catalogue exactly as `back_up` does.

        Returns each wedding's outcome, or the error that kept it out (an unknown wedding, a bad id, a
        failed write); a failed wedding leaves no vault file and no catalogue row, and the others go on.
        An error of the source database or the catalogue is raised. Memory: about two archive chunks
        per wedding of the batch. The platform partition goes through `back_up`.

        Each wedding's lock is held from before its snapshot until its catalogue record; a wedding whose
        lock is held elsewhere (a backup or restore of it is running) is not waited for, so as not to hold
        up the batch: its result is a PartitionBusyError (back_up_each retries it alone)."""
        results: dict[str, BackupOutcome | WedbackupError] = {}
        weddings: list[str] = []
        for partition in dict.fromkeys(partitions):
            try:
                if check_partition(partition) == PLATFORM:
                    raise WedbackupError("back_up_many takes weddings only: back up the platform with back_up")
            except WedbackupError as exc:
                results[partition] = exc
                continue
            weddings.append(partition)
        locks = self.catalogue.partition_locks
        locked = locks.try_acquire(weddings, purpose="backup")
        try:
            for partition in set(weddings) - set(locked):
                results[partition] = locks.busy_error(partition, "backup")
            # Locks granted at once: the shared snapshot (at most share_seconds old) is kept. Renewing it per
            # batch would cost a schema fingerprint per batch (measured ~30-60 ms, ~9% of the fleet); the
            # only case it would change is a restore that committed in those seconds, backed up next time.
            # A wedding that was busy goes through back_up, which waits and always takes a fresh snapshot.
            if locked:
                self._back_up_many_locked(locked, session, results)
        finally:
            locks.release(locked)
        return {p: results[p] for p in dict.fromkeys(partitions)}

    def _back_up_many_locked(self, weddings: list[str], session: Any,
                             results: dict[str, BackupOutcome | WedbackupError]) -> None:
        started = time.perf_counter()
        # The keys are committed before any archive sealed with them can reach the vault.
        wedding_keys: dict[str, SecretKey] = {}
        # One transaction for the batch's keys, first backups' new keys included (Catalogue.wedding_keys).
        for partition, key in self.catalogue.wedding_keys(weddings, self.keyring).items():
            if isinstance(key, WedbackupError):
                results[partition] = key
            else:
                wedding_keys[partition] = key
        sealed: dict[str, tuple[Manifest, ArchiveStats, VaultEntry]] = {}
        for partition in wedding_keys:
            self.vault.clean_incoming(partition)  # what a killed run of this wedding left behind
        with ExitStack() as incoming:
            open_archives: dict[str, tuple[Any, Any, ArchiveWriter]] = {}
            try:
                for partition, wedding_key in wedding_keys.items():
                    fh, tmp = incoming.enter_context(self.vault.incoming(partition))
                    open_archives[partition] = (fh, tmp, self._archive_writer(partition, fh, wedding_key))
                snapshots = session.snapshot_many(
                    list(open_archives), {p: _CountingSink(w) for p, (_, _, w) in open_archives.items()})
            except BaseException:
                for _, _, writer in open_archives.values():
                    writer.abort()
                raise
            closed: dict[str, ArchiveStats] = {}
            for partition, (fh, tmp, writer) in open_archives.items():
                snapshot = snapshots[partition]
                if not isinstance(snapshot, Manifest):
                    writer.abort()
                    results[partition] = snapshot
                    continue
                try:
                    closed[partition] = writer.close()
                except OSError as exc:
                    results[partition] = self._vault_error(partition, exc)
            # Each commit waits for two fsyncs; run side by side, the disk serves them together.
            with ThreadPoolExecutor(max_workers=max(1, min(8, len(closed))),
                                    thread_name_prefix="wedbackup-vault") as pool:
                commits = {p: pool.submit(self.vault.commit, open_archives[p][0], open_archives[p][1], p, stats.sha256)
                           for p, stats in closed.items()}
            for partition, commit in commits.items():
                try:
                    sealed[partition] = (snapshots[partition], closed[partition], commit.result())
                except OSError as exc:
                    results[partition] = self._vault_error(partition, exc)
        share = (time.perf_counter() - started) / max(1, len(weddings))
        results.update(self._record_many(sealed, share))

    @staticmethod
    def _vault_error(partition: str, exc: OSError) -> WedbackupError:
        return WedbackupError(f"wedding {partition}: sealing its archive into the vault failed: {exc}")

    def _archive_writer(self, partition: str, fh: Any, wedding_key: SecretKey | None = None) -> ArchiveWriter:
        """An archive sealed with the wedding's live key (made on first use) into the vault file `fh`."""
        if wedding_key is None:
            wedding_key = self.catalogue.wedding_key(partition, self.keyring)
        return ArchiveWriter(fh, wedding_key=wedding_key, label={"partition": partition, "app": "wedbackup"},
                             level=self.settings.zstd_level)

    def _record(self, partition: str, manifest: Any, stats: ArchiveStats, entry: VaultEntry,
                seconds: float) -> BackupOutcome:
        """The committed archive into the catalogue: the backup and its vault copy, in one transaction."""
        return self._record_many({partition: (manifest, stats, entry)}, seconds)[partition]

    def _record_many(self, sealed: Mapping[str, tuple[Any, ArchiveStats, VaultEntry]], seconds: float
                     ) -> dict[str, BackupOutcome]:
        """`_record` for a batch's committed archives, in one catalogue transaction (not one commit each)."""
        rows, manifests = [], {}
        for partition, (manifest, stats, entry) in sealed.items():
            manifests[partition] = manifest.to_dict() if hasattr(manifest, "to_dict") else dict(manifest)
            vault_copy = dict(provider="vault", uri=entry.path.as_uri(), object_key=entry.path.name, version_id=None,
                              size=entry.size, checksum=stats.sha256, storage_class="local-disk", region=None,
                              media="disk", offsite=False)
            rows.append(dict(partition=partition, archive_sha256=stats.sha256, size=stats.sealed_bytes,
                             key_id=stats.key_id, manifest=manifests[partition], vault_copy=vault_copy))
        if not rows:
            return {}
        backups = (self.catalogue.record_backups(rows) if len(rows) > 1
                   else [self.catalogue.record_backup(**rows[0])])
        return {p: BackupOutcome(p, backup, sealed[p][1], sealed[p][2], manifests[p], seconds)
                for p, backup in zip(sealed, backups)}

    # ---- replicas ------------------------------------------------------------------------------------
    def replicate(self, partition: str, replica: Any) -> ReplicaOutcome:
        """Upload the partition's newest archive to one provider (a no-op when it is already there)."""
        started = time.perf_counter()
        backup, entry = self._replica_source(partition)
        record = self._upload(replica, partition, backup, entry)
        return self._record_copy(partition, backup, record, time.perf_counter() - started)

    def replicate_each(self, partitions: list[str], replica: Any, workers: int | None = None
                       ) -> Iterator[tuple[str, ReplicaOutcome | WedbackupError]]:
        """`replicate_to_all` for one provider: yields each partition's outcome or error as it completes."""
        for _, partition, outcome in self.replicate_to_all(
                partitions, {replica.provider: replica}, None if workers is None else {replica.provider: workers}):
            yield partition, outcome

    digest_workers = 2  # threads reading and hashing vault archives for replicate_to_all (hashlib frees the GIL)
    upload_min_share = 50  # fewest weddings worth a worker process of their own in replicate_to_all
    upload_max_share = 200  # most weddings of one worker share: each share's copies are recorded when it ends

    def replicate_to_all(self, partitions: list[str], replicas: Mapping[str, Any],
                         workers: Mapping[str, int] | None = None, wanted: Mapping[str, Collection[str]] | None = None,
                         processes: int = 1) -> Iterator[tuple[str, str, ReplicaOutcome | WedbackupError]]:
        """Upload many partitions' newest archives to every provider of `replicas` (provider -> replica) at the
        same time, yielding (provider, partition, outcome or error) as each completes. `wanted` (provider ->
        partitions) narrows what a provider is sent: a retried step redoes only what is not yet recorded.

        Each archive is read and hashed ONCE for all providers (SHA-256, and the MD5, CRC32C or per-part
        SHA-256 any of them needs), checked against the catalogue's SHA-256 and size before any provider gets
        it: a damaged vault file is refused for every provider. Its uploads then share those digests, and each
        provider still confirms its own checksum in its answer (replicas/*.py). Every provider uploads in its
        own threads, up to `workers[provider]` (default Settings.upload_concurrency_for(provider)) archives at
        once, so a slow or failing provider holds up only its own uploads. The providers' clients are
        thread-safe (boto3 clients, google-cloud-storage's Client and azure-storage-blob's clients say so).

        With `processes` > 1 (the steps pass Settings.upload_workers) and at least two shares' worth of
        weddings, shares of the weddings upload side by side in worker processes (core/parallel_backup.py
        upload_in_workers), each with replicas of the same providers built from the settings and the
        provider's bound split between them (never more in flight at a provider than in one process); the
        client's CPU per request, which held this process's GIL, then runs on every core. Either way every
        catalogue read and write stays on this thread, on the catalogue's one connection, and a copy is
        reported only once it is recorded. An unexpected error in this process (a bug, not a provider's
        refusal) cancels the work not yet started and propagates; a worker that dies fails its share's
        weddings, by name, with nothing recorded for them."""
        providers = list(replicas)
        if not providers:
            return
        chosen = workers or {}
        bounds = {p: max(1, chosen.get(p) or self.settings.upload_concurrency_for(p)) for p in providers}
        # Every wedding's newest backup in one catalogue query, not one round trip per wedding; without their
        # manifests (an upload needs none; parsing 2,000 of them was most of this process's work in the step).
        latest = self.catalogue.latest_backups(_well_formed(partitions), manifests=False)
        asked = {p: set(wanted[p]) for p in providers if wanted is not None and p in wanted}
        sources: list[UploadSource] = []
        for partition in partitions:
            to = [p for p in providers if p not in asked or partition in asked[p]]
            if not to:
                continue
            try:
                backup, entry = self._replica_source(partition, latest.get(partition))
            except WedbackupError as exc:
                for provider in to:
                    yield provider, partition, exc
                continue
            sources.append((partition, backup, entry, to))
        processes = min(processes, min(bounds.values()), len(sources) // self.upload_min_share)
        if processes <= 1:
            yield from self._recorded(self._uploads(sources, replicas, bounds, tick=self.copy_record_seconds))
            return
        from wedbackup_dagster.core.parallel_backup import upload_in_workers

        share = self.upload_share(len(sources), processes)
        each = {p: bounds[p] // processes for p in providers}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wedbackup-upload-tidy") as tidying:
            _tidy_abandoned_uploads(replicas, lambda provider: tidying)  # beside the workers' uploads
            yield from self._recorded(upload_in_workers(type(self), sources, providers, each, share, processes,
                                                        tick=self.copy_record_seconds))

    def upload_share(self, weddings: int, processes: int) -> int:
        """Weddings per worker share of an upload step: about four rounds of `processes` shares, each of
        upload_min_share to upload_max_share weddings (a share's copies are recorded when it ends)."""
        return max(self.upload_min_share, min(self.upload_max_share, -(-weddings // (4 * processes))))

    def _uploads(self, sources: list[UploadSource], replicas: Mapping[str, Any], bounds: Mapping[str, int],
                 tick: float | None = None, tidy: bool = True) -> Iterator[UploadResult | None]:
        """Every (provider, partition, backup, record or WedbackupError, seconds) of `sources` as it completes,
        nothing recorded; None after `tick` seconds with none (the caller's turn to record what it holds).
        The digests of an archive are taken once for its providers, then each provider uploads in its own
        threads, up to `bounds[provider]` at once; with `tidy`, S3's abandoned multipart parts are aborted too."""
        lanes = {p: ThreadPoolExecutor(max_workers=bounds[p], thread_name_prefix=f"wedbackup-upload-{p}")
                 for p in replicas}
        hashers = ThreadPoolExecutor(max_workers=self.digest_workers, thread_name_prefix="wedbackup-digest")
        try:
            if tidy:
                _tidy_abandoned_uploads(replicas, lanes.__getitem__)  # each in its provider's own lane
            digesting: dict[Future, UploadSource] = {}
            uploading: dict[Future, tuple[str, str, BackupRecord]] = {}
            # Each finished future lands on `finished` (its done-callback), so taking the next one costs the
            # same however many are still running (concurrent.futures.wait sets a waiter on every pending
            # future per call: with thousands of archives that alone held the GIL for seconds).
            finished: SimpleQueue[Future] = SimpleQueue()
            for source in sources:
                partition, backup, entry, to = source
                needs = DigestNeeds()
                for provider in to:
                    needs = needs | replicas[provider].digests_needed(entry.size)
                future = hashers.submit(self._digest_archive, partition, backup, entry, needs)
                digesting[future] = source
                future.add_done_callback(finished.put)
            outstanding = len(digesting)
            while outstanding:
                try:
                    future = finished.get(timeout=tick)
                except Empty:
                    yield None
                    continue
                outstanding -= 1
                if future in digesting:
                    partition, backup, entry, to = digesting.pop(future)
                    try:
                        digests = future.result()
                    except WedbackupError as exc:
                        for provider in to:
                            yield provider, partition, backup, exc, 0.0
                        continue
                    for provider in to:
                        upload = lanes[provider].submit(self._timed_upload, replicas[provider], partition, backup,
                                                        entry, digests)
                        uploading[upload] = (provider, partition, backup)
                        outstanding += 1
                        upload.add_done_callback(finished.put)
                    continue
                provider, partition, backup = uploading.pop(future)
                try:
                    record, seconds = future.result()
                except WedbackupError as exc:
                    yield provider, partition, backup, exc, 0.0
                    continue
                yield provider, partition, backup, record, seconds
        finally:
            hashers.shutdown(wait=True, cancel_futures=True)
            for lane in lanes.values():
                lane.shutdown(wait=True, cancel_futures=True)

    def _recorded(self, results: Iterator[UploadResult | None]
                  ) -> Iterator[tuple[str, str, ReplicaOutcome | WedbackupError]]:
        """Each upload's (provider, partition, outcome or error), a confirmed copy only once it is recorded.
        Confirmed uploads are recorded in the catalogue a batch per transaction (a crash in between leaves an
        object a re-run finds, a no-op); a failure is reported at once."""
        confirmed: list[ReplicaOutcome] = []
        oldest = 0.0  # when the oldest confirmed upload not yet recorded was confirmed
        for result in results:
            if result is not None:
                provider, partition, backup, outcome, seconds = result
                if isinstance(outcome, WedbackupError):
                    yield provider, partition, outcome
                else:
                    if not confirmed:
                        oldest = time.monotonic()
                    confirmed.append(ReplicaOutcome(partition, backup, outcome, seconds))
            if confirmed and (len(confirmed) >= self.copy_record_batch
                              or time.monotonic() - oldest >= self.copy_record_seconds):
                yield from self._record_copies(confirmed)
                confirmed = []
        yield from self._record_copies(confirmed)

    # Confirmed uploads are recorded in one catalogue transaction per batch, a batch being full or its oldest
    # upload this many seconds old: the three providers' uploads together outpaced one commit per 32 (its
    # wait on the catalogue's fsync), which held the step on this thread while the upload threads idled.
    copy_record_batch = 256
    copy_record_seconds = 1.0

    def _record_copies(self, outcomes: list[ReplicaOutcome]) -> Iterator[tuple[str, str, ReplicaOutcome]]:
        if not outcomes:
            return
        self.catalogue.record_copies([self._copy_row(o.backup, o.record) for o in outcomes])
        for outcome in outcomes:
            yield outcome.record.provider, outcome.partition, outcome

    @staticmethod
    def _digest_archive(partition: str, backup: BackupRecord, entry: VaultEntry, needs: DigestNeeds) -> Any:
        """One read of the vault archive for every provider's digests; ArchiveError when it is not the
        archive the catalogue recorded, a WedbackupError naming the wedding when it cannot be read."""
        try:
            return digest_archive(entry.path, backup.archive_sha256, entry.size, needs)
        except OSError as exc:
            raise WedbackupError(f"wedding {partition}: reading its archive from the vault failed: {exc}") from None

    def _replica_source(self, partition: str, latest: BackupRecord | None = None) -> tuple[BackupRecord, VaultEntry]:
        backup = latest or self.catalogue.require_latest_backup(check_partition(partition))
        entry = self.vault.get(partition, backup.archive_sha256)
        if entry is None:
            raise WedbackupError(f"wedding {partition}: archive {backup.archive_sha256[:12]}… is missing from the "
                                 f"vault ({self.vault.root}); take a new backup")
        return backup, entry

    @staticmethod
    def _upload(replica: Any, partition: str, backup: BackupRecord, entry: VaultEntry, digests: Any = None) -> Any:
        shared = {"digests": digests} if digests is not None else {}  # computed once for every provider
        return replica.upload(entry.path, partition=partition, sha256=backup.archive_sha256, size=entry.size,
                              metadata={"partition": partition, "key-id": backup.key_id}, **shared)

    def _timed_upload(self, replica: Any, partition: str, backup: BackupRecord, entry: VaultEntry,
                      digests: Any = None) -> tuple[Any, float]:
        started = time.perf_counter()
        return self._upload(replica, partition, backup, entry, digests), time.perf_counter() - started

    def _record_copy(self, partition: str, backup: BackupRecord, record: Any, seconds: float) -> ReplicaOutcome:
        row = self._copy_row(backup, record)
        self.catalogue.record_copy(row.pop("backup_id"), **row)
        return ReplicaOutcome(partition, backup, record, seconds)

    @staticmethod
    def _copy_row(backup: BackupRecord, record: Any) -> dict[str, Any]:
        return {"backup_id": backup.id, "provider": record.provider, "uri": record.uri, "object_key": record.key,
                "version_id": record.version_id, "size": record.size, "checksum": record.provider_checksum,
                "storage_class": record.storage_class, "region": record.region, "media": record.media,
                "offsite": record.offsite, "locked_until": getattr(record, "locked_until", None),
                "lock_mode": getattr(record, "lock_mode", None)}

    # ---- verified_restore ------------------------------------------------------------------------------
    def choose_provider(self, backup: BackupRecord, available: list[str], asked: str | None = None, *,
                        copies: list[Any] | None = None, restores: int | None = None) -> str:
        """Rotate through the copies so that, over time, every provider's copy is restored. `copies` (the
        backup's CopyRecords) and `restores` (its restore count), when a batch read them already."""
        copies = {c.provider for c in (self.catalogue.copies(backup.id) if copies is None else copies)}
        if asked:
            if asked not in copies:
                raise ProviderError(asked, f"holds no copy of wedding {backup.partition}'s newest backup")
            return asked
        candidates = [p for p in available if p in copies] or (["vault"] if "vault" in copies else [])
        if not candidates:
            raise WedbackupError(f"wedding {backup.partition}: no copy of the newest backup to verify")
        # Start from a point given by the archive's own hash, so across a fleet every provider is exercised,
        # then move one provider on for each later verification of the same backup.
        start = int(backup.archive_sha256[:8], 16)
        if restores is None:
            restores = self.catalogue.restore_count(backup.id)
        return candidates[(start + restores) % len(candidates)]

    @contextmanager
    def fetched_copy(self, backup: BackupRecord, chosen: str, replicas: Mapping[str, Any]) -> Iterator[Any]:
        """A temporary file holding the chosen copy, its SHA-256 checked against the catalogue."""
        folder = self.vault.root if self.vault.root.exists() else None
        with tempfile.TemporaryFile(dir=folder) as tmp:
            if chosen == "vault":
                self.copy_from_vault(backup, tmp)
            else:
                copy = next(c for c in self.catalogue.copies(backup.id) if c.provider == chosen)
                self.download_copy(replicas[chosen], copy.object_key, tmp, backup)
            tmp.seek(0)
            yield tmp

    def copy_from_vault(self, backup: BackupRecord, out: Any) -> None:
        """The vault's copy of `backup` written to `out`, its SHA-256 checked against the catalogue on the bytes
        written (so what is read next is what was checked, even if the vault file changes meanwhile)."""
        entry = self.vault.get(backup.partition, backup.archive_sha256)
        if entry is None:
            raise WedbackupError(f"wedding {backup.partition}: the vault copy {backup.archive_sha256[:12]}… is missing")
        digest = hashlib.sha256()
        with open(entry.path, "rb") as src:
            while block := src.read(1 << 20):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != backup.archive_sha256:
            raise ArchiveError(self.archive_name(backup, "vault"),
                               "its SHA-256 no longer matches the catalogue: the vault copy is damaged")

    download_attempts = 3

    def download_copy(self, replica: Any, key: str, tmp: Any, backup: BackupRecord) -> None:
        """One copy into `tmp`, checked against the catalogue's SHA-256. A transient failure (the connection
        dropped, the answer was cut short) is retried from the start; whole-length bytes with another hash
        are damage at the provider and are raised at once, never retried away."""
        for attempt in range(self.download_attempts):
            tmp.seek(0)
            tmp.truncate()
            try:
                replica.download(key, tmp, expected_sha256=backup.archive_sha256)
                return
            except ReplicaChecksumMismatch:
                if tmp.tell() >= backup.size or attempt == self.download_attempts - 1:
                    raise
            except ReplicaError:
                if attempt == self.download_attempts - 1:
                    raise
            time.sleep(0.5 * 2 ** attempt)

    def archive_name(self, backup: BackupRecord, chosen: str) -> str:
        return f"{chosen}:{backup.partition}/{backup.archive_sha256[:16]}"

    def verify(self, partition: str, replicas: Mapping[str, Any], provider: str | None = None) -> VerifyOutcome:
        """Download one copy, decrypt, restore into a scratch database, compare with the manifest."""
        from wedbackup_dagster.core.postgres import load_snapshot as restore

        backup = self.catalogue.require_latest_backup(check_partition(partition))
        chosen = self.choose_provider(backup, [p for p in PROVIDERS if p in replicas], provider)
        self.drop_abandoned_scratch(restore)
        started = time.perf_counter()
        ok = False
        detail: dict[str, Any] = {}
        try:
            with self.fetched_copy(backup, chosen, replicas) as tmp:
                download_seconds = time.perf_counter() - started
                chunks = open_archive(tmp, name=self.archive_name(backup, chosen), resolve_key=self.resolve_key)
                restore_started = time.perf_counter()
                with restore.scratch_database(self.settings.scratch_dsn, label=partition) as scratch_dsn:
                    restore.restore_snapshot(chunks, scratch_dsn, create_schema=True)
                    manifest = Manifest.from_dict(backup.manifest)
                    verify = restore.verify_restored(scratch_dsn, manifest)
                    _accept_broken_on_source(verify, manifest)
                    verify.raise_if_failed()
                    # Not only the manifest's rows (read by the same COPY): the independent count too.
                    short = count_mismatches(manifest, {t.table: t.rows for t in verify.tables})
                    if short:
                        what = partition_label(partition)
                        raise VerificationError(f"{what}: the restored copy does not hold the rows counted at "
                                                f"snapshot time: {'; '.join(short[:10])}")
                restore_seconds = time.perf_counter() - restore_started
            ok = True
            fks = [f.status for f in verify.foreign_keys]
            outcome = VerifyOutcome(partition, backup, chosen, time.perf_counter() - started, download_seconds,
                                    restore_seconds, tables=verify.table_rows(), fk_checked=fks.count("ok"),
                                    fk_external=len(fks) - fks.count("ok"))
            detail = {"tables": len(outcome.tables), "fk_checked": outcome.fk_checked}
            return outcome
        except WedbackupError as exc:
            detail = {"error": str(exc)[:500]}
            raise
        except psycopg.Error as exc:
            # The scratch server failed under us (connection lost, server gone): name the wedding and the
            # server, so the step reports this wedding and goes on with the others.
            error = RestoreError(f"wedding {partition}: the verification restore failed (scratch server: "
                                 f"{database_label(self.settings.scratch_dsn)}): {type(exc).__name__}: "
                                 f"{(str(exc).strip().splitlines() or [''])[0][:300]}")
            detail = {"error": str(error)[:500]}
            raise error from None
        finally:
            self.catalogue.record_restore(backup.id, provider=chosen, ok=ok, seconds=time.perf_counter() - started,
                                          detail=detail)

    verify_batch_size = 500  # weddings sharing one scratch database in verify_each
    verify_min_share = 50  # fewest weddings worth a worker process of their own in verify_each

    def verify_each(self, partitions: list[str], replicas: Mapping[str, Any], provider: str | None = None,
                    on_progress: Any = None, workers: int | None = None
                    ) -> Iterator[tuple[str, VerifyOutcome | WedbackupError]]:
        """`verify` for many partitions: weddings in batches, each batch restored into ONE scratch database
        and checked per wedding against its own manifest (core/postgres/batch_verify.py); a wedding that fails there
        is verified alone. Yields each partition's outcome or its error (those verified alone last);
        `on_progress()` once per partition as its work is done. With `workers` > 1 (the steps pass
        Settings.snapshot_workers) and at least two shares' worth of weddings, the shares run side by side
        in worker processes with replicas of the same providers built from the settings."""
        from wedbackup_dagster.core.postgres.batch_verify import verify_many

        if workers is not None and workers > 1 and len(partitions) >= 2 * self.verify_min_share:
            # Shares side by side in worker processes, each in its own scratch database (core/parallel_backup.py),
            # with replicas built from the settings for the same providers.
            from wedbackup_dagster.core.parallel_backup import verify_in_workers

            share = self.verify_share(len(partitions), workers)
            step = on_progress or (lambda: None)
            for partition, outcome in verify_in_workers(type(self), partitions, list(replicas), provider, share,
                                                        workers):
                step()
                yield partition, outcome
            return
        for i in range(0, len(partitions), self.verify_batch_size):
            yield from verify_many(self, partitions[i:i + self.verify_batch_size], replicas, provider,
                                   on_progress=on_progress)

    def verify_share(self, weddings: int, workers: int) -> int:
        """Weddings per worker share: at most verify_batch_size, and as many shares as fit whole rounds of
        `workers` (2,001 weddings on 3 workers: 6 shares of 334, not 4 of 500 whose last ran alone)."""
        rounds = -(-weddings // (workers * self.verify_batch_size))
        return max(self.verify_min_share, -(-weddings // (workers * rounds)))

    def drop_abandoned_scratch(self, restore: Any) -> None:
        """Once per engine: drop the scratch databases a killed verification left on the scratch server."""
        if getattr(self, "_scratch_swept", False):
            return
        try:
            restore.drop_abandoned_scratch_databases(self.settings.scratch_dsn)
            self._scratch_swept = True
        except psycopg.Error:
            pass  # tidying only: the verification itself reports a server that cannot be reached

    # ---- key backups (issue 14 defect 9) --------------------------------------------------------------
    def back_up_new_keys(self, replicas: Mapping[str, Any]) -> Any:
        """Once per backup run, however it was launched: when a wedding key lives only in the catalogue, a
        key-store backup to the vault and `replicas` (core/keys/backup.py). Until one is at the vault and at
        least one provider, the backups those keys open are not done: raises KeyBackupError naming the
        providers that failed. None when every live key was already backed up (one indexed count)."""
        from .errors import KeyBackupError
        from wedbackup_dagster.core.keys.backup import back_up_key_store, keys_awaiting_backup

        if not keys_awaiting_backup(self.catalogue):
            return None
        result = back_up_key_store(self.settings, self.catalogue, replicas, self.keyring)
        if "vault" not in result.copies or len(result.copies) < 2:
            failed = "; ".join(f"{p}: {m}" for p, m in sorted(result.failures.items())) or "no provider given"
            raise KeyBackupError(result.sha256 or "of this run", "did not reach the vault and at least one "
                                 f"provider, so new wedding keys live only in the catalogue: {failed}")
        return result

    def restore_to(self, partition: str, target_dsn: str, replicas: Mapping[str, Any],
                   provider: str | None = None) -> Any:
        """Restore the newest backup of a partition into a target database and check it. Holds the
        partition's lock: a backup of the same wedding waits until the restore has committed (and then
        snapshots what it restored), and the restore waits for a running backup."""
        check_restore_target(target_dsn, source_dsn=self.settings.source_dsn,
                             catalogue_dsn=self.settings.catalogue_dsn, mode="target")
        with partition_lock(self.catalogue, check_partition(partition), purpose="restore"):
            return self._restore_to_locked(partition, target_dsn, replicas, provider)

    def _restore_to_locked(self, partition: str, target_dsn: str, replicas: Mapping[str, Any],
                           provider: str | None) -> Any:
        from wedbackup_dagster.core.postgres import load_snapshot as restore

        backup = self.catalogue.require_latest_backup(partition)
        copies = {c.provider for c in self.catalogue.copies(backup.id)}
        chosen = provider or ("vault" if "vault" in copies and self.vault.get(partition, backup.archive_sha256)
                              else self.choose_provider(backup, [p for p in PROVIDERS if p in replicas]))
        started = time.perf_counter()
        with self.fetched_copy(backup, chosen, replicas) as tmp:
            chunks = open_archive(tmp, name=self.archive_name(backup, chosen), resolve_key=self.resolve_key)
            report = restore.restore_snapshot(chunks, target_dsn, create_schema="auto")
        if partition == PLATFORM:  # platform archives still name erased weddings: erase them again
            from wedbackup_dagster.core.governance.erasure import reapply_erasures

            reapply_erasures(target_dsn, self.catalogue)  # audited there, table by table
        self.catalogue.audit("restore", partition, {"archive_sha256": backup.archive_sha256, "copy": chosen,
                                                    "seconds": round(time.perf_counter() - started, 3)})
        return backup, chosen, report


def _well_formed(partitions: list[str]) -> list[str]:
    """The partitions whose names check_partition accepts (the others fail on their own, by name)."""
    ok = []
    for partition in partitions:
        try:
            ok.append(check_partition(partition))
        except WedbackupError:
            pass
    return ok


def _tidy_abandoned_uploads(replicas: Mapping[str, Any], lane: Callable[[str], Executor]) -> None:
    """Each provider's abandoned upload parts dropped, once an upload step, in `lane(provider)` beside the
    uploads: S3's parts of multipart uploads whose process died (a single PUT never looks for them); GCS and
    Azure drop their unfinished uploads themselves."""
    for provider, replica in replicas.items():
        lane(provider).submit(replica.abort_abandoned_uploads)
