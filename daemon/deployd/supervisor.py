"""One app's life: watch the branch, deploy new heads, bake them, roll back bad ones.

    poll: fetch mirror -> branch head -> (deploy mode) deploy a new head
                                      -> (observe mode) record releases others made
    judge: deploy in its bake window + health snapshot -> policy.judge_bake
           good -> last good;  bad -> quarantine + roll back to last good (once);
           still bad after that rollback -> pause and ask a human

Every step is recorded in the store before it is acted on, so `recover()` on start-up can
finish or undo whatever a killed daemon left in flight. One operation (deploy or rollback)
runs at a time per app; it runs in its own task so that a REST client hanging up or the
daemon shutting down never abandons hosts half way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

from deployd import policy
from deployd.archive import Limits
from deployd.config import AppConfig
from deployd.errors import Conflict, DeploydError, FleetError, Invalid, NotFound
from deployd.fleet import Fleet
from deployd.git import Mirror
from deployd.health import HealthChange, HealthMonitor
from deployd.metrics import Metrics
from deployd.rescue import Rescue
from deployd.store import Deploy, Job, Store

log = logging.getLogger("deployd.supervisor")
T = TypeVar("T")

SYSTEM_ACTOR = "deployd"
FETCH_SPACING = 1.0  # seconds between fetches that webhooks (not the interval) ask for
FETCH_INTERVAL = 2.0
"""REST calls start at most one fetch per this many seconds, so they cannot pin the mirror."""


class AppSupervisor:
    """Runs one app: its poll loop, its operations and its bake judgements."""

    def __init__(
        self,
        app: AppConfig,
        *,
        store: Store,
        mirror: Mirror,
        fleet: Fleet,
        metrics: Metrics,
        health: HealthMonitor | None = None,
        rescue: Rescue | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.store = store
        self.mirror = mirror
        self.fleet = fleet
        self.metrics = metrics
        self.health = health
        self.rescue = rescue
        self.clock = clock
        self.head: str | None = None
        self.fetched = False
        self.fetch_error: str | None = None
        self._fetch_started = float("-inf")  # monotonic start of the last fetch attempt
        self._fetch_lock = asyncio.Lock()
        self._operation = asyncio.Lock()
        self._operation_name: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._fetch_requested = False
        self._last_poll = self._last_requested = float("-inf")
        self._recheck = False
        self._stopping = False
        self._attempted: str | None = None
        self._observe_split: frozenset[str] | None = None
        self.pristine = False
        self._ancestry_key: tuple[str | None, frozenset[str]] | None = None
        self._quarantined_ancestor = False

    @property
    def name(self) -> str:
        return self.app.name

    @property
    def busy(self) -> str | None:
        """What operation is running now, if any."""
        return self._operation_name

    def wake(self) -> None:
        """Re-run the loop now (a health change, a resume)."""
        self._wake.set()

    def request_fetch(self) -> None:
        """Fetch at the next round, now if idle (a webhook announced a push).

        Requests made while one is pending or a fetch runs coalesce into one more fetch.
        """
        self._fetch_requested = True
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Recover, then poll and judge until stopped.

        A failure in one round (the store, a bug) is logged and the round retried after a
        pause: an app's supervision must never end while the daemon runs.
        """
        while not self._stopping:
            try:
                await self.recover()
                break
            except Exception:
                # Acting before recovery could redo what a killed daemon left half done.
                log.exception("%s: recovery failed; retrying in 5 seconds", self.name)
                await asyncio.sleep(5.0)
        # Open every host's connection now, so the first rollback pays no handshake.
        await self._guarded("connecting to hosts", self.fleet.connect)
        while not self._stopping:
            # Cleared before this round, not after: a health change announced while the round
            # awaits must wake the next one at once, not wait for the timer.
            self._wake.clear()
            if self.clock() >= self._next_poll():
                if self._fetch_requested:
                    self._fetch_requested, self._last_requested = False, self.clock()
                self._last_poll = self.clock()
                self._recheck = False
                await self._guarded("poll", self.poll)
            elif self._recheck:
                self._recheck = False
                await self._guarded("deploy check", self._recheck_head)
            await self._guarded("judging", self.judge)
            timeout = await self._guarded("bake timer", self._next_bake_check) or 1.0
            timeout = max(0.0, min(self._next_poll() - self.clock(), timeout))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _next_poll(self) -> float:
        """When to poll next: at the interval, or sooner when a fetch was requested.

        Requested fetches start at most one per FETCH_SPACING, so a flood of webhooks costs
        a fetch a second at most, while the first push after a quiet spell is fetched at once.
        """
        due = self._last_poll + self.app.poll_interval
        if self._fetch_requested:
            due = min(due, self._last_requested + FETCH_SPACING)
        return due

    async def _recheck_head(self) -> None:
        """After an operation: deploy a head the polls noticed while the slot was held."""
        if self.app.mode == "deploy":
            await self._maybe_deploy(self.head)

    async def _guarded(self, what: str, step: Callable[[], Awaitable[T]]) -> T | None:
        try:
            return await step()
        except Exception:
            log.exception("%s: %s failed; retrying in a second", self.name, what)
            await asyncio.sleep(1.0)
            return None

    async def stop(self, grace: float) -> None:
        """Take no new work; let a running operation finish within `grace`, then cancel."""
        self._stopping = True
        self._wake.set()
        pending = [task for task in self._tasks if not task.done()]
        if pending:
            log.info("%s: waiting up to %.0fs for %s", self.name, grace, self._operation_name)
            _, still = await asyncio.wait(pending, timeout=grace)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)

    async def _next_bake_check(self) -> float:
        record = await self._baking()
        if record is None:
            return float("inf")
        if record.bake_state == "grace" and record.bake_started_at is not None:
            # Start the bake when grace ends, not up to a second later.
            left = record.bake_started_at + self.app.rollback.grace - self.clock()
            return max(0.0, min(left, 1.0))
        # Re-judge at least every second while baking: the health monitor wakes us sooner.
        return 1.0

    async def poll(self) -> None:
        """Fetch the mirror, notice the head, and deploy or observe."""
        if not await self._fetch():
            return
        head = await self.mirror.branch_head(self.app.branch)
        if head != self.head:
            if self.head is not None or head is not None:
                await self.store.add_event(self.name, "branch.moved",
                                           f"{self.app.branch} is now {_short(head)}",
                                           revision=head, data={"previous": self.head})
            self.head = head
        await self._update_pristine()
        if self.rescue is not None:
            await self.rescue.housekeeping(head)
            if not self._operation.locked():
                await self._resume_jobs()  # approved jobs a restart left waiting
        if self.app.mode == "observe":
            await self.observe()
        else:
            await self._maybe_deploy(head)

    async def _fetch(self) -> bool:
        started = self._fetch_started = time.monotonic()
        try:
            await self.mirror.fetch()
        except DeploydError as exc:
            self.metrics.git_fetch_errors_total.labels(app=self.name).inc()
            if self.fetch_error != str(exc):
                await self.store.add_event(self.name, "git.fetch_failed", str(exc))
                log.warning("%s: fetch failed: %s", self.name, exc)
            self.fetch_error = str(exc)
            return False
        finally:
            self.metrics.git_fetch_duration_seconds.labels(app=self.name).observe(
                time.monotonic() - started)
        if self.fetch_error is not None:
            await self.store.add_event(self.name, "git.fetch_recovered", "fetch works again")
        self.fetch_error = None
        self.fetched = True
        return True

    async def _maybe_deploy(self, head: str | None) -> None:
        state = await self.store.app_state(self.name)
        live = await self.store.last_live(self.name)
        decision = policy.should_deploy(
            head,
            paused=state.paused,
            quarantined=head is not None and await self.store.is_quarantined(self.name, head),
            live=live.revision if live else None,
            attempted=self._attempted,
        )
        if not decision.deploy or head is None or self._operation.locked():
            return
        await self._spawn(self._deploy(head, trigger="branch", actor=SYSTEM_ACTOR), "deploy")

    # -- operations ----------------------------------------------------------------------

    async def request_deploy(self, revision: str, *, actor: str, force: bool = False) -> Deploy:
        """Deploy a revision now (REST); returns the record of the deploy just started.

        A quarantined revision, or one the branch does not hold, needs `force` (Invalid
        otherwise); what force overrode is recorded with the deploy.
        """
        if self.app.mode == "observe":
            raise Conflict(f"{self.name} is in observe mode: another tool deploys it "
                           "(rollbacks still work)")
        sha = await self.mirror.resolve_strict(revision)
        reasons = await self._needs_force(sha)
        if reasons and not force:
            raise Invalid(f"{self.name}: {revision} ({_short(sha)}) is {' and '.join(reasons)}; "
                          'deploy it anyway with "force": true')
        started: asyncio.Future[Deploy] = asyncio.get_running_loop().create_future()
        await self._spawn(self._deploy(sha, trigger="manual", actor=actor, started=started,
                                       forced="; ".join(reasons) or None),
                          "deploy", started)
        return await started

    async def _needs_force(self, sha: str) -> list[str]:
        """Why deploying `sha` by hand needs `"force": true` (empty: it does not)."""
        reasons = []
        for item in await self.store.quarantined(self.name):
            if item.revision == sha:
                reasons.append(f"quarantined ({item.reason})")
        head = await self.mirror.branch_head(self.app.branch)
        if head is None or not await self.mirror.is_ancestor(sha, head):
            reasons.append(f"not on {self.app.branch}")
        return reasons

    async def request_rollback(self, release: str | None, *, actor: str,
                               reason: str = "requested") -> Deploy:
        """Roll back to `release` or to the previous one (REST)."""
        live = await self.store.last_live(self.name)
        if release is None:
            history = await self.store.deploys(self.name, limit=200)
            release = policy.previous_release(history, live.release if live else None)
            if release is None:
                raise Conflict(f"{self.name}: no previous release on record to roll back to")
        await self._release_revision(release)  # NotFound before anything starts
        started: asyncio.Future[Deploy] = asyncio.get_running_loop().create_future()
        await self._spawn(
            self._rollback(release, trigger="manual", actor=actor, reason=reason,
                           started=started),
            "rollback", started,
        )
        return await started

    async def _reserve(self, name: str) -> None:
        """Take the app's operation slot now, or raise Conflict naming what holds it."""
        if self._stopping:
            raise Conflict(f"{self.name}: deployd is shutting down")
        if self._operation.locked():
            raise Conflict(f"{self.name}: a {self._operation_name} is already running")
        await self._operation.acquire()
        self._operation_name = name

    def _unreserve(self) -> None:
        self._operation_name = None
        self._operation.release()

    async def _spawn(self, operation: Coroutine[Any, Any, Any], name: str,
                     started: asyncio.Future[Deploy] | None = None, *,
                     reserved: bool = False) -> None:
        """Run an operation in its own task, one at a time per app.

        `started` is the future a REST caller waits on for the operation's record; if the
        operation fails before recording anything, the caller gets that error instead.
        With `reserved`, the caller already holds the slot (see `_reserve`).
        """
        if not reserved:
            try:
                await self._reserve(name)
            except Conflict:
                operation.close()
                raise

        async def run() -> None:
            try:
                await operation
            except Exception as exc:
                log.exception("%s: %s crashed", self.name, name)
                if started is not None and not started.done():
                    started.set_exception(exc)
            finally:
                if started is not None and not started.done():
                    started.set_exception(Conflict(f"{self.name}: the {name} was cancelled"))
                self._operation_name = None
                self._operation.release()
                # A head noticed while the slot was held is deployed now, not a poll later.
                self._recheck = True
                self.wake()

        task = asyncio.create_task(run(), name=f"{self.name}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deploy(self, revision: str, *, trigger: str, actor: str,
                      started: asyncio.Future[Deploy] | None = None,
                      on_start: Callable[[Deploy], Awaitable[object]] | None = None,
                      forced: str | None = None) -> Deploy:
        if trigger != "manual":
            # A manual deploy is not an attempt at the branch head: remembering it would make
            # the next poll deploy the head again over what the operator chose.
            self._attempted = revision
        live = await self.store.last_live(self.name)
        record = await self.store.start_deploy(
            self.name, "deploy", revision, trigger=trigger, actor=actor,
            previous_release=live.release if live else None,
            previous_revision=live.revision if live else None, forced=forced,
        )
        _resolve(started, record)
        if on_start is not None:
            await on_start(record)
        how = trigger if forced is None else f"{trigger}, forced: {forced}"
        await self.store.add_event(self.name, "deploy.started",
                                   f"deploying {_short(revision)} ({how})", actor=actor,
                                   revision=revision,
                                   data={"deploy": record.id, **({"forced": forced} if forced
                                                                 else {})})
        clock_start = time.monotonic()
        try:
            tarball = await self.mirror.archive(revision, Limits(
                max_bytes=self.app.max_release_size, max_files=self.app.max_release_files))
            state = await self.store.app_state(self.name)
            protect = {state.last_good_release} if state.last_good_release else set()
            outcome = await self.fleet.deploy(revision, tarball, branch=self.app.branch,
                                              actor=actor, protect=protect)
        except DeploydError as exc:
            return await self._deploy_failed(record, exc, time.monotonic() - clock_start)
        await self.store.set_host_results(record.id, {h: ("switched", None)
                                                      for h in outcome.hosts})
        record = await self.store.update_deploy(
            record.id, state="succeeded", release=outcome.release, **self._open_bake())
        await self._retire_bakes(record)
        self._after_switch(record, "succeeded", time.monotonic() - clock_start)
        await self.store.add_event(
            self.name, "deploy.succeeded",
            f"{_short(revision)} live as release {outcome.release} on {_hosts(outcome.hosts)}",
            actor=actor, revision=revision, data={"deploy": record.id,
                                                  "release": outcome.release,
                                                  **_output(outcome.output)})
        return record

    async def _deploy_failed(self, record: Deploy, exc: DeploydError, took: float) -> Deploy:
        failures = exc.failures if isinstance(exc, FleetError) else {}
        await self.store.set_host_results(record.id, {h: ("failed", str(e))
                                                      for h, e in failures.items()})
        record = await self.store.update_deploy(record.id, state="failed", error=str(exc))
        self.metrics.deploys_total.labels(app=self.name, result="failed").inc()
        self.metrics.deploy_duration_seconds.labels(app=self.name).observe(took)
        await self.store.add_event(self.name, "deploy.failed",
                                   f"deploy of {_short(record.revision)} failed: {exc}",
                                   actor=record.actor, revision=record.revision,
                                   data={"deploy": record.id,
                                         "hosts": {h: str(e) for h, e in failures.items()}})
        log.error("%s: deploy of %s failed: %s", self.name, _short(record.revision), exc)
        return record

    def _after_switch(self, record: Deploy, result: str, took: float) -> None:
        self.metrics.deploys_total.labels(app=self.name, result=result).inc()
        self.metrics.deploy_duration_seconds.labels(app=self.name).observe(took)
        self.metrics.last_deploy_timestamp_seconds.labels(app=self.name).set(self.clock())
        self.metrics.set_live_revision(self.name, record.revision)
        if self.health is not None:
            self.health.reset()

    def _open_bake(self) -> dict[str, Any]:
        """The record fields that start a bake now: grace, then the bake window (the one
        place a bake is opened, for deploys, rollbacks, observed releases and recoveries)."""
        now = self.clock()
        return {"bake_state": "grace", "bake_started_at": now,
                "bake_until": now + self.app.rollback.grace + self.app.rollback.bake}

    async def _rollback(self, release: str, *, trigger: str, actor: str, reason: str,
                        started: asyncio.Future[Deploy] | None = None) -> Deploy:
        live = await self.store.last_live(self.name)
        revision = await self._release_revision(release)
        record = await self.store.start_deploy(
            self.name, "rollback", revision or "unknown", trigger=trigger, actor=actor,
            release=release, previous_release=live.release if live else None,
            previous_revision=live.revision if live else None,
        )
        _resolve(started, record)
        await self.store.add_event(self.name, "rollback.started",
                                   f"rolling back to release {release}: {reason}",
                                   actor=actor, revision=revision,
                                   data={"deploy": record.id, "release": release})
        if trigger == "manual" and live is not None and live.revision != revision:
            # A revision a human rolled back is not deployed again by deployd itself.
            await self._quarantine(live.revision, f"rolled back by {actor}: {reason}", actor)
        return await self._run_rollback(record, reason=reason)

    async def _run_rollback(self, record: Deploy, *, reason: str,
                            hosts: list[str] | None = None) -> Deploy:
        assert record.release is not None
        clock_start = time.monotonic()
        try:
            state = await self.store.app_state(self.name)
            protect = {state.last_good_release} if state.last_good_release else set()
            outcome = await self.fleet.rollback(record.release, reason=reason,
                                                actor=record.actor, protect=protect,
                                                hosts=hosts)
        except DeploydError as exc:
            failures = exc.failures if isinstance(exc, FleetError) else {}
            await self.store.set_host_results(record.id, {h: ("failed", str(e))
                                                          for h, e in failures.items()})
            record = await self.store.update_deploy(record.id, state="failed", error=str(exc))
            await self.store.add_event(self.name, "rollback.failed",
                                       f"rollback to {record.release} failed: {exc}",
                                       actor=record.actor, revision=record.revision,
                                       data={"deploy": record.id,
                                             "hosts": {h: str(e) for h, e in failures.items()}})
            log.error("%s: rollback to %s failed: %s", self.name, record.release, exc)
            return record
        took = time.monotonic() - clock_start
        await self.store.set_host_results(record.id, {h: ("switched", None)
                                                      for h in outcome.hosts})
        revision = outcome.revision or record.revision
        record = await self.store.update_deploy(record.id, state="succeeded",
                                                **self._open_bake())
        await self._retire_bakes(record)
        self.metrics.rollbacks_total.labels(app=self.name, trigger=record.trigger).inc()
        self.metrics.rollback_duration_seconds.labels(app=self.name).observe(took)
        self.metrics.last_rollback_timestamp_seconds.labels(app=self.name).set(self.clock())
        self.metrics.set_live_revision(self.name, revision)
        if self.health is not None:
            self.health.reset()
        await self.store.add_event(
            self.name, "rollback.succeeded",
            f"release {record.release} ({_short(revision)}) live again on "
            f"{_hosts(outcome.hosts)} in {took:.2f}s",
            actor=record.actor, revision=revision,
            data={"deploy": record.id, "release": record.release, "seconds": round(took, 3),
                  **_output(outcome.output)})
        return record

    async def _release_revision(self, release: str) -> str | None:
        for record in await self.store.deploys(self.name, limit=500):
            if record.release == release and record.state == "succeeded":
                return record.revision
        states = await self.fleet.state()
        for state in states.values():
            if isinstance(state, DeploydError):
                continue
            for item in state.releases:
                if item.name == release:
                    return item.revision
        raise NotFound(f"{self.name}: no release {release} on record or on any host")

    # -- rescue jobs ---------------------------------------------------------------------

    def _rescue(self) -> Rescue:
        if self.rescue is None:
            raise Conflict(f"{self.name}: rescue jobs are not available for this app")
        return self.rescue

    async def open_job(self, *, commits: list[str], base: str | None, actor: str) -> Job:
        """Open a rescue job by hand: base (default last good) + the named commits."""
        rescue = self._rescue()
        await self._fresh_fetch()
        head = await self.mirror.branch_head(self.app.branch)
        if head is None:
            raise Conflict(f"{self.name}: branch {self.app.branch} does not exist")
        state = await self.store.app_state(self.name)
        if base is None:
            base = state.last_good_revision
            if base is None:
                raise Invalid(f"{self.name}: no last good revision on record; name a base")
        await rescue.check_base(base, head=head, last_good=state.last_good_revision)
        return await rescue.open(base=base, bad_head=head, requester=actor,
                                 reason=f"opened by {actor}", commits=commits)

    async def _fresh_fetch(self) -> None:
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
                await self._fetch()
        if self.fetch_error is not None:
            raise Conflict(f"{self.name}: cannot fetch the branch: {self.fetch_error}")

    async def approve_job(self, job: Job, *, plan: str, actor: str, comment: str) -> Job:
        """Approve exactly `plan` and start the transplant; 409 if anything moved."""
        rescue = self._rescue()
        await rescue.check_approval(job, plan=plan, actor=actor)
        # Hold the operation slot from before the approval is recorded until the transplant
        # runs: nothing (a poll resuming jobs, a REST deploy) can slip in between.
        await self._reserve("transplant")
        try:
            if not await self._fetch():
                raise Conflict(f"{self.name}: cannot reach the remote to check the branch "
                               f"({self.fetch_error}); nothing approved, try again")
            head = await self.mirror.branch_head(self.app.branch)
            if head != job.bad_head:
                await rescue.housekeeping(head)
                raise Conflict(f"rescue job {job.id} superseded: {self.app.branch} moved to "
                               f"{_short(head)} since the job was built")
            approved = await rescue.approve(job, plan=plan, actor=actor, comment=comment)
        except BaseException:
            self._unreserve()
            raise
        await self._spawn(self._transplant_and_deploy(approved, actor), "transplant",
                          reserved=True)
        return approved

    async def _transplant_and_deploy(self, job: Job, approver: str) -> None:
        rescue = self._rescue()
        try:
            new_head = await rescue.transplant(job, approver=approver)
        except Exception as exc:
            # Superseded jobs were ended by rescue (nothing overwritten); anything else fails
            # the job here, so no job stays `running` with nothing behind it.
            await rescue.fail(job, f"transplant failed: {exc}")
            if not isinstance(exc, DeploydError):
                raise
            return
        self.head = new_head
        record = await self._deploy(new_head, trigger="rescue", actor=approver,
                                    on_start=lambda r: rescue.jobs.update(job.id, deploy_id=r.id))
        if record.state != "succeeded":
            await rescue.fail(job, f"deploy of {_short(new_head)} failed: {record.error}")

    async def _resume_jobs(self) -> None:
        """Carry on with transplants a killed daemon left approved or running."""
        if self.rescue is None:
            return
        for job in await self.rescue.in_flight():
            if job.deploy_id is not None:
                record = await self.store.deploy(job.deploy_id)
                if record.state in ("failed", "interrupted"):
                    await self.rescue.fail(job, f"deploy of {_short(record.revision)} "
                                           f"{record.state}: {record.error}")
                elif record.bake_state == "good":
                    await self.rescue.finish(job, healthy=True, reason="")
                elif record.bake_state in ("bad", "skipped"):
                    what = "unhealthy" if record.bake_state == "bad" else "replaced"
                    await self.rescue.fail(job, f"deploy of {_short(record.revision)} was {what}")
                continue  # otherwise its bake carries on like any other
            approvals = [a for a in await self.rescue.jobs.approvals(job.id)
                         if a.decision == "approve"]
            approver = approvals[-1].actor if approvals else SYSTEM_ACTOR
            await self.store.add_event(self.name, "job.resumed",
                                       f"job {job.id}: resuming the transplant after a restart",
                                       data={"job": job.id})
            await self._spawn(self._transplant_and_deploy(job, approver), "transplant")
            return  # one operation at a time; the next poll picks up any other

    # -- observe mode --------------------------------------------------------------------

    async def observe(self) -> None:
        """Record a release that someone else made live on every host."""
        states = await self.fleet.state()
        currents = {name: (s.current, s.current_revision) for name, s in states.items()
                    if not isinstance(s, DeploydError)}
        if not currents or self._operation.locked():
            return
        distinct = set(currents.values())
        if len(distinct) != 1:
            split = frozenset(f"{h}={c[0]}" for h, c in currents.items())
            if split != self._observe_split:
                self._observe_split = split
                await self.store.add_event(self.name, "observe.split",
                                           "hosts disagree about the live release: "
                                           + ", ".join(sorted(split)))
            return
        self._observe_split = None
        release, revision = distinct.pop()
        live = await self.store.last_live(self.name)
        if release is None or (live is not None and live.release == release):
            return
        record = await self.store.start_deploy(
            self.name, "observed", revision or "unknown", trigger="observed", actor="observed",
            release=release, previous_release=live.release if live else None,
            previous_revision=live.revision if live else None, state="succeeded")
        record = await self.store.update_deploy(record.id, state="succeeded",
                                                **self._open_bake())
        await self._retire_bakes(record)
        self._after_switch(record, "observed", 0.0)
        await self.store.add_event(self.name, "deploy.observed",
                                   f"release {release} ({_short(revision)}) made live by "
                                   "another tool", revision=revision,
                                   data={"deploy": record.id, "release": release})

    # -- judging -------------------------------------------------------------------------

    async def _baking(self) -> Deploy | None:
        """The live release's record while it is in its bake window.

        The live record, not the newest one: a later deploy that failed before switching
        (or a failed rollback) must not leave what is live unjudged.
        """
        live = await self.store.last_live(self.name)
        if live is not None and live.bake_state in ("grace", "baking"):
            return live
        return None

    async def _retire_bakes(self, live: Deploy) -> None:
        """A new release went live: older bakes end unjudged, and their rescue jobs fail."""
        for record in await self.store.deploys(self.name, limit=50):
            if record.id == live.id or record.bake_state not in ("grace", "baking"):
                continue
            await self.store.update_deploy(record.id, bake_state="skipped")
            job = await self._job_for(record)
            if job is not None and self.rescue is not None:
                await self.rescue.fail(job, f"release {record.release} was replaced by "
                                       f"{live.release} before its bake ended")

    async def judge(self) -> None:
        """Judge the deploy in its bake window, if any, and act on the verdict."""
        record = await self._baking()
        if record is None or self._operation.locked():
            return
        assert record.bake_started_at is not None and record.bake_until is not None
        if record.bake_state == "grace" \
                and self.clock() >= record.bake_started_at + self.app.rollback.grace:
            # Failures during grace do not count: a host made unhealthy by them alone (an app
            # still starting) must fail `failures` times again in the bake to count.
            if self.health is not None:
                self.health.reset()
            await self.store.update_deploy(record.id, bake_state="baking")
            return
        facts = policy.BakeFacts(
            now=self.clock(), bake_started_at=record.bake_started_at,
            grace=self.app.rollback.grace, bake_until=record.bake_until,
            unhealthy_hosts=self.health.unhealthy_hosts() if self.health else [],
            total_hosts=len(self.app.hosts),
            failing_metrics=self.health.metric_failing() if self.health else [],
            no_data_metrics=self._silent_through_bake(record),
            threshold=self.app.rollback.unhealthy_hosts,
            evidence_since=self.health.evidence_since if self.health else float("-inf"),
            observation=self._observation_time(),
        )
        verdict = policy.judge_bake(facts)
        if verdict.verdict == "wait":
            if verdict.reason == "baking" and record.bake_state == "grace":
                await self.store.update_deploy(record.id, bake_state="baking")
            return
        if verdict.verdict == "good":
            await self._bake_good(record)
        elif verdict.verdict == "no_data":
            await self.store.update_deploy(record.id, bake_state="bad")
            self.metrics.bake_verdicts_total.labels(app=self.name, verdict="no_data").inc()
            job = await self._job_for(record)
            if job is not None and self.rescue is not None:
                await self.rescue.fail(job, f"cannot judge the rebuilt head: {verdict.reason}")
            await self.pause(SYSTEM_ACTOR, f"cannot judge {_short(record.revision)}: "
                             f"{verdict.reason}; a human must decide")
        else:
            await self._bake_bad(record, verdict.reason)

    def _silent_through_bake(self, record: Deploy) -> list[str]:
        """Metric checks with no data since the bake began (not a blip at its end)."""
        if self.health is None or record.bake_started_at is None:
            return []
        bake_start = record.bake_started_at + self.app.rollback.grace
        silent = []
        metrics = self.health.snapshot().metrics
        for check in self.app.checks:
            state = metrics.get(check.name)
            if state is None or state.no_data_since is None:
                continue
            # The first probe after the bake began may come one interval (and timeout) later.
            if state.no_data_since <= bake_start + check.interval + check.timeout + 1.0:
                silent.append(check.name)
        return silent

    async def _bake_good(self, record: Deploy) -> None:
        await self.store.update_deploy(record.id, bake_state="good")
        self.metrics.bake_verdicts_total.labels(app=self.name, verdict="good").inc()
        # A rollback that bakes healthy makes its release the newest good one: an operator
        # who rolled away from a release should not be sent back to it automatically.
        await self.store.set_last_good(self.name, record.revision, record.release)
        await self.store.add_event(self.name, "bake.healthy",
                                   f"{_short(record.revision)} healthy through its bake window",
                                   revision=record.revision, data={"deploy": record.id})
        job = await self._job_for(record)
        if job is not None and self.rescue is not None:
            await self.rescue.finish(job, healthy=True, reason="")
        await self._update_pristine()

    async def _bake_bad(self, record: Deploy, reason: str) -> None:
        await self.store.update_deploy(record.id, bake_state="bad")
        self.metrics.bake_verdicts_total.labels(app=self.name, verdict="bad").inc()
        await self.store.add_event(self.name, "bake.failed",
                                   f"{_short(record.revision)} is unhealthy: {reason}"
                                   + self._failing_checks(),
                                   revision=record.revision,
                                   data={"deploy": record.id, "health": self._health_detail()})
        await self._act_on_bad(record, reason)

    async def _act_on_bad(self, record: Deploy, reason: str) -> None:
        """Quarantine and roll back a bad release (or pause when that is not possible).

        A rescue deploy's job fails once that is done, whichever way it went.
        """
        job = await self._job_for(record)

        async def fail_job() -> None:
            if job is not None and self.rescue is not None:
                await self.rescue.finish(job, healthy=False,
                                         reason=f"the rebuilt head was unhealthy: {reason}")

        state = await self.store.app_state(self.name)
        if record.kind == "rollback":
            await self.pause(SYSTEM_ACTOR, f"still unhealthy after rolling back to "
                             f"{record.release}; not rolling back further")
            return
        await self._quarantine(record.revision, reason, SYSTEM_ACTOR)
        if state.paused or not self.app.rollback.auto:
            why = "paused" if state.paused else "automatic rollback is off"
            await self.store.add_event(self.name, "rollback.skipped",
                                       f"not rolling back by itself: {why}",
                                       revision=record.revision)
            await fail_job()
            return
        target = state.last_good_release or record.previous_release
        if target is None:
            await self.pause(SYSTEM_ACTOR, "bad deploy and no earlier release to roll back to")
            await fail_job()
            return

        async def roll_back() -> None:
            try:
                rollback = await self._rollback(target, trigger="health", actor=SYSTEM_ACTOR,
                                                reason=reason)
            finally:
                await fail_job()
            if rollback.state != "succeeded":
                # Some hosts may still run the bad release: a human must look now.
                await self.pause(SYSTEM_ACTOR, f"automatic rollback to {target} failed: "
                                 f"{rollback.error}")
            elif job is None:
                await self._open_job_after_rollback(rollback, reason)

        # An operation like any other: it holds the app's operation lock (no REST deploy
        # interleaves) and a shutdown lets it finish instead of cancelling it half way.
        try:
            await self._spawn(roll_back(), "rollback")
        except Conflict as exc:
            await self.store.add_event(self.name, "rollback.skipped",
                                       f"not rolling back by itself: {exc}",
                                       revision=record.revision)
            await fail_job()

    async def _job_for(self, record: Deploy) -> Job | None:
        if self.rescue is None or record.trigger != "rescue":
            return None
        return await self.rescue.job_for_deploy(record.id)

    async def _open_job_after_rollback(self, rollback: Deploy, reason: str) -> None:
        """Queue the rescue proposal: the live (good) revision + the marked commits."""
        if self.rescue is None or self.head is None or rollback.revision == "unknown":
            return
        try:
            await self.rescue.open(base=rollback.revision, bad_head=self.head,
                                   requester=SYSTEM_ACTOR, reason=reason)
        except DeploydError as exc:
            await self.store.add_event(self.name, "job.not_opened",
                                       f"no rescue job opened: {exc}", revision=self.head)

    async def _quarantine(self, revision: str, reason: str, actor: str) -> None:
        if await self.store.quarantine(self.name, revision, reason=reason, actor=actor):
            await self.store.add_event(self.name, "quarantine.added",
                                       f"{_short(revision)} quarantined: {reason}",
                                       actor=actor, revision=revision)
        await self._update_pristine()  # not only at the next poll: it may be minutes away

    def _failing_checks(self) -> str:
        """`; failing: web1 http (status 500 ...)` for the event a human reads first."""
        if self.health is None:
            return ""
        failing = [f"{host.name} {check.name} ({check.last_reason})"
                   for host in self.health.snapshot().hosts.values() if host.healthy is False
                   for check in host.checks.values() if check.state == "unhealthy"]
        return "; failing: " + ", ".join(failing) if failing else ""

    def _health_detail(self) -> dict[str, Any]:
        if self.health is None:
            return {}
        return self.health.snapshot().to_json()

    async def on_health_change(self, change: HealthChange) -> None:
        """Record a host's (or metric check's) health turning, and re-judge at once."""
        word = "healthy" if change.healthy else "unhealthy"
        await self.store.add_event(self.name, "health.changed",
                                   f"{change.subject} is {word}"
                                   + (": " + "; ".join(change.reasons) if change.reasons else ""),
                                   data={"subject": change.subject, "healthy": change.healthy})
        self.wake()

    # -- pause / resume ------------------------------------------------------------------

    async def pause(self, actor: str, reason: str) -> None:
        await self.store.set_paused(self.name, True, actor=actor, reason=reason)
        self.metrics.paused.labels(app=self.name).set(1)
        await self.store.add_event(self.name, "app.paused", f"paused by {actor}: {reason}",
                                   actor=actor)
        log.warning("%s: paused by %s: %s", self.name, actor, reason)

    async def resume(self, actor: str, reason: str = "") -> None:
        await self.store.set_paused(self.name, False, actor=actor, reason=reason)
        self.metrics.paused.labels(app=self.name).set(0)
        self._attempted = None
        await self.store.add_event(self.name, "app.resumed",
                                   f"resumed by {actor}" + (f": {reason}" if reason else ""),
                                   actor=actor)
        self.wake()

    # -- state for REST and metrics ------------------------------------------------------

    async def _update_pristine(self) -> None:
        head = self.head
        state = await self.store.app_state(self.name)
        bad = frozenset(q.revision for q in await self.store.quarantined(self.name))
        key = (head, bad)
        if key != self._ancestry_key:
            # One history walk per quarantined revision: only when the head or the list
            # changed, not at every poll.
            self._ancestry_key, self._quarantined_ancestor = key, False
            for revision in bad if head is not None else ():
                with contextlib.suppress(DeploydError):
                    if revision != head and await self.mirror.is_ancestor(revision, str(head)):
                        self._quarantined_ancestor = True
                        break
        ancestor = self._quarantined_ancestor
        pristine = policy.is_pristine(head, head_quarantined=head in bad,
                                      last_good=state.last_good_revision,
                                      quarantined_ancestor=ancestor)
        self.pristine = pristine
        self.metrics.branch_pristine.labels(app=self.name).set(1 if pristine else 0)

    async def summary(self) -> dict[str, Any]:
        """The app as `GET /api/v1/apps` shows it."""
        state = await self.store.app_state(self.name)
        live = await self.store.last_live(self.name)
        latest = await self.store.deploys(self.name, limit=1)
        return {
            "name": self.name,
            "mode": self.app.mode,
            "branch": self.app.branch,
            "head": self.head,
            "deployed": {"revision": live.revision, "release": live.release} if live else None,
            "last_good": {"revision": state.last_good_revision,
                          "release": state.last_good_release},
            "pristine": self.pristine,
            "paused": {"by": state.paused_by, "reason": state.paused_reason,
                       "at": state.paused_at} if state.paused else None,
            "health": self._health_summary(),
            "busy": self._operation_name,
            "latest": await self._latest_json(latest[0]) if latest else None,
            "fetch_error": self.fetch_error,
        }

    async def _latest_json(self, record: Deploy) -> dict[str, Any]:
        """The latest deploy or rollback, with what its hooks printed when it succeeded."""
        shown = record.to_json()
        if record.state == "succeeded" and record.kind in ("deploy", "rollback"):
            event = await self.store.deploy_event(self.name, record.id,
                                                  f"{record.kind}.succeeded")
            if event is not None and "output" in event.data:
                shown["output"] = event.data["output"]
        return shown

    def _health_summary(self) -> dict[str, Any]:
        if self.health is None:
            return {"unhealthy_hosts": []}
        return {"unhealthy_hosts": self.health.unhealthy_hosts(),
                "failing_metrics": self.health.metric_failing(),
                "no_data": self.health.no_data_checks()}

    async def detail(self) -> dict[str, Any]:
        """One app with every host's live release and health."""
        summary = await self.summary()
        states = await self.fleet.state()
        snapshot = self._health_detail()
        hosts = []
        for host, label in zip(self.app.hosts, self.app.host_labels, strict=True):
            state = states.get(label)
            entry: dict[str, Any] = {"name": label, "address": host.address,
                                     "deploy_to": host.deploy_to}
            if isinstance(state, DeploydError) or state is None:
                entry["error"] = str(state) if state else "unknown"
            else:
                entry["current"] = {"release": state.current, "revision": state.current_revision}
                entry["releases"] = [r.name for r in state.releases]
            entry["health"] = snapshot.get("hosts", {}).get(label)
            hosts.append(entry)
        summary["hosts"] = hosts
        summary["quarantined"] = [{"revision": q.revision, "reason": q.reason, "at": q.at}
                                  for q in await self.store.quarantined(self.name)]
        return summary

    # -- recovery ------------------------------------------------------------------------

    def _init_series(self) -> None:
        """Create every per-app counter at 0, so `increase()` sees the first event too."""
        for result in ("succeeded", "failed", "observed"):
            self.metrics.deploys_total.labels(app=self.name, result=result)
        for trigger in ("manual", "health"):
            self.metrics.rollbacks_total.labels(app=self.name, trigger=trigger)
        for verdict in ("good", "bad", "no_data"):
            self.metrics.bake_verdicts_total.labels(app=self.name, verdict=verdict)
        self.metrics.git_fetch_errors_total.labels(app=self.name)

    async def recover(self) -> None:
        """Finish or undo what a killed daemon left running, then resume bakes."""
        self._init_series()
        state = await self.store.app_state(self.name)
        self.metrics.paused.labels(app=self.name).set(1 if state.paused else 0)
        live = await self.store.last_live(self.name)
        if live is not None:
            self.metrics.set_live_revision(self.name, live.revision)
        running = await self.store.deploys(self.name, state="running", limit=20)
        if running:
            # Held like any operation: a REST deploy meanwhile is a 409, not a race on hosts.
            async with self._operation:
                self._operation_name = "recovery"
                try:
                    for record in running:
                        await self._recover_operation(record)
                finally:
                    self._operation_name = None
        # The last head deployd tried by itself: a later manual deploy or rollback must not
        # make a restart deploy that head again over what the operator chose.
        self._attempted = next((record.revision for record in await self.store.deploys(
            self.name, kind="deploy", limit=200) if record.trigger != "manual"), None)
        baking = await self._baking()
        if baking is not None and baking.bake_until is not None:
            # We were not watching while down: observe again before calling it good.
            floor = self.clock() + self.app.rollback.grace + self._observation_time()
            if baking.bake_until < floor:
                await self.store.update_deploy(baking.id, bake_until=floor)
            await self.store.add_event(self.name, "bake.resumed",
                                       f"resuming the bake of {_short(baking.revision)} "
                                       "after a restart", revision=baking.revision)
        await self._roll_back_unfinished_verdict()
        await self._resume_jobs()

    async def _roll_back_unfinished_verdict(self) -> None:
        """A release judged bad just before a crash, with no rollback begun: act on it now."""
        live = await self.store.last_live(self.name)
        newest = await self.store.deploys(self.name, limit=1)
        if live is None or live.bake_state != "bad" or live.kind == "rollback" \
                or not newest or newest[0].id != live.id:
            return
        if (await self.store.app_state(self.name)).paused:
            return  # the verdict already asked a human (no data, nothing to roll back to)
        await self.store.add_event(self.name, "bake.resumed",
                                   f"{_short(live.revision)} was judged unhealthy before a "
                                   "restart and not rolled back yet", revision=live.revision)
        await self._act_on_bad(live, "judged unhealthy before a restart")

    def _observation_time(self) -> float:
        spans = [check.interval * check.failures + check.timeout for check in self.app.checks]
        return max(spans, default=0.0)

    async def _recover_operation(self, record: Deploy) -> None:
        states = await self.fleet.state()
        reachable = {h: s for h, s in states.items() if not isinstance(s, DeploydError)}
        on_new = {h for h, s in reachable.items() if s.current_revision == record.revision}
        if record.kind == "rollback":
            if reachable and len(on_new) == len(states):
                # Grace included: the hosts restarted on it just before the crash.
                await self.store.update_deploy(record.id, state="succeeded",
                                               **self._open_bake())
                await self.store.add_event(self.name, "rollback.recovered",
                                           "rollback found complete after a restart")
                return
            # Hosts already rolled back ran their hooks and logged it: do only the others.
            rest = [h for h in states if h not in on_new]
            await self.store.add_event(self.name, "rollback.resumed",
                                       f"finishing rollback to {record.release} after a restart"
                                       f" on {', '.join(rest)}")
            await self._run_rollback(record, reason="resumed after a restart", hosts=rest)
            return
        if reachable and len(on_new) == len(states):
            release = next(iter(reachable.values())).current
            await self.store.update_deploy(record.id, state="succeeded", release=release,
                                           **self._open_bake())
            await self.store.add_event(self.name, "deploy.recovered",
                                       f"deploy of {_short(record.revision)} found complete "
                                       "after a restart", revision=record.revision)
            return
        error = "interrupted by a daemon restart"
        if on_new and record.previous_release:
            await self.store.add_event(self.name, "deploy.interrupted",
                                       f"hosts split after a restart ({', '.join(sorted(on_new))}"
                                       f" on {_short(record.revision)}); switching them back")
            try:
                await self.fleet.rollback(record.previous_release, reason=error,
                                          actor=SYSTEM_ACTOR, hosts=sorted(on_new))
            except DeploydError as exc:
                error += f"; switching back failed: {exc}"
        await self.store.update_deploy(record.id, state="interrupted", error=error)
        await self.store.add_event(self.name, "deploy.failed",
                                   f"deploy of {_short(record.revision)}: {error}",
                                   revision=record.revision)


def _resolve(future: asyncio.Future[Deploy] | None, record: Deploy) -> None:
    if future is not None and not future.done():
        future.set_result(record)


def _hosts(hosts: object) -> str:
    count = len(hosts)  # type: ignore[arg-type]
    return f"{count} host" if count == 1 else f"{count} hosts"


def _short(revision: str | None) -> str:
    return revision[:12] if revision else "none"


def _output(output: Mapping[str, Mapping[str, str]]) -> dict[str, object]:
    """Event data for what hooks printed: {"output": {host: {hook: last lines}}}, if any."""
    return {"output": {host: dict(hooks) for host, hooks in output.items()}} if output else {}
