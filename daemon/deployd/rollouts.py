"""Deploys and rollbacks: their records, their events, quarantine, and the bake they open.

Each operation is recorded before the hosts are touched and its outcome after, so recovery
can tell a half-done one from a finished one. A release that goes live opens its bake here,
in one place (`open_bake`), whichever way it went live.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from deployd.archive import Limits
from deployd.context import SYSTEM_ACTOR, AppContext, count_hosts, hook_output, short
from deployd.errors import DeploydError, FleetError, NotFound
from deployd.progressive import Steps, plan_of
from deployd.store import Deploy
from deployd.vocabulary import BakeState, DeployKind, DeployState, EventKind, RolloutState, Trigger

log = logging.getLogger("deployd.supervisor")


class Rollouts:
    """Carries out deploys and rollbacks for one app (the caller holds the operation slot)."""

    def __init__(self, ctx: AppContext, *, steps: Steps,
                 on_quarantined: Callable[[], Awaitable[None]]) -> None:
        self.ctx = ctx
        self.steps = steps
        self._on_quarantined = on_quarantined
        self.attempted: str | None = None
        """The last head deployd tried by itself; it is not tried again until it changes."""

    # -- deploy --------------------------------------------------------------------------

    async def deploy(self, revision: str, *, trigger: Trigger, actor: str,
                     started: asyncio.Future[Deploy] | None = None,
                     on_start: Callable[[Deploy], Awaitable[object]] | None = None,
                     forced: str | None = None) -> Deploy:
        ctx = self.ctx
        if trigger != Trigger.MANUAL:
            # A manual deploy is not an attempt at the branch head: remembering it would make
            # the next poll deploy the head again over what the operator chose.
            self.attempted = revision
        plan = plan_of(ctx)
        record = await self._start(revision, DeployKind.DEPLOY, trigger=trigger, actor=actor,
                                   forced=forced)
        # One step of every host is a plain deploy; more steps are recorded as a rollout.
        rollout = await self.steps.begin(record, plan) if len(plan) > 1 else None
        resolve(started, record)
        if on_start is not None:
            await on_start(record)
        how = trigger if forced is None else f"{trigger}, forced: {forced}"
        if rollout is not None:
            how += f", in {len(plan)} steps: {', '.join(step.spec for step in plan)}"
        await ctx.event(EventKind.DEPLOY_STARTED,
                        f"deploying {short(revision)} ({how})", actor=actor,
                        revision=revision,
                        data={"deploy": record.id, **({"forced": forced} if forced else {})})
        clock_start = time.monotonic()
        try:
            tarball = await ctx.mirror.archive(revision, Limits(
                max_bytes=ctx.app.max_release_size, max_files=ctx.app.max_release_files))
            outcome = await ctx.fleet.deploy(revision, tarball, branch=ctx.app.branch,
                                             actor=actor, protect=await ctx.protected_releases(),
                                             hosts=plan[0].added if rollout else None)
        except DeploydError as exc:
            took = time.monotonic() - clock_start
            ctx.metrics.deploys_total.labels(app=ctx.name, result="failed").inc()
            ctx.metrics.deploy_duration_seconds.labels(app=ctx.name).observe(took)
            if rollout is not None:
                await self.steps.end(record, rollout, RolloutState.ABORTED,
                                     f"the first step failed: {exc}")
            return await self._failed(record, exc, f"deploy of {short(revision)} failed")
        await ctx.store.set_host_results(record.id, {h: ("switched", None)
                                                     for h in outcome.hosts})
        record = await ctx.store.update_deploy(
            record.id, state=DeployState.SUCCEEDED, release=outcome.release,
            **self.open_bake(plan[0].bake))
        await self.went_live(record, "succeeded", time.monotonic() - clock_start)
        await ctx.event(
            EventKind.DEPLOY_SUCCEEDED,
            f"{short(revision)} live as release {outcome.release} on {count_hosts(outcome.hosts)}",
            actor=actor, revision=revision,
            data={"deploy": record.id, "release": outcome.release, **hook_output(outcome.output)})
        if rollout is not None:
            await self.steps.switched(record, rollout)
        return record

    async def _start(self, revision: str, kind: DeployKind, *, trigger: Trigger, actor: str,
                     release: str | None = None, forced: str | None = None) -> Deploy:
        live = await self.ctx.store.last_live(self.ctx.name)
        return await self.ctx.store.start_deploy(
            self.ctx.name, kind, revision, trigger=trigger, actor=actor,
            release=release, previous_release=live.release if live else None,
            previous_revision=live.revision if live else None, forced=forced)

    async def _failed(self, record: Deploy, exc: DeploydError, what: str) -> Deploy:
        """Record a deploy or rollback that failed, with each host's error."""
        failures = exc.failures if isinstance(exc, FleetError) else {}
        await self.ctx.store.set_host_results(record.id, {h: ("failed", str(e))
                                                          for h, e in failures.items()})
        record = await self.ctx.store.update_deploy(record.id, state=DeployState.FAILED,
                                                    error=str(exc))
        await self.ctx.event(EventKind(f"{record.kind}.failed"),
                             f"{what}: {exc}", actor=record.actor,
                             revision=record.revision,
                             data={"deploy": record.id,
                                   "hosts": {h: str(e) for h, e in failures.items()}})
        log.error("%s: %s: %s", self.ctx.name, what, exc)
        return record

    def open_bake(self, bake: float | None = None) -> dict[str, Any]:
        """The record fields that start a bake now: grace, then the bake window (the one
        place a bake is opened, for deploys, rollbacks, observed releases and recoveries).
        `bake` is the window's length: `rollback.bake` unless a rollout step says less."""
        now = self.ctx.clock()
        rollback = self.ctx.app.rollback
        length = rollback.bake if bake is None else bake
        return {"bake_state": "grace", "bake_started_at": now,
                "bake_until": now + rollback.grace + length}

    async def went_live(self, record: Deploy, result: str, took: float) -> None:
        """A deploy or observed release is live: older bakes end, metrics and health follow."""
        ctx = self.ctx
        await self.retire_bakes(record)
        ctx.metrics.deploys_total.labels(app=ctx.name, result=result).inc()
        ctx.metrics.deploy_duration_seconds.labels(app=ctx.name).observe(took)
        ctx.metrics.last_deploy_timestamp_seconds.labels(app=ctx.name).set(ctx.clock())
        ctx.metrics.set_live_revision(ctx.name, record.revision)
        ctx.health.reset()

    async def retire_bakes(self, live: Deploy) -> None:
        """A new release went live: older bakes end unjudged, and their rescue jobs fail."""
        for record in await self.ctx.store.deploys(self.ctx.name, limit=50):
            if record.id == live.id or record.bake_state not in (BakeState.GRACE, BakeState.BAKING):
                continue
            await self.ctx.store.update_deploy(record.id, bake_state=BakeState.SKIPPED)
            rollout = await self.steps.of(record)
            if rollout is not None:
                await self.steps.end(record, rollout, RolloutState.ABORTED,
                                     f"replaced by release {live.release}")
            job = await self.ctx.rescue.job_for_record(record)
            if job is not None:
                await self.ctx.rescue.fail(job, f"release {record.release} was replaced by "
                                           f"{live.release} before its bake ended")

    async def needs_force(self, sha: str) -> list[str]:
        """Why deploying `sha` by hand needs `"force": true` (empty: it does not)."""
        ctx = self.ctx
        reasons = [f"quarantined ({item.reason})"
                   for item in await ctx.store.quarantined(ctx.name) if item.revision == sha]
        head = await ctx.mirror.branch_head(ctx.app.branch)
        if head is None or not await ctx.mirror.is_ancestor(sha, head):
            reasons.append(f"not on {ctx.app.branch}")
        return reasons

    # -- rollback ------------------------------------------------------------------------

    async def rollback(self, release: str, *, trigger: Trigger, actor: str, reason: str,
                       started: asyncio.Future[Deploy] | None = None,
                       hosts: list[str] | None = None) -> Deploy:
        """Roll every host (or only `hosts`: a rollout's new hosts) back to `release`."""
        live = await self.ctx.store.last_live(self.ctx.name)
        revision = await self.release_revision(release)
        record = await self._start(revision or "unknown", DeployKind.ROLLBACK, trigger=trigger,
                                   actor=actor, release=release)
        resolve(started, record)
        await self.ctx.event(EventKind.ROLLBACK_STARTED,
                             f"rolling back to release {release}: {reason}",
                             actor=actor, revision=revision,
                             data={"deploy": record.id, "release": release})
        if trigger == Trigger.MANUAL and live is not None and live.revision != revision:
            # A revision a human rolled back is not deployed again by deployd itself.
            await self.quarantine(live.revision, f"rolled back by {actor}: {reason}", actor)
        return await self.run_rollback(record, reason=reason, hosts=hosts)

    async def run_rollback(self, record: Deploy, *, reason: str,
                           hosts: list[str] | None = None) -> Deploy:
        """Roll the hosts (all, or `hosts`) back to the record's release and open its bake."""
        ctx = self.ctx
        assert record.release is not None
        clock_start = time.monotonic()
        try:
            outcome = await ctx.fleet.rollback(record.release, reason=reason,
                                               actor=record.actor,
                                               protect=await ctx.protected_releases(),
                                               hosts=hosts)
        except DeploydError as exc:
            return await self._failed(record, exc, f"rollback to {record.release} failed")
        took = time.monotonic() - clock_start
        await ctx.store.set_host_results(record.id, {h: ("switched", None)
                                                     for h in outcome.hosts})
        revision = outcome.revision or record.revision
        record = await ctx.store.update_deploy(record.id, state=DeployState.SUCCEEDED,
                                               **self.open_bake())
        await self.retire_bakes(record)
        ctx.metrics.rollbacks_total.labels(app=ctx.name, trigger=record.trigger).inc()
        ctx.metrics.rollback_duration_seconds.labels(app=ctx.name).observe(took)
        ctx.metrics.last_rollback_timestamp_seconds.labels(app=ctx.name).set(ctx.clock())
        ctx.metrics.set_live_revision(ctx.name, revision)
        ctx.health.reset()
        await ctx.event(
            EventKind.ROLLBACK_SUCCEEDED,
            f"release {record.release} ({short(revision)}) live again on "
            f"{count_hosts(outcome.hosts)} in {took:.2f}s",
            actor=record.actor, revision=revision,
            data={"deploy": record.id, "release": record.release, "seconds": round(took, 3),
                  **hook_output(outcome.output)})
        return record

    async def release_revision(self, release: str) -> str | None:
        """The revision of a release, by deployd's records or else by the hosts' logs."""
        for record in await self.ctx.store.deploys(self.ctx.name, limit=500):
            if record.release == release and record.state == DeployState.SUCCEEDED:
                return record.revision
        states = await self.ctx.fleet.state()
        for state in states.values():
            if isinstance(state, DeploydError):
                continue
            for item in state.releases:
                if item.name == release:
                    return item.revision
        raise NotFound(f"{self.ctx.name}: no release {release} on record or on any host")

    async def quarantine(self, revision: str, reason: str, actor: str) -> None:
        if await self.ctx.store.quarantine(self.ctx.name, revision, reason=reason, actor=actor):
            await self.ctx.event(EventKind.QUARANTINE_ADDED,
                                 f"{short(revision)} quarantined: {reason}",
                                 actor=actor, revision=revision)
        await self._on_quarantined()  # not only at the next poll: it may be minutes away

    async def switch_back(self, record: Deploy, hosts: list[str], error: str) -> str:
        """Put hosts a half-done deploy switched back on its previous release.

        Returns `error`, with what went wrong switching back appended.
        """
        assert record.previous_release is not None
        try:
            await self.ctx.fleet.rollback(record.previous_release, reason=error,
                                          actor=SYSTEM_ACTOR, hosts=hosts)
        except DeploydError as exc:
            error += f"; switching back failed: {exc}"
        return error


def resolve(future: asyncio.Future[Deploy] | None, record: Deploy) -> None:
    """Hand a REST caller waiting on an operation its record."""
    if future is not None and not future.done():
        future.set_result(record)
