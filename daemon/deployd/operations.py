"""One operation at a time per app, each in its own task.

A deploy, rollback, transplant or recovery holds the app's slot from before its first record
until its last: a REST call meanwhile gets a 409 naming what runs, not a race on the hosts.
Operations run in tasks of their own so a REST client hanging up never abandons hosts half
way, and a shutdown waits for them (within a grace period) instead of cancelling them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from deployd.errors import Conflict

log = logging.getLogger("deployd.supervisor")
T = TypeVar("T")


class OperationSlot:
    """The app's operation reservation and the tasks running under it."""

    def __init__(self, app: str, *, on_done: Callable[[], None]) -> None:
        self._app = app
        self._on_done = on_done
        self._lock = asyncio.Lock()
        self._name: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopping = False

    @property
    def busy(self) -> str | None:
        """What operation holds the slot now, if any."""
        return self._name

    @property
    def held(self) -> bool:
        return self._lock.locked()

    async def reserve(self, name: str) -> None:
        """Take the slot now, or raise Conflict naming what holds it."""
        if self.stopping:
            raise Conflict(f"{self._app}: deployd is shutting down")
        if self._lock.locked():
            raise Conflict(f"{self._app}: a {self._name} is already running")
        await self._lock.acquire()
        self._name = name

    def release(self) -> None:
        self._name = None
        self._lock.release()

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        """Hold the slot for work done in the caller's task (recovery at start-up)."""
        async with self._lock:
            self._name = name
            try:
                yield
            finally:
                self._name = None

    async def spawn(self, operation: Coroutine[Any, Any, T], name: str,
                    started: asyncio.Future[Any] | None = None, *,
                    reserved: bool = False) -> None:
        """Run `operation` in its own task under the slot.

        `started` is the future a REST caller waits on for the operation's record; if the
        operation fails before recording anything, the caller gets that error instead.
        With `reserved`, the caller already holds the slot (see `reserve`).
        """
        if not reserved:
            try:
                await self.reserve(name)
            except Conflict:
                operation.close()
                raise

        async def run() -> None:
            try:
                await operation
            except Exception as exc:
                log.exception("%s: %s crashed", self._app, name)
                if started is not None and not started.done():
                    started.set_exception(exc)
            finally:
                if started is not None and not started.done():
                    started.set_exception(Conflict(f"{self._app}: the {name} was cancelled"))
                self.release()
                self._on_done()

        task = asyncio.create_task(run(), name=f"{self._app}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, grace: float) -> None:
        """Take no new work; let a running operation finish within `grace`, then cancel."""
        self.stopping = True
        pending = [task for task in self._tasks if not task.done()]
        if pending:
            log.info("%s: waiting up to %.0fs for %s", self._app, grace, self._name)
            _, still = await asyncio.wait(pending, timeout=grace)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
