"""Benchmark: how apps spread over nodes, and how fast a killed owner's rollback is finished.

    python3 tests/bench/bench_failover.py [--nodes 3] [--apps 30] [--runs 5] [--failover 5s]
                                         [--skip-spread]

Run as root (sshd hosts log in as the unprivileged test user; PostgreSQL runs as that user).
One throwaway PostgreSQL cluster (tests/support/postgres.py); every node is a `deployd run`
subprocess with its own state_dir on a database of that cluster.

- spread: `--apps` apps on local hosts, the nodes started one after the other; once every
  app is owned and nothing moved for three ownership rounds, the apps each node owns (target:
  no node over ceil(apps / nodes) + 2, ideally an even split) and how long that took from the
  last node's start.
- failover: one app on 3 real sshd hosts whose rollback hook waits on a gate file, `--nodes`
  nodes; first that app alone (a survivor has room for it at once), then with `--nodes - 1`
  apps on local hosts besides it, so that every node is at its share and the dead node's app
  can only move once the node no longer counts as live. Each run deploys a new head, asks
  the owner to roll back to the release before it and, once every host switched and runs its
  rollback hook, kills the owner with SIGKILL and opens the gate. Measured with this
  process's monotonic clock from the kill: until `GET /api/v1/nodes` on a survivor shows the
  app owned by another node ("owned"), and until the rollback's record is `succeeded`
  ("finished"; target: under 5 s). The killed node is started again before the next run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# The imports after sys.path is set up stand below it.
# ruff: noqa: E402
REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "daemon")]

from tests.support.daemonfixtures import AppSpec
from tests.support.gitrepo import OriginRepo
from tests.support.judging import current_release, hooks_log
from tests.support.nodes import NodeProcess, node_process, owners
from tests.support.postgres import ROLE, Database, PostgresServer, remove_postgres, start_postgres
from tests.support.sshd import (
    ClientKey,
    SshdHost,
    remove_hosts,
    shared_dir,
    start_hosts,
    write_known_hosts,
)

from deployd.config import parse_duration

FINISHED_TARGET = 5.0  # seconds from the kill to the rollback recorded finished
QUICK_BAKE = {"grace": "0s", "bake": "300ms"}


def database(server: PostgresServer, name: str) -> Database:
    with server.admin() as admin:
        admin.execute(f"CREATE DATABASE {name} OWNER {ROLE}".encode())
    return Database(server, name)


async def until(check: Any, *, within: float, what: str, every: float = 0.02) -> Any:
    """Await `check()` until truthy; its value. Fails after `within` seconds."""
    deadline = time.monotonic() + within
    while not (value := await check()):
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {within:.0f}s")
        await asyncio.sleep(every)
    return value


async def quietly(node: NodeProcess) -> dict[str, list[str]] | None:
    try:
        return await owners(node)
    except Exception:  # a node starting or just killed
        return None


# -- spread ------------------------------------------------------------------------------------


async def spread(server: PostgresServer, workdir: Path, nodes: int, apps: int,
                 failover: str) -> None:
    root = workdir / "spread"
    root.mkdir()
    origin = OriginRepo(root / "origin.git")
    origin.commit({"index.html": "v1\n"}, "v1")
    specs = [AppSpec(name=f"app{n:02d}", repo=str(origin.path), local_dirs=[root / f"host{n}"],
                     rollback=dict(QUICK_BAKE)) for n in range(apps)]
    db = database(server, "bench_spread")
    cluster = [node_process(root, f"node-{chr(97 + n)}", db, specs, failover=failover)
               for n in range(nodes)]
    rounds = parse_duration(failover) / 3
    try:
        for node in cluster:
            await node.start(wait=120)
        started = time.monotonic()
        last: dict[str, list[str]] = {}
        stable_since = time.monotonic()
        while True:
            seen = await quietly(cluster[0]) or {}
            if seen != last:
                last, stable_since = seen, time.monotonic()
            owned = sum(len(v) for v in seen.values())
            if owned == apps and time.monotonic() - stable_since > 3 * rounds:
                break
            if time.monotonic() - started > 300:
                raise SystemExit(f"spread never settled: {seen}")
            await asyncio.sleep(0.1)
        took = stable_since - started
        counts = {node.name: len(seen.get(node.name, [])) for node in cluster}
        share = math.ceil(apps / nodes)
        print(f"spread: {nodes} nodes x {apps} apps (failover {failover}): "
              + ", ".join(f"{name} {count}" for name, count in counts.items())
              + f"; settled {took:.1f} s after the last node started "
              f"(share {share}; target: none over {share + 2})")
    finally:
        for node in cluster:
            await node.close()


# -- failover mid-rollback ---------------------------------------------------------------------


class Failover:
    def __init__(self, server: PostgresServer, workdir: Path, nodes: int, failover: str,
                 hosts: list[SshdHost], key: ClientKey, others: int) -> None:
        self.root = workdir / f"failover-{others}"
        self.root.mkdir()
        self.hosts = hosts
        self.dirs = [host.home / "app" for host in hosts]
        self.gates = shared_dir("deployd-bench-gate-")
        self.origin = OriginRepo(self.root / "origin.git")
        self.serial = 0
        known = write_known_hosts(self.root / "known_hosts", hosts)
        log = '"$DEPLOYD_DEPLOY_TO/shared/hooks.log"'
        gate = f"{self.gates}/gate-$DEPLOYD_REVISION"
        hook = (f'echo "hold $DEPLOYD_REVISION" >> {log}; '
                f'while [ ! -e "{gate}" ]; do sleep 0.02; done; '
                f'echo "rollback $DEPLOYD_REVISION" >> {log}')
        app = AppSpec(name="shop", repo=str(self.origin.path), sshd_hosts=hosts,
                      hooks={"rollback": hook}, rollback=dict(QUICK_BAKE))
        # Apps on local hosts that fill the other nodes' shares: the dead node's app then
        # moves only once the node no longer counts as live (`failover` after its last round).
        extra = [AppSpec(name=f"other{n}", repo=str(self.origin.path),
                         local_dirs=[self.root / f"other{n}"], rollback=dict(QUICK_BAKE))
                 for n in range(others)]
        self.apps = 1 + others
        self.share = math.ceil(self.apps / nodes)
        db = database(server, f"bench_failover_{others}")
        self.cluster = [node_process(self.root, f"node-{chr(97 + n)}", db, [app, *extra],
                                     failover=failover, client_key=key.private,
                                     known_hosts=known) for n in range(nodes)]

    def node(self, name: str) -> NodeProcess:
        return next(node for node in self.cluster if node.name == name)

    async def owner(self, among: list[NodeProcess]) -> str | None:
        for node in among:
            seen = await quietly(node)
            if seen is not None:
                return next((name for name, apps in seen.items() if "shop" in apps), None)
        return None

    async def events(self, node: NodeProcess, kind: str, revision: str) -> list[Any]:
        return [e for e in await node.events("shop")
                if e["kind"] == kind and e["revision"] == revision]

    async def new_head(self, via: NodeProcess) -> str:
        """Commit a new head; wait until it is live and baked; its sha."""
        self.serial += 1
        revision = self.origin.commit({"index.html": f"v{self.serial}\n"}, f"v{self.serial}")

        async def baked() -> bool:
            return bool(await self.events(via, "bake.healthy", revision))

        await until(baked, within=120, what=f"v{self.serial} deployed and baked", every=0.1)
        return revision

    async def run(self) -> tuple[float, float]:
        live = [node for node in self.cluster if node.alive]

        async def settled() -> bool:
            seen = await quietly(live[0]) or {}
            return (sum(map(len, seen.values())) == self.apps
                    and max(map(len, seen.values())) == self.share)

        await until(settled, within=120, what="every app owned, spread evenly", every=0.1)
        name = await until(lambda: self.owner(live), within=60, what="an owner")
        owner = self.node(name)
        target_revision = await self.new_head(owner)
        target = current_release(self.dirs[0])
        await self.new_head(owner)
        status, body = await owner.api.call("POST", "/api/v1/apps/shop/rollback",
                                            token="deployer",
                                            json_body={"release": target, "reason": "bench"})
        assert status == 202, body
        record = body["rollback"]["id"]

        async def hooks_running() -> bool:
            return all(f"hold {target_revision}" in hooks_log(d) for d in self.dirs)

        await until(hooks_running, within=60, what="every host's rollback hook running")
        owner.kill9()
        killed = time.monotonic()
        (self.gates / f"gate-{target_revision}").touch()
        survivors = [node for node in self.cluster if node.alive]

        async def moved() -> bool:
            found = await self.owner(survivors)
            return found is not None and found != name

        await until(moved, within=120, what="the app owned by another node")
        owned = time.monotonic() - killed

        async def finished() -> bool:
            latest = (await survivors[0].api.get("/api/v1/apps/shop"))["latest"]
            return bool(latest["id"] == record and latest["state"] == "succeeded")

        await until(finished, within=120, what="the rollback finished")
        done = time.monotonic() - killed
        await owner.start(wait=120)
        return owned, done


async def failover_runs(server: PostgresServer, workdir: Path, nodes: int, runs: int,
                        failover: str, others: int) -> None:
    key_dir = workdir / f"key-{others}"
    key_dir.mkdir()
    key = ClientKey.create(key_dir)
    hosts = start_hosts(3, key)
    bench = Failover(server, workdir, nodes, failover, hosts, key, others)
    try:
        for node in bench.cluster:
            await node.start(wait=120)
        owned_times: list[float] = []
        done_times: list[float] = []
        for run in range(runs):
            owned, done = await bench.run()
            owned_times.append(owned)
            done_times.append(done)
            print(f"failover, {bench.apps} app(s), run {run + 1}: kill -9 -> owned by another "
                  f"node {owned:.2f} s, -> rollback finished {done:.2f} s", flush=True)
        owned_median = statistics.median(owned_times)
        done_median = statistics.median(done_times)
        verdict = "met" if done_median < FINISHED_TARGET else "MISSED"
        print(f"failover ({nodes} nodes, {bench.apps} app(s), failover {failover}, 3 sshd "
              f"hosts): median owned "
              f"{owned_median:.2f} s (max {max(owned_times):.2f}), median rollback finished "
              f"{done_median:.2f} s (max {max(done_times):.2f}); target under "
              f"{FINISHED_TARGET:g} s: {verdict}")
    finally:
        for node in bench.cluster:
            await node.close()
        remove_hosts(hosts)
        shutil.rmtree(bench.gates, ignore_errors=True)


async def bench(args: argparse.Namespace) -> None:
    workdir = shared_dir("deployd-bench-failover-")
    server = start_postgres()
    try:
        if not args.skip_spread:
            await spread(server, workdir, args.nodes, args.apps, args.failover)
        # The app alone (a survivor has room for it at once), then every node at its share.
        for others in (0, args.nodes - 1):
            await failover_runs(server, workdir, args.nodes, args.runs, args.failover, others)
    finally:
        remove_postgres(server)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--apps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--failover", default="5s")
    parser.add_argument("--skip-spread", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
