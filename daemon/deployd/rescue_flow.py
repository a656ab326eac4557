"""Rescue jobs in an app's life: opening one, approving it, and deploying what it rebuilt.

`rescue.Rescue` owns a job's content (selection, patch, plan, the transplant itself); this
flow decides when those run: an approval takes the operation slot before it is recorded,
the transplant returns the new head, and the head is deployed like any other, so its bake
decides the job's end.
"""

from __future__ import annotations

from deployd.context import SYSTEM_ACTOR, AppContext, short
from deployd.errors import Conflict, DeploydError, Invalid
from deployd.operations import OperationSlot
from deployd.rollouts import Rollouts
from deployd.store import Deploy, Job
from deployd.vocabulary import BakeState, DeployState, EventKind, Trigger
from deployd.watcher import BranchWatcher


class RescueFlow:
    def __init__(self, ctx: AppContext, *, slot: OperationSlot, watcher: BranchWatcher,
                 rollouts: Rollouts) -> None:
        self.ctx = ctx
        self.slot = slot
        self.watcher = watcher
        self.rollouts = rollouts

    async def open_job(self, *, commits: list[str], base: str | None, actor: str) -> Job:
        """Open a rescue job by hand: base (default last good) + the named commits."""
        ctx = self.ctx
        await self.watcher.fresh_fetch()
        head = await ctx.mirror.branch_head(ctx.app.branch)
        if head is None:
            raise Conflict(f"{ctx.name}: branch {ctx.app.branch} does not exist")
        state = await ctx.store.app_state(ctx.name)
        if base is None:
            base = state.last_good_revision
            if base is None:
                raise Invalid(f"{ctx.name}: no last good revision on record; name a base")
        await ctx.rescue.check_base(base, head=head, last_good=state.last_good_revision)
        return await ctx.rescue.open(base=base, bad_head=head, requester=actor,
                                     reason=f"opened by {actor}", commits=commits)

    async def open_after_rollback(self, rollback: Deploy, reason: str) -> None:
        """Queue the rescue proposal: the live (good) revision + the marked commits."""
        head = self.watcher.head
        if head is None or rollback.revision == "unknown":
            return
        try:
            await self.ctx.rescue.open(base=rollback.revision, bad_head=head,
                                       requester=SYSTEM_ACTOR, reason=reason)
        except DeploydError as exc:
            await self.ctx.event(EventKind.JOB_NOT_OPENED,
                                 f"no rescue job opened: {exc}", revision=head)

    async def approve_job(self, job: Job, *, plan: str, actor: str, comment: str) -> Job:
        """Approve exactly `plan` and start the transplant; 409 if anything moved."""
        ctx, rescue = self.ctx, self.ctx.rescue
        await rescue.check_approval(job, plan=plan, actor=actor)
        if await self.rollouts.steps.active() is not None:
            raise Conflict(f"{ctx.name}: a rollout is in progress; promote or abort it before "
                           "approving a rescue job")
        # Hold the operation slot from before the approval is recorded until the transplant
        # runs: nothing (a poll resuming jobs, a REST deploy) can slip in between.
        await self.slot.reserve("transplant")
        try:
            if not await self.watcher.fetch():
                raise Conflict(f"{ctx.name}: cannot reach the remote to check the branch "
                               f"({self.watcher.fetch_error}); nothing approved, try again")
            head = await ctx.mirror.branch_head(ctx.app.branch)
            if head != job.bad_head:
                await rescue.housekeeping(head)
                raise Conflict(f"rescue job {job.id} superseded: {ctx.app.branch} moved to "
                               f"{short(head)} since the job was built")
            approved = await rescue.approve(job, plan=plan, actor=actor, comment=comment)
        except BaseException:
            self.slot.release()
            raise
        await self.slot.spawn(self._transplant_and_deploy(approved, actor), "transplant",
                              reserved=True)
        return approved

    async def _transplant_and_deploy(self, job: Job, approver: str) -> None:
        rescue = self.ctx.rescue
        try:
            new_head = await rescue.transplant(job, approver=approver)
        except Exception as exc:
            # Superseded jobs were ended by rescue (nothing overwritten); anything else fails
            # the job here, so no job stays `running` with nothing behind it.
            await rescue.fail(job, f"transplant failed: {exc}")
            if not isinstance(exc, DeploydError):
                raise
            return
        self.watcher.head = new_head
        record = await self.rollouts.deploy(
            new_head, trigger=Trigger.RESCUE, actor=approver,
            on_start=lambda r: rescue.jobs.update(job.id, deploy_id=r.id))
        if record.state != "succeeded":
            await rescue.fail(job, f"deploy of {short(new_head)} failed: {record.error}")

    async def resume_jobs(self) -> None:
        """Carry on with transplants a killed daemon left approved or running."""
        ctx, rescue = self.ctx, self.ctx.rescue
        for job in await rescue.in_flight():
            if job.deploy_id is not None:
                await self._settle(job, await ctx.store.deploy(job.deploy_id))
                continue  # otherwise its bake carries on like any other
            approvals = [a for a in await rescue.jobs.approvals(job.id)
                         if a.decision == "approve"]
            approver = approvals[-1].actor if approvals else SYSTEM_ACTOR
            await ctx.event(EventKind.JOB_RESUMED, f"job {job.id}: resuming the transplant after a "
                            "restart", data={"job": job.id})
            await self.slot.spawn(self._transplant_and_deploy(job, approver), "transplant")
            return  # one operation at a time; the next poll picks up any other

    async def _settle(self, job: Job, record: Deploy) -> None:
        """End a job whose deploy ended while the daemon was down (a bake still open waits)."""
        rescue = self.ctx.rescue
        if record.state in (DeployState.FAILED, DeployState.INTERRUPTED):
            await rescue.fail(job, f"deploy of {short(record.revision)} {record.state}: "
                              f"{record.error}")
        elif record.bake_state == BakeState.GOOD:
            await rescue.finish(job, healthy=True, reason="")
        elif record.bake_state in (BakeState.BAD, BakeState.SKIPPED):
            what = "unhealthy" if record.bake_state == BakeState.BAD else "replaced"
            await rescue.fail(job, f"deploy of {short(record.revision)} was {what}")
