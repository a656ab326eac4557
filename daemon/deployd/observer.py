"""Observe mode: another tool (Capistrano) deploys; deployd records what it made live.

A release counts as made live when every reachable host agrees on it; hosts that disagree
are reported once per distinct split. An observed release is baked and judged like a deploy
of deployd's own, and rolled back like one.
"""

from __future__ import annotations

from deployd.context import AppContext, short
from deployd.errors import DeploydError
from deployd.operations import OperationSlot
from deployd.rollouts import Rollouts
from deployd.vocabulary import DeployKind, DeployState, EventKind, Trigger


class ReleaseObserver:
    def __init__(self, ctx: AppContext, *, slot: OperationSlot, rollouts: Rollouts) -> None:
        self.ctx = ctx
        self.slot = slot
        self.rollouts = rollouts
        self._split: frozenset[str] | None = None

    async def observe(self) -> None:
        """Record a release that someone else made live on every host."""
        ctx = self.ctx
        states = await ctx.fleet.state()
        currents = {name: (s.current, s.current_revision) for name, s in states.items()
                    if not isinstance(s, DeploydError)}
        if not currents or self.slot.held:
            return  # a rollback running now is deployd's own, not another tool's
        distinct = set(currents.values())
        if len(distinct) != 1:
            split = frozenset(f"{h}={c[0]}" for h, c in currents.items())
            if split != self._split:
                self._split = split
                await ctx.event(EventKind.OBSERVE_SPLIT, "hosts disagree about the live release: "
                                + ", ".join(sorted(split)))
            return
        self._split = None
        release, revision = distinct.pop()
        live = await ctx.store.last_live(ctx.name)
        if release is None or (live is not None and live.release == release):
            return
        record = await ctx.store.start_deploy(
            ctx.name, DeployKind.OBSERVED, revision or "unknown", trigger=Trigger.OBSERVED,
            actor="observed",
            release=release, previous_release=live.release if live else None,
            previous_revision=live.revision if live else None, state=DeployState.SUCCEEDED)
        record = await ctx.store.update_deploy(record.id, state=DeployState.SUCCEEDED,
                                               **self.rollouts.open_bake())
        await self.rollouts.went_live(record, "observed", 0.0)
        await ctx.event(EventKind.DEPLOY_OBSERVED,
                        f"release {release} ({short(revision)}) made live by "
                        "another tool", revision=revision,
                        data={"deploy": record.id, "release": release})
