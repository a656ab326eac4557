"""Benchmark: from a signed webhook push to every host's `current` switched, and a flood.

    python3 tests/bench/bench_webhook.py [--hosts 1 10 50] [--runs 3] [--flood 1000]

For each N: N real sshd hosts, an origin repository and the real daemon as a subprocess
(`deployd run`) polling only every 60 s, so a deploy within a second can only come from the
webhook. Each run (1.2 s after the previous one) commits a new head, sends a GitHub-signed
push to `POST /hooks/bench` and polls every host's `current` until all point at the new
release. Measured with this process's monotonic clock:

- answered: the webhook's 202 came back;
- all switched: every host's `current` points at the new release (the target: under 1 s at
  50 hosts).

Then `--flood` signed pushes are sent over about three seconds (20 at a time) and the fetches
they caused are read from the daemon's /metrics (`deployd_git_fetch_duration_seconds_count`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

# The imports after sys.path is set up stand below it.
# ruff: noqa: E402
REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "daemon")]

from tests.support.daemonfixtures import AppSpec, DaemonSpec
from tests.support.gitrepo import OriginRepo
from tests.support.judging import DaemonProcess, current_release
from tests.support.sshd import ClientKey, SshdHost, remove_hosts, start_hosts, write_known_hosts

APP = "bench"
SECRET = b"bench-webhook-secret-0123456789"
BODY = json.dumps({"ref": "refs/heads/production"}).encode()
HEADERS = {"X-GitHub-Event": "push", "Content-Type": "application/json",
           "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET, BODY, hashlib.sha256).hexdigest()}


class Bench:
    def __init__(self, count: int, workdir: Path) -> None:
        self.count = count
        self.workdir = workdir
        self.hosts: list[SshdHost] = []
        self.origin = OriginRepo(workdir / "origin.git")
        self.daemon: DaemonProcess | None = None
        self.serial = 0

    async def start(self) -> None:
        key = ClientKey.create(self.workdir)
        self.hosts = start_hosts(self.count, key, "deployd-bench-sshd-")
        secret = self.workdir / "webhook.secret"
        secret.write_bytes(SECRET)
        self.commit()
        app = AppSpec(name=APP, repo=self.origin.url, sshd_hosts=self.hosts,
                      settings={"parallel": max(50, self.count), "poll_interval": "60s"},
                      rollback={"grace": "0s", "bake": "100ms"},
                      webhook={"secret_file": str(secret)})
        spec = DaemonSpec(state_dir=self.workdir / "state", client_key=key.private,
                          known_hosts=write_known_hosts(self.workdir / "known_hosts", self.hosts),
                          apps=[app])
        self.daemon = DaemonProcess(spec.write(self.workdir / "deployd.toml"),
                                    self.workdir / "deployd.log")
        await self.daemon.start()
        await self.daemon.wait_for_event(APP, "deploy.succeeded", within=120)

    async def stop(self) -> None:
        if self.daemon is not None:
            await self.daemon.close()
        remove_hosts(self.hosts)

    def commit(self) -> str:
        self.serial += 1
        return self.origin.commit({"app.txt": f"release {self.serial}\n"}, f"r{self.serial}")

    async def push(self, session: aiohttp.ClientSession) -> int:
        assert self.daemon is not None
        async with session.post(f"{self.daemon.base}/hooks/{APP}", data=BODY,
                                headers=HEADERS) as response:
            await response.read()
            return response.status

    async def run_once(self, session: aiohttp.ClientSession) -> tuple[float, float]:
        # Pushes a second apart or more: closer ones are spaced like a flood (one fetch a
        # second), which is what the flood figure measures.
        await asyncio.sleep(1.2)
        before = {current_release(host.home / "app") for host in self.hosts}
        self.commit()
        started = time.monotonic()
        assert await self.push(session) == 202
        answered = time.monotonic() - started
        deploy_dirs = [host.home / "app" for host in self.hosts]
        while True:
            releases = {current_release(d) for d in deploy_dirs}
            if len(releases) == 1 and not releases & before:
                return answered, time.monotonic() - started
            if time.monotonic() - started > 60:
                raise RuntimeError("not every host switched within 60 s")
            await asyncio.sleep(0.002)

    async def fetches(self, session: aiohttp.ClientSession) -> float:
        assert self.daemon is not None
        async with session.get(f"{self.daemon.base}/metrics") as response:
            text = await response.text()
        for line in text.splitlines():
            if line.startswith("deployd_git_fetch_duration_seconds_count") and APP in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def flood(self, session: aiohttp.ClientSession, total: int) -> tuple[int, float, float]:
        before = await self.fetches(session)
        started = time.monotonic()
        waves = max(1, total // 20)
        sent = 0
        for _ in range(waves):
            statuses = await asyncio.gather(*(self.push(session) for _ in range(20)))
            sent += sum(status == 202 for status in statuses)
            await asyncio.sleep(max(0.0, 3.0 / waves - 0.001))
        took = time.monotonic() - started
        await asyncio.sleep(1.5)  # a fetch still asked for runs
        return sent, took, await self.fetches(session) - before


async def bench(count: int, runs: int, flood: int) -> None:
    with tempfile.TemporaryDirectory(prefix="deployd-bench-") as tmp:
        setup = Bench(count, Path(tmp))
        try:
            await setup.start()
            async with aiohttp.ClientSession() as session:
                results = [await setup.run_once(session) for _ in range(runs)]
                switched = [r[1] * 1000 for r in results]
                answered = [r[0] * 1000 for r in results]
                print(f"N={count}: push -> all {count} hosts switched: median "
                      f"{statistics.median(switched):.0f} ms (runs: "
                      f"{', '.join(f'{v:.0f}' for v in switched)} ms); 202 after median "
                      f"{statistics.median(answered):.1f} ms")
                if flood:
                    sent, took, fetches = await setup.flood(session, flood)
                    print(f"N={count}: flood of {sent} accepted pushes in {took:.1f} s -> "
                          f"{fetches:.0f} fetches")
        finally:
            await setup.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--flood", type=int, default=1000)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for count in args.hosts:
        asyncio.run(bench(count, args.runs, args.flood))


if __name__ == "__main__":
    main()
