"""policy: what a bad verdict leads to, and what a half-done operation becomes at restart."""

from __future__ import annotations

from dataclasses import replace

import pytest

from deployd.policy import (
    BadVerdictResponse,
    BakeFacts,
    RecoveryPlan,
    Threshold,
    judge_bake,
    recover_operation,
    respond_to_bad,
)

# -- respond_to_bad ---------------------------------------------------------------------------


def respond(*, kind: str = "deploy", paused: bool = False, auto: bool = True,
            last_good: str | None = "r1", previous: str | None = "r0") -> BadVerdictResponse:
    return respond_to_bad(kind=kind, release="r2", paused=paused, auto_rollback=auto,
                          last_good_release=last_good, previous_release=previous)


def test_a_bad_deploy_is_quarantined_and_rolled_back_to_last_good() -> None:
    assert respond() == BadVerdictResponse("roll_back", quarantine=True, target="r1")


def test_without_a_last_good_the_release_before_it_is_the_target() -> None:
    assert respond(last_good=None).target == "r0"


def test_an_observed_bad_release_is_rolled_back_like_a_deploy() -> None:
    assert respond(kind="observed").action == "roll_back"


def test_a_bad_rollback_pauses_and_quarantines_nothing() -> None:
    response = respond(kind="rollback")
    assert (response.action, response.quarantine) == ("pause", False)
    assert "still unhealthy after rolling back to r2" in response.reason


@pytest.mark.parametrize(("paused", "auto", "why"), [
    (True, True, "paused"),
    (False, False, "automatic rollback is off"),
    (True, False, "paused"),
])
def test_paused_or_manual_apps_quarantine_but_do_not_roll_back(paused: bool, auto: bool,
                                                               why: str) -> None:
    response = respond(paused=paused, auto=auto)
    assert (response.action, response.quarantine) == ("skip", True)
    assert response.reason == f"not rolling back by itself: {why}"


def test_nothing_to_roll_back_to_asks_a_human() -> None:
    response = respond(last_good=None, previous=None)
    assert (response.action, response.quarantine, response.target) == ("pause", True, None)
    assert "no earlier release" in response.reason


# -- recover_operation ------------------------------------------------------------------------

HOSTS = ["web1", "web2", "web3"]


def recover(kind: str, on_new: list[str], *, reachable: list[str] | None = None,
            previous: str | None = "r1") -> RecoveryPlan:
    return recover_operation(kind=kind, hosts=HOSTS,
                             reachable=HOSTS if reachable is None else reachable,
                             on_new=on_new, previous_release=previous)


def test_a_deploy_found_on_every_host_is_complete() -> None:
    assert recover("deploy", HOSTS) == RecoveryPlan("deploy_complete")


def test_a_deploy_half_way_switches_its_hosts_back() -> None:
    assert recover("deploy", ["web3", "web1"]) == RecoveryPlan("undo_deploy", ("web1", "web3"))


def test_a_deploy_that_switched_nothing_is_just_interrupted() -> None:
    assert recover("deploy", []) == RecoveryPlan("undo_deploy", ())


def test_a_first_deploy_has_nothing_to_switch_back_to() -> None:
    assert recover("deploy", ["web1"], previous=None) == RecoveryPlan("undo_deploy", ())


def test_a_deploy_with_an_unreachable_host_is_never_called_complete() -> None:
    plan = recover("deploy", ["web1", "web2"], reachable=["web1", "web2"])
    assert plan == RecoveryPlan("undo_deploy", ("web1", "web2"))


def test_no_host_reachable_is_never_complete() -> None:
    assert recover("rollback", [], reachable=[]).action == "finish_rollback"


def test_a_rollback_found_on_every_host_is_complete() -> None:
    assert recover("rollback", HOSTS) == RecoveryPlan("rollback_complete")


def test_a_rollback_half_way_is_finished_on_the_other_hosts_in_config_order() -> None:
    assert recover("rollback", ["web2"]) == RecoveryPlan("finish_rollback", ("web1", "web3"))


def test_a_rollback_finishes_on_unreachable_hosts_too() -> None:
    plan = recover("rollback", ["web1", "web2"], reachable=["web1", "web2"])
    assert plan == RecoveryPlan("finish_rollback", ("web3",))


# -- a rollout step: the new release's hosts beside the hosts on last good --------------------

def step_facts(**changes: object) -> BakeFacts:
    facts = BakeFacts(now=100.0, bake_started_at=0.0, grace=10.0, bake_until=200.0,
                      unhealthy_hosts=["web1"], total_hosts=1, failing_metrics=[],
                      no_data_metrics=[], threshold=Threshold(count=1), baseline_total=5)
    return replace(facts, **changes)


def test_a_failing_canary_beside_a_healthy_baseline_is_bad() -> None:
    assert judge_bake(step_facts()).verdict == "bad"


def test_canary_and_baseline_unhealthy_alike_is_inconclusive() -> None:
    verdict = judge_bake(step_facts(baseline_unhealthy=["web2", "web3", "web4", "web5",
                                                        "web6"]))
    assert verdict.verdict == "inconclusive" and "not the release's fault" in verdict.reason


def test_a_baseline_failing_less_than_the_canary_does_not_excuse_it() -> None:
    facts = step_facts(unhealthy_hosts=["web1", "web2"], total_hosts=2,
                       baseline_unhealthy=["web3"], baseline_total=4)
    assert judge_bake(facts).verdict == "bad"


def test_baseline_hosts_failing_probes_are_waited_for_before_a_verdict() -> None:
    waiting = judge_bake(step_facts(baseline_failing=["web2"]))
    assert (waiting.verdict, waiting.reason) == (
        "wait", "the hosts on last good fail probes too: watching them")
