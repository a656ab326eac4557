"""Health monitoring against real aiohttp health servers and a real Prometheus, on loopback."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import Gauge

from deployd import health
from deployd.analysis import Verdict, compare
from deployd.config import AppConfig, HostConfig, HttpCheck, PrometheusCheck
from deployd.health import GroupValue, HealthChange, HealthMonitor, ProbeOutcome, hosts_regex
from deployd.metrics import Metrics
from tests.support.healthservers import (
    HealthServer,
    PrometheusServer,
    StartServers,
    self_signed_tls,
)
from tests.support.net import free_port

URL = "http://{address}:{health_port}/healthz"


def http_check(**overrides: Any) -> HttpCheck:
    """A quick HTTP check: short timeout and interval, one probe per verdict by default."""
    settings: dict[str, Any] = {"name": "http", "url": URL, "timeout": 0.5, "interval": 0.2,
                                "failures": 1, "successes": 1}
    settings.update(overrides)
    return HttpCheck(**settings)


def prom_check(server: str, query: str, **overrides: Any) -> PrometheusCheck:
    """A Prometheus check with a short timeout."""
    settings: dict[str, Any] = {"name": "errors", "server": server, "query": query,
                                "max": 0.05, "timeout": 2.0, "interval": 0.5}
    settings.update(overrides)
    return PrometheusCheck(**settings)


def host_for(server: HealthServer) -> HostConfig:
    """A host whose health port is the server's; its name is 127.0.0.1:<port>."""
    return HostConfig(address="127.0.0.1", port=server.port, deploy_to="/srv/shop",
                      vars={"health_port": str(server.port)})


def make_app(servers: list[HealthServer], *checks: HttpCheck | PrometheusCheck,
             hosts: tuple[HostConfig, ...] | None = None) -> AppConfig:
    """An app named shop over these servers' hosts."""
    return AppConfig(name="shop", repo="/nonexistent", branch="production",
                     deploy_to="/srv/shop",
                     hosts=hosts if hosts is not None else tuple(map(host_for, servers)),
                     checks=checks)


def name_of(server: HealthServer) -> str:
    """The host name the monitor uses for this server."""
    return f"127.0.0.1:{server.port}"


class Changes:
    """An on_change callback that records what it is given."""

    def __init__(self) -> None:
        self.seen: list[HealthChange] = []
        self._arrived = asyncio.Event()

    async def __call__(self, change: HealthChange) -> None:
        self.seen.append(change)
        self._arrived.set()

    async def settle(self) -> list[tuple[str, bool]]:
        """Let queued calls arrive; (subject, healthy) of every call so far."""
        for _ in range(5):
            await asyncio.sleep(0.01)
        return [(change.subject, change.healthy) for change in self.seen]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """One shared client session, as the daemon passes in."""
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def metrics() -> Metrics:
    """A fresh registry."""
    return Metrics()


async def one_host(health_servers: StartServers, session: aiohttp.ClientSession,
                   metrics: Metrics, check: HttpCheck,
                   changes: Changes | None = None) -> tuple[HealthServer, HealthMonitor]:
    """A monitor over one fresh health server."""
    [server] = await health_servers(1)
    monitor = HealthMonitor(make_app([server], check), session, metrics, on_change=changes)
    return server, monitor


def last(monitor: HealthMonitor, server: HealthServer, check: str = "http") -> tuple[str, str]:
    """(last outcome, last reason) of one check on the server's host."""
    status = monitor.snapshot().hosts[name_of(server)].checks[check]
    return str(status.last_outcome), status.last_reason


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    """One sample of the registry."""
    return metrics.registry.get_sample_value(name, labels)


# -- HTTP probes: each kind of answer and failure ------------------------------------------


async def test_ok_answer_is_success(health_servers: StartServers,
                                    session: aiohttp.ClientSession, metrics: Metrics) -> None:
    """A 200 with the expected body is a success, and the host turns healthy."""
    server, monitor = await one_host(health_servers, session, metrics,
                                     http_check(body_contains="ok"))
    await monitor.probe_now()
    assert last(monitor, server) == ("success", "status 200")
    assert monitor.snapshot().hosts[name_of(server)].healthy is True
    assert monitor.unhealthy_hosts() == []


async def test_status_500_is_failure(health_servers: StartServers,
                                     session: aiohttp.ClientSession, metrics: Metrics) -> None:
    """A wrong status fails with the status and what was expected."""
    server, monitor = await one_host(health_servers, session, metrics, http_check())
    server.fail(500)
    await monitor.probe_now()
    assert last(monitor, server) == ("failure", "status 500 (expected 200)")
    assert monitor.unhealthy_hosts() == [name_of(server)]


async def test_slow_answer_is_timeout(health_servers: StartServers,
                                      session: aiohttp.ClientSession, metrics: Metrics) -> None:
    """An answer slower than the timeout fails as a timeout after exactly that long."""
    server, monitor = await one_host(health_servers, session, metrics,
                                     http_check(timeout=0.3))
    server.slow(3.0)
    started = time.monotonic()
    await monitor.probe_now()
    took = time.monotonic() - started
    assert last(monitor, server) == ("failure", "timeout after 0.3s")
    assert 0.25 < took < 2.0  # far from the server's 3 s: the timeout ended it


async def test_refused_then_back(health_servers: StartServers,
                                 session: aiohttp.ClientSession, metrics: Metrics) -> None:
    """A port that refuses fails as "connection refused"; the host recovers when it answers."""
    server, monitor = await one_host(health_servers, session, metrics, http_check())
    await monitor.probe_now()
    await server.refuse()
    await monitor.probe_now()
    assert last(monitor, server) == ("failure", "connection refused")
    await server.restore()
    await monitor.probe_now()
    assert last(monitor, server) == ("success", "status 200")
    assert monitor.snapshot().hosts[name_of(server)].healthy is True


async def test_connection_reset(health_servers: StartServers,
                                session: aiohttp.ClientSession, metrics: Metrics) -> None:
    """A connection reset by the server is a failure with its own reason."""
    server, monitor = await one_host(health_servers, session, metrics, http_check())
    server.reset()
    await monitor.probe_now()
    assert last(monitor, server) == ("failure", "connection reset")


async def test_dns_failure(session: aiohttp.ClientSession, metrics: Metrics) -> None:
    """A name that does not resolve fails as a DNS lookup failure naming the host."""
    host = HostConfig(address="deployd-test.invalid", deploy_to="/srv/shop")
    app = make_app([], http_check(url="http://{address}:8080/healthz", timeout=5.0),
                   hosts=(host,))
    monitor = HealthMonitor(app, session, metrics)
    await monitor.probe_now()
    status = monitor.snapshot().hosts["deployd-test.invalid"].checks["http"]
    assert status.last_reason == "DNS lookup failed for deployd-test.invalid"


async def test_unusable_url_fails_every_probe(session: aiohttp.ClientSession,
                                             metrics: Metrics) -> None:
    """A URL that is not http(s), or names a var the host lacks, fails with why."""
    host = HostConfig(address="127.0.0.1", port=2222, deploy_to="/srv/shop")
    app = make_app([], http_check(name="ftp", url="ftp://{address}/healthz"),
                   http_check(name="novar", url="http://{address}:{nope}/"), hosts=(host,))
    monitor = HealthMonitor(app, session, metrics)
    await monitor.probe_now()
    checks = monitor.snapshot().hosts["127.0.0.1:2222"].checks
    assert checks["ftp"].last_reason == (
        "bad url: expected an http:// or https:// URL, got scheme 'ftp'")
    assert checks["novar"].last_reason == "bad url: host has no var 'nope'"
    assert monitor.unhealthy_hosts() == ["127.0.0.1:2222"]


async def test_body_substring(health_servers: StartServers,
                              session: aiohttp.ClientSession, metrics: Metrics) -> None:
    """body_contains fails when the text is missing, quoting the text looked for."""
    server, monitor = await one_host(health_servers, session, metrics,
                                     http_check(body_contains="ok"))
    server.ok("degraded")
    await monitor.probe_now()
    assert last(monitor, server) == ("failure", "body does not contain 'ok'")


async def test_body_regex(health_servers: StartServers,
                          session: aiohttp.ClientSession, metrics: Metrics) -> None:
    """body_regex searches the body; a miss names the pattern."""
    server, monitor = await one_host(health_servers, session, metrics,
                                     http_check(body_regex=r'"state":\s*"(up|ok)"'))
    server.ok('{"state":   "up"}')
    await monitor.probe_now()
    assert last(monitor, server)[0] == "success"
    server.ok('{"state": "down"}')
    await monitor.probe_now()
    assert last(monitor, server) == ("failure", 'body does not match /"state":\\s*"(up|ok)"/')


async def test_json_path(health_servers: StartServers,
                         session: aiohttp.ClientSession, metrics: Metrics) -> None:
    """json_path walks nested objects and compares with json_equals; misses say what was found."""
    server, monitor = await one_host(
        health_servers, session, metrics,
        http_check(json_path="checks.db.status", json_equals="up"))
    server.json({"checks": {"db": {"status": "up"}}})
    await monitor.probe_now()
    assert last(monitor, server)[0] == "success"
    server.json({"checks": {"db": {"status": "down"}}})
    await monitor.probe_now()
    assert last(monitor, server) == ("failure",
                                     'JSON checks.db.status is "down" (expected "up")')
    server.json({"checks": {}})
    await monitor.probe_now()
    assert last(monitor, server) == ("failure", "JSON has no checks.db.status")
    server.ok("<html>ok</html>")
    await monitor.probe_now()
    assert last(monitor, server) == ("failure", "body is not JSON")


async def test_json_equals_is_type_strict(health_servers: StartServers,
                                          session: aiohttp.ClientSession,
                                          metrics: Metrics) -> None:
    """json_equals = true does not accept 1, while 1 accepts 1.0; list indexes work."""
    server, monitor = await one_host(
        health_servers, session, metrics, http_check(json_path="ok", json_equals=True))
    server.json({"ok": 1})
    await monitor.probe_now()
    assert last(monitor, server) == ("failure", "JSON ok is 1 (expected true)")
    server2, monitor2 = await one_host(
        health_servers, session, metrics,
        http_check(json_path="replicas.1.ready", json_equals=1))
    server2.json({"replicas": [{"ready": 0}, {"ready": 1.0}]})
    await monitor2.probe_now()
    assert last(monitor2, server2)[0] == "success"


async def test_status_range_and_no_redirects(health_servers: StartServers,
                                             session: aiohttp.ClientSession,
                                             metrics: Metrics) -> None:
    """A status range accepts any code in it; a redirect is judged, not followed."""
    server, monitor = await one_host(health_servers, session, metrics,
                                     http_check(expect_status=frozenset(range(200, 300))))
    server.respond(204)
    await monitor.probe_now()
    assert last(monitor, server) == ("success", "status 204")
    server.respond(301)
    await monitor.probe_now()
    assert last(monitor, server) == ("failure", "status 301 (expected 200-299)")


async def test_headers_sent_and_never_in_reasons(health_servers: StartServers,
                                                 session: aiohttp.ClientSession,
                                                 metrics: Metrics) -> None:
    """Extra headers reach the server; no reason or snapshot ever shows their values."""
    secret = "Bearer s3cr3t-t0ken"
    server, monitor = await one_host(
        health_servers, session, metrics,
        http_check(method="POST", headers={"Authorization": secret, "X-Probe": "deployd"}))
    server.respond(401, f"bad token {secret}")
    await monitor.probe_now()
    assert server.requests[-1].method == "POST"
    assert server.requests[-1].headers["Authorization"] == secret
    assert server.requests[-1].headers["X-Probe"] == "deployd"
    assert last(monitor, server) == ("failure", "status 401 (expected 200)")
    assert "s3cr3t" not in json.dumps(monitor.snapshot().to_json())


async def test_tls_verification(tmp_path: Path, session: aiohttp.ClientSession,
                                metrics: Metrics) -> None:
    """TLS is verified by default; tls_verify=false or the right ca_file make it pass."""
    context, cert = self_signed_tls(tmp_path)
    server = HealthServer(ssl_context=context)
    await server.start()
    try:
        url = "https://{address}:{health_port}/healthz"
        checks = (http_check(name="strict", url=url),
                  http_check(name="insecure", url=url, tls_verify=False),
                  http_check(name="pinned", url=url, ca_file=cert),
                  http_check(name="missing", url=url, ca_file=tmp_path / "nope.pem"))
        monitor = HealthMonitor(make_app([server], *checks), session, metrics)
        await monitor.probe_now()
        outcome, reason = last(monitor, server, "strict")
        assert outcome == "failure"
        assert reason.startswith("TLS certificate not accepted: ")
        assert last(monitor, server, "insecure") == ("success", "status 200")
        assert last(monitor, server, "pinned") == ("success", "status 200")
        outcome, reason = last(monitor, server, "missing")
        assert outcome == "failure"
        assert reason.startswith(f"cannot load ca_file {tmp_path / 'nope.pem'}")
    finally:
        await server.stop()


async def test_large_body_is_capped(health_servers: StartServers,
                                    session: aiohttp.ClientSession, metrics: Metrics) -> None:
    """Only the first 64 KiB of a body are read: text beyond it is not seen."""
    server, monitor = await one_host(health_servers, session, metrics,
                                     http_check(body_contains="needle"))
    server.ok("x" * (256 * 1024) + "needle")
    await monitor.probe_now()
    assert last(monitor, server) == ("failure", "body does not contain 'needle'")
    server.ok("needle" + "x" * (256 * 1024))
    await monitor.probe_now()
    assert last(monitor, server)[0] == "success"


# -- thresholds and verdicts --------------------------------------------------------------


async def test_initial_state_is_unknown(health_servers: StartServers,
                                        session: aiohttp.ClientSession,
                                        metrics: Metrics) -> None:
    """Before enough probes a host is unknown: neither healthy nor unhealthy, no gauge yet."""
    server, monitor = await one_host(health_servers, session, metrics,
                                     http_check(failures=3, successes=2))
    host = monitor.snapshot().hosts[name_of(server)]
    assert (host.healthy, host.checks["http"].state, host.checks["http"].last_outcome) == (
        None, "unknown", None)
    server.fail()
    await monitor.probe_now()
    await monitor.probe_now()
    assert monitor.snapshot().hosts[name_of(server)].healthy is None
    assert monitor.unhealthy_hosts() == []
    assert sample(metrics, "deployd_host_healthy", app="shop", host=name_of(server)) is None
    await monitor.probe_now()
    assert monitor.unhealthy_hosts() == [name_of(server)]


async def test_failures_threshold(health_servers: StartServers,
                                  session: aiohttp.ClientSession, metrics: Metrics) -> None:
    """With failures=3, two failures then a success keep the host healthy; three flip it."""
    server, monitor = await one_host(health_servers, session, metrics,
                                     http_check(failures=3))
    await monitor.probe_now()
    server.fail()
    await monitor.probe_now()
    await monitor.probe_now()
    server.ok()
    await monitor.probe_now()
    status = monitor.snapshot().hosts[name_of(server)].checks["http"]
    assert (status.state, status.consecutive_successes, status.consecutive_failures) == (
        "healthy", 1, 0)
    server.fail()
    for expected in (1, 2):
        await monitor.probe_now()
        assert monitor.unhealthy_hosts() == []
        status = monitor.snapshot().hosts[name_of(server)].checks["http"]
        assert status.consecutive_failures == expected
    await monitor.probe_now()
    assert monitor.unhealthy_hosts() == [name_of(server)]


async def test_successes_threshold(health_servers: StartServers,
                                   session: aiohttp.ClientSession, metrics: Metrics) -> None:
    """With successes=2, one success does not make an unhealthy host healthy; two do."""
    server, monitor = await one_host(health_servers, session, metrics,
                                     http_check(failures=1, successes=2))
    server.fail()
    await monitor.probe_now()
    server.ok()
    await monitor.probe_now()
    assert monitor.unhealthy_hosts() == [name_of(server)]
    await monitor.probe_now()
    assert monitor.unhealthy_hosts() == []
    assert monitor.snapshot().hosts[name_of(server)].healthy is True


async def test_flapping_stays_healthy(health_servers: StartServers,
                                      session: aiohttp.ClientSession, metrics: Metrics) -> None:
    """A host failing twice in every three probes never reaches failures=3."""
    changes = Changes()
    server, monitor = await one_host(health_servers, session, metrics,
                                     http_check(failures=3), changes)
    for _ in range(4):
        server.ok()
        await monitor.probe_now()
        server.fail()
        await monitor.probe_now()
        await monitor.probe_now()
        assert monitor.unhealthy_hosts() == []
    assert await changes.settle() == [(name_of(server), True)]


async def test_on_change_on_transitions_only(health_servers: StartServers,
                                             session: aiohttp.ClientSession,
                                             metrics: Metrics) -> None:
    """on_change fires once per verdict change, with the failing check's reason."""
    changes = Changes()
    server, monitor = await one_host(health_servers, session, metrics,
                                     http_check(failures=2), changes)
    host = name_of(server)
    for mode in ("ok", "ok", "fail", "fail", "fail", "ok", "ok"):
        server.ok() if mode == "ok" else server.fail()
        await monitor.probe_now()
    assert await changes.settle() == [(host, True), (host, False), (host, True)]
    assert changes.seen[1].reasons == ["http: status 500 (expected 200)"]
    assert changes.seen[1].host == host and changes.seen[1].check is None
    assert changes.seen[2].reasons == []


async def test_host_needs_every_check(health_servers: StartServers,
                                      session: aiohttp.ClientSession, metrics: Metrics) -> None:
    """A host is healthy only when all its checks are; reasons name the failing check."""
    changes = Changes()
    [server] = await health_servers(1)
    app = make_app([server], http_check(name="live"),
                   http_check(name="ready", json_path="ready", json_equals=True))
    monitor = HealthMonitor(app, session, metrics, on_change=changes)
    server.json({"ready": False})
    await monitor.probe_now()
    assert monitor.unhealthy_hosts() == [name_of(server)]
    await changes.settle()
    assert changes.seen[0].reasons == ['ready: JSON ready is false (expected true)']
    server.json({"ready": True})
    await monitor.probe_now()
    assert monitor.snapshot().hosts[name_of(server)].healthy is True


async def test_reset_forgets_counts_keeps_reasons(health_servers: StartServers,
                                                  session: aiohttp.ClientSession,
                                                  metrics: Metrics) -> None:
    """reset() makes checks unknown with zero counts, keeps reasons, re-announces only news."""
    changes = Changes()
    server, monitor = await one_host(health_servers, session, metrics,
                                     http_check(failures=2), changes)
    host = name_of(server)
    server.fail()
    await monitor.probe_now()
    await monitor.probe_now()
    monitor.reset()
    status = monitor.snapshot().hosts[host]
    assert status.healthy is None
    assert (status.checks["http"].state, status.checks["http"].consecutive_failures) == (
        "unknown", 0)
    assert status.checks["http"].last_reason == "status 500 (expected 200)"
    assert monitor.unhealthy_hosts() == []
    await monitor.probe_now()
    await monitor.probe_now()
    assert monitor.unhealthy_hosts() == [host]
    server.ok()
    await monitor.probe_now()
    assert await changes.settle() == [(host, False), (host, True)]


async def test_probe_in_flight_during_reset_is_dropped(health_servers: StartServers,
                                                       session: aiohttp.ClientSession,
                                                       metrics: Metrics) -> None:
    """A probe started before reset() does not count toward the new verdict."""
    server, monitor = await one_host(health_servers, session, metrics,
                                     http_check(timeout=0.3))
    server.slow(1.0)
    probing = asyncio.create_task(monitor.probe_now())
    await asyncio.sleep(0.1)
    monitor.reset()
    await probing
    status = monitor.snapshot().hosts[name_of(server)].checks["http"]
    assert (status.state, status.last_outcome) == ("unknown", None)
    assert sample(metrics, "deployd_health_checks_total", app="shop", host=name_of(server),
                  result="failure") == 1


async def test_app_without_checks_is_healthy(health_servers: StartServers,
                                             session: aiohttp.ClientSession,
                                             metrics: Metrics) -> None:
    """Hosts of an app without HTTP checks are healthy from the start, and stay so."""
    [server] = await health_servers(1)
    monitor = HealthMonitor(make_app([server]), session, metrics)
    assert monitor.snapshot().hosts[name_of(server)].healthy is True
    assert sample(metrics, "deployd_host_healthy", app="shop", host=name_of(server)) == 1
    running = asyncio.create_task(monitor.run())
    await asyncio.sleep(0.1)
    monitor.reset()
    await monitor.probe_now()
    assert not running.done()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert monitor.snapshot().hosts[name_of(server)].healthy is True


# -- samples for comparing groups of hosts ------------------------------------------------


class Clock:
    """A monitor clock the test moves by hand."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_samples_record_slow_latencies_and_failures(health_servers: StartServers,
                                                          session: aiohttp.ClientSession,
                                                          metrics: Metrics) -> None:
    """A slow host's answers are kept with their times, a failing host's probes as failures;
    compared with healthy hosts, the judge fails both."""
    slow, failing, fast1, fast2 = await health_servers(4)
    slow.slow(0.06)
    failing.fail(500)
    monitor = HealthMonitor(make_app([slow, failing, fast1, fast2], http_check(timeout=2.0)),
                            session, metrics)
    for _ in range(10):
        await monitor.probe_now()
    slow_samples = monitor.samples([name_of(slow)], since=0)
    assert (slow_samples.ok, slow_samples.failed, len(slow_samples.latencies)) == (10, 0, 10)
    assert min(slow_samples.latencies) >= 0.06
    failing_samples = monitor.samples([name_of(failing)], since=0)
    assert (failing_samples.ok, failing_samples.failed, failing_samples.latencies) == (0, 10, ())
    baseline = monitor.samples([name_of(fast1), name_of(fast2)], since=0)
    assert (baseline.ok, baseline.failed, len(baseline.latencies)) == (20, 0, 20)
    assert sorted(baseline.latencies)[10] < sorted(slow_samples.latencies)[5]

    slow_latency = compare("http", slow_samples, baseline)[1]
    assert (slow_latency.metric, slow_latency.verdict) == ("latency", Verdict.FAIL)
    failing_ratio = compare("http", failing_samples, baseline)[0]
    assert (failing_ratio.metric, failing_ratio.verdict) == ("failure_ratio", Verdict.FAIL)


async def test_samples_since_check_and_reset(health_servers: StartServers,
                                             session: aiohttp.ClientSession,
                                             metrics: Metrics) -> None:
    """samples() counts probes started at or after `since` (the monitor's clock), of every
    check or the one named; reset() keeps them; an unknown host is an error."""
    [server] = await health_servers(1)
    clock = Clock(100.0)
    monitor = HealthMonitor(make_app([server], http_check(), http_check(name="ready")),
                            session, metrics, clock=clock)
    host = name_of(server)
    await monitor.probe_now()
    clock.now = 200.0
    server.fail(503)
    await monitor.probe_now()
    monitor.reset()
    assert monitor.samples([host], since=0).probes == 4
    recent = monitor.samples([host], since=200.0)
    assert (recent.ok, recent.failed) == (0, 2)
    early = monitor.samples([host], since=100.0, check="ready")
    assert (early.ok, early.failed, len(early.latencies)) == (1, 1, 1)
    assert monitor.samples([host], since=200.5).probes == 0
    assert monitor.samples([], since=0).probes == 0
    with pytest.raises(ValueError, match="shop has no host 'web9'"):
        monitor.samples(["web9"], since=0)


async def test_samples_keep_the_last_probes_only(health_servers: StartServers,
                                                 session: aiohttp.ClientSession,
                                                 metrics: Metrics,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Each (check, host) keeps a bounded ring of its latest probes: the oldest go first."""
    monkeypatch.setattr(health, "SAMPLES_KEPT", 4)
    [server] = await health_servers(1)
    clock = Clock(0.0)
    monitor = HealthMonitor(make_app([server], http_check()), session, metrics, clock=clock)
    for second in range(7):
        clock.now = float(second)
        await monitor.probe_now()
    assert monitor.samples([name_of(server)], since=0).probes == 4
    assert monitor.samples([name_of(server)], since=3.0).probes == 4


# -- scheduling ---------------------------------------------------------------------------


async def test_slow_host_does_not_delay_fast_host(health_servers: StartServers,
                                                  session: aiohttp.ClientSession,
                                                  metrics: Metrics) -> None:
    """While one host times out, another is still probed on its own 0.2 s interval."""
    slow, fast = await health_servers(2)
    slow.slow(5.0)
    monitor = HealthMonitor(make_app([slow, fast], http_check(timeout=1.5, interval=0.2)),
                            session, metrics)
    running = asyncio.create_task(monitor.run())
    await asyncio.sleep(2.5)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    times = [request.at for request in fast.requests]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert len(times) >= 8
    assert max(gaps) < 0.5, gaps
    assert len(slow.requests) <= 2
    assert monitor.snapshot().hosts[name_of(fast)].healthy is True


async def test_slow_on_change_does_not_block_probes(health_servers: StartServers,
                                                    session: aiohttp.ClientSession,
                                                    metrics: Metrics) -> None:
    """on_change runs apart: a handler that takes a second does not hold up probe_now."""
    calls: list[HealthChange] = []

    async def slow_handler(change: HealthChange) -> None:
        calls.append(change)
        await asyncio.sleep(1.0)

    [server] = await health_servers(1)
    monitor = HealthMonitor(make_app([server], http_check()), session, metrics,
                            on_change=slow_handler)
    started = time.monotonic()
    await monitor.probe_now()
    server.fail()
    await monitor.probe_now()
    assert time.monotonic() - started < 0.9  # the handler's 1 s sleep was not waited on
    await asyncio.sleep(1.2)
    assert [change.healthy for change in calls] == [True, False]


async def test_run_twice_is_an_error(health_servers: StartServers,
                                     session: aiohttp.ClientSession, metrics: Metrics) -> None:
    """One monitor runs one set of loops."""
    [server] = await health_servers(1)
    monitor = HealthMonitor(make_app([server], http_check()), session, metrics)
    running = asyncio.create_task(monitor.run())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already running"):
        await monitor.run()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


# -- metrics ------------------------------------------------------------------------------


async def test_metrics_counted(health_servers: StartServers,
                               session: aiohttp.ClientSession, metrics: Metrics) -> None:
    """Every probe counts its result per host and its duration; host_healthy follows."""
    good, bad = await health_servers(2)
    bad.fail()
    monitor = HealthMonitor(make_app([good, bad], http_check()), session, metrics)
    for _ in range(3):
        await monitor.probe_now()
    assert sample(metrics, "deployd_health_checks_total", app="shop", host=name_of(good),
                  result="success") == 3
    assert sample(metrics, "deployd_health_checks_total", app="shop", host=name_of(good),
                  result="failure") == 0
    assert sample(metrics, "deployd_health_checks_total", app="shop", host=name_of(bad),
                  result="failure") == 3
    assert sample(metrics, "deployd_health_check_duration_seconds_count", app="shop") == 6
    assert sample(metrics, "deployd_host_healthy", app="shop", host=name_of(good)) == 1
    assert sample(metrics, "deployd_host_healthy", app="shop", host=name_of(bad)) == 0


# -- Prometheus checks against a real Prometheus ------------------------------------------


async def metric_monitor(session: aiohttp.ClientSession, metrics: Metrics,
                         check: PrometheusCheck, changes: Changes | None = None
                         ) -> HealthMonitor:
    """A monitor of one local host with only this metric check."""
    host = HostConfig(address="local", deploy_to="/srv/shop")
    return HealthMonitor(make_app([], check, hosts=(host,)), session, metrics,
                         on_change=changes)


def metric_state(monitor: HealthMonitor) -> tuple[str, str | None, str]:
    """(state, last outcome, last reason) of the check named errors."""
    status = monitor.snapshot().metrics["errors"]
    return status.state, status.last_outcome, status.last_reason


async def test_prometheus_under_and_over_max(prometheus: PrometheusServer,
                                             session: aiohttp.ClientSession,
                                             metrics: Metrics) -> None:
    """A value under max is a success; over max a failure naming value and bound."""
    changes = Changes()
    monitor = await metric_monitor(
        session, metrics, prom_check(prometheus.url, "deployd_test_error_ratio"), changes)
    await prometheus.set_error_ratio(0.01)
    await monitor.probe_now()
    assert metric_state(monitor) == ("healthy", "success", "value 0.01")
    assert monitor.snapshot().metrics["errors"].value == 0.01
    await prometheus.set_error_ratio(0.2)
    await monitor.probe_now()
    assert metric_state(monitor) == ("unhealthy", "failure", "value 0.2 above max 0.05")
    assert monitor.metric_failing() == ["errors"]
    assert monitor.unhealthy_hosts() == []
    assert await changes.settle() == [("errors", True), ("errors", False)]
    assert changes.seen[1].reasons == ["value 0.2 above max 0.05"]
    assert sample(metrics, "deployd_health_checks_total", app="shop", host="",
                  result="failure") == 1


def test_hosts_regex_escapes_for_a_promql_string() -> None:
    """{hosts}: each address once, in order, regex-escaped, backslashes doubled for PromQL."""
    assert hosts_regex(["web1.example.com", "db+1", "web1.example.com"]) == (
        "web1\\\\.example\\\\.com|db\\\\+1")
    assert hosts_regex([]) == ""


async def test_prometheus_query_per_group_of_hosts(prometheus: PrometheusServer,
                                                   session: aiohttp.ClientSession,
                                                   metrics: Metrics) -> None:
    """query_group runs the query with {hosts} standing for the group's addresses (a dot
    matches only a dot); the app-wide probe's {hosts} is every host."""
    gauge = Gauge("deployd_test_host_errors", "Test gauge per host.", ["host"],
                  registry=prometheus.registry)
    try:
        for host, value in [("web1.example.com", 1), ("web2.example.com", 10),
                            ("web3.example.com", 100), ("web1xexample.com", 1000)]:
            gauge.labels(host=host).set(value)
        await asyncio.to_thread(prometheus.wait_until, "count(deployd_test_host_errors)",
                                lambda result: bool(result) and result[0]["value"][1] == "4")
        hosts = tuple(HostConfig(address=f"web{n}.example.com", deploy_to="/srv/shop")
                      for n in (1, 2, 3))
        check = prom_check(prometheus.url, 'sum(deployd_test_host_errors{host=~"{hosts}"})',
                           max=50)
        monitor = HealthMonitor(make_app([], check, hosts=hosts), session, metrics)
        canary = await monitor.query_group("errors", ["web1.example.com"])
        assert canary == GroupValue(ProbeOutcome.SUCCESS, 1.0, "value 1")
        baseline = await monitor.query_group("errors", ["web2.example.com", "web3.example.com"])
        assert baseline == GroupValue(ProbeOutcome.FAILURE, 110.0, "value 110 above max 50")
        empty = await monitor.query_group("errors", [])
        assert empty == GroupValue(ProbeOutcome.NO_DATA, None, "query returned no series")
        assert monitor.snapshot().metrics["errors"].last_outcome is None  # untouched
        await monitor.probe_now()
        assert monitor.snapshot().metrics["errors"].value == 111.0
        with pytest.raises(ValueError, match="shop has no host 'web9'"):
            await monitor.query_group("errors", ["web9"])
        with pytest.raises(ValueError, match="shop has no prometheus check 'latency'"):
            await monitor.query_group("latency", ["web1.example.com"])
    finally:
        prometheus.registry.unregister(gauge)


async def test_prometheus_min_and_scalar(prometheus: PrometheusServer,
                                         session: aiohttp.ClientSession,
                                         metrics: Metrics) -> None:
    """A scalar result is read too, and min is a lower bound."""
    await prometheus.set_error_ratio(0.5)
    monitor = await metric_monitor(session, metrics, prom_check(
        prometheus.url, "scalar(deployd_test_error_ratio)", max=None, min=0.9))
    await monitor.probe_now()
    assert metric_state(monitor) == ("unhealthy", "failure", "value 0.5 below min 0.9")


@pytest.mark.parametrize(("query", "reason"), [
    ("deployd_test_metric_that_does_not_exist", "query returned no series"),
    ("deployd_test_requests", "query returned 2 series (expected one)"),
    ("0/0", "query returned NaN"),
    ("deployd_test_requests[1m]", "query returned a matrix (expected one number)"),
])
async def test_prometheus_no_data(prometheus: PrometheusServer, session: aiohttp.ClientSession,
                                  metrics: Metrics, query: str, reason: str) -> None:
    """Results that are not one number are no_data, counted apart, never a failure."""
    monitor = await metric_monitor(session, metrics, prom_check(prometheus.url, query))
    await monitor.probe_now()
    await monitor.probe_now()
    assert metric_state(monitor) == ("unknown", "no_data", reason)
    assert monitor.no_data_checks() == ["errors"]
    assert monitor.metric_failing() == []
    status = monitor.snapshot().metrics["errors"]
    assert status.consecutive_no_data == 2 and status.consecutive_failures == 0
    assert sample(metrics, "deployd_health_checks_total", app="shop", host="",
                  result="no_data") == 2
    assert sample(metrics, "deployd_health_checks_total", app="shop", host="",
                  result="failure") == 0


async def test_prometheus_bad_promql_is_no_data(prometheus: PrometheusServer,
                                                session: aiohttp.ClientSession,
                                                metrics: Metrics) -> None:
    """A query Prometheus rejects is no_data with Prometheus's error kind."""
    monitor = await metric_monitor(session, metrics, prom_check(prometheus.url, "sum("))
    await monitor.probe_now()
    state, outcome, reason = metric_state(monitor)
    assert (state, outcome) == ("unknown", "no_data")
    assert reason.startswith("query error: bad_data: ")


async def test_prometheus_down_is_no_data(session: aiohttp.ClientSession,
                                          metrics: Metrics) -> None:
    """A Prometheus that refuses connections gives no_data, not a failure."""
    url = f"http://127.0.0.1:{free_port()}"
    monitor = await metric_monitor(session, metrics, prom_check(url, "up"))
    await monitor.probe_now()
    assert metric_state(monitor) == ("unknown", "no_data",
                                     "prometheus unreachable: connection refused")


async def test_prometheus_timeout_is_no_data(health_servers: StartServers,
                                             session: aiohttp.ClientSession,
                                             metrics: Metrics) -> None:
    """A server that does not answer within the check's timeout gives no_data."""
    [server] = await health_servers(1)
    server.slow(3.0)
    monitor = await metric_monitor(session, metrics, prom_check(
        f"http://127.0.0.1:{server.port}", "up", timeout=0.3))
    await monitor.probe_now()
    assert metric_state(monitor) == ("unknown", "no_data", "prometheus: timeout after 0.3s")


async def test_no_data_neither_fails_nor_clears(prometheus: PrometheusServer,
                                                session: aiohttp.ClientSession,
                                                metrics: Metrics) -> None:
    """no_data between two failures neither breaks the run (failures=2) nor clears a verdict."""
    changes = Changes()
    monitor = await metric_monitor(session, metrics, prom_check(
        prometheus.url, "deployd_test_error_ratio", failures=2), changes)
    await prometheus.set_error_ratio(0.3)
    await monitor.probe_now()
    await prometheus.set_error_ratio(math.nan)
    await monitor.probe_now()
    assert metric_state(monitor) == ("unknown", "no_data", "query returned NaN")
    await prometheus.set_error_ratio(0.3)
    await monitor.probe_now()
    assert monitor.metric_failing() == ["errors"]
    await prometheus.set_error_ratio(math.nan)
    await monitor.probe_now()
    assert monitor.metric_failing() == ["errors"]
    assert monitor.no_data_checks() == ["errors"]
    status = monitor.snapshot().metrics["errors"]
    assert status.no_data_since is not None and status.value == 0.3
    assert await changes.settle() == [("errors", False)]
