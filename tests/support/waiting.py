"""Waiting with a deadline: poll a check until it holds, and fail the test if it never does.

Three flavours of one loop: `eventually` awaits an async probe (REST state, the store's
events), `wait_until` polls a plain check from async code, `wait_until_blocking` from plain
code. Each returns the check's first truthy value and raises AssertionError naming `what`
after `within` seconds. `wait_event` waits for the daemon's timeline to hold an event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


def _timed_out(what: str, within: float, detail: str = "") -> AssertionError:
    return AssertionError(f"{what}: not within {within}s" + (f"; {detail}" if detail else ""))


def _give_up_after(deadline: float, within: float, what: str,
                   explain: Callable[[], str] | None) -> None:
    if time.monotonic() > deadline:
        raise _timed_out(what, within, explain() if explain else "")


async def eventually(probe: Callable[[], Awaitable[T]], *, within: float = 20.0,
                     every: float = 0.05, what: str = "the condition",
                     explain: Callable[[], Awaitable[str]] | None = None) -> T:
    """Await `probe()` until it returns something truthy, and return that.

    After `within` seconds the test fails with `what` (and `await explain()`, if given).
    """
    deadline = time.monotonic() + within
    while not (value := await probe()):
        if time.monotonic() > deadline:
            raise _timed_out(what, within, await explain() if explain else "")
        await asyncio.sleep(every)
    return value


async def wait_until(check: Callable[[], T], *, within: float = 20.0, every: float = 0.05,
                     what: str = "the condition",
                     explain: Callable[[], str] | None = None) -> T:
    """`eventually` for a plain (non-async) check, sleeping without blocking the loop."""
    deadline = time.monotonic() + within
    while not (value := check()):
        _give_up_after(deadline, within, what, explain)
        await asyncio.sleep(every)
    return value


def wait_until_blocking(check: Callable[[], T], *, within: float = 20.0, every: float = 0.05,
                        what: str = "the condition",
                        explain: Callable[[], str] | None = None) -> T:
    """`wait_until` for plain code: sleeps the thread between checks."""
    deadline = time.monotonic() + within
    while not (value := check()):
        _give_up_after(deadline, within, what, explain)
        time.sleep(every)
    return value


class HasEvents(Protocol):
    """A daemon under test (in-process or a subprocess) whose timeline can be read."""

    async def events(self, app: str) -> list[dict[str, Any]]: ...


def matching(events: list[dict[str, Any]], kind: str | None = None,
             revision: str | None = None) -> list[dict[str, Any]]:
    """The events of `kind` (any when None) about `revision` (any when None)."""
    return [e for e in events if (kind is None or e["kind"] == kind)
            and (revision is None or e["revision"] == revision)]


def timeline(events: list[dict[str, Any]]) -> str:
    """A one-line story of a timeline for failure messages."""
    return str([f"{e['kind']}: {e['message']}" for e in events])


async def wait_event(daemon: HasEvents, app: str, kind: str, revision: str | None = None, *,
                     count: int = 1, within: float = 20.0,
                     every: float = 0.05) -> dict[str, Any]:
    """Wait until `app`'s timeline holds `count` events of `kind` (about `revision`, if
    given); return the `count`-th. On time-out the failure shows the whole timeline."""
    async def found() -> list[dict[str, Any]]:
        return matching(await daemon.events(app), kind, revision)

    async def story() -> str:
        return "timeline: " + timeline(await daemon.events(app))

    about = f" ({revision})" if revision is not None else ""
    events = await eventually(lambda: _at_least(found, count), within=within, every=every,
                              what=f"{count} {kind!r} event(s){about}", explain=story)
    return events[count - 1]


async def _at_least(found: Callable[[], Awaitable[list[dict[str, Any]]]],
                    count: int) -> list[dict[str, Any]]:
    events = await found()
    return events if len(events) >= count else []
