"""Pure decisions from recorded facts: no I/O, no clock of its own, no side effects.

The supervisor gathers the facts (store records, health snapshot, git ancestry) and asks
these functions what to do, so every rule can be tested without a host or a server.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Protocol

from deployd.vocabulary import DeployKind, DeployState


@dataclass(frozen=True)
class Threshold:
    """How many unhealthy hosts make a deploy bad: a count, or a share of the fleet."""

    count: int | None = None
    percent: float | None = None

    def reached(self, unhealthy: int, total: int) -> bool:
        if unhealthy <= 0 or total <= 0:
            return False
        if self.percent is not None:
            # The share as written ("16.1"), not its binary float: 161 of 1000 is 16.1%.
            return unhealthy * 100 >= Fraction(repr(self.percent)) * total
        return unhealthy >= (self.count or 1)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)


class DeployRecord(Protocol):
    """The facts of one recorded deploy, rollback or observation that policy reads."""

    @property
    def kind(self) -> DeployKind: ...
    @property
    def state(self) -> DeployState: ...
    @property
    def release(self) -> str | None: ...
    @property
    def previous_release(self) -> str | None: ...


@dataclass(frozen=True)
class DeployDecision:
    deploy: bool
    reason: str


def should_deploy(head: str | None, *, paused: bool, quarantined: bool, live: str | None,
                  attempted: str | None, rolling_out: bool = False) -> DeployDecision:
    """Whether a branch head should be deployed automatically, and why (not).

    A head that lands while a rollout is in progress waits for it to end: starting another
    over it would leave three releases on the fleet.
    """
    if head is None:
        return DeployDecision(False, "branch not found")
    if head == live:
        return DeployDecision(False, "already live")
    if rolling_out:
        return DeployDecision(False, "a rollout is in progress")
    if head == attempted:
        return DeployDecision(False, "already attempted; waiting for a new head")
    if quarantined:
        return DeployDecision(False, "head is quarantined")
    if paused:
        return DeployDecision(False, "app is paused")
    return DeployDecision(True, "new head")


Verdict = Literal["wait", "good", "bad", "no_data", "inconclusive"]


@dataclass(frozen=True)
class BakeFacts:
    """What is known about a deploy under observation at one moment."""

    now: float
    bake_started_at: float
    grace: float
    bake_until: float
    unhealthy_hosts: Sequence[str]
    total_hosts: int
    failing_metrics: Sequence[str]
    no_data_metrics: Sequence[str]
    threshold: Threshold
    # Health evidence is only as old as the monitor's last reset (a deploy, the end of grace,
    # a daemon restart); `observation` is how long a failing check takes to be called so.
    evidence_since: float = float("-inf")
    observation: float = 0.0
    # During a rollout step `unhealthy_hosts`/`total_hosts` are the hosts on the new release;
    # these are the hosts still on the last good one, judged over the same window.
    baseline_unhealthy: Sequence[str] = ()
    baseline_total: int = 0
    # Hosts on last good with a failed probe within `observation`: not unhealthy yet, but
    # perhaps about to be (a shared outage reaches every host at once, its verdicts do not).
    baseline_failing: Sequence[str] = ()


@dataclass(frozen=True)
class BakeVerdict:
    verdict: Verdict
    reason: str


def judge_bake(facts: BakeFacts) -> BakeVerdict:
    """Judge a deploy in its bake window.

    During grace nothing counts. After it, reaching the unhealthy-host threshold or a failing
    metric check makes the deploy bad. At the end of the window a deploy with no failure is
    good, unless a metric check had no data throughout: then a human must decide. Nothing is
    called good on evidence younger than `observation`: a bake whose window ran out while
    nobody was watching (a daemon restart) waits until a failing host would have shown.
    During a rollout step, new-release hosts failing no more often than the hosts still on
    last good is `inconclusive` (a shared dependency is down), not bad; while hosts on last
    good fail probes without being called unhealthy yet, the verdict waits for theirs.
    """
    if facts.now < facts.bake_started_at + facts.grace:
        return BakeVerdict("wait", "grace period")
    unhealthy = len(facts.unhealthy_hosts)
    if facts.threshold.reached(unhealthy, facts.total_hosts):
        hosts = ", ".join(sorted(facts.unhealthy_hosts))
        if _baseline_as_bad(facts):
            return BakeVerdict(
                "inconclusive", f"the hosts on the new release ({hosts}) and those on last "
                f"good ({', '.join(sorted(facts.baseline_unhealthy))}) are unhealthy alike: "
                "not the release's fault")
        if facts.baseline_failing:
            return BakeVerdict("wait", "the hosts on last good fail probes too: watching them")
        return BakeVerdict(
            "bad", f"{unhealthy} of {facts.total_hosts} hosts unhealthy ({hosts}); "
                   f"threshold {facts.threshold}")
    if facts.failing_metrics:
        return BakeVerdict("bad", "metric checks failing: " + ", ".join(facts.failing_metrics))
    if facts.now < facts.bake_until:
        return BakeVerdict("wait", "baking")
    if facts.now < facts.evidence_since + facts.observation:
        return BakeVerdict("wait", "gathering evidence")
    if facts.no_data_metrics:
        return BakeVerdict("no_data", "no data through the bake window from: "
                           + ", ".join(facts.no_data_metrics))
    return BakeVerdict("good", "healthy through the bake window")


def _baseline_as_bad(facts: BakeFacts) -> bool:
    """Whether the hosts still on last good fail at least as often as the new release's."""
    bad = len(facts.baseline_unhealthy)
    if not bad or facts.baseline_total <= 0:
        return False
    return bad * facts.total_hosts >= len(facts.unhealthy_hosts) * facts.baseline_total


def previous_release(history: Iterable[DeployRecord], current: str | None) -> str | None:
    """The release that was live before `current`, by deployd's own record.

    `history` is newest first. Releases that a rollback moved away from are skipped, so
    rolling back twice never returns to a bad release.
    """
    records = list(history)
    rolled_away = {d.previous_release for d in records
                   if d.kind == DeployKind.ROLLBACK and d.state == DeployState.SUCCEEDED
                   and d.previous_release}
    for record in records:
        if record.state != DeployState.SUCCEEDED or record.release is None:
            continue
        if record.release == current or record.release in rolled_away:
            continue
        return record.release
    return None


def is_pristine(head: str | None, *, head_quarantined: bool, last_good: str | None,
                quarantined_ancestor: bool) -> bool:
    """Whether the branch head is something deployd would deploy with a clear conscience."""
    if head is None or head_quarantined:
        return False
    return head == last_good or not quarantined_ancestor


BadAction = Literal["roll_back", "skip", "pause"]


@dataclass(frozen=True)
class BadVerdictResponse:
    """What to do with a release judged bad: roll back to `target`, leave it (skip), or pause.

    `quarantine` says whether the bad revision is marked so nobody deploys it by itself again;
    `reason` is the sentence recorded for a skip or a pause.
    """

    action: BadAction
    quarantine: bool
    reason: str = ""
    target: str | None = None


def respond_to_bad(*, kind: str, release: str | None, paused: bool, auto_rollback: bool,
                   last_good_release: str | None, previous_release: str | None
                   ) -> BadVerdictResponse:
    """The one rule for a bad verdict.

    A rollback that is itself bad pauses (rolling back further would walk into releases nobody
    vouched for). Otherwise the revision is quarantined and, unless the app is paused or
    automatic rollback is off, rolled back to the last good release (or the one before it when
    nothing was ever judged good); with no release to go back to, a human is asked.
    """
    if kind == "rollback":
        return BadVerdictResponse("pause", quarantine=False,
                                  reason=f"still unhealthy after rolling back to {release}; "
                                         "not rolling back further")
    if paused or not auto_rollback:
        why = "paused" if paused else "automatic rollback is off"
        return BadVerdictResponse("skip", quarantine=True,
                                  reason=f"not rolling back by itself: {why}")
    target = last_good_release or previous_release
    if target is None:
        return BadVerdictResponse("pause", quarantine=True,
                                  reason="bad deploy and no earlier release to roll back to")
    return BadVerdictResponse("roll_back", quarantine=True, target=target)


RecoveryAction = Literal["rollback_complete", "finish_rollback", "deploy_complete",
                         "undo_deploy"]


@dataclass(frozen=True)
class RecoveryPlan:
    """What to do with an operation a killed daemon left `running`.

    `hosts`: for finish_rollback the hosts still to roll back; for undo_deploy the hosts
    already on the new revision that go back to the previous release (may be empty).
    """

    action: RecoveryAction
    hosts: tuple[str, ...] = ()


def recover_operation(*, kind: str, hosts: Sequence[str], reachable: Iterable[str],
                      on_new: Iterable[str], previous_release: str | None) -> RecoveryPlan:
    """The one rule for a half-done operation found at start-up.

    `hosts` is every host of the app, `reachable` those whose state could be read, `on_new`
    those whose `current` is the operation's revision. An operation found done on every host
    is recorded as done (its bake opens now). A rollback is finished on the hosts not yet on
    its revision (those already there ran their hooks). A deploy is never finished half way:
    hosts already switched go back to the previous release and the deploy is interrupted.
    """
    reached, switched = set(reachable), set(on_new)
    complete = bool(reached) and len(switched) == len(hosts)
    if kind == "rollback":
        if complete:
            return RecoveryPlan("rollback_complete")
        return RecoveryPlan("finish_rollback", tuple(h for h in hosts if h not in switched))
    if complete:
        return RecoveryPlan("deploy_complete")
    back = tuple(sorted(switched)) if previous_release else ()
    return RecoveryPlan("undo_deploy", back)
