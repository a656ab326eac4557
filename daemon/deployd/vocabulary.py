"""deployd's words: the kinds, states and triggers it records, each a closed set.

The values are the product's contract: they are stored in SQLite, shown by the REST API and
matched by `[[notify]] events` patterns, so a member's value never changes once shipped. Each
set is a `StrEnum`: a member is a `str` equal to its value, so it serialises (JSON, SQLite,
metric labels, f-strings) exactly as the bare word did, while a typo is a type error.

    deploy record:  kind  deploy | rollback | observed
                    state running -> succeeded | failed | interrupted
                    bake  grace -> baking -> good | bad | skipped (a newer release went live)
    rescue job:     pending -> approved -> running -> succeeded | failed
                    pending -> rejected | expired | superseded
"""

from __future__ import annotations

import enum


class DeployKind(enum.StrEnum):
    """What a deploy record is about."""

    DEPLOY = "deploy"
    ROLLBACK = "rollback"
    OBSERVED = "observed"  # another tool made a release live (observe mode)


class DeployState(enum.StrEnum):
    """Where a deploy or rollback is; every state but `running` is final."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # the daemon stopped mid-way; recovery undid or failed it

    @property
    def finished(self) -> bool:
        return self is not DeployState.RUNNING


class BakeState(enum.StrEnum):
    """How the live release's bake window went."""

    GRACE = "grace"  # just switched: failures do not count yet
    BAKING = "baking"  # failures now mean the release is bad
    GOOD = "good"
    BAD = "bad"
    SKIPPED = "skipped"  # a newer release went live before the bake ended


class Trigger(enum.StrEnum):
    """Why a deploy record exists."""

    BRANCH = "branch"  # a new head of the watched branch
    MANUAL = "manual"  # a REST call
    HEALTH = "health"  # an automatic rollback after a bad bake
    RESCUE = "rescue"  # the deploy of an approved rescue job's rebuilt head
    OBSERVED = "observed"  # seen on the hosts (observe mode)


class RolloutState(enum.StrEnum):
    """Where a progressive rollout is (see `progressive`)."""

    RUNNING = "running"  # a step's hosts are being switched
    BAKING = "baking"  # the step's hosts switched; its bake window is open
    PAUSED = "paused"  # waiting for a promote: a pause step, or a verdict that could not tell
    DONE = "done"  # every step passed: the release is the last good
    ABORTED = "aborted"  # stopped by a human, or cut short: the new hosts went back
    ROLLED_BACK = "rolled_back"  # a step was judged bad: the new hosts went back

    @property
    def active(self) -> bool:
        return self in (RolloutState.RUNNING, RolloutState.BAKING, RolloutState.PAUSED)


class JobState(enum.StrEnum):
    """Where a rescue job is."""

    PENDING = "pending"  # waiting for approval
    APPROVED = "approved"
    RUNNING = "running"  # transplanting, then deploying and baking the rebuilt head
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"  # nobody approved it in time
    SUPERSEDED = "superseded"  # the branch moved: the job no longer describes it

    @property
    def in_flight(self) -> bool:
        """Approved and not finished: a restart carries it on."""
        return self in (JobState.APPROVED, JobState.RUNNING)


class JobStep(enum.StrEnum):
    """How far an approved job's transplant got (recorded before each step is taken)."""

    STARTED = "started"
    COMMITTED = "committed"  # the rebuilt head exists in the mirror
    BACKED_UP = "backed_up"  # the old head is kept under the backup branch, remote too
    PUSHED = "pushed"  # the branch is the rebuilt head; only the deploy is left


class EventKind(enum.StrEnum):
    """Every kind of event on an app's timeline (`GET .../events`, `[[notify]] events`)."""

    # A node of several sharing one database took the app over (data: node, epoch).
    APP_OWNED = "app.owned"
    APP_PAUSED = "app.paused"
    APP_RESUMED = "app.resumed"
    BAKE_FAILED = "bake.failed"
    BAKE_HEALTHY = "bake.healthy"
    BAKE_RESUMED = "bake.resumed"
    BRANCH_MOVED = "branch.moved"
    DEPLOY_FAILED = "deploy.failed"
    DEPLOY_INTERRUPTED = "deploy.interrupted"
    DEPLOY_OBSERVED = "deploy.observed"
    DEPLOY_RECOVERED = "deploy.recovered"
    DEPLOY_STARTED = "deploy.started"
    DEPLOY_SUCCEEDED = "deploy.succeeded"
    GIT_FETCH_FAILED = "git.fetch_failed"
    GIT_FETCH_RECOVERED = "git.fetch_recovered"
    HEALTH_CHANGED = "health.changed"
    JOB_APPROVED = "job.approved"
    JOB_EXPIRED = "job.expired"
    JOB_FAILED = "job.failed"
    JOB_NOT_OPENED = "job.not_opened"
    JOB_OPENED = "job.opened"
    JOB_PATCH = "job.patch"
    JOB_PENDING = "job.pending"  # a reminder to [[notify]] targets; not on the timeline
    JOB_PUSHED = "job.pushed"
    JOB_REJECTED = "job.rejected"
    JOB_RESUMED = "job.resumed"
    JOB_SELECTION = "job.selection"
    JOB_SUCCEEDED = "job.succeeded"
    JOB_SUPERSEDED = "job.superseded"
    NOTIFY_FAILING = "notify.failing"
    OBSERVE_SPLIT = "observe.split"
    QUARANTINE_ADDED = "quarantine.added"
    ROLLBACK_FAILED = "rollback.failed"
    ROLLBACK_RECOVERED = "rollback.recovered"
    ROLLBACK_RESUMED = "rollback.resumed"
    ROLLBACK_SKIPPED = "rollback.skipped"
    ROLLBACK_STARTED = "rollback.started"
    ROLLBACK_SUCCEEDED = "rollback.succeeded"
    ROLLOUT_ABORTED = "rollout.aborted"
    ROLLOUT_DONE = "rollout.done"
    ROLLOUT_PAUSED = "rollout.paused"
    ROLLOUT_PROMOTED = "rollout.promoted"
    ROLLOUT_RECOVERED = "rollout.recovered"
    ROLLOUT_ROLLED_BACK = "rollout.rolled_back"
    ROLLOUT_STEP = "rollout.step"
    ROLLOUT_STEP_PASSED = "rollout.step_passed"

    @classmethod
    def job_ended(cls, state: JobState) -> EventKind:
        """The event a job ending in `state` records (`job.<state>`)."""
        return cls(f"job.{state}")

