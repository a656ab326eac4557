"""What every part of one app's supervision shares: its config, store, git, hosts and health.

The parts (branch watcher, rollouts, judge, verdicts, rescue flow, recovery, views) each take
this one object instead of seven arguments, and record their events and pauses through it so
every event of an app is worded and attributed the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deployd.config import AppConfig
from deployd.fleet import Fleet
from deployd.git import Mirror
from deployd.health import HealthMonitor
from deployd.metrics import Metrics
from deployd.rescue import Rescue
from deployd.store import Event, Store
from deployd.vocabulary import EventKind

log = logging.getLogger("deployd.supervisor")

SYSTEM_ACTOR = "deployd"


@dataclass
class AppContext:
    app: AppConfig
    store: Store
    mirror: Mirror
    fleet: Fleet
    metrics: Metrics
    health: HealthMonitor
    rescue: Rescue
    clock: Callable[[], float] = field(default=time.time)

    @property
    def name(self) -> str:
        return self.app.name

    async def event(self, kind: EventKind, message: str, *, actor: str = SYSTEM_ACTOR,
                    revision: str | None = None, data: dict[str, Any] | None = None) -> Event:
        """Record one event on this app's timeline."""
        return await self.store.add_event(self.name, kind, message, actor=actor,
                                          revision=revision, data=data)

    async def pause(self, actor: str, reason: str) -> None:
        """Stop deploying by itself until a human resumes."""
        await self.store.set_paused(self.name, True, actor=actor, reason=reason)
        self.metrics.paused.labels(app=self.name).set(1)
        await self.event(EventKind.APP_PAUSED, f"paused by {actor}: {reason}", actor=actor)
        log.warning("%s: paused by %s: %s", self.name, actor, reason)

    async def protected_releases(self) -> set[str]:
        """Releases a prune must keep besides the live one: the last good."""
        state = await self.store.app_state(self.name)
        return {state.last_good_release} if state.last_good_release else set()


def short(revision: str | None) -> str:
    return revision[:12] if revision else "none"


def count_hosts(hosts: object) -> str:
    count = len(hosts)  # type: ignore[arg-type]
    return f"{count} host" if count == 1 else f"{count} hosts"


def hook_output(output: Mapping[str, Mapping[str, str]]) -> dict[str, object]:
    """Event data for what hooks printed: {"output": {host: {hook: last lines}}}, if any."""
    return {"output": {host: dict(hooks) for host, hooks in output.items()}} if output else {}
