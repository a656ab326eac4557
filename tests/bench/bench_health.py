"""Benchmark: the CPU deployd's health monitor spends probing many endpoints every second.

    PYTHONPATH=daemon python3 tests/bench/bench_health.py [--endpoints 1000] [--seconds 20]

A separate process serves the endpoints (one aiohttp server listening on one loopback port per
endpoint, so each endpoint has its own keep-alive connection, as distinct hosts would), so its
CPU is not counted. This process runs one `HealthMonitor` over all of them with a 1 s interval,
a body match and the daemon's kind of shared `ClientSession`, and after a warm-up measures: the
process's CPU time over wall time (share of one core), probes per second, and p50/p99 probe
latency. `--profile` writes a cProfile of the measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import resource
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from deployd.config import AppConfig, HostConfig, HttpCheck
from deployd.health import HealthMonitor
from deployd.metrics import Metrics

TARGET_SHARE = 0.25


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(count: int) -> None:
    """The server process: `count` ports answering "ok", ports printed as one JSON line."""
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for _ in range(count):
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=16).start()
    ports = [address[1] for address in runner.addresses]
    print(json.dumps(ports), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _app(ports: list[int]) -> AppConfig:
    hosts = tuple(HostConfig(address="127.0.0.1", port=port, deploy_to="/srv/bench",
                             vars={"health_port": str(port)}) for port in ports)
    check = HttpCheck(name="http", url="http://{address}:{health_port}/healthz",
                      body_contains="ok", timeout=2.0, interval=1.0)
    return AppConfig(name="bench", repo="/nonexistent", branch="production",
                     deploy_to="/srv/bench", hosts=hosts, checks=(check,))


class _Latencies:
    """Records each probe duration the monitor observes, then passes it to the histogram."""

    def __init__(self, metrics: Metrics, app: str) -> None:
        self.values: list[float] = []
        self.recording = False
        child = metrics.health_check_duration_seconds.labels(app=app)
        self._observe = child.observe
        child.observe = self.observe  # type: ignore[method-assign]

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if self.recording:
            self.values.append(amount)
        self._observe(amount, exemplar)

    def percentile(self, share: float) -> float:
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def _probes(registry: CollectorRegistry) -> float:
    return sum(sample.value for family in registry.collect() for sample in family.samples
               if sample.name == "deployd_health_checks_total")


async def _measure(ports: list[int], seconds: float, warmup: float,
                   profile: Path | None, server_pid: int) -> dict[str, float]:
    metrics = Metrics()
    latencies = _Latencies(metrics, "bench")
    # The daemon's own session settings (deployd.app).
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=8, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector) as session:
        monitor = HealthMonitor(_app(ports), session, metrics)
        running = asyncio.create_task(monitor.run())
        await asyncio.sleep(warmup)
        latencies.recording = True
        probes0 = _probes(metrics.registry)
        cpu0, wall0, server0 = time.process_time(), time.monotonic(), _cpu_seconds(server_pid)
        times0 = os.times()
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        await asyncio.sleep(seconds)
        if profiler:
            profiler.disable()
        cpu1, wall1, server1 = time.process_time(), time.monotonic(), _cpu_seconds(server_pid)
        times1 = os.times()
        probes1 = _probes(metrics.registry)
        latencies.recording = False
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        unhealthy = len(monitor.unhealthy_hosts())
    if profiler and profile:
        profiler.dump_stats(profile)
        pstats.Stats(str(profile)).sort_stats("cumulative").print_stats(25)
    wall = wall1 - wall0
    return {
        "cpu_share": (cpu1 - cpu0) / wall,
        "user_share": (times1.user - times0.user) / wall,
        "system_share": (times1.system - times0.system) / wall,
        "probes_per_second": (probes1 - probes0) / wall,
        "p50": latencies.percentile(0.50),
        "p99": latencies.percentile(0.99),
        "server_cpu_share": (server1 - server0) / wall,
        "unhealthy": unhealthy,
    }


def main() -> None:
    """Start the servers, run the monitor, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoints", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    _raise_fd_limit()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(args.endpoints)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        ports = json.loads(server.stdout.readline())
        result = asyncio.run(_measure(ports, args.seconds, args.warmup, args.profile,
                                      server.pid))
    finally:
        server.terminate()
        server.wait()
    _report(args.endpoints, args.seconds, result)


def _report(endpoints: int, seconds: float, result: dict[str, float]) -> None:
    share = result["cpu_share"]
    print(f"endpoints: {endpoints}, interval 1s, measured {seconds:g}s after warm-up")
    print(f"probes/s: {result['probes_per_second']:.0f} (target {endpoints})")
    print(f"monitor CPU: {share:.1%} of one core "
          f"({'within' if share <= TARGET_SHARE else 'OVER'} the {TARGET_SHARE:.0%} target; "
          f"user {result['user_share']:.1%}, kernel {result['system_share']:.1%})")
    print(f"probe latency: p50 {result['p50'] * 1000:.2f} ms, "
          f"p99 {result['p99'] * 1000:.2f} ms")
    print(f"server process CPU (not counted): {result['server_cpu_share']:.1%}")
    print(f"hosts unhealthy at the end: {result['unhealthy']:.0f}")


if __name__ == "__main__":
    main()
