"""Benchmark: a progressive rollout on N real sshd hosts, its steps' switch times and the
blast radius of a bad release.

    python3 tests/bench/bench_rollout.py [--hosts 50] [--steps 1 10% 50% 100%]

N sshd hosts, one health server per host answering as the release live on it says (its
`health.txt`), and the real daemon as a subprocess (`deployd run`) with `[rollout] steps`.
Printed:

- per step of a good rollout: from the step's start (the deploy's start for the first, the
  previous step passing for the others: their events' times) to every host of the step
  having `current` on the new release (read from the hosts' directories every 2 ms);
- the blast radius: how many hosts ever ran a bad release (their revisions.log names it),
  against the first step's host count (the target: equal).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

# The imports after sys.path is set up stand below it.
# ruff: noqa: E402
REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "daemon")]

from tests.support.daemonfixtures import AppSpec, DaemonSpec
from tests.support.gitrepo import OriginRepo
from tests.support.healthservers import BAD, GOOD, HealthServer, start_servers
from tests.support.judging import DaemonProcess, current_revision, http_check, revisions_log
from tests.support.sshd import ClientKey, SshdHost, remove_hosts, start_hosts, write_known_hosts

APP = "shop"


def _at(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["at"]).replace("Z", "+00:00")).timestamp()


class Bench:
    def __init__(self, count: int, steps: list[str], workdir: Path) -> None:
        self.count, self.steps, self.workdir = count, steps, workdir
        self.hosts: list[SshdHost] = []
        self.servers: list[HealthServer] = []
        self.origin = OriginRepo(workdir / "origin.git")
        self.daemon: DaemonProcess | None = None

    @property
    def dirs(self) -> list[Path]:
        return [host.home / "app" for host in self.hosts]

    async def start(self) -> None:
        key = ClientKey.create(self.workdir)
        self.hosts = start_hosts(self.count, key, "deployd-bench-sshd-")
        self.servers = await start_servers(self.count)
        app = AppSpec(
            name=APP, repo=self.origin.url, sshd_hosts=self.hosts,
            checks=[http_check(interval="200ms")],
            host_vars=[{"health_port": s.port} for s in self.servers],
            settings={"parallel": max(50, self.count), "poll_interval": "500ms",
                      "rollout": {"steps": self.steps, "step_bake": "1500ms"}},
            rollback={"grace": "300ms", "bake": "1s", "unhealthy_hosts": "1"})
        spec = DaemonSpec(state_dir=self.workdir / "state", client_key=key.private,
                          known_hosts=write_known_hosts(self.workdir / "known_hosts", self.hosts),
                          apps=[app])
        for server, deploy_to in zip(self.servers, self.dirs, strict=True):
            server.follow(deploy_to)
        self.daemon = DaemonProcess(spec.write(self.workdir / "deployd.toml"),
                                    self.workdir / "deployd.log")
        await self.daemon.start()

    async def stop(self) -> None:
        if self.daemon is not None:
            await self.daemon.close()
        for server in self.servers:
            await server.stop()
        remove_hosts(self.hosts)

    async def good_rollout(self, message: str) -> list[tuple[int, float]]:
        """Commit a good head; per step: (hosts on it, seconds from start to all switched)."""
        assert self.daemon is not None
        revision = self.origin.commit({"health.txt": GOOD, "n.txt": message}, message)
        switched_at: dict[int, float] = {}
        deadline = time.monotonic() + 300
        while len(switched_at) < self.count:
            now = time.time()
            for index, deploy_to in enumerate(self.dirs):
                if index not in switched_at and current_revision(deploy_to) == revision:
                    switched_at[index] = now
            if time.monotonic() > deadline:
                raise RuntimeError("the rollout did not reach every host in 5 minutes")
            await asyncio.sleep(0.002)
        await self.daemon.wait_for_event(APP, "rollout.done", within=120, revision=revision)
        events = await self.daemon.events(APP)
        started = [_at(e) for e in events
                   if e["revision"] == revision and e["kind"] == "deploy.started"]
        passed = [_at(e) for e in events
                  if e["revision"] == revision and e["kind"] == "rollout.step_passed"]
        steps = [e for e in events if e["revision"] == revision and e["kind"] == "rollout.step"]
        figures = []
        for begin, step in zip(started + passed, steps, strict=False):
            added = [self._index(host) for host in step["data"]["hosts"]]
            figures.append((len(step["data"]["canary"]),
                            max(switched_at[i] for i in added) - begin))
        return figures

    def _index(self, label: str) -> int:
        port = int(label.rsplit(":", 1)[1])
        return next(i for i, host in enumerate(self.hosts) if host.port == port)

    async def blast_radius(self) -> tuple[int, int]:
        """Commit a bad head; (hosts that ever ran it, hosts in the first step)."""
        assert self.daemon is not None
        bad = self.origin.commit({"health.txt": BAD}, "bad")
        await self.daemon.wait_for_event(APP, "rollout.rolled_back", within=120, revision=bad)
        await self.daemon.wait_for_event(APP, "rollback.succeeded", within=120)
        ran = sum(any(bad in line for line in revisions_log(d)) for d in self.dirs)
        first = next(e for e in await self.daemon.events(APP)
                     if e["revision"] == bad and e["kind"] == "rollout.step")
        return ran, len(first["data"]["canary"])


async def bench(count: int, steps: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="deployd-bench-") as tmp:
        setup = Bench(count, steps, Path(tmp))
        try:
            await setup.start()
            await setup.good_rollout("first")  # every host has a release and a connection
            for figure in await setup.good_rollout("second"):
                on, seconds = figure
                print(f"N={count}: step reaching {on} hosts: all its hosts switched "
                      f"{seconds * 1000:.0f} ms after it started")
            ran, first = await setup.blast_radius()
            print(f"N={count}: a bad release ran on {ran} host(s); the first step has {first}")
        finally:
            await setup.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--steps", nargs="+", default=["1", "10%", "50%", "100%"])
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(bench(args.hosts, args.steps))


if __name__ == "__main__":
    main()
