"""What a verdict on a bake leads to: the one place a bad release becomes a rollback.

    good    -> last good release; a rescue job whose head it was is done
    no_data -> pause: nobody can tell whether it works, a human decides
    bad     -> policy.respond_to_bad: quarantine, then roll back to last good (once), or pause
               when that is impossible or the rollback itself is bad; after a rollback a
               rescue job is proposed
"""

from __future__ import annotations

import contextlib

from deployd import policy
from deployd.context import SYSTEM_ACTOR, AppContext, short
from deployd.errors import Conflict, DeploydError
from deployd.judge import BakeJudge, Judgement
from deployd.operations import OperationSlot
from deployd.progressive import Steps, next_step, step_label
from deployd.rescue_flow import RescueFlow
from deployd.rollout_store import Rollout
from deployd.rollouts import Rollouts
from deployd.store import Deploy
from deployd.vocabulary import BakeState, DeployState, EventKind, RolloutState, Trigger
from deployd.watcher import BranchWatcher


class Verdicts:
    def __init__(self, ctx: AppContext, *, slot: OperationSlot, watcher: BranchWatcher,
                 rollouts: Rollouts, steps: Steps, judge: BakeJudge,
                 rescue_flow: RescueFlow) -> None:
        self.ctx = ctx
        self.steps = steps
        self.slot = slot
        self.watcher = watcher
        self.rollouts = rollouts
        self.judge = judge
        self.rescue_flow = rescue_flow

    async def act(self, judgement: Judgement) -> None:
        record, verdict, rollout = judgement.record, judgement.verdict, judgement.rollout
        if rollout is not None and verdict.verdict == "inconclusive":
            await self.steps.pause(record, rollout, verdict.reason)
            return
        if rollout is not None and verdict.verdict == "good" and not rollout.last_step:
            if not (await self.ctx.store.app_state(self.ctx.name)).paused:
                # A paused app takes no step by itself; it goes on once resumed.
                await self._step_passed(record, rollout, "healthy through its bake")
            return
        self.ctx.metrics.bake_verdicts_total.labels(app=self.ctx.name,
                                                    verdict=verdict.verdict).inc()
        if verdict.verdict == "good":
            await self._good(record)
            if rollout is not None:
                await self.steps.end(record, rollout, RolloutState.DONE, "every step healthy")
        elif verdict.verdict == "no_data":
            await self._no_data(record, verdict.reason)
        else:
            await self._bad(record, verdict.reason, rollout)

    async def _step_passed(self, record: Deploy, rollout: Rollout, how: str) -> None:
        following = await self.steps.passed(record, rollout, how)
        if following is not None:
            await self.slot.spawn(self._switch(record, following, SYSTEM_ACTOR), "rollout step")

    async def _switch(self, record: Deploy, index: int, actor: str) -> None:
        with contextlib.suppress(DeploydError):  # the step paused the rollout, saying why
            await self.steps.switch(record, index, actor=actor)

    # -- a human's verdicts on a rollout -------------------------------------------------

    async def promote(self, actor: str) -> Rollout:
        """Go on past a pause, retry a step that failed to switch, or end a step's bake
        early as if it had passed (the last step's: the release is good now)."""
        rollout = await self.steps.require_active("promote")
        record = await self.ctx.store.deploy(rollout.deploy_id)
        await self.slot.reserve("rollout step")
        try:
            await self.ctx.event(EventKind.ROLLOUT_PROMOTED, f"{step_label(rollout)} of "
                                 f"{short(record.revision)} promoted by {actor}", actor=actor,
                                 revision=record.revision, data={"deploy": record.id})
            index = next_step(rollout)
            if index == len(rollout.steps):
                await self._good(record)
                await self.steps.end(record, rollout, RolloutState.DONE,
                                     f"promoted by {actor}", actor=actor)
            elif index > rollout.step and not rollout.steps[rollout.step].pause:
                following = await self.steps.passed(record, rollout, f"promoted by {actor}")
                if following is not None:
                    await self.slot.spawn(self._switch(record, following, actor),
                                          "rollout step", reserved=True)
                    return await self.steps.store.get(record.id)
            else:
                await self.slot.spawn(self._switch(record, index, actor), "rollout step",
                                      reserved=True)
                return await self.steps.store.get(record.id)
        except BaseException:
            self.slot.release()
            raise
        self.slot.release()
        return await self.steps.store.get(record.id)

    async def abort(self, actor: str, reason: str) -> Rollout:
        """Roll the rollout's new hosts back to last good now and quarantine the revision."""
        rollout = await self.steps.require_active("abort")
        record = await self.ctx.store.deploy(rollout.deploy_id)
        target = rollout.baseline_release
        if target is None and rollout.on_new:
            raise Conflict(f"{self.ctx.name}: no release to roll back to (the first deploy); "
                           "pause the app and deploy another revision instead")
        await self.slot.reserve("rollback")
        try:
            why = f"aborted by {actor}" + (f": {reason}" if reason else "")
            rollout = await self.steps.end(record, rollout, RolloutState.ABORTED, why,
                                           actor=actor)
            await self.ctx.store.update_deploy(record.id, bake_state=BakeState.BAD)
            await self.rollouts.quarantine(record.revision, why, actor)
        except BaseException:
            self.slot.release()
            raise
        if target is None:
            self.slot.release()
            return rollout
        await self.slot.spawn(self.rollouts.rollback(target, trigger=Trigger.MANUAL, actor=actor,
                                                     reason=why, hosts=list(rollout.on_new)),
                              "rollback", reserved=True)
        return rollout

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

    async def _bad(self, record: Deploy, reason: str, rollout: Rollout | None) -> None:
        await self.ctx.store.update_deploy(record.id, bake_state=BakeState.BAD)
        where = f" at {step_label(rollout)}" if rollout is not None else ""
        await self.ctx.event(EventKind.BAKE_FAILED,
                             f"{short(record.revision)} is unhealthy{where}: "
                             f"{reason}" + self.judge.failing_checks(), revision=record.revision,
                             data={"deploy": record.id, "health": self.judge.health_detail(),
                                   **_step_data(rollout)})
        await self.act_on_bad(record, reason, rollout)

    async def act_on_bad(self, record: Deploy, reason: str,
                         rollout: Rollout | None = None) -> None:
        """Quarantine and roll back a bad release (or pause when that is not possible).

        In a rollout only the hosts on the new release go back, to the release the others
        still run. A rescue deploy's job fails once that is done, whichever way it went.
        """
        ctx = self.ctx
        state = await ctx.store.app_state(ctx.name)
        response = policy.respond_to_bad(
            kind=record.kind, release=record.release, paused=state.paused,
            auto_rollback=ctx.app.rollback.auto,
            last_good_release=rollout.baseline_release if rollout else state.last_good_release,
            previous_release=record.previous_release)
        if rollout is not None:
            await self.steps.end(record, rollout, RolloutState.ROLLED_BACK, reason)
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
                hosts = list(rollout.on_new) if rollout is not None else None
                where = f"; at {step_label(rollout)} on {', '.join(rollout.on_new)}" \
                    if rollout is not None else ""
                await self.slot.spawn(self._roll_back(record, response.target, reason + where,
                                                      hosts), "rollback")
                return
            except Conflict as exc:
                await ctx.event(EventKind.ROLLBACK_SKIPPED, f"not rolling back by itself: {exc}",
                                revision=record.revision)
        await self._fail_job(record, reason)

    async def _roll_back(self, record: Deploy, target: str, reason: str,
                         hosts: list[str] | None) -> None:
        try:
            rollback = await self.rollouts.rollback(target, trigger=Trigger.HEALTH,
                                                    actor=SYSTEM_ACTOR, reason=reason,
                                                    hosts=hosts)
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


def _step_data(rollout: Rollout | None) -> dict[str, object]:
    """Event data naming the step and the hosts a rollout's verdict was about."""
    if rollout is None:
        return {}
    return {"step": rollout.step + 1, "hosts": list(rollout.on_new)}
