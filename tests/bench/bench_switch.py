"""Benchmark: how long a fleet runs two releases at once, with slow restart hooks.

    python3 tests/bench/bench_switch.py [--hosts 50] [--repeat 5] [--hook-sleep 0.2] [--subset 10]
                                        [--parallel N]

N real sshd hosts on loopback (tests/sshd.py; run as root, logging in as the unprivileged test
user), connections warm, a restart hook that sleeps `--hook-sleep` seconds, `--parallel` hosts
acted on at once (default: all; with fewer, a restart holding a slot used to delay the switches
of the hosts after it by a whole restart per batch). Each repetition
deploys a new release, then rolls back to the one before it and measures, from the moment the
rollback was called:

- all switched: the newest mtime of the hosts' `current` symlinks (written by `ln -s` just
  before the rename that switches it; read from the shared filesystem), i.e. when the last host
  started serving the target release (target: under 0.4 s at 50 hosts);
- first switched: the oldest of those mtimes;
- total: until `Fleet.rollback` returned (every hook run).

Then, where `Fleet.deploy` takes `hosts` (a rollout step), a deploy to the first `--subset`
hosts is timed the same way (all switched, total), and the hosts outside it are checked to be
untouched. Wall-clock times (the symlink mtimes are wall clock); the kernel stamps file times
at its tick (a few ms), which bounds the resolution.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "daemon")]

from tests.support.hostfixtures import make_tarball, sha  # noqa: E402
from tests.support.sshd import ClientKey, SshdHost, shared_dir  # noqa: E402

from deployd.config import AppConfig, Hooks, HostConfig, SSHConfig  # noqa: E402
from deployd.fleet import Fleet  # noqa: E402
from deployd.hosts import HostPool  # noqa: E402

ALL_SWITCHED_TARGET = 0.4  # seconds, 50 hosts, warm connections, 0.2 s restart hooks


def _app(hosts: list[SshdHost], known_hosts: Path, key: ClientKey, sleep: float,
         parallel: int) -> AppConfig:
    configs = tuple(HostConfig(address=h.address, port=h.port, deploy_to=str(h.home / "app"))
                    for h in hosts)
    return AppConfig(
        name="bench", repo="/nonexistent", branch="production", deploy_to=configs[0].deploy_to,
        hosts=configs, keep_releases=5, parallel=parallel,
        ssh=SSHConfig(user=hosts[0].user, key=key.private, known_hosts=known_hosts),
        hooks=Hooks(restart=f"sleep {sleep:g}"), hook_timeout=30,
    )


def _tarball(revision: int) -> bytes:
    return make_tarball({"index.html": f"version {revision}", "VERSION": str(revision)})


def _switch_times(app: AppConfig) -> list[float]:
    return [os.lstat(Path(host.deploy_to) / "current").st_mtime for host in app.hosts]


class Figures:
    def __init__(self) -> None:
        self.first: list[float] = []
        self.last: list[float] = []
        self.total: list[float] = []

    def add(self, began: float, app: AppConfig, ended: float,
            hosts: slice = slice(None)) -> None:
        stamps = _switch_times(app)[hosts]
        self.first.append(min(stamps) - began)
        self.last.append(max(stamps) - began)
        self.total.append(ended - began)


async def _measure(app: AppConfig, repeat: int, subset: int) -> tuple[Figures, Figures | None]:
    pool = HostPool()
    fleet = Fleet(app, pool)
    rollbacks = Figures()
    subsets: Figures | None = None
    try:
        failures = await fleet.connect()
        if failures:
            raise SystemExit(f"could not connect: {failures}")
        previous = (await fleet.deploy(sha(1), _tarball(1), branch="production",
                                       actor="bench")).release
        for n in range(2, repeat + 2):
            await fleet.deploy(sha(n), _tarball(n), branch="production", actor="bench")
            began = time.time()
            await fleet.rollback(previous, reason="bench", actor="bench")
            rollbacks.add(began, app, time.time())
            previous = (await fleet.deploy(sha(n), _tarball(n), branch="production",
                                           actor="bench")).release
        if "hosts" in inspect.signature(fleet.deploy).parameters and subset < len(app.hosts):
            subsets = Figures()
            step = fleet.hosts[:subset]
            for n in range(repeat + 2, 2 * repeat + 2):
                untouched = _switch_times(app)[subset:]
                began = time.time()
                await fleet.deploy(sha(n), _tarball(n), branch="production", actor="bench",
                                   hosts=step)
                subsets.add(began, app, time.time(), slice(0, subset))
                if _switch_times(app)[subset:] != untouched:
                    raise SystemExit("a subset deploy switched a host outside the subset")
        return rollbacks, subsets
    finally:
        await pool.close()


def _start_hosts(count: int, key: ClientKey) -> list[SshdHost]:
    hosts = []
    for _ in range(count):
        host = SshdHost(workdir=shared_dir("deployd-bench-sshd-"), client_key=key)
        host.start()
        hosts.append(host)
    return hosts


def _stop_hosts(hosts: list[SshdHost]) -> None:
    for host in hosts:
        host.cleanup()
        shutil.rmtree(host.workdir, ignore_errors=True)


def _line(label: str, times: list[float]) -> str:
    return (f"{label:<15} median {statistics.median(times):6.3f}s   "
            f"min {min(times):6.3f}s   max {max(times):6.3f}s")


def _report(title: str, figures: Figures) -> None:
    print(title)
    print("    " + _line("first switched", figures.first))
    print("    " + _line("all switched", figures.last))
    print("    " + _line("total", figures.total))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--hook-sleep", type=float, default=0.2)
    parser.add_argument("--subset", type=int, default=10)
    parser.add_argument("--parallel", type=int, default=0, help="default: every host")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    keydir = Path(tempfile.mkdtemp(prefix="deployd-bench-key-"))
    key = ClientKey.create(keydir)
    hosts = _start_hosts(args.hosts, key)
    known_hosts = shared_dir("deployd-bench-kh-") / "known_hosts"
    try:
        known_hosts.write_text("".join(h.known_hosts_line() + "\n" for h in hosts))
        app = _app(hosts, known_hosts, key, args.hook_sleep, args.parallel or args.hosts)
        rollbacks, subsets = asyncio.run(_measure(app, args.repeat, args.subset))
    finally:
        _stop_hosts(hosts)
        shutil.rmtree(known_hosts.parent, ignore_errors=True)
        shutil.rmtree(keydir, ignore_errors=True)
    print(f"{args.hosts} hosts, parallel {args.parallel or args.hosts}, restart hook "
          f"`sleep {args.hook_sleep:g}`, {args.repeat} repetitions, connections warm; seconds "
          "from the call")
    _report(f"rollback of {args.hosts} hosts", rollbacks)
    if subsets is not None:
        _report(f"deploy to the first {args.subset} hosts (a rollout step)", subsets)
    else:
        print("deploy to a subset: not supported by this Fleet.deploy")
    verdict = "met" if statistics.median(rollbacks.last) < ALL_SWITCHED_TARGET else "MISSED"
    print(f"target: all {args.hosts} switched in < {ALL_SWITCHED_TARGET}s: {verdict}")


if __name__ == "__main__":
    main()
