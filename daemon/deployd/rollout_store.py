"""Progressive rollouts as the store keeps them: one row per deploy that goes out in steps.

A rollout is written before each step touches a host (state `running`, the step it is
switching) and after (`baking`, the hosts now on the new release), so recovery after a crash
knows which hosts run what and whether a step was cut short.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from deployd.rollout_plan import PlannedStep
from deployd.storage import Row
from deployd.store import Store
from deployd.vocabulary import RolloutState


@dataclass(frozen=True)
class Rollout:
    deploy_id: int
    app: str
    steps: tuple[PlannedStep, ...]
    step: int  # index into steps: the step running, baking or paused before
    state: RolloutState
    on_new: tuple[str, ...]  # hosts whose `current` is the new release
    baseline_release: str | None
    baseline_revision: str | None
    reason: str | None
    analysis: dict[str, Any]
    started_at: float
    updated_at: float

    @property
    def active(self) -> bool:
        return self.state.active

    @property
    def last_step(self) -> bool:
        return self.step == len(self.steps) - 1

    def baseline(self, hosts: Sequence[str]) -> tuple[str, ...]:
        """The app's hosts still on the last good release."""
        return tuple(host for host in hosts if host not in self.on_new)


class RolloutStore:
    """Rollout rows, in the same database as the `Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def create(self, deploy_id: int, app: str, steps: Sequence[PlannedStep], *,
                     baseline_release: str | None, baseline_revision: str | None) -> Rollout:
        now = self.store.clock()

        await self.store.backend.execute(
            "INSERT INTO rollouts (deploy_id, app, steps, step, state, on_new, "
            "baseline_release, baseline_revision, started_at, updated_at) "
            "VALUES (?, ?, ?, 0, 'running', '[]', ?, ?, ?, ?)",
            (deploy_id, app, json.dumps([dataclasses.asdict(s) for s in steps]),
             baseline_release, baseline_revision, now, now))
        return await self.get(deploy_id)

    async def get(self, deploy_id: int) -> Rollout:
        row = await self.store.backend.fetch_one(
            "SELECT * FROM rollouts WHERE deploy_id = ?", (deploy_id,))
        if row is None:
            raise KeyError(deploy_id)
        return _rollout(row)

    async def of_deploy(self, deploy_id: int) -> Rollout | None:
        try:
            return await self.get(deploy_id)
        except KeyError:
            return None

    async def latest(self, app: str) -> Rollout | None:
        """The app's newest rollout, whatever its state."""
        row = await self.store.backend.fetch_one(
            "SELECT * FROM rollouts WHERE app = ? ORDER BY deploy_id DESC LIMIT 1", (app,))
        return _rollout(row) if row is not None else None

    async def active(self, app: str) -> Rollout | None:
        """The app's rollout in progress (running, baking or paused), if any."""
        latest = await self.latest(app)
        return latest if latest is not None and latest.active else None

    async def update(self, deploy_id: int, *, state: RolloutState | None = None,
                     step: int | None = None, on_new: Sequence[str] | None = None,
                     reason: str | None = None, analysis: dict[str, Any] | None = None
                     ) -> Rollout:
        """Set the given fields (None: unchanged; `reason` is replaced whenever state is)."""
        fields: dict[str, object] = {"updated_at": self.store.clock()}
        if state is not None:
            fields["state"], fields["reason"] = state.value, reason
        elif reason is not None:
            fields["reason"] = reason
        if step is not None:
            fields["step"] = step
        if on_new is not None:
            fields["on_new"] = json.dumps(list(on_new))
        if analysis is not None:
            fields["analysis"] = json.dumps(analysis, default=str)
        columns = ", ".join(f"{name} = ?" for name in fields)

        await self.store.backend.execute(f"UPDATE rollouts SET {columns} WHERE deploy_id = ?",
                                         (*fields.values(), deploy_id))
        return await self.get(deploy_id)


def _rollout(row: Row) -> Rollout:
    steps = tuple(PlannedStep(index=s["index"], hosts=tuple(s["hosts"]),
                              added=tuple(s["added"]), pause=bool(s["pause"]),
                              bake=float(s["bake"]), spec=str(s["spec"]))
                  for s in json.loads(row["steps"]))
    return Rollout(
        deploy_id=row["deploy_id"], app=row["app"], steps=steps, step=row["step"],
        state=RolloutState(row["state"]), on_new=tuple(json.loads(row["on_new"])),
        baseline_release=row["baseline_release"], baseline_revision=row["baseline_revision"],
        reason=row["reason"], analysis=json.loads(row["analysis"]),
        started_at=row["started_at"], updated_at=row["updated_at"])
