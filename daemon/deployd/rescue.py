"""Rescue jobs: "rebuild the branch as last good + these commits", shown, approved, done.

A job is opened after every automatic rollback (or by hand over REST). It lists the commits
of the bad range as candidates, pre-selects those the app's rule marks, and keeps a preview
of what would land: whether each selected commit applies on the base and the ones before it,
the conflicting paths where not, and a `plan` hash binding base, bad head, selection (or the
hand-resolved patch) and the resulting tree. An approval names the plan it approves, so
nobody approves something other than what they read.

The transplant, once approved:

    fetch; branch still at the bad head?  -- no --> superseded, nothing overwritten
    cherry-pick the selection onto the base (three-way, in memory) or commit the patch
    tree == the approved plan's tree?     -- no --> failed
    backup ref at the bad head, pushed to the remote  (refs/heads/<prefix>/<app>/<job id>)
    push the new head with a lease on the bad head    -- lost --> superseded
    hand the pushed head back: the supervisor deploys and bakes it like any head

Each step is recorded before it is taken, so `resume()` can carry on after a crash: the
remote is either untouched or fully done with its backup.

    pending -> approved -> running -> succeeded | failed
    pending -> rejected | expired | superseded

`Rescue` keeps the jobs and their records; `rescue_preview.Previewer` computes the preview
and plan and the REST view, `rescue_rebuild.Rebuilder` makes the new head and the backup.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from deployd.config import AppConfig
from deployd.errors import Conflict, Forbidden, GitError, Invalid, NotFound
from deployd.git import CommitInfo, Mirror, RefUpdate
from deployd.metrics import Metrics
from deployd.rescue_preview import (
    DEFAULT_CANDIDATES_LIMIT,
    PatchScope,
    Preview,
    Previewer,
    known_commit,
)
from deployd.rescue_rebuild import Rebuilder
from deployd.store import UNSET, Deploy, Job, JobStore, Store, Unset
from deployd.vocabulary import EventKind, JobState, JobStep

log = logging.getLogger("deployd.rescue")

_TRAILER = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*):\s*(.*)$")
_CHERRY_PICKED = re.compile(r"^\(cherry picked from commit [0-9a-f]+\)$")
_FALSE = {"no", "false", "0", "off", "n"}


def trailers(message: str) -> dict[str, str]:
    """The trailer block of a commit message (`Key: value` lines of its last paragraph)."""
    paragraphs = [p for p in message.strip().split("\n\n") if p.strip()]
    if len(paragraphs) < 2:
        return {}
    found: dict[str, str] = {}
    for line in paragraphs[-1].splitlines():
        if _CHERRY_PICKED.match(line.strip()):
            continue  # `git cherry-pick -x` (and a transplant) writes it into the block
        match = _TRAILER.match(line.strip())
        if match is None:
            return {}
        found[match.group(1).lower()] = match.group(2).strip()
    return found


def preselected(app: AppConfig, commit: CommitInfo) -> bool:
    """Whether the app's rule picks this commit for the rescue."""
    rule = app.rescue
    if rule.select_kind == "trailer":
        value = trailers(commit.message).get(rule.select_value.lower())
        return value is not None and value.lower() not in _FALSE
    if rule.select_kind == "message":
        return re.search(rule.select_value, commit.message) is not None
    return False


class Rescue:
    """The rescue jobs of one app: open, preview, select, resolve, approve, transplant."""

    def __init__(self, app: AppConfig, *, store: Store, jobs: JobStore, mirror: Mirror,
                 metrics: Metrics, clock: Callable[[], float] = time.time) -> None:
        self.app = app
        self.store = store
        self.jobs = jobs
        self.mirror = mirror
        self.metrics = metrics
        self.clock = clock
        self.previewer = Previewer(app.name, store=store, jobs=jobs, mirror=mirror)
        self.rebuilder = Rebuilder(app, mirror=mirror, previewer=self.previewer)

    @property
    def name(self) -> str:
        return self.app.name

    def backup_ref(self, job: Job) -> str:
        """The remote branch holding the old head: `refs/heads/<prefix>/<app>/<job id>`."""
        return self.rebuilder.backup_ref(job)

    # -- opening ---------------------------------------------------------------------------

    async def open(self, *, base: str, bad_head: str, requester: str, reason: str,
                   commits: list[str] | None = None) -> Job:
        """Open a pending job for the range base..bad_head; `commits` picks by hand."""
        base = await known_commit(self.mirror, base, "base commit")
        bad_head = await self.mirror.resolve(bad_head)
        if base == bad_head:
            raise Invalid(f"{self.name}: the branch head is the base; nothing to rescue")
        infos = await self.mirror.commits_between(base, bad_head)
        if not infos:
            raise Invalid(f"{self.name}: no commits between {base[:12]} and {bad_head[:12]}")
        candidates = await self.previewer.tried_alone(base, [_candidate(i) for i in infos])
        if commits is None:
            selection = [info.sha for info in infos if preselected(self.app, info)]
        else:
            selection = await self.previewer.validate_selection(candidates, commits)
        now = self.clock()
        draft = Job(id=0, app=self.name, state=JobState.PENDING, base=base, bad_head=bad_head,
                    candidates=candidates, selection=selection, resolved_patch=None,
                    preview={}, plan=None, requester=requester, reason=reason,
                    created_at=now, updated_at=now, expires_at=now + self.app.rescue.expire,
                    step=None, new_head=None, backup_ref=None, deploy_id=None, error=None)
        # Preview and plan first, stored with the job in one insert: nobody ever reads a
        # pending job without them.
        preview = await self.compute_preview(draft)
        job = await self.jobs.create(self.name, base=base, bad_head=bad_head,
                                     candidates=candidates, selection=selection,
                                     requester=requester, reason=reason,
                                     expires_at=draft.expires_at, preview=preview.to_json(),
                                     plan=preview.plan)
        picked = ", ".join(s[:12] for s in selection) or "nothing yet"
        await self.store.add_event(
            self.name, EventKind.JOB_OPENED,
            f"rescue job {job.id} waits for approval: {base[:12]} + {picked} "
            f"({len(candidates)} candidate(s))", actor=requester, revision=bad_head,
            data={"job": job.id, "plan": job.plan})
        await self.refresh_metrics()
        return job

    async def check_base(self, base: str, *, head: str, last_good: str | None) -> None:
        """Raise Invalid unless `base` is in the history of the branch head or last good.

        The rebuilt branch is base + the selection, and an approver reads only the selection's
        change: a base from elsewhere would bring in code nobody was shown.
        """
        sha = await known_commit(self.mirror, base, "base commit")
        for tip in (head, last_good):
            try:
                if tip is not None and await self.mirror.is_ancestor(sha, tip):
                    return
            except NotFound:
                continue  # a last good revision the mirror no longer has
        raise Invalid(f"base {base!r} ({sha[:12]}) is not in the history of "
                      f"{self.app.branch} or of the last good revision")

    # -- preview and plan ------------------------------------------------------------------

    async def compute_preview(self, job: Job) -> Preview:
        """Try the selection commit by commit on the base, in memory; compute the plan."""
        return await self.previewer.compute_preview(job)

    async def patch_scope(self, job: Job, tree: str) -> PatchScope:
        """Compare what the resolved patch (giving `tree`) adds with what the commits add."""
        return await self.previewer.patch_scope(job, tree)

    async def patch(self, job: Job) -> str:
        """The combined change that would land on the base, as a unified diff."""
        return await self.previewer.patch(job)

    async def describe(self, job: Job, *, candidates_offset: int = 0,
                       candidates_limit: int = DEFAULT_CANDIDATES_LIMIT) -> dict[str, Any]:
        """A job as `GET /api/v1/jobs/{id}` shows it (see `Previewer.describe`)."""
        return await self.previewer.describe(job, candidates_offset=candidates_offset,
                                             candidates_limit=candidates_limit)

    # -- human decisions -------------------------------------------------------------------

    async def set_selection(self, job_id: int, commits: list[str], *, actor: str) -> Job:
        job = await self._pending(job_id)
        selection = await self.previewer.validate_selection(job.candidates, commits)
        updated = await self._replace_plan(job, selection=selection, resolved_patch=None,
                                           actor=actor)
        await self._job_event(updated, EventKind.JOB_SELECTION,
                              f"selection set to {', '.join(s[:12] for s in selection) or 'none'}"
                              " (any resolved patch dropped)", actor)
        return updated

    async def set_resolved_patch(self, job_id: int, patch: str, *, actor: str) -> Job:
        """Take a hand-resolved diff for the selection; it must apply to the base."""
        job = await self._pending(job_id)
        if not job.selection:
            raise Invalid("select the commits this patch stands for first (PUT .../selection)")
        await self.mirror.apply_patch(job.base, patch)  # Invalid when it does not apply
        updated = await self._replace_plan(job, selection=job.selection, resolved_patch=patch,
                                           actor=actor)
        await self._job_event(updated, EventKind.JOB_PATCH,
                              f"resolved patch uploaded ({len(patch)} bytes)", actor)
        return updated

    async def _replace_plan(self, job: Job, *, selection: list[str],
                            resolved_patch: str | None, actor: str) -> Job:
        """Compute the new preview first, then store it with its inputs in one step.

        Stored only if the job is still pending with the plan this change was based on, so
        an approval never sees a selection without its matching plan. `actor` becomes the
        job's last changer (and, with a patch, its resolver).
        """
        resolved_by = actor if resolved_patch is not None else None
        proposed = replace(job, selection=selection, resolved_patch=resolved_patch,
                           resolved_by=resolved_by, changed_by=actor)
        preview = await self.compute_preview(proposed)
        updated = await self.jobs.update(
            job.id, expect=(JobState.PENDING,), expect_plan=job.plan, selection=selection,
            resolved_patch=resolved_patch, preview=preview.to_json(), plan=preview.plan,
            changed_by=actor, resolved_by=resolved_by)
        if updated is None:
            raise Conflict(f"rescue job {job.id} was decided or changed meanwhile; "
                           "read it again")
        return updated

    async def check_approval(self, job: Job, *, plan: str, actor: str) -> None:
        """Raise unless `actor` may approve exactly `plan` of this pending job now."""
        if job.state is not JobState.PENDING:
            raise Conflict(f"rescue job {job.id} is {job.state}, not pending")
        if self.clock() >= job.expires_at:
            await self._end(job, JobState.EXPIRED, "expired before approval")
            raise Conflict(f"rescue job {job.id} expired")
        if not job.preview.get("ready"):
            raise Invalid(f"rescue job {job.id} cannot be approved yet: "
                          f"{job.preview.get('blocked_by')}")
        if plan != job.plan:
            raise Conflict(f"stale plan: rescue job {job.id} now has plan {job.plan}; "
                           "read it again before approving")
        if not self.app.rescue.distinct_approver:
            return
        if actor == job.requester:
            raise Forbidden(f"distinct_approver: {actor} opened rescue job {job.id} and may "
                            "not approve it")
        if actor == job.last_changed_by:
            what = "uploaded the resolved patch of" if job.resolved_patch is not None \
                else "chose the selection of"
            raise Forbidden(f"distinct_approver: {actor} {what} rescue job {job.id} and may "
                            "not approve it; someone else must")

    async def approve(self, job: Job, *, plan: str, actor: str, comment: str) -> Job:
        """Move the job from pending to approved; exactly one racing approval wins."""
        # The last changer too: an identical re-upload by the approver between the check
        # and this update must not slip through distinct_approver.
        updated = await self.jobs.update(job.id, expect=(JobState.PENDING,), expect_plan=plan,
                                         expect_changed_by=job.changed_by, state=JobState.APPROVED)
        if updated is None:
            raise Conflict(f"rescue job {job.id} was decided or changed meanwhile; read it again")
        await self.jobs.add_approval(job.id, decision="approve", actor=actor, plan=plan,
                                     comment=comment)
        await self._job_event(updated, EventKind.JOB_APPROVED,
                              f"approved by {actor}" + (f": {comment}" if comment else ""),
                              actor)
        await self.refresh_metrics()
        return updated

    async def reject(self, job_id: int, *, actor: str, comment: str) -> Job:
        job = await self._pending(job_id)
        updated = await self.jobs.update(job.id, expect=(JobState.PENDING,),
                                         state=JobState.REJECTED)
        if updated is None:
            raise Conflict(f"rescue job {job_id} was already decided")
        await self.jobs.add_approval(job.id, decision="reject", actor=actor, plan=job.plan,
                                     comment=comment)
        await self._job_event(updated, EventKind.JOB_REJECTED,
                              f"rejected by {actor}" + (f": {comment}" if comment else ""), actor)
        await self.refresh_metrics()
        return updated

    async def _pending(self, job_id: int) -> Job:
        job = await self.jobs.get(job_id)
        if job.state is not JobState.PENDING:
            raise Conflict(f"rescue job {job_id} is {job.state}, not pending")
        return job

    # -- the transplant --------------------------------------------------------------------

    async def transplant(self, job: Job, *, approver: str) -> str:
        """Rebuild, back up and push; return the new head for the supervisor to deploy."""
        started = time.monotonic()
        was_pushed = job.step is JobStep.PUSHED
        job = await self._set(job, state=JobState.RUNNING, step=JobStep.STARTED)
        await self.mirror.fetch()
        head = await self.mirror.branch_head(self.app.branch)
        if job.new_head is not None and head == job.new_head:
            # Pushed before a restart (maybe by a push whose answer never came); only the
            # deploy is left.
            return await self._pushed(job, job.new_head, approver, started,
                                      record=not was_pushed)
        if head != job.bad_head:
            await self._end(job, JobState.SUPERSEDED, f"{self.app.branch} moved to "
                            f"{(head or 'nothing')[:12]} since the job was built; "
                            "nothing was overwritten")
            raise Conflict(f"rescue job {job.id} superseded: the branch moved")
        # After a restart, push the very commit made before it: a push of it still in flight
        # then lands the same head, and is recognised below.
        new_head = (await self.rebuilder.made_before(job)
                    or await self.rebuilder.rebuild(job, approver))
        job = await self._set(job, step=JobStep.COMMITTED, new_head=new_head)
        await self.rebuilder.backup(job)
        job = await self._set(job, step=JobStep.BACKED_UP, backup_ref=self.backup_ref(job))
        try:
            await self.mirror.push([RefUpdate(new_head, f"refs/heads/{self.app.branch}",
                                              expected=job.bad_head)])
        except GitError as exc:  # refused (PushRejected) or the answer never came
            await self.mirror.fetch()
            now_at = await self.mirror.branch_head(self.app.branch)
            if now_at != new_head and now_at != job.bad_head:
                await self._end(job, JobState.SUPERSEDED,
                                f"push refused, nothing overwritten: {exc}")
                raise Conflict(f"rescue job {job.id} superseded: {exc}") from exc
            if now_at != new_head:
                raise  # a hook, permissions or the network: the job fails, branch untouched
            # Our push landed after all (its answer was lost, or a push from before a restart).
        return await self._pushed(job, new_head, approver, started, record=True)

    async def _pushed(self, job: Job, new_head: str, approver: str, started: float, *,
                      record: bool) -> str:
        job = await self._set(job, step=JobStep.PUSHED)
        if record:
            self.metrics.transplant_duration_seconds.labels(app=self.name).observe(
                time.monotonic() - started)
            await self._job_event(job, EventKind.JOB_PUSHED,
                                  f"{self.app.branch} rebuilt as {new_head[:12]} (old head "
                                  f"{job.bad_head[:12]} kept at {self.backup_ref(job)})",
                                  approver)
        return new_head

    async def finish(self, job: Job, *, healthy: bool, reason: str) -> None:
        """The deploy of the rebuilt head baked: the job succeeded or failed."""
        if healthy:
            await self._end(job, JobState.SUCCEEDED, f"{(job.new_head or '')[:12]} healthy through "
                            "its bake window; the branch is pristine again")
        else:
            await self._end(job, JobState.FAILED, reason)

    async def fail(self, job: Job, reason: str) -> None:
        await self._end(job, JobState.FAILED, reason)

    # -- housekeeping ----------------------------------------------------------------------

    async def housekeeping(self, head: str | None) -> None:
        """Expire old pending jobs and supersede those whose branch moved."""
        for job in await self.jobs.find(app=self.name, state=JobState.PENDING):
            if self.clock() >= job.expires_at:
                await self._end(job, JobState.EXPIRED, "nobody approved it in time")
            elif head is not None and head != job.bad_head:
                await self._end(job, JobState.SUPERSEDED,
                                f"{self.app.branch} moved to {head[:12]} since the job was built")
        await self.refresh_metrics()

    async def in_flight(self) -> list[Job]:
        """Approved or running jobs (to resume after a restart)."""
        found = []
        for state in (JobState.APPROVED, JobState.RUNNING):
            found += await self.jobs.find(app=self.name, state=state)
        return sorted(found, key=lambda j: j.id)

    async def job_for_deploy(self, deploy_id: int) -> Job | None:
        for job in await self.jobs.find(app=self.name, state=JobState.RUNNING):
            if job.deploy_id == deploy_id:
                return job
        return None

    async def job_for_record(self, record: Deploy) -> Job | None:
        """The running job whose rebuilt head `record` deployed, if it is one."""
        if record.trigger != "rescue":
            return None
        return await self.job_for_deploy(record.id)

    async def refresh_metrics(self) -> None:
        counts = await self.jobs.counts(self.name)
        for state in JobState:
            self.metrics.rescue_jobs.labels(app=self.name, state=state).set(counts.get(state, 0))
        oldest = await self.jobs.oldest_pending(self.name)
        gauge = self.metrics.rescue_job_oldest_pending_timestamp_seconds
        if oldest is None:
            try:
                gauge.remove(self.name)
            except KeyError:
                pass
        else:
            gauge.labels(app=self.name).set(oldest)

    async def _set(self, job: Job, *, step: JobStep, state: JobState | Unset = UNSET,
                   new_head: str | Unset = UNSET, backup_ref: str | Unset = UNSET) -> Job:
        """Record the transplant's next step (with what it made)."""
        updated = await self.jobs.update(job.id, step=step, state=state, new_head=new_head,
                                         backup_ref=backup_ref)
        assert updated is not None
        return updated

    async def _end(self, job: Job, state: JobState, reason: str) -> None:
        """End a job, only from the states that can lead there (a racing approval wins)."""
        in_flight = (JobState.APPROVED, JobState.RUNNING)
        origins = (JobState.PENDING,) if state in (
            JobState.EXPIRED, JobState.SUPERSEDED, JobState.REJECTED) else in_flight
        if state is JobState.SUPERSEDED and job.state.in_flight:
            origins = in_flight  # the transplant found the branch moved
        error = None if state is JobState.SUCCEEDED else reason
        updated = await self.jobs.update(job.id, expect=origins, state=state, error=error)
        if updated is None:
            return
        await self._job_event(updated, EventKind.job_ended(state), reason, "deployd")
        log.info("%s: rescue job %d %s: %s", self.name, job.id, state, reason)
        await self.refresh_metrics()

    async def _job_event(self, job: Job, kind: EventKind, message: str, actor: str) -> None:
        await self.store.add_event(self.name, kind, f"job {job.id}: {message}", actor=actor,
                                   revision=job.new_head or job.bad_head,
                                   data={"job": job.id, "state": job.state})


def _candidate(info: CommitInfo) -> dict[str, Any]:
    return {"sha": info.sha, "summary": info.summary,
            "author": f"{info.author_name} <{info.author_email}>", "time": info.time}
