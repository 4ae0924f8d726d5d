"""wedbackup's configuration: every setting comes from the environment (or a `.env` file), is validated
once, and a bad or missing one stops with an error naming the variable — never echoing its value."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError

# One table of every variable the project reads: README's configuration table is generated from it
# (see `wedbackup config table`), so the two cannot drift apart.
VARIABLES: dict[str, tuple[str, str, bool]] = {
    # name: (description, default or "", secret)
    "WEDBACKUP_SOURCE_DSN": ("PostgreSQL DSN of the wedding platform database to back up", "", True),
    "WEDBACKUP_CATALOGUE_DSN": (
        "PostgreSQL DSN of the catalogue (backups, wedding keys, audit); may be the same server", "", True),
    "WEDBACKUP_SCRATCH_DSN": (
        "DSN with CREATEDB rights where verified_restore makes throw-away databases "
        "(default: the source server, database `postgres`)", "", True),
    "WEDBACKUP_VAULT_DIR": ("on-site vault directory: copy #1 of every sealed archive", ".wedbackup/vault", False),
    "WEDBACKUP_MASTER_KEY": ("master key(s) `KEYID:BASE64(32 bytes)`, comma-separated, first is current", "", True),
    "WEDBACKUP_MASTER_KEY_FILE": ("file holding the same text as WEDBACKUP_MASTER_KEY (used when that is unset)",
                                  "", False),
    "WEDBACKUP_S3_ENDPOINT_URL": ("S3 endpoint (empty for AWS itself)", "", False),
    "WEDBACKUP_S3_BUCKET": ("S3 bucket for replicas", "wedbackup-replicas", False),
    "WEDBACKUP_S3_REGION": ("S3 region", "eu-west-1", False),
    "WEDBACKUP_S3_PREFIX": ("key prefix inside the S3 bucket", "wedbackup", False),
    "WEDBACKUP_S3_STORAGE_CLASS": ("S3 storage class for replicas", "STANDARD", False),
    "WEDBACKUP_S3_SSE": ("S3 server-side encryption (`AES256`, `aws:kms` or empty)", "AES256", False),
    "WEDBACKUP_S3_OBJECT_LOCK": ("S3 Object Lock mode of new replicas: `none`, `governance` or `compliance` "
                                 "(the bucket must have Object Lock enabled)", "none", False),
    "WEDBACKUP_S3_OBJECT_LOCK_DAYS": ("days each new S3 replica stays locked when Object Lock is on (1-36500)",
                                      "30", False),
    "AWS_ACCESS_KEY_ID": ("S3 access key id", "", True),
    "AWS_SECRET_ACCESS_KEY": ("S3 secret access key", "", True),
    "WEDBACKUP_GCS_BUCKET": ("GCS bucket for replicas", "wedbackup-replicas", False),
    "WEDBACKUP_GCS_PROJECT": ("GCP project of the bucket", "wedbackup-local", False),
    "WEDBACKUP_GCS_PREFIX": ("object prefix inside the GCS bucket", "wedbackup", False),
    "WEDBACKUP_GCS_STORAGE_CLASS": ("GCS storage class for replicas", "STANDARD", False),
    "STORAGE_EMULATOR_HOST": ("GCS emulator URL (local stack only; unset for Google Cloud)", "", False),
    "WEDBACKUP_AZURE_CONNECTION_STRING": ("Azure Blob connection string (account key or SAS)", "", True),
    "WEDBACKUP_AZURE_CONTAINER": ("Azure Blob container for replicas", "wedbackup-replicas", False),
    "WEDBACKUP_AZURE_PREFIX": ("blob name prefix inside the container", "wedbackup", False),
    "WEDBACKUP_AZURE_TIER": ("Azure access tier for replicas (Hot, Cool, Cold, Archive)", "Cool", False),
    "WEDBACKUP_PROVIDER_TIMEOUT": ("seconds one S3 / GCS / Azure request may wait on the network (connect, and "
                                   "each read of the answer) before the SDK retries or the upload fails", "60",
                                   False),
    "WEDBACKUP_UPLOAD_RETRY_DELAY": ("seconds before an upload step's first retry (Dagster retries a failed "
                                     "upload step 3 times, the pause doubling each time, with jitter)", "1",
                                     False),
    "WEDBACKUP_UPLOAD_CONCURRENCY": ("archives one replica step uploads to its provider at once (1-64); each "
                                     "provider's step has its own threads", "8", False),
    "WEDBACKUP_S3_UPLOAD_CONCURRENCY": ("archives the S3 step uploads at once (1-64); empty: "
                                        "WEDBACKUP_UPLOAD_CONCURRENCY", "", False),
    "WEDBACKUP_GCS_UPLOAD_CONCURRENCY": ("archives the GCS step uploads at once (1-64); empty: "
                                         "WEDBACKUP_UPLOAD_CONCURRENCY, at most 4 against the GCS emulator "
                                         "(STORAGE_EMULATOR_HOST: one thread serves every upload)", "", False),
    "WEDBACKUP_AZURE_UPLOAD_CONCURRENCY": ("archives the Azure step uploads at once (1-64); empty: "
                                           "WEDBACKUP_UPLOAD_CONCURRENCY", "", False),
    "WEDBACKUP_SNAPSHOT_WORKERS": ("worker processes a snapshot-and-seal or verified-restore step spreads its "
                                   "weddings' batches over (1-16; 1: in the step's own process); empty: one "
                                   "more than the cores, at most 4", "", False),
    "WEDBACKUP_UPLOAD_WORKERS": ("worker processes the upload step spreads its weddings over (1-16; 1: in the "
                                 "step's own process); empty: WEDBACKUP_SNAPSHOT_WORKERS", "", False),
    "WEDBACKUP_ZSTD_LEVEL": ("zstd level for sealed archives (1-19); 1 was faster and no larger on the demo data",
                             "1", False),
    "WEDBACKUP_LOCK_TIMEOUT": ("seconds a backup or restore of a wedding waits while another backup or restore "
                               "of the same wedding runs (then it fails, naming the holder)", "600", False),
    "WEDBACKUP_SNAPSHOT_LOCK_TIMEOUT": ("seconds a snapshot waits for its ACCESS SHARE lock on each table (a "
                                        "migration holding the table); then that snapshot fails and is retried",
                                        "30", False),
    "WEDBACKUP_POLICY_FILE": ("JSON or YAML file of backup policy settings (tiers, RPOs, season, schedule); "
                              "unset: the built-in defaults", "", False),
    "WEDBACKUP_PROVIDER_DOWN_AFTER": ("consecutive failed canaries (one per 30 s health tick) before a provider "
                                      "counts as down; one success brings it back", "2", False),
    "WEDBACKUP_CANARY_TIMEOUT": ("seconds one provider canary (write, read back, delete) may take", "10", False),
    "WEDBACKUP_ALERT_WEBHOOK_URL": ("http(s) URL that run-failure alerts are POSTed to as JSON (unset: alerts "
                                    "are only logged); secret, as webhook URLs often carry a token", "", True),
    "WEDBACKUP_STORAGE_PRICES": ("storage prices for backup_inventory's cost estimate, "
                                 "`provider:CLASS=USD_per_GB_month,…` over the built-in list prices", "", False),
    # Wedding media (issue 19, core/media/): unset WEDBACKUP_MEDIA_SOURCE and nothing of media runs.
    "WEDBACKUP_MEDIA_SOURCE": ("where the platform keeps media: `s3://bucket/prefix` or a directory (unset: media "
                               "is not backed up)", "", False),
    "WEDBACKUP_MEDIA_WEDDING_PREFIX": ("layout: the folder whose `<id>/` subfolders are weddings; everything else "
                                       "is the platform partition", "weddings/", False),
    "WEDBACKUP_MEDIA_S3_ENDPOINT_URL": ("endpoint of the media bucket (default: WEDBACKUP_S3_ENDPOINT_URL)", "", False),
    "WEDBACKUP_MEDIA_S3_REGION": ("region of the media bucket (default: WEDBACKUP_S3_REGION)", "", False),
    "WEDBACKUP_MEDIA_AWS_ACCESS_KEY_ID": ("access key id for the media bucket (default: AWS_ACCESS_KEY_ID)", "", False),
    "WEDBACKUP_MEDIA_AWS_SECRET_ACCESS_KEY": ("secret key for the media bucket (default: AWS_SECRET_ACCESS_KEY)", "",
                                              True),
    "WEDBACKUP_MEDIA_VERIFY_SAMPLE": ("files each media verification restores and checks (0: every file); "
                                      "successive verifications rotate through all files", "0", False),
    "WEDBACKUP_MEDIA_REPACK_BELOW": ("live fraction under which retention rewrites a media pack's live chunks into "
                                     "a new pack (0: never)", "0.5", False),
    "WEDBACKUP_STATE_DIR": ("where the local stack keeps its data, logs and PIDs", ".wedbackup", False),
    "DAGSTER_HOME": ("Dagster instance directory (the local stack sets it up)", ".wedbackup/dagster_home", False),
    # The change feed (issue 18, core/changefeed/, docs/CHANGEFEED.md).
    "WEDBACKUP_CHANGEFEED_SLOT": ("logical replication slot of the change feed (its publication is "
                                  "<slot>_pub)", "wedbackup_feed", False),
    "WEDBACKUP_CHANGEFEED_MAX_LAG": ("seconds the change feed may trail before feed_lag_within_rpo warns", "10",
                                     False),
}

SECRET_VARIABLES = frozenset(name for name, (_, _, secret) in VARIABLES.items() if secret)

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,200}$")


def load_dotenv_if_present(path: str | os.PathLike[str] = ".env") -> None:
    """Read a `.env` file into the environment without overriding variables already set."""
    from dotenv import load_dotenv

    if Path(path).is_file():
        load_dotenv(path, override=False)


def dsn_setting(environ: Mapping[str, str], name: str, default: str | None = None) -> str:
    value = environ.get(name, "") or (default or "")
    if not value:
        raise ConfigError(name, "is not set (a PostgreSQL DSN such as postgresql://user@host:5432/db)")
    try:
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(value)
    except Exception:  # noqa: BLE001 - psycopg's message may quote the DSN, password included
        raise ConfigError(name, "is not a valid PostgreSQL connection string") from None
    if not parts.get("dbname") and not parts.get("host") and not parts.get("service"):
        raise ConfigError(name, "names neither a host nor a database (nor a service)")
    port = str(parts.get("port") or "5432")
    if not all(p.isdigit() and 0 < int(p) < 65536 for p in port.split(",")):
        raise ConfigError(name, "has a port that is not a number between 1 and 65535")
    return value


def _choice(environ: Mapping[str, str], name: str, allowed: set[str]) -> str:
    value = environ.get(name) or VARIABLES[name][1]
    if value not in allowed:
        raise ConfigError(name, f"must be one of {sorted(allowed)}")
    return value


def _matching(environ: Mapping[str, str], name: str, pattern: re.Pattern[str], what: str) -> str:
    value = environ.get(name) or VARIABLES[name][1]
    # fullmatch: a pattern's `$` also matches before a trailing newline.
    if not pattern.fullmatch(value) or ".." in value:
        raise ConfigError(name, f"is not a valid {what}")
    return value


def _prefix(environ: Mapping[str, str], name: str, what: str) -> str:
    """An object-key prefix: segments of [A-Za-z0-9._-] joined by single '/', none of them '.' or '..',
    no leading or trailing '/': every key under it stays under it, whatever a provider normalises."""
    value = _matching(environ, name, _PREFIX, what)
    if any(segment in ("", ".", "..") for segment in value.split("/")):
        raise ConfigError(name, f"is not a valid {what} (empty, '.' or '..' path segment)")
    return value


def _path(environ: Mapping[str, str], name: str) -> Path:
    value = environ.get(name) or VARIABLES[name][1]
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise ConfigError(name, "contains a control character (NUL, newline, ...): not a usable directory")
    return Path(value)


def url_setting(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name, "")
    if value:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(name, "must be an http(s) URL")
    return value


def _lock_days(environ: Mapping[str, str]) -> int:
    text = environ.get("WEDBACKUP_S3_OBJECT_LOCK_DAYS") or VARIABLES["WEDBACKUP_S3_OBJECT_LOCK_DAYS"][1]
    if not text.isdigit() or not 1 <= int(text) <= 36500:
        raise ConfigError("WEDBACKUP_S3_OBJECT_LOCK_DAYS", "must be a whole number of days from 1 to 36500")
    return int(text)


def scratch_dsn_from(source_dsn: str) -> str:
    """The maintenance database on the source's server: where scratch databases are created."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    parts = conninfo_to_dict(source_dsn)
    parts["dbname"] = "postgres"
    return make_conninfo(**parts)


@dataclass(frozen=True)
class S3Target:
    bucket: str
    region: str
    prefix: str
    endpoint_url: str
    storage_class: str
    sse: str
    media: str = "object-storage"
    offsite: bool = True
    object_lock: str = "none"  # none | governance | compliance
    object_lock_days: int = 30


@dataclass(frozen=True)
class GCSTarget:
    bucket: str
    project: str
    prefix: str
    storage_class: str
    emulator_host: str
    media: str = "object-storage"
    offsite: bool = True


@dataclass(frozen=True)
class AzureTarget:
    container: str
    prefix: str
    tier: str
    connection_string: str = field(repr=False)
    media: str = "object-storage"
    offsite: bool = True


@dataclass(frozen=True)
class Settings:
    source_dsn: str = field(repr=False)
    catalogue_dsn: str = field(repr=False)
    scratch_dsn: str = field(repr=False)
    vault_dir: Path
    zstd_level: int
    s3: S3Target
    gcs: GCSTarget
    azure: AzureTarget
    lock_timeout: float = 600.0
    provider_timeout: float = 60.0
    snapshot_lock_timeout: float = 30.0
    upload_concurrency: int = 8
    # Per provider (s3, gcs, azure), where it differs from upload_concurrency: see upload_concurrency_for.
    provider_upload_concurrency: tuple[tuple[str, int], ...] = ()
    # Worker processes of a snapshot-and-seal or verified-restore step (core/parallel_backup.py); 1: in-process.
    snapshot_workers: int = 1
    # Worker processes of the upload step (Engine.replicate_to_all); 1: in-process.
    upload_workers: int = 1

    def upload_concurrency_for(self, provider: str) -> int:
        """How many archives `provider`'s replica step uploads at once."""
        return dict(self.provider_upload_concurrency).get(provider, self.upload_concurrency)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        source = dsn_setting(env, "WEDBACKUP_SOURCE_DSN")
        catalogue = dsn_setting(env, "WEDBACKUP_CATALOGUE_DSN")
        from wedbackup_dagster.core.postgres.identity import check_catalogue_not_source

        check_catalogue_not_source(source, catalogue, connect=False)  # the servers are compared by the engine
        scratch = dsn_setting(env, "WEDBACKUP_SCRATCH_DSN", default=scratch_dsn_from(source))
        vault = _path(env, "WEDBACKUP_VAULT_DIR")
        level_text = env.get("WEDBACKUP_ZSTD_LEVEL") or VARIABLES["WEDBACKUP_ZSTD_LEVEL"][1]
        # [0-9], not str.isdigit(): "²" is a digit to Python but not a number to int().
        if not re.fullmatch(r"[0-9]{1,2}", level_text) or not 1 <= int(level_text) <= 19:
            raise ConfigError("WEDBACKUP_ZSTD_LEVEL", "must be a whole number from 1 to 19")
        s3 = S3Target(
            bucket=_matching(env, "WEDBACKUP_S3_BUCKET", _BUCKET, "bucket name"),
            region=_matching(env, "WEDBACKUP_S3_REGION", re.compile(r"^[a-z0-9-]{2,32}$"), "region"),
            prefix=_prefix(env, "WEDBACKUP_S3_PREFIX", "key prefix"),
            endpoint_url=url_setting(env, "WEDBACKUP_S3_ENDPOINT_URL"),
            storage_class=_choice(env, "WEDBACKUP_S3_STORAGE_CLASS", {
                "STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR",
                "GLACIER", "DEEP_ARCHIVE"}),
            sse=_choice(env, "WEDBACKUP_S3_SSE", {"AES256", "aws:kms", "none"}),
            object_lock=_choice(env, "WEDBACKUP_S3_OBJECT_LOCK", {"none", "governance", "compliance"}),
            object_lock_days=_lock_days(env),
        )
        gcs = GCSTarget(
            bucket=_matching(env, "WEDBACKUP_GCS_BUCKET", _BUCKET, "bucket name"),
            project=_matching(env, "WEDBACKUP_GCS_PROJECT", re.compile(r"^[a-z0-9-]{2,64}$"), "project id"),
            prefix=_prefix(env, "WEDBACKUP_GCS_PREFIX", "object prefix"),
            storage_class=_choice(env, "WEDBACKUP_GCS_STORAGE_CLASS", {
                "STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE"}),
            emulator_host=url_setting(env, "STORAGE_EMULATOR_HOST"),
        )
        lock_text = env.get("WEDBACKUP_LOCK_TIMEOUT") or VARIABLES["WEDBACKUP_LOCK_TIMEOUT"][1]
        try:
            lock_timeout = float(lock_text)
        except ValueError:
            lock_timeout = -1.0
        if not 0 <= lock_timeout <= 86400:  # NaN fails this too
            raise ConfigError("WEDBACKUP_LOCK_TIMEOUT", "must be a number of seconds from 0 to 86400")
        azure_cs = env.get("WEDBACKUP_AZURE_CONNECTION_STRING", "")
        if azure_cs and "=" not in azure_cs:
            raise ConfigError("WEDBACKUP_AZURE_CONNECTION_STRING", "is not an Azure connection string")
        azure = AzureTarget(
            container=_matching(env, "WEDBACKUP_AZURE_CONTAINER", re.compile(r"^[a-z0-9](?:[a-z0-9-]{1,61})[a-z0-9]$"),
                                "container name"),
            prefix=_prefix(env, "WEDBACKUP_AZURE_PREFIX", "blob prefix"),
            tier=_choice(env, "WEDBACKUP_AZURE_TIER", {"Hot", "Cool", "Cold", "Archive"}),
            connection_string=azure_cs,
        )
        return cls(source_dsn=source, catalogue_dsn=catalogue, scratch_dsn=scratch, vault_dir=vault,
                   zstd_level=int(level_text),
                   s3=s3, gcs=gcs, azure=azure, lock_timeout=lock_timeout,
                   provider_timeout=provider_timeout_from(env), upload_concurrency=_upload_concurrency(env),
                   provider_upload_concurrency=provider_upload_concurrency_from(env, gcs_emulator=bool(gcs.emulator_host)),
                   snapshot_lock_timeout=snapshot_lock_timeout_from(env), snapshot_workers=snapshot_workers_from(env),
                   upload_workers=snapshot_workers_from(env, "WEDBACKUP_UPLOAD_WORKERS"))


def snapshot_workers_from(env: Mapping[str, str], name: str = "WEDBACKUP_SNAPSHOT_WORKERS") -> int:
    """WEDBACKUP_SNAPSHOT_WORKERS, 1-16; unset, one more than the cores (COPY on the server overlaps with
    sealing), at most 4. WEDBACKUP_UPLOAD_WORKERS (`name`) likewise, unset: WEDBACKUP_SNAPSHOT_WORKERS."""
    text = env.get(name) or ""
    if not text:
        if name != "WEDBACKUP_SNAPSHOT_WORKERS":
            return snapshot_workers_from(env)
        return max(1, min(4, (os.cpu_count() or 1) + 1))
    if not re.fullmatch(r"[0-9]{1,2}", text) or not 1 <= int(text) <= 16:
        raise ConfigError(name, "must be a whole number from 1 to 16")
    return int(text)


def _upload_concurrency(env: Mapping[str, str], name: str = "WEDBACKUP_UPLOAD_CONCURRENCY") -> int:
    text = env.get(name) or VARIABLES[name][1]
    if not re.fullmatch(r"[0-9]{1,2}", text) or not 1 <= int(text) <= 64:
        raise ConfigError(name, "must be a whole number from 1 to 64")
    return int(text)


# The GCS emulator (gcp-storage-emulator) serves one request at a time: more uploads in flight only queue
# there, and queued ones time out. Real GCS takes WEDBACKUP_UPLOAD_CONCURRENCY like the others.
GCS_EMULATOR_UPLOAD_CONCURRENCY = 4


def provider_upload_concurrency_from(env: Mapping[str, str], *, gcs_emulator: bool = False
                                     ) -> tuple[tuple[str, int], ...]:
    """The providers whose WEDBACKUP_<PROVIDER>_UPLOAD_CONCURRENCY is set (or, for the GCS emulator, capped)."""
    chosen: dict[str, int] = {}
    for provider in ("s3", "gcs", "azure"):
        name = f"WEDBACKUP_{provider.upper()}_UPLOAD_CONCURRENCY"
        if env.get(name):
            chosen[provider] = _upload_concurrency(env, name)
    if gcs_emulator and "gcs" not in chosen:
        chosen["gcs"] = min(_upload_concurrency(env), GCS_EMULATOR_UPLOAD_CONCURRENCY)
    return tuple(sorted(chosen.items()))


def _seconds_setting(environ: Mapping[str, str] | None, name: str, low: float, high: float) -> float:
    """A setting in seconds from `low` to `high` (its default from VARIABLES); else a ConfigError naming it."""
    env = os.environ if environ is None else environ
    text = env.get(name) or VARIABLES[name][1]
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not low <= value <= high:  # NaN fails this too
        raise ConfigError(name, f"must be a number of seconds from {low:g} to {high:g}")
    return value


def provider_timeout_from(environ: Mapping[str, str] | None = None) -> float:
    """WEDBACKUP_PROVIDER_TIMEOUT: without it a provider that accepts a connection and then says nothing
    holds an upload step for the SDKs' own read timeouts (60 s per attempt), retries included."""
    return _seconds_setting(environ, "WEDBACKUP_PROVIDER_TIMEOUT", 0.5, 600)


def upload_retry_delay_from(environ: Mapping[str, str] | None = None) -> float:
    """WEDBACKUP_UPLOAD_RETRY_DELAY: the pause before an upload step's first retry (0.01 s to 5 min)."""
    return _seconds_setting(environ, "WEDBACKUP_UPLOAD_RETRY_DELAY", 0.01, 300)


def snapshot_lock_timeout_from(environ: Mapping[str, str] | None = None) -> float:
    """WEDBACKUP_SNAPSHOT_LOCK_TIMEOUT: how long a snapshot waits for each table's ACCESS SHARE lock (at least
    0.1 s: 0 would mean "wait for ever" to PostgreSQL)."""
    return _seconds_setting(environ, "WEDBACKUP_SNAPSHOT_LOCK_TIMEOUT", 0.1, 3600)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace every secret setting's value (and any DSN password) appearing in `text` by `***`."""
    env = os.environ if environ is None else environ
    out = text
    for name in SECRET_VARIABLES:
        value = env.get(name)
        if value and len(value) >= 4:
            out = out.replace(value, "***")
    out = re.sub(r"(postgres(?:ql)?://[^:/@\s]+:)[^@\s]+@", r"\1***@", out)
    # The key=value form of a DSN ("host=db password=…"), quoted or not.
    return re.sub(r"(?i)\b(password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|[^\s'\"]+)", r"\1***", out)
