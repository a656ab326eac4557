"""Benchmark: from a deploy's failure threshold being reached to every host rolled back.

    python3 tests/bench/bench_detection.py [--hosts 1 10 50] [--runs 3] [--profile DIR]

For each N: N real sshd hosts (one `sshd` each, as tests/support/sshd.py starts them), one
real aiohttp health server per host, an origin repository and the real daemon as a subprocess
(`deployd run`). Each run deploys a good release and lets it bake, then a bad one; once its
grace period is over every health server answers 500. Measured with this process's monotonic
clock:

- threshold: the moment the failure threshold was reached, i.e. the arrival of the probe that
  completes the `failures`-th consecutive failure on the host that tips `unhealthy_hosts`
  (read from the health servers' request logs);
- done: the moment every host's `current` points back at the good release (readlink polled);
- detection-to-rollback = done - threshold (the target: within 1 s at 50 hosts);
- end to end = done - the moment the servers switched to 500 (adds the probe interval times
  `failures`).

The daemon's own events split the detection-to-rollback time into: the health.changed event
written, bake.failed, rollback.started and rollback.succeeded. `--profile DIR` records the
daemon with py-spy (if installed) from each bad deploy's switch to its rollback, as folded
stacks (one file per run).
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The imports after sys.path is set up stand below it.
# ruff: noqa: E402
REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "daemon")]

from tests.support.daemonfixtures import AppSpec, DaemonSpec
from tests.support.gitrepo import OriginRepo
from tests.support.healthservers import HealthServer
from tests.support.judging import DaemonProcess, current_release
from tests.support.sshd import ClientKey, SshdHost, remove_hosts, start_hosts, write_known_hosts
from tests.support.waiting import eventually, matching, timeline

APP = "bench"
INTERVAL = 0.2  # seconds between probes of one host
FAILURES = 2  # consecutive failures that make a host unhealthy
GRACE = 0.3
BAKE = 3.0


@dataclass
class Run:
    hosts: int
    detection: float  # threshold reached -> every host switched back
    end_to_end: float  # servers switched to 500 -> every host switched back
    steps: dict[str, float]  # threshold -> each daemon event


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _wall_to_monotonic(iso: str) -> float:
    """An event's ISO time (UTC, ms) on this process's monotonic clock."""
    seconds, _, millis = iso.rstrip("Z").partition(".")
    wall = calendar.timegm(time.strptime(seconds, "%Y-%m-%dT%H:%M:%S")) + int(millis) / 1000
    return wall - (time.time() - time.monotonic())


class Bench:
    """N sshd hosts with health servers and one daemon watching them."""

    def __init__(self, count: int, workdir: Path, threshold: str, profile: Path | None) -> None:
        self.count = count
        self.workdir = workdir
        self.threshold = threshold
        self.profile = profile
        self.hosts: list[SshdHost] = []
        self.servers: list[HealthServer] = []
        self.daemon: DaemonProcess | None = None
        self.origin: OriginRepo | None = None
        self.serial = 0
        self._events: list[dict[str, Any]] = []

    @property
    def deploy_dirs(self) -> list[Path]:
        return [host.home / "app" for host in self.hosts]

    async def start(self) -> None:
        key = ClientKey.create(self.workdir)
        self.hosts = start_hosts(self.count, key, "deployd-bench-sshd-")
        for _ in range(self.count):
            server = HealthServer()
            await server.start()
            self.servers.append(server)
        self.origin = OriginRepo(self.workdir / "origin.git")
        threshold = self.threshold
        app = AppSpec(
            name=APP, repo=self.origin.url, sshd_hosts=self.hosts,
            settings={"parallel": max(50, self.count)},
            checks=[{"name": "http", "url": "http://127.0.0.1:{health_port}/healthz",
                     "timeout": "1s", "interval": f"{int(INTERVAL * 1000)}ms",
                     "failures": FAILURES, "successes": 1}],
            rollback={"grace": f"{int(GRACE * 1000)}ms", "bake": f"{int(BAKE * 1000)}ms",
                      "unhealthy_hosts": threshold},
            host_vars=[{"health_port": server.port} for server in self.servers],
        )
        spec = DaemonSpec(state_dir=self.workdir / "state", client_key=key.private,
                          known_hosts=write_known_hosts(self.workdir / "known_hosts",
                                                        self.hosts),
                          apps=[app])
        config = spec.write(self.workdir / "deployd.toml")
        self.daemon = DaemonProcess(config, self.workdir / "deployd.log")
        await self.daemon.start()

    async def stop(self) -> None:
        if self.daemon is not None:
            await self.daemon.close()
        for server in self.servers:
            await server.stop()
        remove_hosts(self.hosts)

    async def events(self) -> list[dict[str, Any]]:
        """Every event so far (read page by page: each host's health changes add up)."""
        assert self.daemon is not None
        while True:
            since = self._events[-1]["id"] if self._events else 0
            body = await self.daemon.api.get(f"/api/v1/apps/{APP}/events?since={since}")
            self._events.extend(body["events"])
            if not body["events"]:
                return self._events

    async def wait_event(self, kind: str, revision: str | None = None, count: int = 1,
                         within: float = 120.0) -> dict[str, Any]:
        async def found() -> list[dict[str, Any]]:
            events = matching(await self.events(), kind, revision)
            return events if len(events) >= count else []

        async def tail() -> str:
            return "last events: " + timeline((await self.events())[-8:])

        events = await eventually(found, within=within, what=f"{count} {kind} event(s)",
                                  explain=tail)
        return events[count - 1]

    def commit(self, label: str) -> str:
        assert self.origin is not None
        self.serial += 1
        return self.origin.commit({"app.txt": f"{label} {self.serial}\n"}, label)

    def _threshold_count(self) -> int:
        if self.threshold.endswith("%"):
            share = float(self.threshold[:-1])
            return next(k for k in range(1, self.count + 1) if k * 100 >= share * self.count)
        return int(self.threshold)

    async def run_once(self, spy_out: Path | None = None) -> Run:
        for server in self.servers:
            server.ok()
        good = self.commit("good")
        await self.wait_event("bake.healthy", good)
        good_release = current_release(self.deploy_dirs[0])
        bad = self.commit("bad")
        await self.wait_event("deploy.succeeded", bad)
        spy = None
        if spy_out is not None and self.daemon is not None and self.daemon.process is not None:
            spy = _py_spy(self.daemon.process.pid, spy_out)
            await asyncio.sleep(0.5)  # let py-spy attach
        await asyncio.sleep(GRACE + 0.05)
        marks = [len(server.requests) for server in self.servers]
        switched = time.monotonic()
        for server in self.servers:
            server.fail(500)
        pending = set(self.deploy_dirs)
        while pending:
            pending = {d for d in pending if current_release(d) != good_release}
            if pending:
                await asyncio.sleep(0.002)
        done = time.monotonic()
        for server in self.servers:
            server.ok()
        if spy is not None:
            await asyncio.sleep(0.3)
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            spy.wait()
        # The probe completing the FAILURES-th failure on each host; the k-th earliest of
        # those (k = the threshold's host count) is when the threshold was reached.
        completing = sorted(server.requests[mark + FAILURES - 1].at
                            for server, mark in zip(self.servers, marks, strict=True)
                            if len(server.requests) >= mark + FAILURES)
        threshold = completing[self._threshold_count() - 1]
        succeeded = await self.wait_event("rollback.succeeded",
                                          count=self.serial // 2)
        await self.wait_event("bake.healthy", good, count=2)
        events = [e for e in await self.events() if e["id"] <= succeeded["id"]]
        steps: dict[str, float] = {}
        bad_ids = {e["id"] for e in events if e["revision"] == bad}
        since = min(bad_ids)
        tipping = self._threshold_count()
        for kind in ("health.changed", "bake.failed", "rollback.started", "rollback.succeeded"):
            found = [e for e in events if e["kind"] == kind and e["id"] > since
                     and (kind != "health.changed" or e["data"].get("healthy") is False)]
            # The health.changed that tips the threshold is the k-th host turning unhealthy.
            nth = tipping if kind == "health.changed" else 1
            if len(found) >= nth:
                steps[kind] = _wall_to_monotonic(found[nth - 1]["at"]) - threshold
        steps["all current switched"] = done - threshold
        return Run(self.count, done - threshold, done - switched, steps)


def _py_spy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    binary = shutil.which("py-spy")
    if binary is None:
        print("  (py-spy not installed: no profile)")
        return None
    return subprocess.Popen([binary, "record", "--pid", str(pid), "--rate", "500",
                             "--format", "raw", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def bench(count: int, runs: int, threshold: str, profile: Path | None) -> list[Run]:
    with tempfile.TemporaryDirectory(prefix="deployd-bench-") as tmp:
        setup = Bench(count, Path(tmp), threshold, profile)
        try:
            started = time.monotonic()
            await setup.start()
            print(f"N={count}: {count} sshd hosts and health servers up, daemon ready "
                  f"in {time.monotonic() - started:.1f}s")
            results = []
            for index in range(runs):
                out = profile / f"daemon-{count}-run{index + 1}.folded" if profile else None
                run = await setup.run_once(out)
                results.append(run)
                steps = ", ".join(f"{k} {round(v * 1000):+d} ms" for k, v in run.steps.items())
                print(f"  run {index + 1}: detection->rollback {run.detection * 1000:.0f} ms, "
                      f"end to end {run.end_to_end * 1000:.0f} ms  ({steps})")
            return results
        except BaseException:
            kept = Path(tempfile.gettempdir()) / f"deployd-bench-{count}.log"
            shutil.copy(setup.workdir / "deployd.log", kept)
            print(f"  failed; the daemon's log is in {kept}", file=sys.stderr)
            raise
        finally:
            await setup.stop()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threshold", default="1", help="unhealthy_hosts (a count or N%%)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="record the daemon with py-spy into this directory")
    args = parser.parse_args()
    _raise_fd_limit()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        print("needs root (sshd hosts log in as the test user)", file=sys.stderr)
        return 2
    print(f"probe interval {INTERVAL * 1000:.0f} ms, failures {FAILURES}, "
          f"unhealthy_hosts {args.threshold}, grace {GRACE}s, bake {BAKE}s")
    summary = []
    for count in args.hosts:
        results = await bench(count, args.runs, args.threshold, args.profile)
        summary.append((count, statistics.median(r.detection for r in results),
                        statistics.median(r.end_to_end for r in results)))
    print("\nmedian of", args.runs, "runs:")
    print(f"{'hosts':>6}  {'threshold->rolled back':>24}  {'500 -> rolled back':>20}")
    for count, detection, end_to_end in summary:
        flag = "" if count < 50 or detection <= 1.0 else "  (target: 1 s)"
        print(f"{count:>6}  {detection * 1000:>21.0f} ms  {end_to_end * 1000:>17.0f} ms{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
