"""Health monitoring: HTTP probes per host, Prometheus metric checks, thresholds and verdicts.

A `HealthMonitor` watches one app. Every HTTP check is probed on every host, and every
Prometheus check once for the whole app, each in its own loop on its own interval, so a slow
endpoint costs only its own timeout and never delays another probe.

Verdicts
    Each (HTTP check, host) and each metric check has a state: "unknown" until its first
    verdict, "unhealthy" after `failures` consecutive failures, "healthy" after `successes`
    consecutive successes (the same thresholds lead out of "unknown"). A host is healthy when
    all its HTTP checks are healthy, unhealthy as soon as one is unhealthy, and unknown
    otherwise. A host of an app without HTTP checks is healthy from the start.

No data
    A metric check whose query gives no usable number (no series, several series, NaN, a
    query error, Prometheus down or too slow) records `no_data`: counted apart, never a
    failure, and it neither extends nor breaks a run of successes or failures, so the check
    keeps the verdict its last real measurements gave. `no_data_checks()` names the checks
    whose latest probe had no data; deciding what a long silence means (pause the app, ask a
    human) is the caller's job.

Changes
    `on_change` is called when a host's or a metric check's verdict differs from the one last
    announced (the first verdict after start is announced too). Calls are delivered one at a
    time, in order, from a separate task, so probes never wait for them.

Probes start, and time out, on a shared 10 ms tick rather than each on its own timer: at a
thousand probes a second that cuts the monitor's CPU by a third, and a timeout fires at most one
tick late.

`reset()` (after a deploy or rollback) puts every check back to "unknown" with zero counts,
keeping the last outcome and reason, and drops results of probes that were in flight; the
`host_healthy` gauge keeps its last value until a new verdict replaces it.

Samples
    Each (HTTP check, host) also keeps its last `SAMPLES_KEPT` probes (when each started on
    the monitor's clock, success or failure, how long it took), whatever `reset()` does, so a
    rollout can compare the hosts on a new release with the others over the same window:
    `samples(hosts, since)` sums them into an `analysis.GroupSamples`. At the default 5 s
    interval, 600 probes are the last 50 minutes.

Groups in PromQL
    In a Prometheus check's query, `{hosts}` stands for a regex of host addresses (see
    `hosts_regex`): every host of the app in the app-wide probe, and a group's hosts in
    `query_group(check, hosts)`, which a rollout runs for its canary and its baseline.

HTTP probes do not follow redirects (a 301 is judged against `expect_status`), read at most
`BODY_LIMIT` bytes of a body (matchers see that much), and never put header values or the
body itself in a reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import math
import random
import re
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, Final, Literal, NamedTuple, TypeVar

import aiohttp
from prometheus_client.metrics import Counter, Gauge, Histogram
from yarl import URL

from deployd.analysis import GroupSamples
from deployd.config import AppConfig, HostConfig, HttpCheck, PrometheusCheck, render_template
from deployd.metrics import Metrics

log = logging.getLogger(__name__)

BODY_LIMIT: Final = 64 * 1024
PROMETHEUS_BODY_LIMIT: Final = 256 * 1024
INITIAL_JITTER: Final = 1.0
TICK: Final = 0.01
_SHOWN: Final = 60
SAMPLES_KEPT: Final = 600
HOSTS_PLACEHOLDER: Final = "{hosts}"
_REASON_LIMIT: Final = 200
# Timeouts are enforced around the whole probe (connect, send, read) by `_Ticks`;
# this keeps aiohttp from arming a timer of its own per request.
_NO_CLIENT_TIMEOUT: Final = aiohttp.ClientTimeout(
    total=None, connect=None, sock_read=None, sock_connect=None
)

State = Literal["unknown", "healthy", "unhealthy"]


class ProbeOutcome(StrEnum):
    """What one probe found; the values are the `result` label of `health_checks_total`."""

    SUCCESS = "success"
    FAILURE = "failure"
    NO_DATA = "no_data"


SUCCESS: Final = ProbeOutcome.SUCCESS
FAILURE: Final = ProbeOutcome.FAILURE
NO_DATA: Final = ProbeOutcome.NO_DATA


@dataclass(frozen=True)
class HealthChange:
    """A verdict changed: `host` is set for a host, `check` for an app-wide metric check."""

    host: str | None
    check: str | None
    healthy: bool
    reasons: list[str]
    at: float

    @property
    def subject(self) -> str:
        """The host's or the metric check's name."""
        return self.host if self.host is not None else self.check or ""


@dataclass(frozen=True)
class CheckHealth:
    """One HTTP check on one host."""

    name: str
    state: State
    since: float | None
    consecutive_successes: int
    consecutive_failures: int
    last_outcome: ProbeOutcome | None
    last_reason: str
    last_at: float | None


@dataclass(frozen=True)
class HostHealth:
    """One host: `healthy` is None while unknown; `since` is when that verdict was reached."""

    name: str
    healthy: bool | None
    since: float | None
    checks: Mapping[str, CheckHealth]


@dataclass(frozen=True)
class MetricHealth:
    """One app-wide Prometheus check; `value` is the last number measured."""

    name: str
    state: State
    since: float | None
    value: float | None
    consecutive_successes: int
    consecutive_failures: int
    consecutive_no_data: int
    no_data_since: float | None
    last_outcome: ProbeOutcome | None
    last_reason: str
    last_at: float | None


@dataclass(frozen=True)
class AppHealth:
    """Everything the monitor knows about one app at `at`."""

    app: str
    at: float
    hosts: Mapping[str, HostHealth]
    metrics: Mapping[str, MetricHealth]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (outcomes as plain strings)."""
        return dataclasses.asdict(self, dict_factory=_plain_dict)


def _plain_dict(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, ProbeOutcome) else value
            for key, value in items}


OnChange = Callable[[HealthChange], Awaitable[None]]


class GroupValue(NamedTuple):
    """A Prometheus check run once for a group of hosts, judged against its max and min."""

    outcome: ProbeOutcome
    value: float | None
    reason: str


class ProbeSample(NamedTuple):
    """One HTTP probe: when it started (the monitor's clock), whether it succeeded, and how
    long it took (seconds)."""

    at: float
    ok: bool
    latency: float


class _Streak:
    """Consecutive outcomes of one check and the verdict they give."""

    __slots__ = ("bad", "last_at", "last_outcome", "last_reason", "need_bad", "need_ok",
                 "no_data", "no_data_since", "ok", "since", "state")

    def __init__(self, successes: int, failures: int) -> None:
        self.need_ok = successes
        self.need_bad = failures
        self.state: State = "unknown"
        self.since: float | None = None
        self.ok = self.bad = self.no_data = 0
        self.no_data_since: float | None = None
        self.last_outcome: ProbeOutcome | None = None
        self.last_reason = ""
        self.last_at: float | None = None

    def record(self, outcome: ProbeOutcome, reason: str, at: float) -> bool:
        """Count one outcome; True when the state changed."""
        self.last_outcome, self.last_reason, self.last_at = outcome, reason, at
        if outcome is NO_DATA:
            if not self.no_data:
                self.no_data_since = at
            self.no_data += 1
            return False
        self.no_data, self.no_data_since = 0, None
        if outcome is SUCCESS:
            self.ok, self.bad = self.ok + 1, 0
            return self.ok >= self.need_ok and self._become("healthy", at)
        self.bad, self.ok = self.bad + 1, 0
        return self.bad >= self.need_bad and self._become("unhealthy", at)

    def _become(self, state: State, at: float) -> bool:
        if self.state == state:
            return False
        self.state, self.since = state, at
        return True

    def reset(self, at: float) -> None:
        """Forget the counts and the verdict; keep the last outcome and reason."""
        if self.state != "unknown":
            self.state, self.since = "unknown", at
        self.ok = self.bad = self.no_data = 0
        self.no_data_since = None


class _Host:
    __slots__ = ("announced", "app", "gauge", "healthy", "name", "probes", "since")

    def __init__(self, app: str, name: str, gauge: Gauge) -> None:
        self.app = app
        self.name = name
        self.gauge = gauge
        self.probes: list[_HttpProbe] = []
        self.healthy: bool | None = None
        self.since: float | None = None
        self.announced: bool | None = None

    def verdict(self) -> bool | None:
        states = [probe.streak.state for probe in self.probes]
        if "unhealthy" in states:
            return False
        return True if all(state == "healthy" for state in states) else None

    def publish(self, healthy: bool) -> None:
        # The series is created only now: a host without a verdict yet exports nothing.
        self.gauge.labels(app=self.app, host=self.name).set(1 if healthy else 0)

    def reasons(self) -> list[str]:
        return [f"{probe.check.name}: {probe.streak.last_reason}" for probe in self.probes
                if probe.streak.state == "unhealthy"]


BodyMatcher = Callable[[bytes], str | None]


class _HttpProbe:
    """Everything one (HTTP check, host) probe needs, prepared once."""

    __slots__ = ("check", "counters", "expect_text", "headers", "host", "label", "matcher",
                 "recent", "setup_error", "ssl", "streak", "timeout_reason", "url")

    def __init__(self, check: HttpCheck, host: _Host, config: HostConfig,
                 tls: bool | ssl.SSLContext | str, counters: Mapping[ProbeOutcome, Counter]
                 ) -> None:
        self.check = check
        self.host = host
        self.label = f"{check.name}@{host.name}"
        self.headers = dict(check.headers)
        self.expect_text = _describe_statuses(check.expect_status)
        self.timeout_reason = f"timeout after {check.timeout:g}s"
        self.matcher = _body_matcher(check)
        self.streak = _Streak(check.successes, check.failures)
        self.recent: deque[ProbeSample] = deque(maxlen=SAMPLES_KEPT)
        self.counters = counters
        self.ssl: bool | ssl.SSLContext = True if isinstance(tls, str) else tls
        self.setup_error: str | None = tls if isinstance(tls, str) else None
        self.url = URL()
        try:
            self.url = _http_url(render_template(check.url, config))
        except (KeyError, ValueError) as exc:
            self.setup_error = f"bad url: {_url_problem(exc)}"

    @property
    def interval(self) -> float:
        return self.check.interval


class _MetricProbe:
    """One Prometheus check, prepared once; `{hosts}` in its query means every host."""

    __slots__ = ("announced", "base", "check", "counters", "label", "setup_error", "streak",
                 "timeout_reason", "url", "value")

    def __init__(self, check: PrometheusCheck, counters: Mapping[ProbeOutcome, Counter],
                 addresses: Iterable[str]) -> None:
        self.check = check
        self.label = f"{check.name} (prometheus)"
        self.setup_error: str | None = None
        self.base = self.url = URL()
        try:
            self.base = _http_url(check.server.rstrip("/") + "/api/v1/query")
            self.url = self.query_url(addresses)
        except ValueError as exc:
            self.setup_error = f"bad prometheus server: {_url_problem(exc)}"
        self.timeout_reason = f"prometheus: timeout after {check.timeout:g}s"
        self.streak = _Streak(check.successes, check.failures)
        self.counters = counters
        self.value: float | None = None
        self.announced: bool | None = None

    @property
    def interval(self) -> float:
        return self.check.interval

    def query_url(self, addresses: Iterable[str]) -> URL:
        """The query's URL with `{hosts}` standing for these hosts."""
        query = self.check.query.replace(HOSTS_PLACEHOLDER, hosts_regex(addresses))
        return self.base.with_query(query=query)

    def judge(self, value: float) -> tuple[ProbeOutcome, str]:
        """Compare a measured number with the check's bounds."""
        check = self.check
        if check.max is not None and value > check.max:
            return FAILURE, f"value {value:g} above max {check.max:g}"
        if check.min is not None and value < check.min:
            return FAILURE, f"value {value:g} below min {check.min:g}"
        return SUCCESS, f"value {value:g}"


_Probe = _HttpProbe | _MetricProbe
_P = TypeVar("_P", _HttpProbe, _MetricProbe)


class _Slot:
    __slots__ = ("deadlines", "sleepers")

    def __init__(self) -> None:
        self.sleepers: list[asyncio.Future[None]] = []
        self.deadlines: set[asyncio.Timeout] = set()


class _Ticks:
    """Coarse timers shared by a monitor's probes: one event-loop timer per busy tick.

    A sleep timer and a timeout timer per probe meant heap operations on thousands of timer
    handles each second, a large share of the CPU at a thousand probes a second. Probes due in
    the same tick also start together, in one pass of the event loop.
    """

    def __init__(self, tick: float) -> None:
        self._tick = tick
        self._slots: dict[int, _Slot] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def sleep_until(self, when: float) -> asyncio.Future[None]:
        """A future done at the first tick at or after `when` (loop time)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._slot(loop, when).sleepers.append(future)
        return future

    def timeout(self, seconds: float) -> _Deadline:
        """Like `asyncio.timeout(seconds)`, expiring at the first tick after the deadline."""
        return _Deadline(self, seconds)

    def expire(self, scope: asyncio.Timeout, when: float) -> set[asyncio.Timeout]:
        """Expire an entered scope at `when`; the caller discards it from the returned set."""
        deadlines = self._slot(asyncio.get_running_loop(), when).deadlines
        deadlines.add(scope)
        return deadlines

    def _slot(self, loop: asyncio.AbstractEventLoop, when: float) -> _Slot:
        if loop is not self._loop:
            # Slots armed on another (closed) event loop would never fire here.
            self._loop, self._slots = loop, {}
        number = math.ceil(when / self._tick)
        slot = self._slots.get(number)
        if slot is None:
            slot = self._slots[number] = _Slot()
            loop.call_at(number * self._tick, self._fire, number)
        return slot

    def _fire(self, number: int) -> None:
        slot = self._slots.pop(number)
        for future in slot.sleepers:
            if not future.done():
                future.set_result(None)
        if slot.deadlines:
            now = asyncio.get_running_loop().time()
            for scope in slot.deadlines:
                scope.reschedule(now)


class _Deadline:
    """An `asyncio.timeout` whose expiry is driven by `_Ticks` instead of its own timer."""

    __slots__ = ("_scope", "_seconds", "_ticks", "_watch")

    def __init__(self, ticks: _Ticks, seconds: float) -> None:
        self._ticks = ticks
        self._seconds = seconds
        self._scope = asyncio.timeout(None)
        self._watch: set[asyncio.Timeout] = set()

    async def __aenter__(self) -> None:
        await self._scope.__aenter__()
        when = asyncio.get_running_loop().time() + self._seconds
        self._watch = self._ticks.expire(self._scope, when)

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        self._watch.discard(self._scope)
        await self._scope.__aexit__(kind, error, trace)


class HealthMonitor:
    """Probes one app's hosts and metric checks and keeps their verdicts (see the module doc)."""

    def __init__(self, app: AppConfig, session: aiohttp.ClientSession, metrics: Metrics, *,
                 on_change: OnChange | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.app = app
        self._session = session
        self._on_change = on_change
        self._clock = clock
        self._duration: Histogram = metrics.health_check_duration_seconds.labels(app=app.name)
        self._generation = 0
        # When the evidence behind the current verdicts began: the start of probing or the
        # last reset. A verdict younger than a check's observation time proves little.
        self.evidence_since = clock()
        self._changes: deque[HealthChange] = deque()
        self._dispatcher: asyncio.Task[None] | None = None
        self._running = False
        self._ticks = _Ticks(TICK)
        self._hosts = self._build_hosts(metrics)
        self._addresses = dict(zip(app.host_labels, (host.address for host in app.hosts),
                                   strict=True))
        self._metric_probes = {
            check.name: _MetricProbe(check, _counters(metrics, app.name, "", with_no_data=True),
                                     self._addresses.values())
            for check in app.checks if isinstance(check, PrometheusCheck)
        }
        self._probes: list[_Probe] = [
            *(probe for host in self._hosts.values() for probe in host.probes),
            *self._metric_probes.values(),
        ]

    def _build_hosts(self, metrics: Metrics) -> dict[str, _Host]:
        http_checks = [check for check in self.app.checks if isinstance(check, HttpCheck)]
        tls = {check.name: _tls_setting(check) for check in http_checks}
        hosts: dict[str, _Host] = {}
        for name, config in zip(self.app.host_labels, self.app.hosts, strict=True):
            host = _Host(self.app.name, name, metrics.host_healthy)
            counters = _counters(metrics, self.app.name, name, with_no_data=False)
            host.probes = [_HttpProbe(check, host, config, tls[check.name], counters)
                           for check in http_checks]
            if not host.probes:
                host.healthy = host.announced = True
                host.publish(True)
            hosts[name] = host
        return hosts

    async def run(self) -> None:
        """Probe everything, each check on its own interval, until cancelled."""
        if self._running:
            raise RuntimeError(f"health monitor of {self.app.name} is already running")
        self._running = True
        self.evidence_since = self._clock()
        try:
            async with asyncio.TaskGroup() as group:
                for host in self._hosts.values():
                    for probe in host.probes:
                        group.create_task(self._loop(probe, self._probe_http),
                                          name=f"health {self.app.name} {probe.label}")
                for metric in self._metric_probes.values():
                    group.create_task(self._loop(metric, self._probe_metric),
                                      name=f"health {self.app.name} {metric.label}")
                await asyncio.get_running_loop().create_future()
        finally:
            self._running = False
            if self._dispatcher is not None:
                self._dispatcher.cancel()

    async def probe_now(self) -> None:
        """Run every probe once, right now, and update the verdicts."""
        await asyncio.gather(
            *(self._guarded(self._probe_http, probe) for host in self._hosts.values()
              for probe in host.probes),
            *(self._guarded(self._probe_metric, probe) for probe in self._metric_probes.values()),
        )

    def reset(self) -> None:
        """Forget counts and verdicts (e.g. after a deploy); keep the last reasons."""
        now = self._clock()
        self.evidence_since = now
        self._generation += 1
        for probe in self._probes:
            probe.streak.reset(now)
        for host in self._hosts.values():
            verdict = host.verdict()
            if verdict != host.healthy:
                host.healthy, host.since = verdict, now

    def unhealthy_hosts(self) -> list[str]:
        """Hosts whose verdict is unhealthy, in config order."""
        return [name for name, host in self._hosts.items() if host.healthy is False]

    def metric_failing(self) -> list[str]:
        """Metric checks whose verdict is unhealthy."""
        return [name for name, probe in self._metric_probes.items()
                if probe.streak.state == "unhealthy"]

    def no_data_checks(self) -> list[str]:
        """Metric checks whose latest probe gave no data."""
        return [name for name, probe in self._metric_probes.items() if probe.streak.no_data]

    def samples(self, hosts: Iterable[str], since: float, *,
                check: str | None = None) -> GroupSamples:
        """The kept HTTP probes of `hosts` (host labels) that started at or after `since` (the
        monitor's clock), summed: successes, failures and the times of the successes. Every
        HTTP check counts, or only the one named `check`. ValueError for an unknown host."""
        ok = failed = 0
        latencies: list[float] = []
        for name in hosts:
            host = self._hosts.get(name)
            if host is None:
                raise ValueError(f"{self.app.name} has no host {name!r}")
            for probe in host.probes:
                if check is not None and probe.check.name != check:
                    continue
                for sample in probe.recent:
                    if sample.at < since:
                        continue
                    if sample.ok:
                        ok += 1
                        latencies.append(sample.latency)
                    else:
                        failed += 1
        return GroupSamples(ok=ok, failed=failed, latencies=tuple(latencies))

    async def query_group(self, check: str, hosts: Iterable[str]) -> GroupValue:
        """Run the Prometheus check named `check` once for a group of hosts (host labels):
        `{hosts}` in its query stands for their addresses. The app-wide verdicts are not
        touched. ValueError for an unknown check or host."""
        probe = self._metric_probes.get(check)
        if probe is None:
            raise ValueError(f"{self.app.name} has no prometheus check {check!r}")
        addresses = []
        for name in hosts:
            if name not in self._addresses:
                raise ValueError(f"{self.app.name} has no host {name!r}")
            addresses.append(self._addresses[name])
        url = probe.url if probe.setup_error else probe.query_url(addresses)
        outcome, value, reason = await _probe_prometheus_once(self._session, self._ticks,
                                                              probe, url)
        return GroupValue(outcome, value, reason)

    def snapshot(self) -> AppHealth:
        """A copy of every verdict, count and last outcome."""
        return AppHealth(
            app=self.app.name,
            at=self._clock(),
            hosts={name: _host_health(host) for name, host in self._hosts.items()},
            metrics={name: _metric_health(probe) for name, probe in self._metric_probes.items()},
        )

    async def _loop(self, probe: _P, run: Callable[[_P], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        interval = probe.interval
        due = loop.time() + random.uniform(0, min(interval, INITIAL_JITTER))
        while True:
            await self._ticks.sleep_until(due)
            await self._guarded(run, probe)
            due += interval
            now = loop.time()
            if due < now:
                # The probe overran its interval: start the next one now, don't catch up.
                due = now

    async def _guarded(self, run: Callable[[_P], Awaitable[None]], probe: _P) -> None:
        try:
            await run(probe)
        except Exception:
            log.exception("health probe %s of %s crashed", probe.label, self.app.name)

    async def _probe_http(self, probe: _HttpProbe) -> None:
        generation = self._generation
        started_at = self._clock()
        started = time.perf_counter()
        outcome, reason = await _probe_http_once(self._session, self._ticks, probe)
        took = time.perf_counter() - started
        self._duration.observe(took)
        probe.recent.append(ProbeSample(started_at, outcome is SUCCESS, took))
        probe.counters[outcome].inc()
        if generation != self._generation:
            return  # started before reset(): it judged what ran before
        now = self._clock()
        if probe.streak.record(outcome, reason, now):
            self._update_host(probe.host, now)

    async def _probe_metric(self, probe: _MetricProbe) -> None:
        generation = self._generation
        started = time.perf_counter()
        outcome, value, reason = await _probe_prometheus_once(self._session, self._ticks, probe)
        self._duration.observe(time.perf_counter() - started)
        probe.counters[outcome].inc()
        if generation != self._generation:
            return
        now = self._clock()
        if value is not None:
            probe.value = value
        if outcome is NO_DATA:
            log.debug("%s: no data: %s", probe.label, reason)
        if probe.streak.record(outcome, reason, now) and probe.streak.state != "unknown":
            healthy = probe.streak.state == "healthy"
            if healthy != probe.announced:
                probe.announced = healthy
                self._announce(HealthChange(None, probe.check.name, healthy,
                                            [] if healthy else [reason], now))

    def _update_host(self, host: _Host, now: float) -> None:
        verdict = host.verdict()
        if verdict == host.healthy:
            return
        host.healthy, host.since = verdict, now
        if verdict is None:
            return
        host.publish(verdict)
        if verdict != host.announced:
            host.announced = verdict
            self._announce(HealthChange(host.name, None, verdict, host.reasons(), now))

    def _announce(self, change: HealthChange) -> None:
        if change.healthy:
            log.info("%s: %s is healthy", self.app.name, change.subject)
        else:
            log.warning("%s: %s is unhealthy: %s", self.app.name, change.subject,
                        "; ".join(change.reasons))
        if self._on_change is None:
            return
        self._changes.append(change)
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(
                self._dispatch(self._on_change), name=f"health {self.app.name} on_change")

    async def _dispatch(self, on_change: OnChange) -> None:
        while self._changes:
            change = self._changes.popleft()
            try:
                await on_change(change)
            except Exception:
                log.exception("%s: health change handler failed", self.app.name)


async def _probe_http_once(session: aiohttp.ClientSession, ticks: _Ticks, probe: _HttpProbe
                           ) -> tuple[ProbeOutcome, str]:
    """Probe one HTTP check on one host once: (success or failure, short reason)."""
    if probe.setup_error is not None:
        return FAILURE, probe.setup_error
    check = probe.check
    try:
        async with ticks.timeout(check.timeout):
            async with session.request(check.method, probe.url, headers=probe.headers,
                                       ssl=probe.ssl, allow_redirects=False,
                                       timeout=_NO_CLIENT_TIMEOUT) as response:
                body = await _read_body(response, BODY_LIMIT)
                status = response.status
    except TimeoutError:
        return FAILURE, probe.timeout_reason
    except (aiohttp.ClientError, OSError) as exc:
        return FAILURE, _describe_error(exc)
    if status not in check.expect_status:
        return FAILURE, f"status {status} (expected {probe.expect_text})"
    if probe.matcher is not None:
        mismatch = probe.matcher(body)
        if mismatch is not None:
            return FAILURE, mismatch
    return SUCCESS, f"status {status}"


async def _probe_prometheus_once(session: aiohttp.ClientSession, ticks: _Ticks,
                                 probe: _MetricProbe, url: URL | None = None
                                 ) -> tuple[ProbeOutcome, float | None, str]:
    """Run one Prometheus check once (its own URL, or `url`): (outcome, the number or None,
    short reason)."""
    if probe.setup_error is not None:
        return NO_DATA, None, probe.setup_error
    try:
        async with ticks.timeout(probe.check.timeout):
            async with session.get(url or probe.url, allow_redirects=False,
                                   timeout=_NO_CLIENT_TIMEOUT) as response:
                body = await _read_body(response, PROMETHEUS_BODY_LIMIT)
                status = response.status
    except TimeoutError:
        return NO_DATA, None, probe.timeout_reason
    except (aiohttp.ClientError, OSError) as exc:
        return NO_DATA, None, f"prometheus unreachable: {_describe_error(exc)}"
    value, problem = _prometheus_value(status, body)
    if value is None:
        return NO_DATA, None, problem
    outcome, reason = probe.judge(value)
    return outcome, value, reason


async def _read_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most `limit` bytes of the body; a longer body is cut (its connection is not reused)."""
    content = response.content
    if content.is_eof():
        # Usually the whole body came with the headers: take it without awaiting.
        return content.read_nowait(limit)
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if content.is_eof():
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _prometheus_value(status: int, body: bytes) -> tuple[float | None, str]:
    """The one number in a `/api/v1/query` answer, or None and why there is none."""
    try:
        document = json.loads(body)
    except ValueError:
        return None, f"prometheus answered status {status} without JSON"
    if not isinstance(document, dict):
        return None, f"prometheus answered status {status} with unexpected JSON"
    if document.get("status") != "success":
        kind = document.get("errorType") or f"status {status}"
        return None, _clip(f"query error: {kind}: {document.get('error', '')}")
    data = document.get("data")
    if not isinstance(data, dict):
        return None, "prometheus answer has no data"
    return _sample_value(data.get("resultType"), data.get("result"))


def _sample_value(kind: Any, result: Any) -> tuple[float | None, str]:
    if kind == "scalar":
        sample = result
    elif kind == "vector" and isinstance(result, list):
        if not result:
            return None, "query returned no series"
        if len(result) > 1:
            return None, f"query returned {len(result)} series (expected one)"
        sample = result[0].get("value") if isinstance(result[0], dict) else None
    else:
        return None, f"query returned a {kind} (expected one number)"
    try:
        value = float(sample[1])
    except (TypeError, ValueError, IndexError, KeyError):
        return None, "query returned an unreadable sample"
    if math.isnan(value):
        return None, "query returned NaN"
    return value, ""


_ERRNO_REASONS: Final = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.EPIPE: "connection reset",
    errno.ETIMEDOUT: "connection timed out",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
}


def _describe_error(exc: BaseException) -> str:
    """A short reason for a failed request, naming neither the URL nor any header."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        error = exc.certificate_error
        detail = getattr(error, "verify_message", None) or type(error).__name__
        return f"TLS certificate not accepted: {detail}"
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return "TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"DNS lookup failed for {exc.host}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server closed the connection without answering"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "response body cut short"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "not a valid HTTP response"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.errno in _ERRNO_REASONS:
        return _ERRNO_REASONS[exc.errno]
    if isinstance(exc, OSError) and exc.strerror:
        return f"network error: {exc.strerror}"
    return f"request failed ({type(exc).__name__})"


def _body_matcher(check: HttpCheck) -> BodyMatcher | None:
    if check.body_contains is not None:
        return _contains_matcher(check.body_contains)
    if check.body_regex is not None:
        return _regex_matcher(check.body_regex)
    if check.json_path is not None:
        return _json_matcher(check.json_path, check.json_equals)
    return None


def _contains_matcher(text: str) -> BodyMatcher:
    needle = text.encode()
    reason = f"body does not contain {_clip(text, _SHOWN)!r}"
    return lambda body: None if needle in body else reason


def _regex_matcher(expression: str) -> BodyMatcher:
    pattern = re.compile(expression)
    reason = f"body does not match /{_clip(expression, _SHOWN)}/"
    return lambda body: (None if pattern.search(body.decode("utf-8", "replace"))
                         else reason)


def _json_matcher(path: str, expected: Any) -> BodyMatcher:
    parts = path.split(".")
    shown = _json_text(expected)

    def match(body: bytes) -> str | None:
        try:
            document = json.loads(body)
        except ValueError:
            return "body is not JSON"
        found, value = _json_lookup(document, parts)
        if not found:
            return f"JSON has no {path}"
        if not _json_equal(value, expected):
            return f"JSON {path} is {_json_text(value)} (expected {shown})"
        return None

    return match


def _json_lookup(document: Any, parts: list[str]) -> tuple[bool, Any]:
    value = document
    for part in parts:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return False, None
    return True, value


def _json_equal(actual: Any, expected: Any) -> bool:
    # JSON true must not equal 1 (nor false 0), which Python's == allows.
    if isinstance(actual, bool) or isinstance(expected, bool):
        return type(actual) is type(expected) and actual == expected
    return bool(actual == expected)


def _json_text(value: Any) -> str:
    return _clip(json.dumps(value), _SHOWN)


def _clip(text: str, limit: int = _REASON_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe_statuses(codes: frozenset[int]) -> str:
    """`200`, `200-299` or `200, 204, 301-302`."""
    ordered = sorted(codes)
    if not ordered:
        return "none"
    runs: list[tuple[int, int]] = []
    start = previous = ordered[0]
    for code in ordered[1:]:
        if code != previous + 1:
            runs.append((start, previous))
            start = code
        previous = code
    runs.append((start, previous))
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def hosts_regex(addresses: Iterable[str]) -> str:
    """What `{hosts}` stands for in a PromQL query: the addresses regex-escaped, joined with
    `|`, in order, each once; its backslashes doubled, for a double- or single-quoted PromQL
    string (`instance=~"({hosts}):9100"`). Prometheus anchors regex matchers at both ends."""
    unique = dict.fromkeys(addresses)
    return "|".join(re.escape(address) for address in unique).replace("\\", "\\\\")


def _http_url(text: str) -> URL:
    url = URL(text)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"expected an http:// or https:// URL, got scheme {url.scheme!r}")
    return url


def _url_problem(exc: KeyError | ValueError) -> str:
    if isinstance(exc, KeyError):
        return f"host has no var {exc.args[0]!r}"
    return str(exc).split("\n")[0][:_SHOWN]


def _tls_setting(check: HttpCheck) -> bool | ssl.SSLContext | str:
    """aiohttp's `ssl=` value for a check, or why it cannot be built."""
    if not check.tls_verify:
        return False
    if check.ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(check.ca_file))
    except (OSError, ssl.SSLError) as exc:
        return f"cannot load ca_file {check.ca_file}: {getattr(exc, 'strerror', None) or exc}"


def _counters(metrics: Metrics, app: str, host: str, *, with_no_data: bool
              ) -> dict[ProbeOutcome, Counter]:
    outcomes = list(ProbeOutcome) if with_no_data else [SUCCESS, FAILURE]
    return {outcome: metrics.health_checks_total.labels(app=app, host=host, result=outcome.value)
            for outcome in outcomes}


def _host_health(host: _Host) -> HostHealth:
    return HostHealth(
        name=host.name,
        healthy=host.healthy,
        since=host.since,
        checks={probe.check.name: _check_health(probe) for probe in host.probes},
    )


def _check_health(probe: _HttpProbe) -> CheckHealth:
    streak = probe.streak
    return CheckHealth(
        name=probe.check.name, state=streak.state, since=streak.since,
        consecutive_successes=streak.ok, consecutive_failures=streak.bad,
        last_outcome=streak.last_outcome, last_reason=streak.last_reason,
        last_at=streak.last_at,
    )


def _metric_health(probe: _MetricProbe) -> MetricHealth:
    streak = probe.streak
    return MetricHealth(
        name=probe.check.name, state=streak.state, since=streak.since, value=probe.value,
        consecutive_successes=streak.ok, consecutive_failures=streak.bad,
        consecutive_no_data=streak.no_data, no_data_since=streak.no_data_since,
        last_outcome=streak.last_outcome, last_reason=streak.last_reason,
        last_at=streak.last_at,
    )
