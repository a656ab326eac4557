"""The compare judge of a rollout step: the new release's hosts against last good's, pure.

During a step the hosts already on the new release form the *canary* group and the hosts
still on the last good release the *baseline* group. Both are probed by the same checks over
the same window, so a bad day (a slow database, a traffic spike) shows in both and a bad
release only in the canary. No I/O and no clock here: the caller hands in what the probes
found (`GroupSamples` per group) and gets a `Judgement` that shows its work.

Per HTTP check, two comparisons (`compare`):

failure_ratio
    The share of probes that failed, per group. Fails when the canary's ratio exceeds the
    baseline's by more than `failure_margin` (default 0.05: five points) *and* a one-sided
    Fisher exact test says the canary fails more often with p < `alpha` (default 0.05). Fisher's
    test is exact at every size, so small groups need no special case; it costs one term per
    possible failure count.

latency
    Response times of the probes that succeeded (a failed probe is counted by failure_ratio;
    its time says how it failed, not how fast the app is). Fails when a one-sided Mann-Whitney
    U test says canary times are stochastically greater with p < `alpha` *and* the canary's
    median exceeds the baseline's by more than `latency_increase` (default 0.2: 20%). The test
    alone would call a 1% slowdown significant given enough samples; the effect size alone
    would trust noise: both must agree, as in Kayenta's Mann-Whitney judge. So a canary 3x
    slower than the baseline but answering 200 fails, and one 5% slower passes. The p-value
    is exact (the distribution of U counted) when no time is tied and the groups are small
    (n x m <= 400); otherwise the normal approximation with the tie correction of the
    variance and a continuity correction of 0.5.

Worse, but not significantly
    A canary beyond tolerance (its failure ratio above the margin, its median above the
    allowed increase) whose test is not significant is `inconclusive`, not `pass`: the data
    cannot tell a bad release from noise yet, so the step does not go on by itself.

Not enough data
    A comparison with fewer than `min_samples` (default 10) probes (for failure_ratio) or
    successful probes (for latency) in either group is `inconclusive`: with less, a test at
    alpha 0.05 can barely tell anything, and deciding on it would be guessing. Inconclusive
    never passes: the engine pauses and a human decides.

Both failing
    When the baseline itself fails at least `both_failing_ratio` (default 0.5) of its probes
    and the canary is not significantly worse, the failure is not the release's (a shared
    database is down): the comparison is `inconclusive` with `both_failing` set, and the
    engine pauses instead of rolling back. A canary that is significantly worse still fails.

Groups
    `GroupSamples` sums a group's probes that started at or after the same moment (the
    step's switch), e.g. from `HealthMonitor.samples`. At the last step no host is left on
    last good: there is no baseline to compare with (too few probes: inconclusive), so a
    rollout judges that step with the absolute checks alone.

Prometheus checks whose query names `{hosts}`
    Run once per group (the query with `{hosts}` standing for the group's hosts) and judged
    against the check's own bound (`max`/`min`): the canary beyond it while the baseline is
    within fails; both beyond it is `inconclusive` with `both_failing`; no data from either
    group is `inconclusive`. One evaluation of a query is already an aggregate over the
    query's range, so no test is run on it: the check's bound is the tolerance.

Overall: `fail` if any comparison fails; else `inconclusive` if any is; else `pass`.
`Judgement.both_failing` is set when any comparison flagged it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Verdict(StrEnum):
    """The outcome of one comparison, or of a whole judgement."""

    PASS = "pass"  # the canary is not worse than the baseline beyond tolerance
    FAIL = "fail"  # the canary is worse, with confidence: roll back
    INCONCLUSIVE = "inconclusive"  # not enough data, or no healthy baseline: pause


@dataclass(frozen=True)
class Tolerances:
    """How much worse the canary may be, and how sure the judge must be (module doc)."""

    alpha: float = 0.05
    failure_margin: float = 0.05
    latency_increase: float = 0.2
    min_samples: int = 10
    both_failing_ratio: float = 0.5


@dataclass(frozen=True)
class GroupSamples:
    """What one group's probes found in the window: counts, and the times (seconds) of the
    probes that succeeded."""

    ok: int = 0
    failed: int = 0
    latencies: tuple[float, ...] = ()

    @property
    def probes(self) -> int:
        return self.ok + self.failed

    def __add__(self, other: GroupSamples) -> GroupSamples:
        return GroupSamples(self.ok + other.ok, self.failed + other.failed,
                            self.latencies + other.latencies)


@dataclass(frozen=True)
class GroupFigures:
    """One group's figures as a comparison saw them."""

    probes: int
    failed: int
    failure_ratio: float | None
    latency_samples: int
    p50: float | None
    p90: float | None

    @classmethod
    def of(cls, samples: GroupSamples) -> GroupFigures:
        ordered = sorted(samples.latencies)
        return cls(
            probes=samples.probes,
            failed=samples.failed,
            failure_ratio=samples.failed / samples.probes if samples.probes else None,
            latency_samples=len(ordered),
            p50=quantile(ordered, 0.5),
            p90=quantile(ordered, 0.9),
        )


@dataclass(frozen=True)
class CheckResult:
    """One comparison of one check: both groups' figures, the test, the verdict and why.

    `statistic` is the canary's failure count (failure_ratio) or its Mann-Whitney U
    (latency); `p_value` is the one-sided p-value of "the canary is worse"; both are None when
    too little data left nothing to test.
    """

    check: str
    metric: str  # "failure_ratio" or "latency"
    canary: GroupFigures
    baseline: GroupFigures
    statistic: float | None
    p_value: float | None
    verdict: Verdict
    reason: str
    both_failing: bool = False


@dataclass(frozen=True)
class Judgement:
    """Every comparison of a step and the overall verdict."""

    verdict: Verdict
    both_failing: bool
    reason: str
    checks: tuple[CheckResult | QueryResult, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (verdicts as plain strings)."""
        return dataclasses.asdict(self, dict_factory=_plain)


def _plain(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Verdict) else value for key, value in items}


def compare(check: str, canary: GroupSamples, baseline: GroupSamples,
            tolerances: Tolerances = Tolerances()) -> tuple[CheckResult, CheckResult]:
    """Both comparisons (failure_ratio, latency) of one check's two groups."""
    figures = GroupFigures.of(canary), GroupFigures.of(baseline)
    return (_failure_ratio(check, canary, baseline, figures, tolerances),
            _latency(check, canary, baseline, figures, tolerances))


@dataclass(frozen=True)
class QueryFigures:
    """What a Prometheus check's query gave for one group: success (within the check's
    bound), failure (beyond it) or no_data, the value, and why."""

    outcome: str
    value: float | None
    reason: str


@dataclass(frozen=True)
class QueryResult:
    """One Prometheus check compared across the groups (module doc)."""

    check: str
    metric: str  # always "query"
    canary: QueryFigures
    baseline: QueryFigures
    verdict: Verdict
    reason: str
    both_failing: bool = False


def compare_query(check: str, canary: QueryFigures, baseline: QueryFigures) -> QueryResult:
    """A Prometheus check's per-group values against its bound (module doc)."""
    def result(verdict: Verdict, reason: str, both_failing: bool = False) -> QueryResult:
        return QueryResult(check, "query", canary, baseline, verdict, reason, both_failing)

    for name, figures in (("canary", canary), ("baseline", baseline)):
        if figures.outcome == "no_data":
            return result(Verdict.INCONCLUSIVE, f"no data for the {name}: {figures.reason}")
    canary_bad, baseline_bad = canary.outcome == "failure", baseline.outcome == "failure"
    if canary_bad and baseline_bad:
        return result(Verdict.INCONCLUSIVE, f"both groups beyond the bound: canary "
                      f"{canary.reason}; baseline {baseline.reason}", both_failing=True)
    if canary_bad:
        return result(Verdict.FAIL, f"canary {canary.reason}; baseline within the bound")
    return result(Verdict.PASS, "canary within the bound")


def judge(results: Iterable[CheckResult | QueryResult]) -> Judgement:
    """The overall verdict of a step's comparisons (module doc)."""
    checks = tuple(results)
    both_failing = any(result.both_failing for result in checks)
    for verdict in (Verdict.FAIL, Verdict.INCONCLUSIVE):
        matching = [result for result in checks if result.verdict is verdict]
        if matching:
            reason = "; ".join(f"{r.check} {r.metric}: {r.reason}" for r in matching)
            return Judgement(verdict, both_failing, reason, checks)
    if not checks:
        return Judgement(Verdict.INCONCLUSIVE, False, "nothing to compare", checks)
    return Judgement(Verdict.PASS, False, "canary no worse than baseline", checks)


def judge_groups(groups: Mapping[str, tuple[GroupSamples, GroupSamples]],
                 tolerances: Tolerances = Tolerances()) -> Judgement:
    """`judge` of every check's (canary, baseline) samples."""
    return judge(result for check, (canary, baseline) in groups.items()
                 for result in compare(check, canary, baseline, tolerances))


def _failure_ratio(check: str, canary: GroupSamples, baseline: GroupSamples,
                   figures: tuple[GroupFigures, GroupFigures],
                   tolerances: Tolerances) -> CheckResult:
    def result(verdict: Verdict, reason: str, p: float | None = None,
               both_failing: bool = False) -> CheckResult:
        statistic = float(canary.failed) if p is not None else None
        return CheckResult(check, "failure_ratio", *figures, statistic, p, verdict, reason,
                           both_failing)

    short = _too_few(canary.probes, baseline.probes, "probes", tolerances.min_samples)
    if short:
        return result(Verdict.INCONCLUSIVE, short)
    canary_ratio = canary.failed / canary.probes
    baseline_ratio = baseline.failed / baseline.probes
    p = fisher_greater(canary.failed, canary.probes, baseline.failed, baseline.probes)
    figures_text = (f"canary fails {_percent(canary_ratio)} of {canary.probes} probes, "
                    f"baseline {_percent(baseline_ratio)} of {baseline.probes} (p={p:.3g})")
    worse = canary_ratio > baseline_ratio + tolerances.failure_margin
    if worse and p < tolerances.alpha:
        return result(Verdict.FAIL, figures_text, p)
    if baseline_ratio >= tolerances.both_failing_ratio:
        return result(Verdict.INCONCLUSIVE, f"both failing: {figures_text}; the baseline is "
                                            "no healthy reference", p, both_failing=True)
    if worse:
        return result(Verdict.INCONCLUSIVE, f"{figures_text}: worse, but not significantly "
                                            "yet", p)
    return result(Verdict.PASS, figures_text, p)


def _latency(check: str, canary: GroupSamples, baseline: GroupSamples,
             figures: tuple[GroupFigures, GroupFigures], tolerances: Tolerances) -> CheckResult:
    def result(verdict: Verdict, reason: str, test: MannWhitney | None = None) -> CheckResult:
        return CheckResult(check, "latency", *figures, test.u if test else None,
                           test.p_value if test else None, verdict, reason)

    short = _too_few(len(canary.latencies), len(baseline.latencies), "answered probes",
                     tolerances.min_samples)
    if short:
        return result(Verdict.INCONCLUSIVE, short)
    test = mann_whitney_greater(canary.latencies, baseline.latencies)
    canary_median, baseline_median = figures[0].p50, figures[1].p50
    assert canary_median is not None and baseline_median is not None
    limit = baseline_median * (1 + tolerances.latency_increase)
    text = (f"median {_ms(canary_median)} on the canary, {_ms(baseline_median)} on the "
            f"baseline (p={test.p_value:.3g})")
    slower = f"more than {tolerances.latency_increase:.0%} slower"
    if canary_median > limit:
        if test.p_value < tolerances.alpha:
            return result(Verdict.FAIL, f"{text}: {slower}", test)
        return result(Verdict.INCONCLUSIVE, f"{text}: {slower}, but not significantly yet",
                      test)
    return result(Verdict.PASS, text, test)


def _too_few(canary: int, baseline: int, what: str, needed: int) -> str | None:
    if canary >= needed and baseline >= needed:
        return None
    return f"too few {what}: canary {canary}, baseline {baseline} (need {needed} each)"


def _percent(ratio: float) -> str:
    return f"{ratio * 100:.3g}%"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms"


# -- statistics -------------------------------------------------------------------------------


def quantile(ordered: Sequence[float], q: float) -> float | None:
    """The q-quantile of sorted values, linearly interpolated between the closest ranks
    (numpy's default; the median of an even count is the mean of the middle two)."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def fisher_greater(failed_a: int, total_a: int, failed_b: int, total_b: int) -> float:
    """One-sided Fisher exact test: the p-value of group A failing at least as often as it did
    if both groups shared one failure rate (the hypergeometric upper tail)."""
    population = total_a + total_b
    failures = failed_a + failed_b
    if not 0 <= failed_a <= total_a or not 0 <= failed_b <= total_b:
        raise ValueError("failure counts must lie between 0 and their group's total")
    if population == 0:
        return 1.0
    log_all = _log_comb(population, total_a)
    top = min(total_a, failures)
    p = sum(math.exp(_log_comb(failures, x) + _log_comb(population - failures, total_a - x)
                     - log_all) for x in range(failed_a, top + 1))
    return min(1.0, p)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


@dataclass(frozen=True)
class MannWhitney:
    """A one-sided Mann-Whitney U test of "x is stochastically greater than y".

    `u` counts the pairs (x_i, y_j) with x_i > y_j, ties counting half; `z` is the normal
    score (None when the p-value was counted exactly); `exact` says which.
    """

    u: float
    p_value: float
    z: float | None
    exact: bool


EXACT_LIMIT = 400  # n x m at most this, and no ties: count the distribution of U


def mann_whitney_greater(x: Sequence[float], y: Sequence[float]) -> MannWhitney:
    """The one-sided Mann-Whitney U test of x against y (module doc)."""
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        raise ValueError("each group needs at least one value")
    ranks, tie_sizes = _midranks([*x, *y])
    u = sum(ranks[:n]) - n * (n + 1) / 2
    if not tie_sizes and n * m <= EXACT_LIMIT:
        return MannWhitney(u, _exact_upper_tail(n, m, round(u)), None, True)
    total = n + m
    ties = sum(t**3 - t for t in tie_sizes)
    variance = n * m / 12 * ((total + 1) - ties / (total * (total - 1)))
    if variance <= 0:  # every value tied: no evidence either way
        return MannWhitney(u, 1.0, 0.0, False)
    z = (u - n * m / 2 - 0.5) / math.sqrt(variance)
    return MannWhitney(u, normal_sf(z), z, False)


def _midranks(values: Sequence[float]) -> tuple[list[float], list[int]]:
    """Each value's rank (1-based; tied values share the mean of their ranks) and the size of
    every group of ties."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    tie_sizes: list[int] = []
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        rank = (start + end) / 2 + 1
        for position in range(start, end + 1):
            ranks[order[position]] = rank
        if end > start:
            tie_sizes.append(end - start + 1)
        start = end + 1
    return ranks, tie_sizes


def _exact_upper_tail(n: int, m: int, u: int) -> float:
    """P(U >= u) when the n + m values are untied and every split is equally likely."""
    # counts[k]: the number of orderings of n x's among m y's with U = k, built one x and one
    # y at a time: f(i, j) = f(i - 1, j) shifted by j (the new x, largest, beats all j y's)
    # + f(i, j - 1) (the new y, largest, beats nothing).
    rows = [[[1] if i == 0 or j == 0 else [] for j in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            with_x = [0] * j + rows[i - 1][j]
            with_y = rows[i][j - 1]
            size = max(len(with_x), len(with_y))
            rows[i][j] = [(with_x[k] if k < len(with_x) else 0)
                          + (with_y[k] if k < len(with_y) else 0) for k in range(size)]
    counts = rows[n][m]
    return sum(counts[u:]) / sum(counts)
