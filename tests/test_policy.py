"""policy: the pure verdicts (deploy or not, bake judgement, rollback target, pristine)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from fractions import Fraction

import pytest

from deployd.policy import (
    BakeFacts,
    BakeVerdict,
    DeployDecision,
    Threshold,
    is_pristine,
    judge_bake,
    previous_release,
    should_deploy,
)

# -- should_deploy ----------------------------------------------------------------------------


def decide(head: str | None = "new", *, paused: bool = False, quarantined: bool = False,
           live: str | None = "old", attempted: str | None = None) -> DeployDecision:
    return should_deploy(head, paused=paused, quarantined=quarantined, live=live,
                         attempted=attempted)


def test_should_deploy_a_new_head() -> None:
    """A head that is not live, not attempted, not quarantined, app not paused: deploy."""
    assert decide() == DeployDecision(True, "new head")


def test_should_deploy_the_first_head_when_nothing_is_live() -> None:
    """With nothing live yet (first start), the head is deployed."""
    assert decide(live=None) == DeployDecision(True, "new head")


def test_should_not_deploy_a_missing_branch() -> None:
    """No head (the branch is gone or not fetched yet): nothing to deploy."""
    assert decide(None, live=None) == DeployDecision(False, "branch not found")


def test_should_not_redeploy_what_is_live() -> None:
    """The head already live is not deployed again (restart does not redeploy)."""
    assert decide("abc", live="abc") == DeployDecision(False, "already live")


def test_should_not_retry_a_failed_attempt() -> None:
    """A head already attempted (and failed) waits for a new head instead of looping."""
    assert decide("abc", attempted="abc") == DeployDecision(
        False, "already attempted; waiting for a new head")


def test_should_not_deploy_a_quarantined_head() -> None:
    """A quarantined revision is never deployed by deployd itself."""
    assert decide(quarantined=True) == DeployDecision(False, "head is quarantined")


def test_should_not_deploy_while_paused() -> None:
    """A paused app does not deploy new heads."""
    assert decide(paused=True) == DeployDecision(False, "app is paused")


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"head": None, "live": None, "paused": True, "quarantined": True}, "branch not found"),
    ({"head": "x", "live": "x", "attempted": "x", "paused": True, "quarantined": True},
     "already live"),
    ({"head": "x", "attempted": "x", "paused": True, "quarantined": True},
     "already attempted; waiting for a new head"),
    ({"head": "x", "paused": True, "quarantined": True}, "head is quarantined"),
])
def test_should_deploy_reason_precedence(kwargs: dict[str, object], reason: str) -> None:
    """With several reasons at once, the most specific fact is the one given."""
    head = kwargs.pop("head")
    assert isinstance(head, str | None)
    decision = should_deploy(head, paused=bool(kwargs.get("paused")),
                             quarantined=bool(kwargs.get("quarantined")),
                             live=kwargs.get("live", "old"),  # type: ignore[arg-type]
                             attempted=kwargs.get("attempted"))  # type: ignore[arg-type]
    assert decision == DeployDecision(False, reason)


def test_a_new_head_after_an_attempt_is_deployed() -> None:
    """Once the branch moves past the attempted head, deploying resumes."""
    assert decide("newer", attempted="failed-one").deploy


# -- judge_bake -------------------------------------------------------------------------------

START = 1000.0
GRACE = 30.0
ONE_HOST = Threshold(count=1)
BAKE_UNTIL = START + 600.0


def facts(now: float, *, unhealthy: tuple[str, ...] = (), total: int = 10,
          failing: tuple[str, ...] = (), no_data: tuple[str, ...] = (),
          threshold: Threshold = ONE_HOST) -> BakeFacts:
    return BakeFacts(now=now, bake_started_at=START, grace=GRACE, bake_until=BAKE_UNTIL,
                     unhealthy_hosts=unhealthy, total_hosts=total, failing_metrics=failing,
                     no_data_metrics=no_data, threshold=threshold)


HOSTS = tuple(f"web{n}" for n in range(1, 11))


@pytest.mark.parametrize("now", [START, START + 1, START + GRACE - 0.001])
def test_grace_ignores_every_failure(now: float) -> None:
    """During grace, unhealthy hosts and failing metrics count for nothing: wait."""
    verdict = judge_bake(facts(now, unhealthy=HOSTS, failing=("error-rate",),
                               no_data=("latency",)))
    assert verdict == BakeVerdict("wait", "grace period")


def test_grace_ends_exactly_at_its_end() -> None:
    """At bake_started_at + grace, failures count."""
    assert judge_bake(facts(START + GRACE, unhealthy=("web1",))).verdict == "bad"


def test_healthy_during_bake_waits() -> None:
    """After grace and before the end of the window, a healthy deploy is still baking."""
    assert judge_bake(facts(START + GRACE + 1)) == BakeVerdict("wait", "baking")
    assert judge_bake(facts(BAKE_UNTIL - 0.001)) == BakeVerdict("wait", "baking")


def test_threshold_count_reached_is_bad_and_names_hosts() -> None:
    """Unhealthy hosts reaching a count threshold make the deploy bad, naming them sorted."""
    verdict = judge_bake(facts(START + 60, unhealthy=("web3", "web1"),
                               threshold=Threshold(count=2)))
    assert verdict == BakeVerdict("bad", "2 of 10 hosts unhealthy (web1, web3); threshold 2")


def test_threshold_count_not_reached_waits() -> None:
    """Fewer unhealthy hosts than the count: a flapping host does not make the deploy bad."""
    verdict = judge_bake(facts(START + 60, unhealthy=("web1",), threshold=Threshold(count=2)))
    assert verdict == BakeVerdict("wait", "baking")


@pytest.mark.parametrize(("unhealthy", "verdict"), [
    (0, "wait"), (1, "wait"), (2, "wait"), (3, "bad"), (4, "bad"), (10, "bad"),
])
def test_threshold_percent_of_ten_hosts(unhealthy: int, verdict: str) -> None:
    """With "30%" of 10 hosts, 1 or 2 unhealthy is not bad, 3 or more is."""
    result = judge_bake(facts(START + 60, unhealthy=HOSTS[:unhealthy],
                              threshold=Threshold(percent=30.0)))
    assert result.verdict == verdict
    if verdict == "bad":
        assert result.reason.endswith("threshold 30%")


def test_under_threshold_at_the_end_is_good() -> None:
    """A host unhealthy under the threshold at the end of the window does not block good."""
    verdict = judge_bake(facts(BAKE_UNTIL, unhealthy=("web1",), threshold=Threshold(percent=30)))
    assert verdict == BakeVerdict("good", "healthy through the bake window")


def test_failing_metrics_are_bad() -> None:
    """A failing metric check after grace makes the deploy bad, naming the checks."""
    verdict = judge_bake(facts(START + 60, failing=("error-rate", "latency")))
    assert verdict == BakeVerdict("bad", "metric checks failing: error-rate, latency")


def test_host_threshold_is_reported_before_metrics() -> None:
    """With both hosts and metrics failing, the verdict is bad and speaks of the hosts."""
    verdict = judge_bake(facts(START + 60, unhealthy=("web1",), failing=("error-rate",)))
    assert verdict.verdict == "bad"
    assert verdict.reason.startswith("1 of 10 hosts unhealthy (web1)")


def test_end_of_window_is_good() -> None:
    """A deploy with no failure at the end of its window is good."""
    assert judge_bake(facts(BAKE_UNTIL)) == BakeVerdict("good", "healthy through the bake window")
    assert judge_bake(facts(BAKE_UNTIL + 3600)).verdict == "good"


def test_window_run_out_unwatched_waits_for_fresh_evidence() -> None:
    """A bake whose window ended while nobody watched is not good on younger evidence."""
    restarted = BAKE_UNTIL + 100
    fresh = replace(facts(restarted + 2), evidence_since=restarted, observation=5.0)
    assert judge_bake(fresh) == BakeVerdict("wait", "gathering evidence")
    assert judge_bake(replace(fresh, unhealthy_hosts=("web1",))).verdict == "bad"
    assert judge_bake(replace(fresh, now=restarted + 5)).verdict == "good"


def test_failure_at_the_end_is_still_bad() -> None:
    """A threshold reached when the window is over still judges bad, not good."""
    assert judge_bake(facts(BAKE_UNTIL + 1, unhealthy=("web1",))).verdict == "bad"
    assert judge_bake(facts(BAKE_UNTIL + 1, failing=("error-rate",))).verdict == "bad"


def test_no_data_through_the_window_asks_a_human() -> None:
    """A metric with no data is never bad by itself; at the window's end it is no_data."""
    assert judge_bake(facts(START + 60, no_data=("error-rate",))) == BakeVerdict(
        "wait", "baking")
    assert judge_bake(facts(BAKE_UNTIL, no_data=("error-rate", "latency"))) == BakeVerdict(
        "no_data", "no data through the bake window from: error-rate, latency")


def test_no_data_does_not_hide_a_bad_deploy() -> None:
    """Another check failing still makes the deploy bad even if one metric has no data."""
    verdict = judge_bake(facts(START + 60, unhealthy=("web1",), no_data=("error-rate",)))
    assert verdict.verdict == "bad"


def test_no_hosts_never_reach_a_threshold() -> None:
    """An app with no hosts reported is not judged bad by the host threshold."""
    assert judge_bake(facts(BAKE_UNTIL, total=0)).verdict == "good"


def test_zero_grace_and_zero_bake() -> None:
    """With grace 0 and bake 0, the verdict is immediate."""
    now = START
    immediate = dataclasses.replace(facts(now), grace=0.0, bake_until=START)
    assert judge_bake(immediate).verdict == "good"
    bad = dataclasses.replace(immediate, unhealthy_hosts=("web1",))
    assert judge_bake(bad).verdict == "bad"


# -- previous_release -------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    kind: str
    state: str
    release: str | None
    previous_release: str | None = None


def deploy(release: str | None, state: str = "succeeded",
           previous: str | None = None) -> Record:
    return Record("deploy", state, release, previous)


def rollback(to: str, away_from: str, state: str = "succeeded") -> Record:
    return Record("rollback", state, to, away_from)


def newest_first(*records: Record) -> list[Record]:
    """Records written oldest first, as history is told; returned newest first."""
    return list(reversed(records))


def test_previous_release_is_the_one_live_before() -> None:
    """After deploys r1, r2, r3, the release before r3 is r2 (not by time, by record)."""
    history = newest_first(deploy("r1"), deploy("r2", previous="r1"), deploy("r3", previous="r2"))
    assert previous_release(history, "r3") == "r2"


def test_previous_release_skips_failed_and_release_less_records() -> None:
    """Failed, interrupted, running and release-less records never were live: skipped."""
    history = newest_first(
        deploy("r1"),
        deploy("r2", state="failed"),
        deploy("r3", state="interrupted"),
        deploy(None),
        deploy("r4", previous="r1"),
        deploy("r5", state="running"),
    )
    assert previous_release(history, "r4") == "r1"


def test_previous_release_skips_the_current_one() -> None:
    """The current release is never its own previous, even if recorded more than once."""
    history = newest_first(deploy("r1"), deploy("r2"), Record("observed", "succeeded", "r2"))
    assert previous_release(history, "r2") == "r1"


def test_previous_release_skips_rolled_away_releases() -> None:
    """After rolling back r3 -> r2, rolling back again goes to r1, never back to r3."""
    history = newest_first(deploy("r1"), deploy("r2"), deploy("r3"), rollback("r2", "r3"))
    assert previous_release(history, "r2") == "r1"


def test_rolling_back_twice_never_returns_to_a_bad_release() -> None:
    """r3 -> r2 -> r1 by two rollbacks: nothing is left before r1."""
    history = newest_first(deploy("r1"), deploy("r2"), deploy("r3"), rollback("r2", "r3"),
                           rollback("r1", "r2"))
    assert previous_release(history, "r1") is None


def test_previous_release_after_a_rollback_and_a_new_deploy() -> None:
    """r1, r2 (bad, rolled back to r1), r3: the release before r3 is r1, not r2."""
    history = newest_first(deploy("r1"), deploy("r2"), rollback("r1", "r2"), deploy("r3"))
    assert previous_release(history, "r3") == "r1"


def test_failed_rollback_does_not_mark_a_release_rolled_away() -> None:
    """A rollback that failed moved nothing away: its source stays a valid target."""
    history = newest_first(deploy("r1"), deploy("r2"), deploy("r3"),
                           rollback("r1", "r2", state="failed"))
    assert previous_release(history, "r3") == "r2"


def test_observed_releases_count() -> None:
    """Releases seen in observe mode (made by Capistrano) are valid rollback targets."""
    history = newest_first(Record("observed", "succeeded", "c1"),
                           Record("observed", "succeeded", "c2"))
    assert previous_release(history, "c2") == "c1"


def test_previous_release_with_no_history() -> None:
    """No history, or only the current release: no previous release."""
    assert previous_release([], "r1") is None
    assert previous_release([], None) is None
    assert previous_release(newest_first(deploy("r1")), "r1") is None


def test_previous_release_when_current_is_unknown() -> None:
    """With no current release (nothing live), the newest live record is the answer."""
    assert previous_release(newest_first(deploy("r1"), deploy("r2")), None) == "r2"


def test_previous_release_accepts_an_iterator() -> None:
    """history may be a one-shot iterator (it is read once)."""
    history = newest_first(deploy("r1"), deploy("r2"), deploy("r3"), rollback("r2", "r3"))
    assert previous_release(iter(history), "r2") == "r1"


# -- is_pristine ------------------------------------------------------------------------------

@pytest.mark.parametrize(("head", "head_quarantined", "last_good", "quarantined_ancestor",
                          "pristine"), [
    (None, False, "a", False, False),             # no branch: not pristine
    ("a", False, "a", False, True),               # head is the last good
    ("a", False, "a", True, True),                # last good itself, whatever came before
    ("b", False, "a", False, True),               # a new head with clean history
    ("b", False, None, False, True),              # nothing good yet, nothing bad either
    ("b", True, "a", False, False),               # head itself quarantined
    ("a", True, "a", False, False),               # quarantined beats last good
    ("b", False, "a", True, False),               # a quarantined commit is in its history
    ("b", False, None, True, False),
])
def test_is_pristine(head: str | None, head_quarantined: bool, last_good: str | None,
                     quarantined_ancestor: bool, pristine: bool) -> None:
    """Pristine: the head is deployable (not quarantined) and carries no quarantined commit."""
    assert is_pristine(head, head_quarantined=head_quarantined, last_good=last_good,
                       quarantined_ancestor=quarantined_ancestor) is pristine


# -- Threshold --------------------------------------------------------------------------------

@pytest.mark.parametrize(("threshold", "unhealthy", "total", "reached"), [
    (Threshold(count=1), 0, 10, False),
    (Threshold(count=1), 1, 10, True),
    (Threshold(count=3), 2, 10, False),
    (Threshold(count=3), 3, 10, True),
    (Threshold(count=3), 2, 2, False),            # a count above the fleet is never reached
    (Threshold(count=1), 1, 0, False),            # no hosts: never
    (Threshold(count=1), -1, 10, False),
    (Threshold(), 1, 5, True),                    # no count or percent: one host
    (Threshold(count=0), 1, 5, True),             # a zero count behaves as one
    (Threshold(count=0), 0, 5, False),
    (Threshold(percent=30.0), 1, 10, False),
    (Threshold(percent=30.0), 2, 10, False),
    (Threshold(percent=30.0), 3, 10, True),       # exactly the share
    (Threshold(percent=30.0), 1, 3, True),        # 33% of 3
    (Threshold(percent=30.0), 1, 1, True),        # the only host
    (Threshold(percent=50.0), 1, 2, True),
    (Threshold(percent=50.0), 2, 5, False),       # 40%
    (Threshold(percent=100.0), 9, 10, False),
    (Threshold(percent=100.0), 10, 10, True),
    (Threshold(percent=10.0), 1, 10, True),       # 10.0 * 10 is exactly 100
    (Threshold(percent=12.5), 1, 8, True),
    (Threshold(percent=33.3), 1, 3, True),
    (Threshold(percent=33.4), 1, 3, False),
    (Threshold(percent=0.1), 0, 1000, False),     # zero unhealthy is never reached
])
def test_threshold_reached(threshold: Threshold, unhealthy: int, total: int,
                           reached: bool) -> None:
    """Counts compare directly; shares compare exactly (no float rounding at the boundary)."""
    assert threshold.reached(unhealthy, total) is reached


@pytest.mark.parametrize("percent", [
    "10", "12.5", "16.1", "20", "25", "30", "32.2", "33", "33.3", "50", "64.4", "65.4", "70",
    "99.9", "100",
])
def test_threshold_percent_boundary_is_the_exact_share(percent: str) -> None:
    """The first unhealthy count reaching "P%" of N hosts is exactly ceil(P * N / 100)."""
    threshold = Threshold(percent=float(percent))
    for total in (1, 2, 3, 7, 10, 50, 100, 1000):
        first = math.ceil(Fraction(percent) * total / 100)
        assert threshold.reached(first, total), (percent, total, first)
        assert not threshold.reached(first - 1, total), (percent, total, first - 1)


def test_threshold_str() -> None:
    """A threshold prints as the config spells it."""
    assert str(Threshold(count=2)) == "2"
    assert str(Threshold(percent=30.0)) == "30%"
    assert str(Threshold(percent=12.5)) == "12.5%"
