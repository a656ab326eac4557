"""Benchmark: wall time of a deploy and of a rollback to 1, 10 and 50 real sshd hosts.

    python3 tests/bench/bench_fleet.py [--hosts 1 10 50] [--repeat 7] [--files 40]

Each host is its own OpenSSH sshd on loopback (tests/support/sshd.py; run as root, logging in as the
unprivileged test user), with its own deploy directory. Connections are opened first (a daemon
keeps them open), then each repetition times one `Fleet.deploy` of a small app (a tar of
`--files` files, restart hook `touch tmp/restart.txt`) and one `Fleet.rollback` to the release
before it. Prints the median, min and max of each, the CPU time this process (the daemon
side) spent per rollback, and the 50-host/1-host rollback ratio. All hosts share this machine's
cores, so the host side of N hosts' work (sshd, sh, ln, mv, hooks) adds up here, where on real
machines it runs in parallel.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The imports after sys.path is set up stand below it.
# ruff: noqa: E402
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "daemon")]

from tests.support.hostfixtures import make_tarball, sha
from tests.support.sshd import (
    ClientKey,
    SshdHost,
    remove_hosts,
    shared_dir,
    start_hosts,
    write_known_hosts,
)

from deployd.config import AppConfig, Hooks, HostConfig, SSHConfig
from deployd.fleet import Fleet
from deployd.hosts import HostPool

ROLLBACK_TARGET = 0.6  # seconds, 50 hosts, warm connections
DEPLOY_TARGET = 3.0


def _app(hosts: list[SshdHost], known_hosts: Path, key: ClientKey, hook: bool) -> AppConfig:
    configs = tuple(HostConfig(address=h.address, port=h.port, deploy_to=str(h.home / "app"))
                    for h in hosts)
    return AppConfig(
        name="bench", repo="/nonexistent", branch="production", deploy_to=configs[0].deploy_to,
        hosts=configs, keep_releases=5, linked_dirs=("log", "tmp"), parallel=len(hosts),
        ssh=SSHConfig(user=hosts[0].user, key=key.private, known_hosts=known_hosts),
        hooks=Hooks(restart="touch tmp/restart.txt") if hook else Hooks(),
    )


def _tarball(files: int, revision: int) -> bytes:
    content = {f"app/file{i:03d}.rb": f"# {revision}\n" + "x = 1\n" * 200 for i in range(files)}
    return make_tarball({**content, "VERSION": str(revision)})


async def _measure(app: AppConfig, repeat: int,
                   files: int) -> tuple[list[float], list[float], list[float]]:
    pool = HostPool()
    fleet = Fleet(app, pool)
    try:
        failures = await fleet.connect()
        if failures:
            raise SystemExit(f"could not connect: {failures}")
        previous = (await fleet.deploy(sha(1), _tarball(files, 1), branch="production",
                                       actor="bench")).release
        deploys, rollbacks, rollback_cpu = [], [], []
        for n in range(2, repeat + 2):
            began = time.perf_counter()
            await fleet.deploy(sha(n), _tarball(files, n), branch="production", actor="bench")
            deploys.append(time.perf_counter() - began)
            began, cpu = time.perf_counter(), time.process_time()
            await fleet.rollback(previous, reason="bench", actor="bench")
            rollbacks.append(time.perf_counter() - began)
            rollback_cpu.append(time.process_time() - cpu)
            previous = (await fleet.deploy(sha(n), _tarball(files, n), branch="production",
                                           actor="bench")).release
        return deploys, rollbacks, rollback_cpu
    finally:
        await pool.close()



def _line(label: str, times: list[float]) -> str:
    return (f"{label:<9} median {statistics.median(times):6.3f}s   "
            f"min {min(times):6.3f}s   max {max(times):6.3f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--no-hook", action="store_true", help="no restart hook")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    key = ClientKey.create(Path(tempfile.mkdtemp(prefix="deployd-bench-key-")))
    medians: dict[int, tuple[float, float]] = {}
    print(f"deploy = check + prepare (upload {args.files} files) + switch + prune, "
          f"rollback = check + switch; {args.repeat} repetitions, connections warm")
    for count in args.hosts:
        hosts = start_hosts(count, key, "deployd-bench-sshd-")
        try:
            known_hosts = write_known_hosts(shared_dir("deployd-bench-kh-") / "known_hosts",
                                            hosts)
            app = _app(hosts, known_hosts, key, hook=not args.no_hook)
            deploys, rollbacks, cpu = asyncio.run(_measure(app, args.repeat, args.files))
            shutil.rmtree(known_hosts.parent, ignore_errors=True)
        finally:
            remove_hosts(hosts)
        medians[count] = (statistics.median(deploys), statistics.median(rollbacks))
        print(f"{count:>3} host(s)")
        print("    " + _line("deploy", deploys))
        print("    " + _line("rollback", rollbacks)
              + f"   (deployd's own CPU: median {statistics.median(cpu):.3f}s)")
    if 1 in medians and len(medians) > 1:
        most = max(medians)
        ratio = medians[most][1] / medians[1][1]
        print(f"rollback {most} hosts / 1 host: {ratio:.2f}x (target <= 1.5x)")
        if most >= 50:
            print(f"targets at {most} hosts: rollback {medians[most][1]:.3f}s "
                  f"(< {ROLLBACK_TARGET}s), deploy {medians[most][0]:.3f}s (< {DEPLOY_TARGET}s)")


if __name__ == "__main__":
    main()
