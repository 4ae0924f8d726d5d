"""Asset checks per wedding partition: archive integrity (blocking), replica checksum per provider, 3-2-1,
restore matches manifest, freshness by tier, shrinkage (a sharp drop in rows). Each check is one step even
in a batched run: it evaluates every wedding of the run and reports one result per wedding partition."""
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import dagster as dg

from ..instance.event_batches import check_evaluations_in_batches, log_check_evaluations
from .constants import DB_DUMP, ENCRYPTED_ARCHIVE, REPLICA_KEYS, VERIFIED_RESTORE
from .partitions import validated_keys, weddings_partitions
from ..shared.metadata import metadata_table
from ..shared.resources import ProviderReplicasResource, WedbackupEngineResource
from wedbackup_dagster.core.policy import rules
from ..core.engine import Engine
from ..core.errors import WedbackupError

# Freshness and shrinkage read the tier policy (core.policy, WEDBACKUP_POLICY_FILE): each wedding's RPO and
# tier come from its date in the catalogue and the season, as for the backup schedule.

Outcome = tuple[bool, str, dict[str, Any], dg.AssetCheckSeverity]


def _report(context: dg.AssetCheckExecutionContext, asset_key: dg.AssetKey, name: str,
            outcomes: dict[str, Outcome], *, blocking: bool = False) -> Iterator[Any]:
    """One evaluation per wedding partition (AssetCheckResult would carry one partition only), then the
    check's output so the step completes. A failed blocking evaluation fails the step after all are reported."""
    yield from check_evaluations_in_batches(context, _evaluations(asset_key, name, outcomes, blocking=blocking))
    failed = sum(1 for passed, *_ in outcomes.values() if not passed)
    if failed:
        context.log.warning(f"{name}: {failed} of {len(outcomes)} wedding(s) failed")
    yield dg.Output(None)


def _evaluations(asset_key: dg.AssetKey, name: str, outcomes: dict[str, Outcome], *, blocking: bool = False
                 ) -> Iterator[dg.AssetCheckEvaluation]:
    for key, (passed, description, metadata, severity) in outcomes.items():
        yield dg.AssetCheckEvaluation(asset_key=asset_key, check_name=name, passed=passed, partition=key,
                                      description=description, metadata=metadata, severity=severity,
                                      blocking=blocking)


def _keys(context: dg.AssetCheckExecutionContext) -> list[str]:
    return validated_keys(list(context.partition_keys))


def _evaluate(wedbackup: WedbackupEngineResource, outcomes_of: Callable[[Engine], dict[str, Outcome]]
              ) -> dict[str, Outcome]:
    """Run one check's evaluation with the run's engine (its catalogue is closed when the run ends)."""
    return outcomes_of(wedbackup.engine())


def _ts(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).isoformat(timespec="seconds") if value else ""


ERROR, WARN = dg.AssetCheckSeverity.ERROR, dg.AssetCheckSeverity.WARN


# ------------------------------------------------------------------------------ archive integrity


def integrity_outcomes(engine: Engine, keys: list[str]) -> dict[str, Outcome]:
    queries = rules.CheckQueries(engine.catalogue)
    evidence = queries.evidence(keys)
    # The weddings' keys in one query; one missing or destroyed is read alone, which says why.
    known = engine.catalogue.keys_by_id([ev.key_id for ev in evidence.values() if ev.key_id], engine.keyring)

    def resolve_key(key_id: str) -> Any:
        return known[key_id] if key_id in known else engine.resolve_key(key_id)

    out: dict[str, Outcome] = {}
    for key in keys:
        ev = evidence[key]
        if ev.archive_sha256 is None:
            out[key] = (False, f"wedding {key}: no backup in the catalogue", {}, ERROR)
            continue
        name = f"vault:{key}/{ev.archive_sha256[:16]}"
        try:
            report = rules.verify_sealed_archive(engine.vault.path_for(key, ev.archive_sha256), name=name,
                                                 expected_sha256=ev.archive_sha256, expected_size=int(ev.size or 0),
                                                 resolve_key=resolve_key)
        except WedbackupError as exc:
            out[key] = (False, str(exc), {"archive_sha256": ev.archive_sha256}, ERROR)
            continue
        out[key] = (True, f"{name}: {report.chunks} chunks authenticated, SHA-256 matches the catalogue", {
            "archive_sha256": report.sha256, "sealed_bytes": report.sealed_bytes,
            "plaintext_bytes": report.plaintext_bytes, "chunks": report.chunks, "key_id": report.key_id,
            "seconds": round(report.seconds, 3)}, ERROR)
    return out


@dg.asset_check(asset=ENCRYPTED_ARCHIVE, name="archive_integrity", blocking=True, partitions_def=weddings_partitions,
                description="The sealed vault archive opens with the wedding's key and reads through: header, every "
                            "chunk's AES-GCM tag, the final chunk, and its SHA-256 equals the catalogue's. Blocking: "
                            "a failure stops the run's replicas from uploading it.")
def archive_integrity(context: dg.AssetCheckExecutionContext, wedbackup: WedbackupEngineResource) -> Iterator[Any]:
    yield from _report(context, ENCRYPTED_ARCHIVE, "archive_integrity",
                       _evaluate(wedbackup, lambda e: integrity_outcomes(e, _keys(context))), blocking=True)


# ------------------------------------------------------------------------------- replica checksum


def replica_outcomes(engine: Engine, provider: str, replica: Any, keys: list[str]) -> dict[str, Outcome]:
    evidence = rules.CheckQueries(engine.catalogue).evidence(keys)
    out: dict[str, Outcome] = {}
    for key in keys:
        ev = evidence[key]
        if ev.archive_sha256 is None:
            out[key] = (False, f"wedding {key}: no backup in the catalogue", {}, ERROR)
            continue
        row = next((c for c in ev.copies if c["provider"] == provider), None)
        copy = _CopyView(row) if row else None
        head = None
        if copy is not None:
            try:
                head = replica.head(copy.object_key)
            except WedbackupError as exc:
                out[key] = (False, f"wedding {key}: {exc}", {"object_key": copy.object_key}, ERROR)
                continue
        result = rules.compare_replica(provider, key, ev.archive_sha256, copy, head)
        metadata = {"object_key": result.key or "", "recorded_checksum": result.recorded_checksum or "",
                    "provider_checksum": result.provider_checksum or "",
                    "recorded_size": result.recorded_size or 0, "provider_size": result.provider_size or 0}
        out[key] = (result.passed, result.problem or f"{provider} holds the archive with the recorded checksum",
                    metadata, ERROR)
    return out


class _CopyView:
    def __init__(self, row: dict[str, Any]):
        self.object_key, self.checksum, self.size = row["object_key"], row["checksum"], int(row["size"])


def _replica_check(provider: str, context: dg.AssetCheckExecutionContext, wedbackup: WedbackupEngineResource,
                   replicas: ProviderReplicasResource) -> Iterator[Any]:
    replica = replicas.replica(provider)
    outcomes = _evaluate(wedbackup, lambda e: replica_outcomes(e, provider, replica, _keys(context)))
    yield from _report(context, REPLICA_KEYS[provider], "replica_checksum", outcomes)


def _replica_description(provider: str) -> str:
    return (f"{provider}'s own stored checksum and size of the newest backup's object equal the ones recorded "
            "at upload (one HEAD per wedding); a missing object or an unreachable provider fails.")


@dg.asset_check(asset=REPLICA_KEYS["s3"], name="replica_checksum", partitions_def=weddings_partitions,
                description=_replica_description("s3"))
def s3_replica_checksum(context: dg.AssetCheckExecutionContext, wedbackup: WedbackupEngineResource,
                        replicas: ProviderReplicasResource) -> Iterator[Any]:
    yield from _replica_check("s3", context, wedbackup, replicas)


@dg.asset_check(asset=REPLICA_KEYS["gcs"], name="replica_checksum", partitions_def=weddings_partitions,
                description=_replica_description("gcs"))
def gcs_replica_checksum(context: dg.AssetCheckExecutionContext, wedbackup: WedbackupEngineResource,
                         replicas: ProviderReplicasResource) -> Iterator[Any]:
    yield from _replica_check("gcs", context, wedbackup, replicas)


@dg.asset_check(asset=REPLICA_KEYS["azure"], name="replica_checksum", partitions_def=weddings_partitions,
                description=_replica_description("azure"))
def azure_replica_checksum(context: dg.AssetCheckExecutionContext, wedbackup: WedbackupEngineResource,
                           replicas: ProviderReplicasResource) -> Iterator[Any]:
    yield from _replica_check("azure", context, wedbackup, replicas)


# ------------------------------------------------------------------------------------------ 3-2-1


def three_two_one_outcomes(engine: Engine, keys: list[str]) -> dict[str, Outcome]:
    from wedbackup_dagster.core.keys.backup import keys_outside_catalogue

    evidence = rules.CheckQueries(engine.catalogue).evidence(keys)
    backed_up = keys_outside_catalogue(engine.catalogue, [ev.key_id for ev in evidence.values() if ev.key_id])

    def vault_size(partition: str, sha256: str) -> int | None:
        entry = engine.vault.get(partition, sha256) if sha256 else None
        return entry.size if entry else None

    out: dict[str, Outcome] = {}
    for key in keys:
        ev = evidence[key]
        if ev.backup_id is None:
            out[key] = (False, f"wedding {key}: no backup in the catalogue", {}, ERROR)
            continue
        verdict = rules.three_two_one(rules.copy_evidence(ev, vault_size), key_backed_up=ev.key_id in backed_up)
        rows = [{"where": c.provider, "uri": c.uri, "media": c.media, "offsite": c.offsite, "present": c.present,
                 "verified": c.verified, "checksum_confirmed": _ts(c.confirmed_at), "restored": _ts(c.restored_at)}
                for c in verdict.copies]
        metadata = {
            "copies": metadata_table(rows, [("where", "string"), ("uri", "string"), ("media", "string"),
                                    ("offsite", "bool"), ("present", "bool"), ("verified", "bool"),
                                    ("checksum_confirmed", "string"), ("restored", "string")]),
            "verified_copies": verdict.verified_copies, "media_kinds": ", ".join(verdict.media_kinds),
            "offsite_copies": verdict.offsite_copies, "archive_sha256": ev.archive_sha256 or "",
        }
        out[key] = (verdict.passed, f"wedding {key}: {verdict.summary}", metadata, ERROR)
    return out


@dg.asset_check(asset=VERIFIED_RESTORE, name="three_two_one", partitions_def=weddings_partitions,
                description="At least 3 verified copies of the newest backup (the vault among them), on at least 2 "
                            "kinds of media, at least 1 offsite. A copy is verified when its checksum was confirmed "
                            "as it was stored (by the provider at upload; by sealing and an atomic rename in the "
                            "vault, whose file must still be there) or a restore from it succeeded. No copy counts "
                            "while the backup's wedding key is in no key-store backup at the vault and a provider: "
                            "losing the catalogue would make them all unreadable.")
def three_two_one(context: dg.AssetCheckExecutionContext, wedbackup: WedbackupEngineResource) -> Iterator[Any]:
    yield from _report(context, VERIFIED_RESTORE, "three_two_one",
                       _evaluate(wedbackup, lambda e: three_two_one_outcomes(e, _keys(context))))


# ------------------------------------------------------------------------ restore matches manifest


def restore_outcomes(engine: Engine, keys: list[str]) -> dict[str, Outcome]:
    evidence = rules.CheckQueries(engine.catalogue).evidence(keys)
    out: dict[str, Outcome] = {}
    for key in keys:
        ev = evidence[key]
        restore = ev.latest_restore
        if ev.backup_id is None or restore is None:
            what = "no backup in the catalogue" if ev.backup_id is None else "the newest backup was never restored"
            out[key] = (False, f"wedding {key}: {what}", {}, ERROR)
            continue
        detail = restore["detail"] or {}
        metadata = {"restored_from": restore["provider"], "restored_at": _ts(restore["at"]),
                    "seconds": round(float(restore["seconds"]), 3), "archive_sha256": ev.archive_sha256 or "",
                    "tables_checked": int(detail.get("tables", 0)),
                    "foreign_keys_checked": int(detail.get("fk_checked", 0))}
        if restore["ok"]:
            out[key] = (True, f"wedding {key}: restore from {restore['provider']} matched the manifest", metadata,
                        ERROR)
        else:
            out[key] = (False, f"wedding {key}: the latest restore from {restore['provider']} failed: "
                               f"{str(detail.get('error', 'unknown error'))[:300]}", metadata, ERROR)
    return out


@dg.asset_check(asset=VERIFIED_RESTORE, name="restore_matches_manifest", partitions_def=weddings_partitions,
                description="The latest restore of the newest backup succeeded: row counts, SHA-256 per table and "
                            "foreign keys matched its manifest.")
def restore_matches_manifest(context: dg.AssetCheckExecutionContext,
                             wedbackup: WedbackupEngineResource) -> Iterator[Any]:
    yield from _report(context, VERIFIED_RESTORE, "restore_matches_manifest",
                       _evaluate(wedbackup, lambda e: restore_outcomes(e, _keys(context))))


# -------------------------------------------------------------------------------------- freshness


def freshness_outcomes(engine: Engine, keys: list[str], *, now: datetime | None = None) -> dict[str, Outcome]:
    from wedbackup_dagster.core.policy.backup_policy import Policy

    evidence = rules.CheckQueries(engine.catalogue).evidence(keys)
    policy = Policy.from_env()
    at = now or datetime.now(timezone.utc)
    # The tier policy (season, wedding day) decides each wedding's RPO, as it does for the schedule.
    verdicts = rules.freshness_of(
        evidence, now=now,
        rpo_for_partition=lambda p: policy.rpo(evidence[p].wedding_date, at),
        tier_for_partition=lambda p: policy.tier(evidence[p].wedding_date, policy.today(at)))
    out: dict[str, Outcome] = {}
    for key, f in verdicts.items():
        metadata = {"tier": f.tier, "rpo_hours": round(f.rpo.total_seconds() / 3600, 2),
                    "newest_verified_snapshot": _ts(f.newest_verified),
                    "age_hours": round(f.age.total_seconds() / 3600, 2) if f.age is not None else -1.0}
        out[key] = (f.passed, f.summary, metadata, ERROR if f.critical else WARN)
    return out


@dg.asset_check(asset=VERIFIED_RESTORE, name="freshness", partitions_def=weddings_partitions,
                description="The newest verified backup (one that restored successfully) is younger than the RPO of "
                            "the wedding's tier. WARN when late; ERROR for a wedding in its critical week.")
def freshness(context: dg.AssetCheckExecutionContext, wedbackup: WedbackupEngineResource) -> Iterator[Any]:
    yield from _report(context, VERIFIED_RESTORE, "freshness",
                       _evaluate(wedbackup, lambda e: freshness_outcomes(e, _keys(context))))


# -------------------------------------------------------------------------------------- shrinkage


def shrinkage_outcomes(engine: Engine, keys: list[str]) -> dict[str, Outcome]:
    """The newest backup's rows against the previous verified backup's (core.rules.shrinkage, thresholds
    from the policy file). A flagged drop is recorded in the catalogue, and every flag nobody acknowledged
    keeps the wedding's check failing (at its level) while retention holds the pre-drop backups."""
    from wedbackup_dagster.core.policy.backup_policy import Policy

    rule = Policy.from_env().shrinkage
    verdicts = rules.find_shrinkage(engine.catalogue, keys, warn=rule.warn, error=rule.error,
                                    min_rows=rule.min_rows)
    catalogue = engine.catalogue
    catalogue.record_shrinkage(rules.new_shrinkage_flags((v for vs in verdicts.values() for v in vs),
                                                         catalogue.shrinkage_flags(keys)))
    known = catalogue.shrinkage_flags(keys)
    open_flags: dict[str, list[dict[str, Any]]] = {}
    for flag in known:
        if flag["acknowledged_at"] is None:
            open_flags.setdefault(flag["partition"], []).append(flag)
    out: dict[str, Outcome] = {}
    for key in keys:
        if not verdicts.get(key):
            out[key] = (True, f"wedding {key}: no backup in the catalogue, nothing to compare", {}, WARN)
            continue
        v = verdicts[key][-1]
        rows = [{"table": t.table, "before": t.before, "after": -1 if t.after is None else t.after,
                 "lost": t.lost, "lost_pct": round(100 * t.fraction, 1),
                 "flag": (t.level or "-") + (" (gone)" if t.after is None else "")}
                for t in (*v.tables, v.total)]
        rows += [{"table": t, "before": 0, "after": 0, "lost": 0, "lost_pct": 0.0, "flag": "new"}
                 for t in v.new_tables]
        flags = open_flags.get(key, [])
        covering = [] if v.passed else rules.covering_flags(v, known)
        # Its drop was acknowledged (every flag spanning it is): it passes, saying who.
        ack = covering[-1] if covering and all(f["acknowledged_at"] for f in covering) else None
        older = [f for f in flags if f not in covering]
        description = v.summary
        if ack is not None:
            description += (f"; acknowledged by {ack['acknowledged_by']} at {_ts(ack['acknowledged_at'])}"
                            + (f": {ack['note']}" if ack["note"] else ""))
        if older:
            description += "; not yet acknowledged: " + " | ".join(f["summary"] for f in older)
        if flags:
            description += f" — check, then `wedbackup ack --wedding {key}` (retention keeps the pre-drop backups)"
        levels = ({v.level} if ack is None else set()) | {f["level"] for f in flags}
        metadata = {
            "tables": metadata_table(rows, [("table", "string"), ("before", "int"), ("after", "int"), ("lost", "int"),
                                    ("lost_pct", "float"), ("flag", "string")]),
            "backup_id": v.backup_id or 0, "baseline_backup_id": v.baseline_id or 0,
            "baseline_snapshot": _ts(v.baseline_time), "total_before": v.total.before, "total_after": v.total.after,
            "unacknowledged_flags": len(flags), "held_backup_ids": ", ".join(sorted(
                {str(i) for f in flags for i in (f["baseline_id"], f["previous_id"]) if i is not None})),
            "thresholds": f"warn ≥ {rule.warn:.0%}, error ≥ {rule.error:.0%} of ≥ {rule.min_rows} rows",
        }
        passed = (v.passed or ack is not None) and not flags
        out[key] = (passed, description, metadata, ERROR if "error" in levels else WARN)
    return out


@dg.asset_check(asset=DB_DUMP, name="shrinkage", partitions_def=weddings_partitions,
                description="The newest backup's rows per table and in total against the wedding's previous verified "
                            "backup: WARN when a table (or the total) that held at least min_rows rows lost at least "
                            "`warn` of them (a table emptied or gone loses all), ERROR past `error` (policy file, "
                            "`shrinkage`). A flag stays until acknowledged (`wedbackup ack`, job "
                            "acknowledge_shrinkage); until then retention keeps the backups before the drop.")
def shrinkage(context: dg.AssetCheckExecutionContext, wedbackup: WedbackupEngineResource) -> Iterator[Any]:
    yield from _report(context, DB_DUMP, "shrinkage",
                       _evaluate(wedbackup, lambda e: shrinkage_outcomes(e, _keys(context))))


def log_shrinkage_evaluations(context: dg.OpExecutionContext, engine: Engine, keys: list[str]) -> None:
    """Log the shrinkage check's evaluations of `keys` from a job that backs weddings up outside the assets
    (automation's backup_wedding_list), so its weddings show their check result per partition. The backups
    are taken already: a check that cannot be evaluated is logged, never fails them (check_weddings, and
    retention's own scan, still judge them)."""
    if not keys:
        return
    try:
        evaluations = list(_evaluations(DB_DUMP, "shrinkage", shrinkage_outcomes(engine, keys)))
    except Exception as exc:  # noqa: BLE001 - whatever broke the check must not fail the backups
        context.log.error(f"shrinkage check not evaluated for {len(keys)} wedding(s): {type(exc).__name__}: "
                          f"{str(exc)[:300]}")
        return
    log_check_evaluations(context, evaluations)


wedding_checks = [archive_integrity, s3_replica_checksum, gcs_replica_checksum, azure_replica_checksum,
                  three_two_one, restore_matches_manifest, freshness, shrinkage]
