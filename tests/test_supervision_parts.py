"""The supervisor's parts against a fleet held in memory: no sshd, no daemon.

The rules (policy) are tested alone in test_policy*.py; here the parts that carry them out are
wired together as the supervisor wires them, over a real store and a real mirror of a real
repository, with a fleet whose hosts are a dict: where a bad verdict becomes a rollback, what
recovery does with a half-done deploy, and that the judge only judges.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Collection, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from deployd.config import AppConfig, HostConfig, RollbackConfig
from deployd.context import AppContext
from deployd.errors import DeploydError
from deployd.fleet import DeployOutcome, Fleet, RollbackOutcome
from deployd.git import Mirror
from deployd.health import HealthMonitor
from deployd.judge import Judgement
from deployd.metrics import Metrics
from deployd.policy import BakeVerdict
from deployd.releases import HostState, Release
from deployd.rescue import Rescue
from deployd.store import Deploy, JobStore, Store
from deployd.supervisor import AppSupervisor
from tests.support.gitrepo import OriginRepo

HOSTS = ("web1", "web2", "web3")
FIX = "Fix tax rounding\n\nRescue: yes\n"


class MemoryFleet:
    """Hosts as a dict of host -> live release; releases as release -> revision."""

    def __init__(self, hosts: Iterable[str]) -> None:
        self.current: dict[str, str | None] = dict.fromkeys(hosts)
        self.revisions: dict[str, str] = {}
        self.calls: list[tuple[str, str, tuple[str, ...]]] = []

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(self.current)

    async def connect(self) -> dict[str, DeploydError]:
        return {}

    async def state(self) -> dict[str, HostState | DeploydError]:
        releases = tuple(Release(name, rev) for name, rev in sorted(self.revisions.items()))
        return {host: HostState(current=current,
                                current_revision=self.revisions.get(current or ""),
                                releases=releases, lock=None)
                for host, current in self.current.items()}

    async def deploy(self, revision: str, tarball: object, *, branch: str, actor: str,
                     protect: Collection[str] = (), **_: Any) -> DeployOutcome:
        release = f"r{len(self.revisions) + 1}"
        self.revisions[release] = revision
        previous = dict(self.current)
        self.current = dict.fromkeys(self.current, release)
        self.calls.append(("deploy", release, self.hosts))
        return DeployOutcome(release=release, revision=revision, previous=previous, timings={},
                             pruned={}, warnings={}, seconds=0.0)

    async def rollback(self, target: str, *, reason: str, actor: str,
                       protect: Collection[str] = (), hosts: Iterable[str] | None = None,
                       revision: str | None = None) -> RollbackOutcome:
        chosen = tuple(hosts) if hosts is not None else self.hosts
        previous = {host: self.current[host] for host in chosen}
        for host in chosen:
            self.current[host] = target
        self.calls.append(("rollback", target, chosen))
        return RollbackOutcome(target=target, revision=self.revisions.get(target),
                               previous=previous, timings={}, seconds=0.0)


@dataclass
class Parts:
    sup: AppSupervisor
    fleet: MemoryFleet
    store: Store
    origin: OriginRepo
    good: str


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    origin = OriginRepo(tmp_path / "origin.git")
    good = origin.commit({"health.txt": "ok\n"}, "Shop v1")
    app = AppConfig(name="shop", repo=origin.url, branch="production", deploy_to="/srv/shop",
                    hosts=tuple(HostConfig(address=h) for h in HOSTS),
                    rollback=RollbackConfig(grace=0.0, bake=0.0))
    store = Store(tmp_path / "deployd.sqlite3")
    await store.open()
    mirror = Mirror(tmp_path / "mirror.git", origin.url, name="shop")
    await mirror.fetch()
    metrics = Metrics()
    fleet = MemoryFleet(HOSTS)
    async with aiohttp.ClientSession() as session:
        ctx = AppContext(app, store=store, mirror=mirror, fleet=cast(Fleet, fleet),
                         metrics=metrics, health=HealthMonitor(app, session, metrics),
                         rescue=Rescue(app, store=store, jobs=JobStore(store), mirror=mirror,
                                       metrics=metrics))
        yield Parts(AppSupervisor(ctx), fleet, store, origin, good)
    await store.close()


async def settle(sup: AppSupervisor) -> None:
    """Wait for the operation the parts started to end."""
    deadline = time.monotonic() + 30
    await asyncio.sleep(0)
    while sup.slot.held:
        assert time.monotonic() < deadline, f"{sup.slot.busy} still running"
        await asyncio.sleep(0.01)


async def deploy_good_then_bad(parts: Parts) -> Deploy:
    """r1 (good, judged so) on every host, then a bad batch deployed as r2."""
    sup = parts.sup
    first = await sup.rollouts.deploy(parts.good, trigger="branch", actor="deployd")
    await parts.store.set_last_good("shop", parts.good, first.release)
    parts.origin.commit({"tax.txt": "rate 0.2\n"}, FIX)
    parts.origin.commit({"health.txt": "broken\n"}, "Switch databases")
    assert await sup.watcher.fetch()
    head = await sup.watcher.refresh_head()
    assert head is not None
    return await sup.rollouts.deploy(head, trigger="branch", actor="deployd")


async def test_a_bad_verdict_quarantines_rolls_back_to_last_good_and_proposes_a_job(
        parts: Parts) -> None:
    bad = await deploy_good_then_bad(parts)
    await parts.sup.verdicts.act(Judgement(bad, BakeVerdict("bad", "2 of 3 hosts unhealthy")))
    await settle(parts.sup)
    assert parts.fleet.current == dict.fromkeys(HOSTS, "r1")
    assert parts.fleet.calls[-1] == ("rollback", "r1", HOSTS)
    assert await parts.store.is_quarantined("shop", bad.revision)
    rollback = (await parts.store.deploys("shop", limit=1))[0]
    assert (rollback.kind, rollback.trigger, rollback.state) == ("rollback", "health",
                                                                 "succeeded")
    assert (await parts.store.deploy(bad.id)).bake_state == "bad"
    jobs = await parts.sup.rescue.jobs.find(app="shop")
    assert [(job.base, job.bad_head, job.state) for job in jobs] == \
        [(parts.good, bad.revision, "pending")]


async def test_a_bad_rolled_back_release_pauses_and_touches_no_host(parts: Parts) -> None:
    bad = await deploy_good_then_bad(parts)
    rollback = await parts.sup.rollouts.rollback("r1", trigger="manual", actor="alice",
                                                 reason="slow")
    calls = list(parts.fleet.calls)
    await parts.sup.verdicts.act(Judgement(rollback, BakeVerdict("bad", "still failing")))
    await settle(parts.sup)
    assert parts.fleet.calls == calls
    state = await parts.store.app_state("shop")
    assert state.paused and "not rolling back further" in str(state.paused_reason)
    assert await parts.store.is_quarantined("shop", bad.revision)  # by the manual rollback


async def test_with_automatic_rollback_off_a_bad_release_stays_but_is_quarantined(
        parts: Parts) -> None:
    bad = await deploy_good_then_bad(parts)
    ctx = parts.sup.ctx
    ctx.app = replace(ctx.app, rollback=replace(ctx.app.rollback, auto=False))
    await parts.sup.verdicts.act(Judgement(bad, BakeVerdict("bad", "failing")))
    await settle(parts.sup)
    assert parts.fleet.current == dict.fromkeys(HOSTS, "r2")
    assert await parts.store.is_quarantined("shop", bad.revision)
    events = [e.kind for e in await parts.store.events("shop")]
    assert events[-1] == "rollback.skipped"


async def test_recovery_switches_back_the_hosts_a_killed_deploy_had_switched(
        parts: Parts) -> None:
    first = await parts.sup.rollouts.deploy(parts.good, trigger="branch", actor="deployd")
    new = parts.origin.commit({"index.html": "v2\n"}, "Front page v2")
    # What a deploy killed half way leaves: its record running, web2 already on it.
    record = await parts.store.start_deploy("shop", "deploy", new, trigger="branch",
                                            actor="deployd", previous_release=first.release,
                                            previous_revision=parts.good)
    parts.fleet.revisions["r2"] = new
    parts.fleet.current["web2"] = "r2"
    await parts.sup.recovery.recover()
    assert parts.fleet.calls[-1] == ("rollback", "r1", ("web2",))
    assert parts.fleet.current == dict.fromkeys(HOSTS, "r1")
    after = await parts.store.deploy(record.id)
    assert (after.state, after.error) == ("interrupted", "interrupted by a daemon restart")


async def test_the_judge_returns_a_verdict_and_changes_nothing(parts: Parts) -> None:
    record = await parts.sup.rollouts.deploy(parts.good, trigger="branch", actor="deployd")
    parts.sup.ctx.health.evidence_since = float("-inf")
    first = await parts.sup.judge.judge()  # grace (0 s) ends: the bake begins
    assert first is None
    assert (await parts.store.deploy(record.id)).bake_state == "baking"
    parts.sup.ctx.health.evidence_since = float("-inf")
    judgement = await parts.sup.judge.judge()
    assert judgement is not None and judgement.verdict.verdict == "good"
    assert judgement.record.id == record.id
    assert (await parts.store.deploy(record.id)).bake_state == "baking"
    assert (await parts.store.app_state("shop")).last_good_revision is None
