"""Progressive rollouts over a fleet held in memory: the steps, the verdicts on them, promote,
abort and recovery, wired as the supervisor wires them (no sshd; end to end in
test_rollout.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import cast

import aiohttp
import pytest

from deployd.config import AppConfig, HostConfig, RollbackConfig, RolloutConfig
from deployd.context import AppContext
from deployd.errors import Conflict
from deployd.fleet import Fleet
from deployd.git import Mirror
from deployd.health import HealthMonitor
from deployd.judge import Judgement
from deployd.metrics import Metrics
from deployd.policy import BakeVerdict
from deployd.rescue import Rescue
from deployd.rollout_plan import parse_step
from deployd.store import Deploy, JobStore, Store
from deployd.supervisor import AppSupervisor
from deployd.vocabulary import RolloutState, Trigger
from tests.support.gitrepo import OriginRepo
from tests.support.postgres import BACKENDS, store_backend
from tests.test_supervision_parts import MemoryFleet, settle

HOSTS = ("h1", "h2", "h3", "h4")


class Rig:
    def __init__(self, sup: AppSupervisor, fleet: MemoryFleet, store: Store,
                 origin: OriginRepo) -> None:
        self.sup, self.fleet, self.store, self.origin = sup, fleet, store, origin

    async def judge_once(self) -> Judgement | None:
        """The loop's judging until a verdict (grace ends first), the verdict acted on and
        the operation it started waited for; None when the bake gives no verdict yet."""
        for _ in range(3):
            judgement = await self.sup.judge.judge()
            if judgement is not None:
                await self.sup.verdicts.act(judgement)
                await settle(self.sup)
                return judgement
        return None

    async def rollout_state(self) -> RolloutState | None:
        rollout = await self.sup.steps.store.latest("shop")
        return rollout.state if rollout else None

    def on(self, release: str) -> list[str]:
        return [host for host, current in self.fleet.current.items() if current == release]


MakeRig = Callable[..., Awaitable[Rig]]


def rollout_config(*steps: str) -> RolloutConfig:
    return RolloutConfig(steps=tuple(parse_step(s) for s in steps), step_bake=0.0)


@pytest.fixture(params=BACKENDS)
async def make_rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeRig]:
    stores: list[Store] = []
    async with aiohttp.ClientSession() as session:
        async def make(*steps: str) -> Rig:
            root = tmp_path / f"rig{len(stores)}"
            origin = OriginRepo(root / "origin.git")
            origin.commit({"health.txt": "ok\n"}, "Shop v1")
            app = AppConfig(name="shop", repo=origin.url, branch="production",
                            deploy_to="/srv/shop",
                            hosts=tuple(HostConfig(address=h) for h in HOSTS),
                            rollback=RollbackConfig(grace=0.0, bake=0.0),
                            rollout=rollout_config(*steps))
            store = Store(store_backend(request, root / "deployd.sqlite3"))
            await store.open()
            stores.append(store)
            mirror = Mirror(root / "mirror.git", origin.url, name="shop")
            await mirror.fetch()
            metrics = Metrics()
            fleet = MemoryFleet(HOSTS)
            ctx = AppContext(app, store=store, mirror=mirror, fleet=cast(Fleet, fleet),
                             metrics=metrics, health=HealthMonitor(app, session, metrics),
                             rescue=Rescue(app, store=store, jobs=JobStore(store),
                                           mirror=mirror, metrics=metrics))
            ctx.health.evidence_since = float("-inf")
            return Rig(AppSupervisor(ctx), fleet, store, origin)

        yield make
    for store in stores:
        await store.close()


async def first_good_then_new(rig: Rig) -> Deploy:
    """r1 on every host (as a plain deploy would leave it), then a new head's rollout."""
    single = replace(rig.sup.ctx.app, rollout=RolloutConfig())
    steps_app, rig.sup.ctx.app = rig.sup.ctx.app, single
    first = await rig.sup.rollouts.deploy(rig.origin.head(), trigger=Trigger.BRANCH,
                                          actor="deployd")
    await rig.store.set_last_good("shop", first.revision, first.release)
    rig.sup.ctx.app = steps_app
    head = rig.origin.commit({"health.txt": "ok\n", "index.html": "v2\n"}, "Front page v2")
    assert await rig.sup.watcher.fetch()
    await rig.sup.watcher.refresh_head()
    return await rig.sup.rollouts.deploy(head, trigger=Trigger.BRANCH, actor="deployd")


async def test_a_healthy_release_walks_every_step_then_is_last_good(make_rig: MakeRig) -> None:
    rig = await make_rig("1", "50%", "100%")
    record = await first_good_then_new(rig)
    assert rig.on("r2") == ["h1"] and rig.fleet.calls[-1] == ("deploy", "r2", ("h1",))
    assert await rig.rollout_state() == RolloutState.BAKING
    await rig.judge_once()
    assert rig.on("r2") == ["h1", "h2"] and rig.fleet.calls[-1] == ("deploy", "r2", ("h2",))
    await rig.judge_once()
    assert rig.on("r2") == list(HOSTS)
    assert rig.fleet.calls[-1] == ("deploy", "r2", ("h3", "h4"))
    await rig.judge_once()
    assert await rig.rollout_state() == RolloutState.DONE
    state = await rig.store.app_state("shop")
    assert (state.last_good_revision, state.last_good_release) == (record.revision, "r2")
    kinds = [e.kind for e in await rig.store.events("shop")]
    assert kinds.count("rollout.step") == 3 and kinds[-1] == "rollout.done"


async def test_a_bad_canary_goes_back_alone_and_the_others_never_run_it(make_rig: MakeRig) -> None:
    rig = await make_rig("1", "50%", "100%")
    record = await first_good_then_new(rig)
    rollout = await rig.sup.steps.of(record)
    await rig.sup.verdicts.act(Judgement(record, BakeVerdict("bad", "h1 unhealthy"), rollout))
    await settle(rig.sup)
    assert rig.fleet.calls[-2:] == [("deploy", "r2", ("h1",)), ("rollback", "r1", ("h1",))]
    assert rig.on("r1") == list(HOSTS)
    assert await rig.rollout_state() == RolloutState.ROLLED_BACK
    assert await rig.store.is_quarantined("shop", record.revision)
    failed = [e for e in await rig.store.events("shop") if e.kind == "bake.failed"][-1]
    assert (failed.data["step"], failed.data["hosts"]) == (1, ["h1"])
    assert "at step 1/3" in failed.message
    started = [e for e in await rig.store.events("shop") if e.kind == "rollback.started"][-1]
    assert started.message.endswith("; at step 1/3 on h1")


async def test_a_pause_step_waits_for_a_promote(make_rig: MakeRig) -> None:
    rig = await make_rig("1", "pause", "100%")
    await first_good_then_new(rig)
    await rig.judge_once()
    assert await rig.rollout_state() == RolloutState.PAUSED
    for _ in range(3):  # paused: a healthy verdict moves nothing
        await rig.judge_once()
    assert rig.on("r2") == ["h1"]
    await rig.sup.promote("alice")
    await settle(rig.sup)
    assert rig.on("r2") == list(HOSTS)
    assert await rig.rollout_state() == RolloutState.BAKING
    promoted = [e for e in await rig.store.events("shop") if e.kind == "rollout.promoted"]
    assert [e.actor for e in promoted] == ["alice"]


async def test_promote_ends_a_steps_bake_early(make_rig: MakeRig) -> None:
    rig = await make_rig("1", "100%")
    rig.sup.ctx.app = replace(rig.sup.ctx.app, rollout=replace(rig.sup.ctx.app.rollout,
                                                              step_bake=3600.0))
    await first_good_then_new(rig)
    assert await rig.judge_once() is None  # an hour's bake has not ended
    await rig.sup.promote("alice")
    await settle(rig.sup)
    assert rig.on("r2") == list(HOSTS)


async def test_abort_sends_the_new_hosts_back_and_quarantines(make_rig: MakeRig) -> None:
    rig = await make_rig("1", "50%", "100%")
    record = await first_good_then_new(rig)
    await rig.judge_once()
    assert rig.on("r2") == ["h1", "h2"]
    await rig.sup.abort("bob", "checkout is slow")
    await settle(rig.sup)
    assert rig.fleet.calls[-1] == ("rollback", "r1", ("h1", "h2"))
    assert rig.on("r1") == list(HOSTS)
    assert await rig.rollout_state() == RolloutState.ABORTED
    assert await rig.store.is_quarantined("shop", record.revision)
    rollback = (await rig.store.deploys("shop", limit=1))[0]
    assert (rollback.kind, rollback.actor, rollback.trigger) == ("rollback", "bob", "manual")


async def test_promote_or_abort_with_no_rollout_is_a_conflict(make_rig: MakeRig) -> None:
    rig = await make_rig("1", "100%")
    with pytest.raises(Conflict, match="no rollout in progress to promote"):
        await rig.sup.promote("alice")
    with pytest.raises(Conflict, match="no rollout in progress to abort"):
        await rig.sup.abort("alice")


async def test_a_manual_deploy_during_a_rollout_is_a_conflict(make_rig: MakeRig) -> None:
    rig = await make_rig("1", "100%")
    record = await first_good_then_new(rig)
    with pytest.raises(Conflict, match="a rollout is in progress"):
        await rig.sup.request_deploy(record.revision, actor="alice")


async def test_a_step_that_cannot_switch_pauses_and_promote_retries_it(make_rig: MakeRig) -> None:
    rig = await make_rig("1", "50%", "100%")
    await first_good_then_new(rig)
    rig.fleet.unreachable = {"h2"}
    await rig.judge_once()
    assert await rig.rollout_state() == RolloutState.PAUSED
    assert rig.on("r2") == ["h1"]
    rollout = await rig.sup.steps.store.latest("shop")
    assert rollout is not None and "failed to switch" in str(rollout.reason)
    rig.fleet.unreachable = set()
    await rig.sup.promote("alice")
    await settle(rig.sup)
    assert rig.on("r2") == ["h1", "h2"]
    assert await rig.rollout_state() == RolloutState.BAKING


async def test_canary_and_baseline_failing_alike_pause_instead_of_rolling_back(
        make_rig: MakeRig) -> None:
    rig = await make_rig("1", "50%", "100%")
    record = await first_good_then_new(rig)
    rollout = await rig.sup.steps.of(record)
    verdict = BakeVerdict("inconclusive", "unhealthy alike: not the release's fault")
    await rig.sup.verdicts.act(Judgement(record, verdict, rollout))
    assert await rig.rollout_state() == RolloutState.PAUSED
    assert rig.on("r2") == ["h1"] and not await rig.store.is_quarantined("shop", record.revision)


async def test_recovery_opens_the_bake_of_a_step_found_switched(make_rig: MakeRig) -> None:
    rig = await make_rig("1", "50%", "100%")
    record = await first_good_then_new(rig)
    # What a kill during step 2's switch leaves once the switch had reached its hosts:
    await rig.sup.steps.store.update(record.id, state=RolloutState.RUNNING, step=1)
    rig.fleet.current["h2"] = "r2"
    await rig.sup.recovery.recover()
    rollout = await rig.sup.steps.store.latest("shop")
    assert rollout is not None and rollout.state == RolloutState.BAKING
    assert rollout.on_new == ("h1", "h2")


async def test_recovery_undoes_a_step_cut_short(make_rig: MakeRig) -> None:
    rig = await make_rig("1", "75%", "100%")
    record = await first_good_then_new(rig)
    await rig.sup.steps.store.update(record.id, state=RolloutState.RUNNING, step=1)
    rig.fleet.current["h2"] = "r2"  # h3 not yet
    await rig.sup.recovery.recover()
    assert rig.on("r1") == list(HOSTS)
    assert rig.fleet.calls[-1] == ("rollback", "r1", ("h1", "h2"))
    assert await rig.rollout_state() == RolloutState.ABORTED
    after = await rig.store.deploy(record.id)
    assert after.state == "interrupted"
    assert (await rig.store.last_live("shop")).release == "r1"  # type: ignore[union-attr]


async def test_a_paused_app_takes_no_step_until_resumed(make_rig: MakeRig) -> None:
    rig = await make_rig("1", "50%", "100%")
    await first_good_then_new(rig)
    await rig.sup.pause("carol", "freeze")
    for _ in range(3):
        await rig.judge_once()
    assert rig.on("r2") == ["h1"]
    await rig.sup.resume("carol")
    await rig.judge_once()
    assert rig.on("r2") == ["h1", "h2"]
