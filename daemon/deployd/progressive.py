"""Progressive rollouts (deploy mode): a deploy that reaches the fleet in steps.

    step 1: the first hosts in config order (the canaries) switch; their bake is judged
    step k: more hosts switch to the same release, then bake; a `pause` step waits for promote
    last:   every host is on the new release; it bakes for `rollback.bake` like any deploy

Each step is written before it touches a host and after (`rollout_store`); the deploy
record's bake window is the current step's, and the judge judges only the hosts on the new
release (against the others, with `compare`). A bad step rolls back only the hosts on the new
release: the others never ran it. A step that fails to switch (a host unreachable) is undone
on its own hosts by the fleet and pauses the rollout: promote retries it, abort rolls back.
Without `[rollout]` a deploy is one step of every host and no rollout is recorded.
"""

from __future__ import annotations

import logging

from deployd import rollout_plan
from deployd.archive import Limits
from deployd.context import SYSTEM_ACTOR, AppContext, short
from deployd.errors import Conflict
from deployd.metrics import drop_series
from deployd.rollout_plan import PlannedStep
from deployd.rollout_store import Rollout, RolloutStore
from deployd.store import Deploy
from deployd.vocabulary import BakeState, EventKind, RolloutState

log = logging.getLogger("deployd.supervisor")


def plan_of(ctx: AppContext) -> tuple[PlannedStep, ...]:
    """The app's steps over its hosts (config order), as the config validated them."""
    app = ctx.app
    return rollout_plan.plan(app.rollout.steps, app.host_labels,
                             step_bake=app.rollout.step_bake, final_bake=app.rollback.bake)


def step_label(rollout: Rollout) -> str:
    return f"step {rollout.step + 1}/{len(rollout.steps)}"


def next_step(rollout: Rollout) -> int:
    """The step a promote switches: the one after a pause or a judged step, or the current
    one again when its switch did not complete."""
    current = rollout.steps[rollout.step]
    if not current.pause and set(rollout.on_new) != set(current.hosts):
        return rollout.step
    return rollout.step + 1


class Steps:
    """Moves a rollout from step to step and says so (events, metrics)."""

    def __init__(self, ctx: AppContext, store: RolloutStore) -> None:
        self.ctx = ctx
        self.store = store

    async def begin(self, record: Deploy, plan: tuple[PlannedStep, ...]) -> Rollout:
        """Record a rollout about to switch its first step."""
        return await self.store.create(record.id, self.ctx.name, plan,
                                       baseline_release=record.previous_release,
                                       baseline_revision=record.previous_revision)

    async def switched(self, record: Deploy, rollout: Rollout) -> Rollout:
        """The current step's hosts run the new release: its bake starts."""
        step = rollout.steps[rollout.step]
        rollout = await self.store.update(record.id, state=RolloutState.BAKING,
                                          on_new=step.hosts)
        self.publish(rollout)
        await self.ctx.event(
            EventKind.ROLLOUT_STEP,
            f"{step_label(rollout)} ({step.spec}): release {record.release} now on "
            f"{', '.join(step.added)}; {len(step.hosts)} of {len(self.ctx.app.hosts)} hosts on "
            "the new release", revision=record.revision,
            data={"deploy": record.id, "step": rollout.step + 1, "hosts": list(step.added),
                  "canary": list(step.hosts)})
        return rollout

    async def switch(self, record: Deploy, index: int, *, actor: str) -> Deploy:
        """Switch step `index`'s new hosts to the record's release and open the step's bake.

        Raises what the fleet raised when the step could not switch; its own hosts are back
        as they were, and the rollout pauses (promote retries the step).
        """
        ctx = self.ctx
        rollout = await self.store.update(record.id, state=RolloutState.RUNNING, step=index)
        step = rollout.steps[index]
        assert record.release is not None
        try:
            tarball = await ctx.mirror.archive(record.revision, Limits(
                max_bytes=ctx.app.max_release_size, max_files=ctx.app.max_release_files))
            outcome = await ctx.fleet.deploy(record.revision, tarball, branch=ctx.app.branch,
                                             actor=actor,
                                             protect=await ctx.protected_releases(),
                                             hosts=step.added, release=record.release)
        except Exception as exc:
            await self.pause(record, rollout, f"{step_label(rollout)} failed to switch: {exc}; "
                             "promote retries it")
            raise
        await ctx.store.set_host_results(record.id, {h: ("switched", None)
                                                     for h in outcome.hosts})
        now = ctx.clock()
        record = await ctx.store.update_deploy(
            record.id, bake_state=BakeState.GRACE, bake_started_at=now,
            bake_until=now + ctx.app.rollback.grace + step.bake)
        ctx.health.reset()
        await self.switched(record, rollout)
        return record

    async def pause(self, record: Deploy, rollout: Rollout, reason: str) -> Rollout:
        rollout = await self.store.update(record.id, state=RolloutState.PAUSED, reason=reason)
        self.publish(rollout)
        await self.ctx.event(EventKind.ROLLOUT_PAUSED,
                             f"rollout of {short(record.revision)} paused at "
                             f"{step_label(rollout)}: {reason}; promote or abort it",
                             revision=record.revision,
                             data={"deploy": record.id, "step": rollout.step + 1})
        log.warning("%s: rollout paused at %s: %s", self.ctx.name, step_label(rollout), reason)
        return rollout

    async def passed(self, record: Deploy, rollout: Rollout, how: str) -> int | None:
        """A step is done (baked well, or promoted): the next step to switch now, or None
        when the rollout waits at a pause step."""
        await self.ctx.event(EventKind.ROLLOUT_STEP_PASSED, f"{step_label(rollout)} of "
                             f"{short(record.revision)}: {how}", revision=record.revision,
                             data={"deploy": record.id, "step": rollout.step + 1})
        following = rollout.step + 1
        if not rollout.steps[following].pause:
            return following
        rollout = await self.store.update(record.id, step=following)
        await self.pause(record, rollout, "a pause step: waiting for a promote")
        return None

    async def end(self, record: Deploy, rollout: Rollout, state: RolloutState, reason: str,
                  *, actor: str = SYSTEM_ACTOR) -> Rollout:
        """The rollout is over: done, aborted or rolled back."""
        rollout = await self.store.update(record.id, state=state, reason=reason)
        self.publish(rollout)
        word = state.value.replace("_", " ")
        await self.ctx.event(EventKind(f"rollout.{state.value}"),
                             f"rollout of {short(record.revision)} {word} at "
                             f"{step_label(rollout)}: {reason}", actor=actor,
                             revision=record.revision,
                             data={"deploy": record.id, "step": rollout.step + 1,
                                   "hosts": list(rollout.on_new)})
        return rollout

    async def active(self) -> Rollout | None:
        return await self.store.active(self.ctx.name)

    async def of(self, record: Deploy) -> Rollout | None:
        """The record's rollout while it is in progress."""
        rollout = await self.store.of_deploy(record.id)
        return rollout if rollout is not None and rollout.active else None

    async def require_active(self, action: str) -> Rollout:
        rollout = await self.active()
        if rollout is None:
            raise Conflict(f"{self.ctx.name}: no rollout in progress to {action}")
        if rollout.state is RolloutState.RUNNING:
            raise Conflict(f"{self.ctx.name}: {step_label(rollout)} is switching hosts right "
                           "now; try again in a moment")
        return rollout

    def publish(self, rollout: Rollout | None) -> None:
        """Metrics of the app's rollout (none, or over: zeros)."""
        metrics, app = self.ctx.metrics, self.ctx.name
        live = rollout is not None and rollout.active
        canary = len(rollout.on_new) if rollout is not None and live else 0
        metrics.rollout_step.labels(app=app).set(rollout.step + 1 if rollout and live else 0)
        metrics.rollout_hosts.labels(app=app, group="canary").set(canary)
        metrics.rollout_hosts.labels(app=app, group="baseline").set(
            len(self.ctx.app.hosts) - canary if live else 0)
        paused = metrics.rollout_paused_timestamp_seconds
        if rollout is not None and rollout.state is RolloutState.PAUSED:
            paused.labels(app=app).set(rollout.updated_at)
        else:
            drop_series(paused, app)
