"""An app as the REST API shows it: `GET /api/v1/apps` (summary) and `/apps/{app}` (detail)."""

from __future__ import annotations

from typing import Any

from deployd.context import AppContext
from deployd.errors import DeploydError
from deployd.judge import BakeJudge
from deployd.operations import OperationSlot
from deployd.store import Deploy
from deployd.timefmt import iso_time
from deployd.vocabulary import DeployKind, DeployState, RolloutState
from deployd.watcher import BranchWatcher


class AppViews:
    def __init__(self, ctx: AppContext, *, slot: OperationSlot, watcher: BranchWatcher,
                 judge: BakeJudge) -> None:
        self.ctx = ctx
        self.slot = slot
        self.watcher = watcher
        self.judge = judge

    async def summary(self) -> dict[str, Any]:
        """The app as `GET /api/v1/apps` shows it."""
        ctx = self.ctx
        state = await ctx.store.app_state(ctx.name)
        live = await ctx.store.last_live(ctx.name)
        latest = await ctx.store.deploys(ctx.name, limit=1)
        return {
            "name": ctx.name,
            "mode": ctx.app.mode,
            "branch": ctx.app.branch,
            "head": self.watcher.head,
            "deployed": {"revision": live.revision, "release": live.release} if live else None,
            "last_good": {"revision": state.last_good_revision,
                          "release": state.last_good_release},
            "pristine": self.watcher.pristine,
            "paused": {"by": state.paused_by, "reason": state.paused_reason,
                       "at": state.paused_at} if state.paused else None,
            "health": self._health(),
            "busy": self.slot.busy,
            "latest": await self._latest(latest[0]) if latest else None,
            "fetch_error": self.watcher.fetch_error,
            "rollout": await self.rollout(),
        }

    async def rollout(self) -> dict[str, Any] | None:
        """The app's latest rollout, with the judge's figures (live while a step bakes)."""
        rollout = await self.judge.steps.store.latest(self.ctx.name)
        if rollout is None:
            return None
        record = await self.ctx.store.deploy(rollout.deploy_id)
        canary, baseline = self.judge.groups(rollout) if rollout.active else ((), ())
        figures = rollout.analysis
        if rollout.state is RolloutState.BAKING and self.judge.comparing(rollout) \
                and record.bake_started_at is not None:
            figures = (await self.judge.compare(record, rollout)).to_json()
        return {
            "deploy": rollout.deploy_id, "revision": record.revision, "release": record.release,
            "step": rollout.step + 1, "steps": len(rollout.steps), "state": rollout.state.value,
            "reason": rollout.reason,
            "hosts": {"canary": list(canary), "baseline": list(baseline)},
            "plan": [{"step": s.index + 1, "spec": s.spec, "hosts": list(s.hosts),
                      "bake_seconds": s.bake} for s in rollout.steps],
            "analysis": figures or None, "compare": self.ctx.app.rollout.compare,
            "started_at": iso_time(rollout.started_at),
            "updated_at": iso_time(rollout.updated_at),
        }

    async def detail(self) -> dict[str, Any]:
        """One app with every host's live release and health."""
        ctx = self.ctx
        summary = await self.summary()
        states = await ctx.fleet.state()
        health = ctx.health.snapshot().to_json().get("hosts", {})
        hosts = []
        for host, label in zip(ctx.app.hosts, ctx.app.host_labels, strict=True):
            state = states.get(label)
            entry: dict[str, Any] = {"name": label, "address": host.address,
                                     "deploy_to": host.deploy_to}
            if isinstance(state, DeploydError) or state is None:
                entry["error"] = str(state) if state else "unknown"
            else:
                entry["current"] = {"release": state.current, "revision": state.current_revision}
                entry["releases"] = [r.name for r in state.releases]
            entry["health"] = health.get(label)
            hosts.append(entry)
        summary["hosts"] = hosts
        summary["quarantined"] = [{"revision": q.revision, "reason": q.reason, "at": q.at}
                                  for q in await ctx.store.quarantined(ctx.name)]
        return summary

    async def _latest(self, record: Deploy) -> dict[str, Any]:
        """The latest deploy or rollback, with what its hooks printed when it succeeded."""
        shown = record.to_json()
        if record.state == DeployState.SUCCEEDED \
                and record.kind in (DeployKind.DEPLOY, DeployKind.ROLLBACK):
            event = await self.ctx.store.deploy_event(self.ctx.name, record.id,
                                                      f"{record.kind}.succeeded")
            if event is not None and "output" in event.data:
                shown["output"] = event.data["output"]
        return shown

    def _health(self) -> dict[str, Any]:
        health = self.ctx.health
        return {"unhealthy_hosts": health.unhealthy_hosts(),
                "failing_metrics": health.metric_failing(),
                "no_data": health.no_data_checks()}
