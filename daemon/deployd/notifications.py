"""Telling humans: every `[[notify]]` target gets the events it wants, at least once.

    store.add_event --wake--> scan: events after each target's cursor -> outbox (one transaction)
                              reminders: a job still pending `remind` after its last message
    per target: send due deliveries in order -> 2xx sent | 429/5xx/no answer: retry later
                                             -> past `give_up_after`: failed + notify.failing

Nothing is sent before it is in the store, so a crash or a restart loses nothing: the cursor
and the queued rows pick up where the daemon stopped, with the same delivery ids. Each target
has its own task and its own timeout, so a slow or dead receiver delays only itself, never a
deploy, a rollback or a probe. URLs and secrets appear in no log line, event or metric.

Several daemons on one PostgreSQL database all run this over the one outbox: each attempt
claims the target (outbox.py), so a delivery goes out once, from whichever daemon claimed it,
and the others take over at once when that daemon dies or stops. `stop` lets an attempt in
flight finish; one cancelled past the grace period is rolled back and sent again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import hmac
import json
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from deployd.config import NotifyTarget
from deployd.metrics import Metrics
from deployd.outbox import SCAN_BATCH, Claim, Delivery, OutboxStore
from deployd.store import Event, JobStore, Store
from deployd.timefmt import iso_time
from deployd.vocabulary import EventKind, JobState

log = logging.getLogger("deployd.notifications")

FIRST_RETRY = 0.5  # seconds; doubled at each attempt up to MAX_RETRY
MAX_RETRY = 300.0
MIN_ATTEMPTS = 3  # tries a delivery gets before it may be given up
_REMINDER_CHECK = 5.0
# How long a stopping daemon lets a send in flight finish before it hands it back.
STOP_GRACE = 5.0
_BUSY_RETRY = 1.0  # another daemon is delivering to the target: look again this soon
_HOLD_MARGIN = 30.0  # beyond the target's timeout: how long a claim may sit idle in the database


class Notifications:
    """Fills the outbox from the store's events and delivers it to every target."""

    def __init__(self, targets: Sequence[NotifyTarget], *, store: Store,
                 session: aiohttp.ClientSession, metrics: Metrics, base_url: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.targets = {target.name: target for target in targets}
        self.store = store
        self.outbox = OutboxStore(store)
        self.jobs = JobStore(store)
        self.session = session
        self.metrics = metrics
        self.base_url = base_url.rstrip("/")
        self.clock = clock
        self._scan = asyncio.Event()
        self._send = {name: asyncio.Event() for name in self.targets}
        self._failing: set[str] = set()  # targets whose last attempt here was given up
        self._stopping = False
        # Look for jobs owed a reminder often enough to send each close to its time.
        self._idle_check = min([_REMINDER_CHECK, *(t.remind / 2 for t in targets
                                                   if t.remind > 0)])
        self._next_remind = 0.0

    def on_event(self, event: Event) -> None:
        """A store listener: look at the new event soon (never blocks the caller)."""
        self._scan.set()

    async def run(self) -> None:
        """Scan and deliver until `stop` (then return) or cancelled."""
        for name in self.targets:
            self._init_series(name)
            while not self._stopping:
                try:
                    await self.outbox.start_cursor(name)
                    break
                except Exception:  # the store: keep trying, never end notifications silently
                    log.exception("notifications to %s: cannot start; retrying in 5 seconds",
                                  name)
                    await _wait(self._scan, 5.0)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._scan_loop(), name="notifications scan")
                for name in self.targets:
                    group.create_task(self._send_loop(self.targets[name]),
                                      name=f"notifications to {name}")
        finally:
            await self.outbox.close()

    def stop(self) -> None:
        """Start nothing new: `run` returns once each target's attempt in flight is done."""
        self._stopping = True
        self._scan.set()
        for wake in self._send.values():
            wake.set()

    def _init_series(self, name: str) -> None:
        for result in ("sent", "retried", "failed"):
            self.metrics.notifications_total.labels(target=name, result=result)
        self.metrics.notifications_queued.labels(target=name).set(0)

    # -- filling the outbox ----------------------------------------------------------------

    async def _scan_loop(self) -> None:
        while not self._stopping:
            self._scan.clear()
            try:
                await self.scan()
            except Exception:
                log.exception("notifications: scanning events failed; retrying in a second")
                await asyncio.sleep(1.0)
                continue
            await _wait(self._scan, self._idle_check)

    async def scan(self) -> None:
        """Queue what each target is owed: new events, then (on their own timer, not at every
        event) reminders of waiting jobs."""
        remind = self.clock() >= self._next_remind
        if remind:
            self._next_remind = self.clock() + self._idle_check
        for target in self.targets.values():
            queued, scanned = 0, SCAN_BATCH
            while scanned == SCAN_BATCH:
                scanned, wanted = await self.outbox.enqueue_events(target.name,
                                                                   _wanted_by(target))
                queued += wanted
            if remind:
                queued += await self._remind(target)
            if queued:
                self._send[target.name].set()
            await self._publish_queue(target.name)

    async def _remind(self, target: NotifyTarget) -> int:
        if target.remind <= 0:
            return 0
        sent = 0
        now = self.clock()
        for job in await self.jobs.find(state=JobState.PENDING):
            if not target.wants(job.app, EventKind.JOB_PENDING):
                continue
            last = await self.outbox.last_about_job(target.name, job.id) or job.created_at
            if now - last < target.remind:
                continue
            waited = _duration(now - job.created_at)
            # Looked at again under the target's lock: another daemon may have just reminded.
            sent += await self.outbox.enqueue_reminder(target.name, job.app, job.id, {
                "event": None, "app": job.app, "kind": EventKind.JOB_PENDING, "actor": "deployd",
                "at": iso_time(now), "revision": job.bad_head,
                "message": f"job {job.id}: still waiting for approval after {waited}",
                "data": {"job": job.id, "plan": job.plan, "reminder": True},
            }, quiet_since=now - target.remind)
        return sent

    async def _publish_queue(self, name: str) -> None:
        self.metrics.notifications_queued.labels(target=name).set(
            await self.outbox.queued(name))

    # -- delivering ------------------------------------------------------------------------

    async def _send_loop(self, target: NotifyTarget) -> None:
        wake = self._send[target.name]
        while not self._stopping:
            wake.clear()
            try:
                next_at = await self.deliver_due(target)
            except Exception:
                log.exception("notifications to %s: delivery round failed", target.name)
                next_at = self.clock() + 1.0
            timeout = _REMINDER_CHECK if next_at is None else max(0.0, next_at - self.clock())
            await _wait(wake, min(timeout, _REMINDER_CHECK))

    async def deliver_due(self, target: NotifyTarget) -> float | None:
        """Send the target's deliveries in order until one must wait; return when to look
        again (None: nothing is queued).

        In order means the oldest blocks the rest: a receiver never hears of a rollback
        before the bad deploy that caused it.
        """
        next_at: float | None = None
        while not self._stopping:
            more, next_at = await self._attempt(target)
            if not more:
                break
        await self._publish_queue(target.name)
        return next_at

    async def _attempt(self, target: NotifyTarget) -> tuple[bool, float | None]:
        """One attempt at the target's oldest delivery, if it is due and no other daemon is
        making one: (whether the next may go at once, else when to look again)."""
        async with self.outbox.claim(target.name, hold=target.timeout + _HOLD_MARGIN) as claim:
            if claim is None:
                return False, self.clock() + _BUSY_RETRY
            delivery = await claim.oldest(target.name)
            if delivery is None:
                return False, None
            if delivery.next_at > self.clock():
                return False, delivery.next_at
            retry = await self._deliver(target, delivery, claim)
            return retry is None, retry

    async def _deliver(self, target: NotifyTarget, delivery: Delivery,
                       claim: Claim) -> float | None:
        """One attempt; None when the delivery is done with (sent or given up), else when it
        is to be tried again."""
        body = await self._body(target, delivery)
        try:
            error, retry_after = await self._post(target, delivery.delivery, body)
        except Exception as exc:  # a bug must not block the queue behind this delivery
            log.exception("notifications to %s: delivery attempt crashed", target.name)
            error, retry_after = f"delivery attempt crashed ({type(exc).__name__})", None
        if error is None:
            await claim.finish(delivery.id, "sent")
            self.metrics.notifications_total.labels(target=target.name, result="sent").inc()
            if target.name in self._failing:
                self._failing.discard(target.name)
                log.info("notifications to %s: delivering again", target.name)
            return None
        # Patience runs from when the delivery was queued, but a few tries are owed whatever
        # the clock says (a receiver or deployd down past give_up_after left it waiting).
        if (self.clock() - delivery.created_at >= target.give_up_after
                and delivery.attempts + 1 >= MIN_ATTEMPTS):
            await self._give_up(target, delivery, error, claim)
            return None
        # Retry-After is honoured as a floor; "0" must not turn retries into a busy loop.
        wait = max(retry_after or 0.0, _backoff(delivery.attempts))
        when = self.clock() + wait
        await claim.retry_at(delivery.id, when, error)
        self.metrics.notifications_total.labels(target=target.name, result="retried").inc()
        log.info("notifications to %s: %s; retrying in %.1fs", target.name, error, wait)
        return when

    async def _give_up(self, target: NotifyTarget, delivery: Delivery, error: str,
                       claim: Claim) -> None:
        # Once per failing spell (the target's last finished delivery was not given up),
        # whichever daemon gives up: the store says, not this daemon's memory.
        new_spell = await claim.last_finished(target.name) != "failed"
        await claim.finish(delivery.id, "failed", error=error)
        self.metrics.notifications_total.labels(target=target.name, result="failed").inc()
        log.error("notifications to %s: gave up on %s %s after %s: %s", target.name,
                  delivery.app, delivery.kind, _duration(target.give_up_after), error)
        self._failing.add(target.name)
        if new_spell:
            # Told to the other targets (never to this one).
            await self.store.add_event(
                delivery.app, EventKind.NOTIFY_FAILING,
                f"notifications to {target.name} failing for {_duration(target.give_up_after)}"
                f": {error}", data={"target": target.name})

    async def _post(self, target: NotifyTarget, delivery: str, body: bytes
                    ) -> tuple[str | None, float | None]:
        """POST one body: (None, None) on 2xx, else (why, the receiver's Retry-After)."""
        headers = {"Content-Type": "application/json", "X-Deployd-Delivery": delivery,
                   "User-Agent": "deployd"}
        if target.secret is not None:
            digest = hmac.new(target.secret, body, hashlib.sha256).hexdigest()
            headers["X-Deployd-Signature-256"] = f"sha256={digest}"
        try:
            async with asyncio.timeout(target.timeout):
                async with self.session.post(target.url, data=body, headers=headers,
                                             allow_redirects=False) as response:
                    await response.read()
                    if 200 <= response.status < 300:
                        return None, None
                    return (f"answered {response.status}",
                            _retry_after(response.headers.get("Retry-After"), self.clock()))
        except TimeoutError:
            return f"no answer within {target.timeout:g}s", None
        except aiohttp.ClientError as exc:
            # Never str(exc): some aiohttp errors carry the URL, and the URL is a secret.
            return f"cannot deliver ({type(exc).__name__})", None

    async def _body(self, target: NotifyTarget, delivery: Delivery) -> bytes:
        if target.format == "json":
            return json.dumps(delivery.payload, sort_keys=True).encode()
        text = _slack_text(delivery.payload)
        if delivery.job_id is not None \
                and delivery.kind in (EventKind.JOB_OPENED, EventKind.JOB_PENDING):
            text += "\n" + await self._approve_hint(delivery.job_id)
        return json.dumps({"text": text}).encode()

    async def _approve_hint(self, job_id: int) -> str:
        job = await self.jobs.get(job_id)
        if job.state is not JobState.PENDING:
            return f"(job {job_id} is {job.state} now)"
        if job.plan is None:
            return f"Job {job_id} is not ready to approve: {self.base_url}/api/v1/jobs/{job_id}"
        body = json.dumps({"plan": job.plan, "comment": "approved"})
        return (f"Read it: `curl -sS -H \"Authorization: Bearer $DEPLOYD_TOKEN\" "
                f"{self.base_url}/api/v1/jobs/{job_id}`\n"
                f"Approve it: `curl -sS -H \"Authorization: Bearer $DEPLOYD_TOKEN\" -X POST "
                f"-d '{body}' {self.base_url}/api/v1/jobs/{job_id}/approve`")


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Until `event` is set or `seconds` pass.

    Not `asyncio.wait_for`: on Python 3.11 it can swallow a cancellation that arrives as the
    event is set, and a loop that cannot be cancelled hangs the daemon's shutdown.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def _wanted_by(target: NotifyTarget) -> Callable[[Event], bool]:
    def wants(event: Event) -> bool:
        if event.kind == EventKind.NOTIFY_FAILING and event.data.get("target") == target.name:
            return False  # a target is not told that it is failing: it would not hear it
        return target.wants(event.app, event.kind)
    return wants


def _slack_text(payload: dict[str, Any]) -> str:
    revision = payload.get("revision")
    parts = [f"*{_slack(payload['app'])}* `{_slack(payload['kind'])}`: "
             f"{_slack(payload['message'])}"]
    details = []
    if revision:
        details.append(f"revision `{_slack(str(revision)[:12])}`")
    if payload.get("actor"):
        details.append(f"by {_slack(payload['actor'])}")
    if details:
        parts.append(", ".join(details))
    return "\n".join(parts)


def _slack(text: object) -> str:
    """Text shown as text: messages carry what pushers and token holders wrote, and Slack
    would render `<https://...|label>` as a link and `<!channel>` as a mention."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _backoff(attempts: int) -> float:
    wait = min(MAX_RETRY, FIRST_RETRY * 2.0 ** min(attempts, 20))
    return wait + random.uniform(0, wait / 4)


def _retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date), capped at MAX_RETRY."""
    if not value:
        return None
    if re.fullmatch(r"[0-9]{1,9}", value.strip()):
        return min(MAX_RETRY, float(value.strip()))
    try:
        when = float(email.utils.parsedate_to_datetime(value).timestamp())
    except (TypeError, ValueError):
        return None
    return min(MAX_RETRY, max(0.0, when - now))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
