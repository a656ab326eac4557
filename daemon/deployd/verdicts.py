"""What a verdict on a bake leads to: the one place a bad release becomes a rollback.

    good    -> last good release; a rescue job whose head it was is done
    no_data -> pause: nobody can tell whether it works, a human decides
    bad     -> policy.respond_to_bad: quarantine, then roll back to last good (once), or pause
               when that is impossible or the rollback itself is bad; after a rollback a
               rescue job is proposed
"""

from __future__ import annotations

from deployd import policy
from deployd.context import SYSTEM_ACTOR, AppContext, short
from deployd.errors import Conflict
from deployd.judge import BakeJudge, Judgement
from deployd.operations import OperationSlot
from deployd.rescue_flow import RescueFlow
from deployd.rollouts import Rollouts
from deployd.store import Deploy
from deployd.vocabulary import BakeState, DeployState, EventKind, Trigger
from deployd.watcher import BranchWatcher


class Verdicts:
    def __init__(self, ctx: AppContext, *, slot: OperationSlot, watcher: BranchWatcher,
                 rollouts: Rollouts, judge: BakeJudge, rescue_flow: RescueFlow) -> None:
        self.ctx = ctx
        self.slot = slot
        self.watcher = watcher
        self.rollouts = rollouts
        self.judge = judge
        self.rescue_flow = rescue_flow

    async def act(self, judgement: Judgement) -> None:
        record, verdict = judgement.record, judgement.verdict
        self.ctx.metrics.bake_verdicts_total.labels(app=self.ctx.name,
                                                    verdict=verdict.verdict).inc()
        if verdict.verdict == "good":
            await self._good(record)
        elif verdict.verdict == "no_data":
            await self._no_data(record, verdict.reason)
        else:
            await self._bad(record, verdict.reason)

    async def _good(self, record: Deploy) -> None:
        ctx = self.ctx
        await ctx.store.update_deploy(record.id, bake_state=BakeState.GOOD)
        # A rollback that bakes healthy makes its release the newest good one: an operator
        # who rolled away from a release should not be sent back to it automatically.
        await ctx.store.set_last_good(ctx.name, record.revision, record.release)
        await ctx.event(EventKind.BAKE_HEALTHY,
                        f"{short(record.revision)} healthy through its bake "
                        "window", revision=record.revision, data={"deploy": record.id})
        job = await ctx.rescue.job_for_record(record)
        if job is not None:
            await ctx.rescue.finish(job, healthy=True, reason="")
        await self.watcher.update_pristine()

    async def _no_data(self, record: Deploy, reason: str) -> None:
        ctx = self.ctx
        await ctx.store.update_deploy(record.id, bake_state=BakeState.BAD)
        job = await ctx.rescue.job_for_record(record)
        if job is not None:
            await ctx.rescue.fail(job, f"cannot judge the rebuilt head: {reason}")
        await ctx.pause(SYSTEM_ACTOR, f"cannot judge {short(record.revision)}: {reason}; "
                        "a human must decide")

    async def _bad(self, record: Deploy, reason: str) -> None:
        await self.ctx.store.update_deploy(record.id, bake_state=BakeState.BAD)
        await self.ctx.event(EventKind.BAKE_FAILED,
                             f"{short(record.revision)} is unhealthy: {reason}"
                             + self.judge.failing_checks(), revision=record.revision,
                             data={"deploy": record.id, "health": self.judge.health_detail()})
        await self.act_on_bad(record, reason)

    async def act_on_bad(self, record: Deploy, reason: str) -> None:
        """Quarantine and roll back a bad release (or pause when that is not possible).

        A rescue deploy's job fails once that is done, whichever way it went.
        """
        ctx = self.ctx
        state = await ctx.store.app_state(ctx.name)
        response = policy.respond_to_bad(
            kind=record.kind, release=record.release, paused=state.paused,
            auto_rollback=ctx.app.rollback.auto, last_good_release=state.last_good_release,
            previous_release=record.previous_release)
        if response.quarantine:
            await self.rollouts.quarantine(record.revision, reason, SYSTEM_ACTOR)
        if response.action == "pause":
            await ctx.pause(SYSTEM_ACTOR, response.reason)
        elif response.action == "skip":
            await ctx.event(EventKind.ROLLBACK_SKIPPED, response.reason, revision=record.revision)
        else:
            assert response.target is not None
            try:
                # An operation like any other: it holds the app's slot (no REST deploy
                # interleaves) and a shutdown lets it finish instead of cancelling it.
                await self.slot.spawn(self._roll_back(record, response.target, reason),
                                      "rollback")
                return
            except Conflict as exc:
                await ctx.event(EventKind.ROLLBACK_SKIPPED, f"not rolling back by itself: {exc}",
                                revision=record.revision)
        await self._fail_job(record, reason)

    async def _roll_back(self, record: Deploy, target: str, reason: str) -> None:
        try:
            rollback = await self.rollouts.rollback(target, trigger=Trigger.HEALTH,
                                                    actor=SYSTEM_ACTOR, reason=reason)
        finally:
            job_failed = await self._fail_job(record, reason)
        if rollback.state != DeployState.SUCCEEDED:
            # Some hosts may still run the bad release: a human must look now.
            await self.ctx.pause(SYSTEM_ACTOR, f"automatic rollback to {target} failed: "
                                 f"{rollback.error}")
        elif not job_failed:
            await self.rescue_flow.open_after_rollback(rollback, reason)

    async def _fail_job(self, record: Deploy, reason: str) -> bool:
        """End the rescue job whose rebuilt head was bad; False when it was none's."""
        job = await self.ctx.rescue.job_for_record(record)
        if job is None:
            return False
        await self.ctx.rescue.finish(job, healthy=False,
                                     reason=f"the rebuilt head was unhealthy: {reason}")
        return True
