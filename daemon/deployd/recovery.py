"""Start-up: finish or undo what a killed daemon left in flight, then resume bakes and jobs.

Every operation is recorded before it touches a host, so a record still `running` at start-up
is one a crash cut short; `policy.recover_operation` says what to do with it from what the
hosts show now.
"""

from __future__ import annotations

from deployd import policy
from deployd.context import AppContext, short
from deployd.errors import DeploydError
from deployd.judge import BakeJudge
from deployd.operations import OperationSlot
from deployd.progressive import Steps, step_label
from deployd.rescue_flow import RescueFlow
from deployd.rollout_store import Rollout
from deployd.rollouts import Rollouts
from deployd.store import Deploy
from deployd.verdicts import Verdicts
from deployd.vocabulary import BakeState, DeployKind, DeployState, EventKind, RolloutState, Trigger


class Recovery:
    def __init__(self, ctx: AppContext, *, slot: OperationSlot, rollouts: Rollouts,
                 steps: Steps, judge: BakeJudge, verdicts: Verdicts,
                 rescue_flow: RescueFlow) -> None:
        self.ctx = ctx
        self.slot = slot
        self.rollouts = rollouts
        self.steps = steps
        self.judge = judge
        self.verdicts = verdicts
        self.rescue_flow = rescue_flow

    async def recover(self) -> None:
        """Finish or undo what a killed daemon left running, then resume bakes."""
        ctx = self.ctx
        self._init_series()
        state = await ctx.store.app_state(ctx.name)
        ctx.metrics.paused.labels(app=ctx.name).set(1 if state.paused else 0)
        live = await ctx.store.last_live(ctx.name)
        if live is not None:
            ctx.metrics.set_live_revision(ctx.name, live.revision)
        running = await ctx.store.deploys(ctx.name, state=DeployState.RUNNING, limit=20)
        if running:
            # Held like any operation: a REST deploy meanwhile is a 409, not a race on hosts.
            async with self.slot.hold("recovery"):
                for record in running:
                    await self._recover_operation(record)
        rollout = await self.steps.active()
        if rollout is not None and rollout.state is RolloutState.RUNNING:
            async with self.slot.hold("recovery"):
                await self._recover_step(rollout)
        self.steps.publish(await self.steps.active())
        # The last head deployd tried by itself: a later manual deploy or rollback must not
        # make a restart deploy that head again over what the operator chose.
        self.rollouts.attempted = next((record.revision for record in await ctx.store.deploys(
            ctx.name, kind=DeployKind.DEPLOY, limit=200) if record.trigger != Trigger.MANUAL), None)
        await self._resume_bake()
        await self._roll_back_unfinished_verdict()
        await self.rescue_flow.resume_jobs()

    def _init_series(self) -> None:
        """Create every per-app counter at 0, so `increase()` sees the first event too."""
        metrics, app = self.ctx.metrics, self.ctx.name
        for result in ("succeeded", "failed", "observed"):
            metrics.deploys_total.labels(app=app, result=result)
        for trigger in ("manual", "health"):
            metrics.rollbacks_total.labels(app=app, trigger=trigger)
        for verdict in ("good", "bad", "no_data"):
            metrics.bake_verdicts_total.labels(app=app, verdict=verdict)
        for outcome in ("pass", "fail", "inconclusive"):
            metrics.analysis_verdicts_total.labels(app=app, verdict=outcome)
        metrics.git_fetch_errors_total.labels(app=app)

    async def _resume_bake(self) -> None:
        baking = await self.judge.baking()
        if baking is None or baking.bake_until is None:
            return
        # We were not watching while down: observe again before calling it good.
        ctx = self.ctx
        floor = ctx.clock() + ctx.app.rollback.grace + self.judge.observation_time()
        if baking.bake_until < floor:
            await ctx.store.update_deploy(baking.id, bake_until=floor)
        await ctx.event(EventKind.BAKE_RESUMED,
                        f"resuming the bake of {short(baking.revision)} after "
                        "a restart", revision=baking.revision)

    async def _roll_back_unfinished_verdict(self) -> None:
        """A release judged bad just before a crash, with no rollback begun: act on it now."""
        ctx = self.ctx
        live = await ctx.store.last_live(ctx.name)
        newest = await ctx.store.deploys(ctx.name, limit=1)
        if live is None or live.bake_state != BakeState.BAD \
                or live.kind == DeployKind.ROLLBACK or not newest or newest[0].id != live.id:
            return
        if (await ctx.store.app_state(ctx.name)).paused:
            return  # the verdict already asked a human (no data, nothing to roll back to)
        await ctx.event(EventKind.BAKE_RESUMED,
                        f"{short(live.revision)} was judged unhealthy before a "
                        "restart and not rolled back yet", revision=live.revision)
        await self.verdicts.act_on_bad(live, "judged unhealthy before a restart")

    async def _recover_operation(self, record: Deploy) -> None:
        ctx = self.ctx
        states = await ctx.fleet.state()
        rollout = await self.steps.of(record)
        # A rollout's first step switches only its own hosts: the others are not its to judge.
        hosts = list(rollout.steps[0].hosts) if rollout is not None else list(states)
        reachable = {h: s for h, s in states.items()
                     if h in hosts and not isinstance(s, DeploydError)}
        plan = policy.recover_operation(
            kind=record.kind, hosts=hosts, reachable=reachable,
            on_new=[h for h, s in reachable.items() if s.current_revision == record.revision],
            previous_release=record.previous_release)
        if plan.action == "rollback_complete":
            # Grace included: the hosts restarted on it just before the crash.
            await ctx.store.update_deploy(record.id, state=DeployState.SUCCEEDED,
                                          **self.rollouts.open_bake())
            await ctx.event(EventKind.ROLLBACK_RECOVERED, "rollback found complete after a restart")
        elif plan.action == "finish_rollback":
            # Hosts already rolled back ran their hooks and logged it: do only the others.
            await ctx.event(EventKind.ROLLBACK_RESUMED,
                            f"finishing rollback to {record.release} after "
                            f"a restart on {', '.join(plan.hosts)}")
            await self.rollouts.run_rollback(record, reason="resumed after a restart",
                                             hosts=list(plan.hosts))
        elif plan.action == "deploy_complete":
            release = next(iter(reachable.values())).current
            bake = rollout.steps[0].bake if rollout is not None else None
            record = await ctx.store.update_deploy(record.id, state=DeployState.SUCCEEDED,
                                                   release=release,
                                                   **self.rollouts.open_bake(bake))
            await ctx.event(EventKind.DEPLOY_RECOVERED, f"deploy of {short(record.revision)} found "
                            "complete after a restart", revision=record.revision)
            if rollout is not None:
                await self.steps.switched(record, rollout)
        else:
            await self._interrupted(record, list(plan.hosts))
            if rollout is not None:
                await self.steps.end(record, rollout, RolloutState.ABORTED,
                                     "interrupted by a daemon restart")

    async def _recover_step(self, rollout: Rollout) -> None:
        """A later step was switching when the daemon died: its bake opens if every one of
        its hosts switched; otherwise every host on the new release goes back."""
        ctx = self.ctx
        record = await ctx.store.deploy(rollout.deploy_id)
        step = rollout.steps[rollout.step]
        states = await ctx.fleet.state()
        on_new = [h for h, s in states.items()
                  if not isinstance(s, DeploydError) and s.current_revision == record.revision]
        if set(step.hosts) <= set(on_new):
            record = await ctx.store.update_deploy(record.id,
                                                   **self.rollouts.open_bake(step.bake))
            await ctx.event(EventKind.ROLLOUT_RECOVERED,
                            f"{step_label(rollout)} found switched after "
                            "a restart", revision=record.revision, data={"deploy": record.id})
            await self.steps.switched(record, rollout)
            return
        await self._interrupted(record, on_new)
        await self.steps.end(record, rollout, RolloutState.ABORTED,
                             "interrupted by a daemon restart while switching hosts")

    async def _interrupted(self, record: Deploy, switched: list[str]) -> None:
        """A deploy cut short: hosts it switched go back, and it is recorded interrupted."""
        ctx = self.ctx
        error = "interrupted by a daemon restart"
        if switched:
            await ctx.event(EventKind.DEPLOY_INTERRUPTED, f"hosts split after a restart "
                            f"({', '.join(switched)} on {short(record.revision)}); "
                            "switching them back")
            error = await self.rollouts.switch_back(record, switched, error)
        await ctx.store.update_deploy(record.id, state=DeployState.INTERRUPTED, error=error)
        await ctx.event(EventKind.DEPLOY_FAILED, f"deploy of {short(record.revision)}: {error}",
                        revision=record.revision)
