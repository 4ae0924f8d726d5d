"""Provider health: a canary write / read / delete per provider under a hard timeout, and the up / down
state that follows from consecutive failures, recorded in the catalogue (history and current state)."""
from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.config import Settings, redact
from wedbackup_dagster.core.storage.providers import PROVIDERS, provider_client, replica_over
from wedbackup_dagster.core.errors import ConfigError


DOWN_AFTER_VARIABLE = "WEDBACKUP_PROVIDER_DOWN_AFTER"
CANARY_TIMEOUT_VARIABLE = "WEDBACKUP_CANARY_TIMEOUT"
DEFAULT_DOWN_AFTER = 2
DEFAULT_CANARY_TIMEOUT = 10.0


@dataclass(frozen=True)
class HealthSettings:
    down_after: int = DEFAULT_DOWN_AFTER  # consecutive failed canaries before a provider counts as down
    canary_timeout: float = DEFAULT_CANARY_TIMEOUT  # seconds one canary may take, all three steps together

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HealthSettings:
        env = os.environ if environ is None else environ
        down_text = env.get(DOWN_AFTER_VARIABLE) or str(DEFAULT_DOWN_AFTER)
        if not re.fullmatch(r"[0-9]{1,3}", down_text) or not 1 <= int(down_text) <= 100:
            raise ConfigError(DOWN_AFTER_VARIABLE, "must be a whole number from 1 to 100")
        timeout_text = env.get(CANARY_TIMEOUT_VARIABLE) or str(DEFAULT_CANARY_TIMEOUT)
        try:
            timeout = float(timeout_text)
        except ValueError:
            raise ConfigError(CANARY_TIMEOUT_VARIABLE, "must be a number of seconds") from None
        if not 0.1 <= timeout <= 300:
            raise ConfigError(CANARY_TIMEOUT_VARIABLE, "must be between 0.1 and 300 seconds")
        return cls(down_after=int(down_text), canary_timeout=timeout)


@dataclass(frozen=True)
class ProbeResult:
    """One canary: whether write, read back and delete all worked in time, and why not."""

    provider: str
    ok: bool
    seconds: float
    error: str | None = None  # redacted, for people


@dataclass(frozen=True)
class ProviderState:
    """What we believe about a provider: `ok` flips to False after `down_after` consecutive failures and
    back to True on the first success. Times are ISO-8601 UTC strings so the state fits a sensor cursor."""

    provider: str
    ok: bool
    consecutive_failures: int
    since: str  # when the current up / down state began
    last_checked: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProviderState:
        return cls(provider=str(data["provider"]), ok=bool(data["ok"]),
                   consecutive_failures=int(data["consecutive_failures"]), since=str(data["since"]),
                   last_checked=str(data["last_checked"]))


@dataclass(frozen=True)
class HealthCheck:
    """One provider's canary and the state it led to. `transition` is "down", "recovered" or None."""

    probe: ProbeResult
    state: ProviderState
    transition: str | None


def iso(at: datetime) -> str:
    return at.astimezone(timezone.utc).isoformat(timespec="seconds")


def next_state(previous: ProviderState | None, probe: ProbeResult, *, down_after: int,
               now: datetime) -> tuple[ProviderState, str | None]:
    """The state after one canary. A provider never seen before starts as up: one blip is not an outage."""
    stamp = iso(now)
    was_ok = previous.ok if previous is not None else True
    since = previous.since if previous is not None else stamp
    if probe.ok:
        if not was_ok:
            return ProviderState(probe.provider, True, 0, stamp, stamp), "recovered"
        return ProviderState(probe.provider, True, 0, since, stamp), None
    failures = (previous.consecutive_failures if previous is not None else 0) + 1
    if was_ok and failures >= down_after:
        return ProviderState(probe.provider, False, failures, stamp, stamp), "down"
    return ProviderState(probe.provider, was_ok, failures, since, stamp), None


def canary_replicas(settings: Settings, timeout: float, providers: tuple[str, ...] = PROVIDERS,
                    environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Replica clients made for canaries: connect and read timeouts of `timeout`, no SDK retry loops, so a
    dead endpoint fails in about `timeout` seconds rather than after the SDKs' minutes of back-off."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for provider in providers:
        try:
            out[provider] = _canary_replica(provider, settings, timeout, env)
        except Exception as exc:  # noqa: BLE001 - a client that cannot even be made is a failed canary
            out[provider] = _Unconfigured(provider, redact(f"client not usable: {type(exc).__name__}: {exc}"))
    return out


def _canary_replica(provider: str, settings: Settings, timeout: float, env: Mapping[str, str]) -> Any:
    if provider == "azure" and not settings.azure.connection_string:
        return _Unconfigured(provider, "WEDBACKUP_AZURE_CONNECTION_STRING is not set")
    # One attempt, every wait bounded by the canary's own timeout (not the pipeline's).
    client = provider_client(provider, settings, env, timeout=timeout, connect_timeout=timeout, max_attempts=1)
    return replica_over(provider, settings, client, timeout=timeout, connect_timeout=timeout, retry_seconds=timeout)


class _Unconfigured:
    """Stands in for a provider that cannot even be configured: its canary fails with the reason."""

    def __init__(self, provider: str, reason: str):
        self.provider = provider
        self.reason = reason

    def canary(self) -> float:
        raise RuntimeError(self.reason)


def probe(replica: Any, timeout: float) -> ProbeResult:
    """Run one canary in a daemon thread and give up on it after `timeout` seconds. A hung SDK call is
    abandoned, not killed (Python cannot kill a thread): the canary object is tiny and self-deleting."""
    return probe_all({replica.provider: replica}, timeout)[replica.provider]


def probe_all(replicas: Mapping[str, Any], timeout: float) -> dict[str, ProbeResult]:
    """Every provider's canary at once, so a tick takes at most `timeout`, not the sum over providers."""
    results: dict[str, ProbeResult] = {}
    lock = threading.Lock()

    def run(provider: str, replica: Any) -> None:
        started = time.monotonic()
        try:
            replica.canary()
            result = ProbeResult(provider, True, time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - any failure of the canary means the provider is not usable
            text = " ".join(str(exc).split())[:400] or type(exc).__name__
            result = ProbeResult(provider, False, time.monotonic() - started, redact(text))
        with lock:
            results.setdefault(provider, result)

    started = time.monotonic()
    threads = {p: threading.Thread(target=run, args=(p, r), name=f"canary-{p}", daemon=True)
               for p, r in replicas.items()}
    for thread in threads.values():
        thread.start()
    for thread in threads.values():
        thread.join(max(0.0, timeout - (time.monotonic() - started)))
    with lock:
        for provider in replicas:
            results.setdefault(provider, ProbeResult(
                provider, False, timeout, f"canary did not finish within {timeout:g} s"))
        return {p: results[p] for p in replicas}


def check_providers(replicas: Mapping[str, Any], catalogue: Catalogue | None,
                    previous: Mapping[str, ProviderState], *, settings: HealthSettings,
                    now: datetime | None = None) -> dict[str, HealthCheck]:
    """Canary every provider, work out each one's new state, and record canary and state in the
    catalogue (when given). `previous` is the state the caller last saw (a sensor's cursor)."""
    now = now or datetime.now(timezone.utc)
    probes = probe_all(replicas, settings.canary_timeout)
    checks: dict[str, HealthCheck] = {}
    for provider, result in probes.items():
        state, transition = next_state(previous.get(provider), result, down_after=settings.down_after, now=now)
        checks[provider] = HealthCheck(result, state, transition)
        if catalogue is not None:
            catalogue.record_provider_check(provider, ok=result.ok, seconds=result.seconds, error=result.error,
                                            state_ok=state.ok, consecutive_failures=state.consecutive_failures,
                                            since=state.since, at=state.last_checked)
    return checks


def states_from_catalogue(catalogue: Catalogue) -> dict[str, ProviderState]:
    """The recorded state of every provider: where a sensor without a cursor (new, or reset) picks up."""
    return {row["provider"]: ProviderState(row["provider"], row["ok"], row["consecutive_failures"],
                                           iso(row["since"]), iso(row["last_checked"]))
            for row in catalogue.provider_states()}


def catchup_ranges(missing: set[str] | list[str], ordered: list[str], harmless: set[str], *,
                   max_runs: int, max_gap: int = 0) -> tuple[list[tuple[str, str]], list[str]]:
    """Group the partitions that missed a provider into (first, last) ranges of the partitions' insertion
    order `ordered` — Dagster runs one range per run. A gap between two ranges may be closed when it holds
    only `harmless` partitions (their newest backup already has the copy, so replicating them again is a
    checked no-op costing a HEAD request and a read of the vault file, where a run costs seconds): every
    such gap of at most `max_gap` partitions is closed, then the smallest others until at most `max_runs`
    ranges remain. Returns (ranges, missing partitions not in `ordered`)."""
    wanted = set(missing)
    position = {k: i for i, k in enumerate(ordered)}
    unknown = sorted(wanted.difference(position))
    spans: list[list[int]] = []  # [first index, last index]
    for i in sorted(position[k] for k in wanted if k in position):
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    gaps = []  # (size, index of the span before the gap) for the gaps that may be closed
    for n in range(len(spans) - 1):
        between = ordered[spans[n][1] + 1: spans[n + 1][0]]
        if all(k in harmless for k in between):
            gaps.append((len(between), n))
    gaps.sort()
    small = sum(1 for size, _ in gaps if size <= max_gap)
    closing = {n for _, n in gaps[: max(small, len(spans) - max_runs)]}
    merged: list[list[int]] = []
    for n, span in enumerate(spans):
        if n - 1 in closing:
            merged[-1][1] = span[1]
        else:
            merged.append(list(span))
    return [(ordered[a], ordered[b]) for a, b in merged], unknown
