"""A progressive rollout's steps, resolved against an app's hosts: pure, no I/O, no clock.

`[apps.X.rollout] steps` lists how many hosts run the new release after each step, cumulatively:
a count (`"1"`, or the TOML integer `1`), a share of the app's hosts (`"25%"`), or `"pause"`
(wait for a promote). Hosts are taken in config order, so the first hosts are the canaries.

Shares round up: a share reaches `ceil(share x hosts)` hosts, and at least one, so `"25%"` of 6
hosts is 2, `"10%"` of 4 hosts is 1, and `"100%"` is always every host. The share is read as
written (`"33.3%"` of 1000 hosts is 333, not the 334 a binary float would give).

A valid plan (`problems` finds what is not):
- every count is from 1 to the number of hosts; every share is above 0% and at most 100%;
- after resolving to host numbers, each non-pause step reaches more hosts than the one before;
- the last non-pause step reaches every host;
- a pause is never first (nothing would be judged), never last (the rollout is over: there is
  nothing left to promote to), and never right after another pause (one promote would then
  only reach the next pause; a single pause says the same).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

_COUNT = re.compile(r"\d+")
_SHARE = re.compile(r"(\d+(?:\.\d+)?)%")
PAUSE = "pause"


@dataclass(frozen=True)
class StepSpec:
    """One entry of `steps` as written: a host count, a share of the hosts, or a pause."""

    count: int | None = None
    share: Fraction | None = None  # 0 < share <= 1
    pause: bool = False

    def __str__(self) -> str:
        if self.pause:
            return PAUSE
        if self.share is not None:
            # Exact: a share is read from a decimal, so its percentage is a finite decimal.
            percent = Decimal(self.share.numerator * 100) / Decimal(self.share.denominator)
            return f"{percent.normalize():f}%"
        return str(self.count)

    def hosts(self, total: int) -> int | None:
        """How many hosts run the new release after this step (None for a pause)."""
        if self.pause:
            return None
        if self.share is not None:
            return max(1, math.ceil(self.share * total))
        return self.count


ALL_HOSTS = StepSpec(share=Fraction(1))


def parse_step(value: Any) -> StepSpec:
    """A step from its TOML value: `"3"` or `3`, `"25%"`, `"pause"`; ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 1:
            return StepSpec(count=value)
    elif isinstance(value, str):
        text = value.strip()
        if text == PAUSE:
            return StepSpec(pause=True)
        if _COUNT.fullmatch(text) and int(text) >= 1:
            return StepSpec(count=int(text))
        match = _SHARE.fullmatch(text)
        if match is not None:
            share = Fraction(match.group(1)) / 100
            if 0 < share <= 1:
                return StepSpec(share=share)
            raise ValueError(f"expected a share above 0% and at most 100%, got {value!r}")
    raise ValueError(f'expected a host count like "1", a share like "25%" or "pause", '
                     f"got {value!r}")


def problems(steps: Sequence[StepSpec], total: int) -> list[tuple[int | None, str]]:
    """What makes `steps` unusable for `total` hosts: (index of the step or None for the
    whole list, message)."""
    if not steps:
        return [(None, "expected at least one step")]
    found: list[tuple[int | None, str]] = []
    reached = 0
    last_real: int | None = None
    for index, step in enumerate(steps):
        if step.pause:
            found.extend((index, message) for message in _pause_problems(steps, index))
            continue
        hosts = step.hosts(total)
        assert hosts is not None
        last_real = index
        if hosts > total:
            found.append((index, f"{hosts} hosts, but the app has {total}"))
            continue  # reported; the next steps are compared with the last possible one
        if hosts <= reached:
            found.append((index, f"{step} is {_hosts(hosts)} of {total}, not more than the "
                                 f"{reached} the step before reaches: steps are cumulative"))
        reached = max(reached, hosts)
    if last_real is not None:
        hosts = steps[last_real].hosts(total)
        if hosts is not None and hosts < total:
            found.append((last_real, f"the last step must reach every host ({total} or "
                                     f'"100%"), got {steps[last_real]}'))
    return found


def _pause_problems(steps: Sequence[StepSpec], index: int) -> list[str]:
    if index == 0:
        return ["a rollout cannot start with a pause: nothing would have been judged yet"]
    if index == len(steps) - 1:
        return ["a rollout cannot end with a pause: every host is on the new release by then"]
    if steps[index - 1].pause:
        return ["two pauses in a row: one is enough"]
    return []


def _hosts(count: int) -> str:
    return "1 host" if count == 1 else f"{count} hosts"


@dataclass(frozen=True)
class PlannedStep:
    """One step of a rollout over actual hosts.

    `index` is the step's position in `steps` (0-based, as in config key paths). `hosts` are
    every host on the new release once the step is done, in config order; `added` are the
    hosts this step switches (none for a pause). `bake` is how long the step is judged before
    the next one starts: `step_bake`, the last step `rollback.bake`, a pause 0 (it waits for a
    promote instead).
    """

    index: int
    hosts: tuple[str, ...]
    added: tuple[str, ...]
    pause: bool
    bake: float
    spec: str


def plan(steps: Sequence[StepSpec], hosts: Sequence[str], *, step_bake: float,
         final_bake: float) -> tuple[PlannedStep, ...]:
    """The rollout of `steps` over `hosts` (config order); ValueError when they are not valid
    together (see `problems`)."""
    found = problems(steps, len(hosts))
    if found:
        raise ValueError("; ".join(f"steps[{index}]: {message}" if index is not None
                                   else message for index, message in found))
    planned: list[PlannedStep] = []
    reached = 0
    for index, step in enumerate(steps):
        if step.pause:
            planned.append(PlannedStep(index, tuple(hosts[:reached]), (), True, 0.0, str(step)))
            continue
        count = step.hosts(len(hosts))
        assert count is not None
        last = index == len(steps) - 1
        planned.append(PlannedStep(index, tuple(hosts[:count]), tuple(hosts[reached:count]),
                                   False, final_bake if last else step_bake, str(step)))
        reached = count
    return tuple(planned)
