"""The watched branch: when to fetch, what its head is, and whether that head is pristine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from deployd import policy
from deployd.context import AppContext, short
from deployd.errors import Conflict, DeploydError
from deployd.vocabulary import EventKind

log = logging.getLogger("deployd.supervisor")

FETCH_SPACING = 1.0  # seconds between fetches that webhooks (not the interval) ask for
FETCH_INTERVAL = 2.0
"""REST calls start at most one fetch per this many seconds, so they cannot pin the mirror."""


class BranchWatcher:
    """Fetches the app's mirror on a schedule (or on request) and follows the branch head."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.head: str | None = None
        self.fetched = False
        self.fetch_error: str | None = None
        self.pristine = False
        self._fetch_started = float("-inf")  # monotonic start of the last fetch attempt
        self._fetch_lock = asyncio.Lock()
        self._fetch_requested = False
        self._last_poll = self._last_requested = float("-inf")
        self._ancestry_key: tuple[str | None, frozenset[str]] | None = None
        self._quarantined_ancestor = False

    # -- schedule ------------------------------------------------------------------------

    def request_fetch(self) -> None:
        """Fetch at the next round (a webhook announced a push); requests coalesce."""
        self._fetch_requested = True

    def next_poll(self) -> float:
        """When to poll next: at the interval, or sooner when a fetch was requested.

        Requested fetches start at most one per FETCH_SPACING, so a flood of webhooks costs
        a fetch a second at most, while the first push after a quiet spell is fetched at once.
        """
        due = self._last_poll + self.ctx.app.poll_interval
        if self._fetch_requested:
            due = min(due, self._last_requested + FETCH_SPACING)
        return due

    def start_poll(self, now: float) -> None:
        """A poll begins now: it serves every fetch requested so far."""
        if self._fetch_requested:
            self._fetch_requested, self._last_requested = False, now
        self._last_poll = now

    # -- fetching ------------------------------------------------------------------------

    async def fetch(self) -> bool:
        """Fetch the mirror; False (recorded once per distinct error) when it failed."""
        ctx = self.ctx
        started = self._fetch_started = time.monotonic()
        try:
            await ctx.mirror.fetch()
        except DeploydError as exc:
            ctx.metrics.git_fetch_errors_total.labels(app=ctx.name).inc()
            if self.fetch_error != str(exc):
                await ctx.event(EventKind.GIT_FETCH_FAILED, str(exc))
                log.warning("%s: fetch failed: %s", ctx.name, exc)
            self.fetch_error = str(exc)
            return False
        finally:
            ctx.metrics.git_fetch_duration_seconds.labels(app=ctx.name).observe(
                time.monotonic() - started)
        if self.fetch_error is not None:
            await ctx.event(EventKind.GIT_FETCH_RECOVERED, "fetch works again")
        self.fetch_error = None
        self.fetched = True
        return True

    async def fresh_fetch(self) -> None:
        """Make sure a fetch started after this call arrived, at a bounded rate.

        Callers queue here, not on the mirror: one fetch serves every caller that arrived
        before it started, and the next starts no sooner than FETCH_INTERVAL after the last,
        so a stream of calls leaves the mirror free for the poll loop and deploys.
        """
        arrived = time.monotonic()
        async with self._fetch_lock:
            if self._fetch_started < arrived:
                wait = self._fetch_started + FETCH_INTERVAL - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self.fetch()
        if self.fetch_error is not None:
            raise Conflict(f"{self.ctx.name}: cannot fetch the branch: {self.fetch_error}")

    async def refresh_head(self) -> str | None:
        """Read the branch head from the mirror; a move is recorded as `branch.moved`."""
        head = await self.ctx.mirror.branch_head(self.ctx.app.branch)
        if head != self.head:
            if self.head is not None or head is not None:
                await self.ctx.event(EventKind.BRANCH_MOVED,
                                     f"{self.ctx.app.branch} is now {short(head)}",
                                     revision=head, data={"previous": self.head})
            self.head = head
        await self.update_pristine()
        return head

    # -- pristine ------------------------------------------------------------------------

    async def follow(self) -> None:
        """On a node that does not run the app: head and pristine from the mirror it keeps
        fetched, for REST reads, with no event and no metric (its owner records those)."""
        self.head = await self.ctx.mirror.branch_head(self.ctx.app.branch)
        self.pristine = await self._pristine(self.head)

    async def update_pristine(self) -> None:
        """Whether the head is something deployd would deploy (see policy.is_pristine)."""
        self.pristine = await self._pristine(self.head)
        self.ctx.metrics.branch_pristine.labels(app=self.ctx.name).set(1 if self.pristine else 0)

    async def _pristine(self, head: str | None) -> bool:
        ctx = self.ctx
        state = await ctx.store.app_state(ctx.name)
        bad = frozenset(q.revision for q in await ctx.store.quarantined(ctx.name))
        key = (head, bad)
        if key != self._ancestry_key:
            # One history walk per quarantined revision: only when the head or the list
            # changed, not at every poll.
            self._ancestry_key, self._quarantined_ancestor = key, False
            for revision in bad if head is not None else ():
                with contextlib.suppress(DeploydError):
                    if revision != head and await ctx.mirror.is_ancestor(revision, str(head)):
                        self._quarantined_ancestor = True
                        break
        return policy.is_pristine(head, head_quarantined=head in bad,
                                  last_good=state.last_good_revision,
                                  quarantined_ancestor=self._quarantined_ancestor)
