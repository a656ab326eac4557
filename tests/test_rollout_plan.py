"""rollout_plan: steps as written, resolved against an app's hosts in config order."""

from __future__ import annotations

from fractions import Fraction

import pytest

from deployd.rollout_plan import (
    ALL_HOSTS,
    PlannedStep,
    StepSpec,
    parse_step,
    plan,
    problems,
)

HOSTS = tuple(f"web{n}" for n in range(1, 7))


def steps(*written: str | int) -> tuple[StepSpec, ...]:
    return tuple(parse_step(value) for value in written)


def test_parse_step_forms() -> None:
    """A count (string or integer), a share (whole or decimal) and a pause."""
    assert parse_step("3") == parse_step(3) == StepSpec(count=3)
    assert parse_step("25%") == StepSpec(share=Fraction(1, 4))
    assert parse_step("12.5%") == StepSpec(share=Fraction(1, 8))
    assert parse_step(" pause ") == StepSpec(pause=True)
    assert [str(parse_step(v)) for v in ("3", 3, "25%", "12.5%", "pause", "100%", "0.125%",
                                         "33.333333333%", "050%")] == [
        "3", "3", "25%", "12.5%", "pause", "100%", "0.125%", "33.333333333%", "50%"]


@pytest.mark.parametrize("value", ["0", 0, -1, "0%", "100.1%", "x", "", "1.5", 1.5, True,
                                   None, "PAUSE", "25 %"])
def test_parse_step_refuses(value: object) -> None:
    """Anything but a positive count, a share in (0, 100] or "pause" is a ValueError."""
    with pytest.raises(ValueError, match="got"):
        parse_step(value)


@pytest.mark.parametrize(("share", "total", "hosts"), [
    ("25%", 6, 2),     # 1.5 rounds up
    ("10%", 4, 1),     # 0.4 rounds up to one host
    ("1%", 6, 1),      # at least one host
    ("50%", 6, 3),     # exact
    ("100%", 6, 6),
    ("33.3%", 1000, 333),  # the share as written: no float rounding to 334
    ("33.4%", 1000, 334),
    ("0.1%", 1000, 1),
])
def test_share_rounds_up_to_at_least_one_host(share: str, total: int, hosts: int) -> None:
    """A share reaches ceil(share x hosts) hosts, at least one."""
    assert parse_step(share).hosts(total) == hosts


def test_default_is_one_step_of_every_host() -> None:
    """Without a rollout table: one step that switches every host and bakes rollback.bake."""
    assert plan((ALL_HOSTS,), HOSTS, step_bake=120.0, final_bake=600.0) == (
        PlannedStep(0, HOSTS, HOSTS, False, 600.0, "100%"),)


def test_plan_steps_are_cumulative_in_config_order() -> None:
    """Each step's hosts are the first N of the config; `added` is what it switches."""
    planned = plan(steps("1", "50%", "pause", "100%"), HOSTS, step_bake=120.0,
                   final_bake=600.0)
    assert planned == (
        PlannedStep(0, ("web1",), ("web1",), False, 120.0, "1"),
        PlannedStep(1, HOSTS[:3], ("web2", "web3"), False, 120.0, "50%"),
        PlannedStep(2, HOSTS[:3], (), True, 0.0, "pause"),
        PlannedStep(3, HOSTS, HOSTS[3:], False, 600.0, "100%"),
    )


def test_plan_last_count_equal_to_hosts() -> None:
    """A final count equal to the host count is the last step, baking rollback.bake."""
    planned = plan(steps(2, 6), HOSTS, step_bake=30.0, final_bake=90.0)
    assert [(p.added, p.bake) for p in planned] == [(HOSTS[:2], 30.0), (HOSTS[2:], 90.0)]


def test_plan_one_host_app() -> None:
    """On one host every share is that host; the single step is the last."""
    assert plan(steps("25%"), ("web1",), step_bake=1.0, final_bake=2.0) == (
        PlannedStep(0, ("web1",), ("web1",), False, 2.0, "25%"),)


def test_plan_refuses_invalid_steps() -> None:
    """plan() raises with every problem named by its step."""
    with pytest.raises(ValueError, match=r"steps\[1\]: the last step must reach every host"):
        plan(steps("1", "2"), HOSTS, step_bake=1.0, final_bake=1.0)


def test_problems_of_a_valid_plan_are_none() -> None:
    """Counts, shares and a single pause between steps are fine."""
    assert problems(steps("1", "pause", "25%", "pause", "100%"), 6) == []
    assert problems(steps("100%"), 1) == []


@pytest.mark.parametrize(("written", "total", "expected"), [
    ((), 3, [(None, "expected at least one step")]),
    (("pause", "100%"), 3, [(0, "a rollout cannot start with a pause: nothing would have been "
                                "judged yet")]),
    (("1", "100%", "pause"), 3, [(2, "a rollout cannot end with a pause: every host is on the "
                                    "new release by then")]),
    (("1", "pause", "pause", "3"), 3, [(2, "two pauses in a row: one is enough")]),
    (("2", "50%", "3"), 3, [(1, "50% is 2 hosts of 3, not more than the 2 the step before "
                               "reaches: steps are cumulative")]),
    (("1", "4"), 3, [(1, "4 hosts, but the app has 3")]),
    # Out of range is reported once; the next step is compared with the step before it.
    (("1", "9", "100%"), 3, [(1, "9 hosts, but the app has 3")]),
    (("1", "2"), 3, [(1, 'the last step must reach every host (3 or "100%"), got 2')]),
    # A pause last still has its own message, besides the last real step's.
    (("1", "pause"), 3, [(1, "a rollout cannot end with a pause: every host is on the new "
                             "release by then"),
                         (0, 'the last step must reach every host (3 or "100%"), got 1')]),
])
def test_problems(written: tuple[str, ...], total: int,
                  expected: list[tuple[int | None, str]]) -> None:
    """Each rule of a valid plan, with the step it is about."""
    assert problems(steps(*written), total) == expected
