"""One app's life: watch the branch, deploy new heads, bake them, roll back bad ones.

The supervisor composes single-purpose parts and runs their loop; data flows one way:

    watcher   (watcher.py)      fetch the mirror, follow the branch head, pristine or not
      -> rollouts (rollouts.py)  deploy a new head (deploy mode), record, open its bake
         or observer (observer.py) record releases another tool made live (observe mode)
      -> judge    (judge.py)     the live release's bake -> policy.judge_bake -> a judgement
      -> verdicts (verdicts.py)  good: last good; bad: quarantine + roll back (once) or pause
      -> rescue   (rescue_flow.py) propose a job after a rollback; an approved job's
                                   transplant returns a head that rollouts deploys

`recovery.py` finishes or undoes what a killed daemon left in flight before the loop starts;
`operations.py` keeps one operation (deploy, rollback, transplant) at a time per app, each in
a task of its own; `views.py` renders the app for REST. Every step is recorded in the store
before it is acted on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from deployd import policy
from deployd.config import AppConfig
from deployd.context import SYSTEM_ACTOR, AppContext, short
from deployd.errors import Conflict, Invalid
from deployd.git import Mirror
from deployd.health import HealthChange, HealthMonitor
from deployd.judge import BakeJudge
from deployd.observer import ReleaseObserver
from deployd.operations import OperationSlot
from deployd.recovery import Recovery
from deployd.rescue import Rescue
from deployd.rescue_flow import RescueFlow
from deployd.rollouts import Rollouts
from deployd.store import Deploy
from deployd.verdicts import Verdicts
from deployd.views import AppViews
from deployd.vocabulary import EventKind, Trigger
from deployd.watcher import BranchWatcher

log = logging.getLogger("deployd.supervisor")
T = TypeVar("T")


class AppSupervisor:
    """Runs one app: its poll loop, its operations and its bake judgements."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._wake = asyncio.Event()
        self._recheck = False
        self.slot = OperationSlot(ctx.name, on_done=self._operation_done)
        self.watcher = BranchWatcher(ctx)
        self.rollouts = Rollouts(ctx, on_quarantined=self.watcher.update_pristine)
        self.observer = ReleaseObserver(ctx, slot=self.slot, rollouts=self.rollouts)
        self.judge = BakeJudge(ctx)
        self.rescue_flow = RescueFlow(ctx, slot=self.slot, watcher=self.watcher,
                                      rollouts=self.rollouts)
        self.verdicts = Verdicts(ctx, slot=self.slot, watcher=self.watcher,
                                 rollouts=self.rollouts, judge=self.judge,
                                 rescue_flow=self.rescue_flow)
        self.recovery = Recovery(ctx, slot=self.slot, rollouts=self.rollouts, judge=self.judge,
                                 verdicts=self.verdicts, rescue_flow=self.rescue_flow)
        self.views = AppViews(ctx, slot=self.slot, watcher=self.watcher)
        self.summary = self.views.summary
        self.detail = self.views.detail
        self.open_job = self.rescue_flow.open_job
        self.approve_job = self.rescue_flow.approve_job

    @property
    def name(self) -> str:
        return self.ctx.name

    @property
    def app(self) -> AppConfig:
        return self.ctx.app

    @property
    def mirror(self) -> Mirror:
        return self.ctx.mirror

    @property
    def health(self) -> HealthMonitor:
        return self.ctx.health

    @property
    def rescue(self) -> Rescue:
        return self.ctx.rescue

    @property
    def fetched(self) -> bool:
        return self.watcher.fetched

    @property
    def busy(self) -> str | None:
        """What operation is running now, if any."""
        return self.slot.busy

    def wake(self) -> None:
        """Re-run the loop now (a health change, a resume)."""
        self._wake.set()

    def request_fetch(self) -> None:
        """Fetch at the next round, now if idle (a webhook announced a push).

        Requests made while one is pending or a fetch runs coalesce into one more fetch.
        """
        self.watcher.request_fetch()
        self._wake.set()

    def _operation_done(self) -> None:
        # A head noticed while the slot was held is deployed now, not a poll later.
        self._recheck = True
        self.wake()

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Recover, then poll and judge until stopped.

        A failure in one round (the store, a bug) is logged and the round retried after a
        pause: an app's supervision must never end while the daemon runs.
        """
        while not self.slot.stopping:
            try:
                await self.recovery.recover()
                break
            except Exception:
                # Acting before recovery could redo what a killed daemon left half done.
                log.exception("%s: recovery failed; retrying in 5 seconds", self.name)
                await asyncio.sleep(5.0)
        # Open every host's connection now, so the first rollback pays no handshake.
        await self._guarded("connecting to hosts", self.ctx.fleet.connect)
        while not self.slot.stopping:
            await self._round()

    async def _round(self) -> None:
        # Cleared before this round, not after: a health change announced while the round
        # awaits must wake the next one at once, not wait for the timer.
        self._wake.clear()
        clock = self.ctx.clock
        if clock() >= self.watcher.next_poll():
            self.watcher.start_poll(clock())
            self._recheck = False
            await self._guarded("poll", self.poll)
        elif self._recheck:
            self._recheck = False
            await self._guarded("deploy check", self._deploy_head)
        await self._guarded("judging", self._judge)
        timeout = await self._guarded("bake timer", self.judge.next_check) or 1.0
        timeout = max(0.0, min(self.watcher.next_poll() - clock(), timeout))
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _guarded(self, what: str, step: Callable[[], Awaitable[T]]) -> T | None:
        try:
            return await step()
        except Exception:
            log.exception("%s: %s failed; retrying in a second", self.name, what)
            await asyncio.sleep(1.0)
            return None

    async def stop(self, grace: float) -> None:
        """Take no new work; let a running operation finish within `grace`, then cancel."""
        self._wake.set()
        await self.slot.stop(grace)

    async def poll(self) -> None:
        """Fetch the mirror, notice the head, and deploy or observe."""
        if not await self.watcher.fetch():
            return
        head = await self.watcher.refresh_head()
        await self.ctx.rescue.housekeeping(head)
        if not self.slot.held:
            await self.rescue_flow.resume_jobs()  # approved jobs a restart left waiting
        if self.ctx.app.mode == "observe":
            await self.observer.observe()
        else:
            await self._deploy_head()

    async def _deploy_head(self) -> None:
        """Deploy the branch head when policy says so (deploy mode)."""
        ctx, head = self.ctx, self.watcher.head
        if ctx.app.mode != "deploy":
            return
        state = await ctx.store.app_state(ctx.name)
        live = await ctx.store.last_live(ctx.name)
        decision = policy.should_deploy(
            head, paused=state.paused,
            quarantined=head is not None and await ctx.store.is_quarantined(ctx.name, head),
            live=live.revision if live else None, attempted=self.rollouts.attempted)
        if not decision.deploy or head is None or self.slot.held:
            return
        await self.slot.spawn(
            self.rollouts.deploy(head, trigger=Trigger.BRANCH, actor=SYSTEM_ACTOR), "deploy")

    async def _judge(self) -> None:
        if self.slot.held:
            return  # an operation in flight opens a new bake when it ends
        judgement = await self.judge.judge()
        if judgement is not None:
            await self.verdicts.act(judgement)

    # -- REST actions --------------------------------------------------------------------

    async def request_deploy(self, revision: str, *, actor: str, force: bool = False) -> Deploy:
        """Deploy a revision now (REST); returns the record of the deploy just started.

        A quarantined revision, or one the branch does not hold, needs `force` (Invalid
        otherwise); what force overrode is recorded with the deploy.
        """
        if self.ctx.app.mode == "observe":
            raise Conflict(f"{self.name} is in observe mode: another tool deploys it "
                           "(rollbacks still work)")
        sha = await self.ctx.mirror.resolve_strict(revision)
        reasons = await self.rollouts.needs_force(sha)
        if reasons and not force:
            raise Invalid(f"{self.name}: {revision} ({short(sha)}) is {' and '.join(reasons)}; "
                          'deploy it anyway with "force": true')
        started: asyncio.Future[Deploy] = asyncio.get_running_loop().create_future()
        await self.slot.spawn(self.rollouts.deploy(sha, trigger=Trigger.MANUAL, actor=actor,
                                                   started=started,
                                                   forced="; ".join(reasons) or None),
                              "deploy", started)
        return await started

    async def request_rollback(self, release: str | None, *, actor: str,
                               reason: str = "requested") -> Deploy:
        """Roll back to `release` or to the previous one (REST)."""
        store = self.ctx.store
        if release is None:
            live = await store.last_live(self.name)
            history = await store.deploys(self.name, limit=200)
            release = policy.previous_release(history, live.release if live else None)
            if release is None:
                raise Conflict(f"{self.name}: no previous release on record to roll back to")
        await self.rollouts.release_revision(release)  # NotFound before anything starts
        started: asyncio.Future[Deploy] = asyncio.get_running_loop().create_future()
        await self.slot.spawn(
            self.rollouts.rollback(release, trigger=Trigger.MANUAL, actor=actor, reason=reason,
                                   started=started),
            "rollback", started)
        return await started

    async def pause(self, actor: str, reason: str) -> None:
        await self.ctx.pause(actor, reason)

    async def resume(self, actor: str, reason: str = "") -> None:
        await self.ctx.store.set_paused(self.name, False, actor=actor, reason=reason)
        self.ctx.metrics.paused.labels(app=self.name).set(0)
        self.rollouts.attempted = None
        await self.ctx.event(EventKind.APP_RESUMED, f"resumed by {actor}"
                             + (f": {reason}" if reason else ""), actor=actor)
        self.wake()

    async def on_health_change(self, change: HealthChange) -> None:
        """Record a host's (or metric check's) health turning, and re-judge at once."""
        word = "healthy" if change.healthy else "unhealthy"
        await self.ctx.event(EventKind.HEALTH_CHANGED, f"{change.subject} is {word}"
                             + (": " + "; ".join(change.reasons) if change.reasons else ""),
                             data={"subject": change.subject, "healthy": change.healthy})
        self.wake()
