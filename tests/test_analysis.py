"""analysis: the compare judge (canary hosts against baseline hosts), on deterministic data."""

from __future__ import annotations

import itertools
import json
import math
import random
from fractions import Fraction

import pytest

from deployd.analysis import (
    CheckResult,
    GroupFigures,
    GroupSamples,
    QueryFigures,
    Tolerances,
    Verdict,
    compare,
    compare_query,
    fisher_greater,
    judge,
    judge_groups,
    mann_whitney_greater,
    normal_sf,
    quantile,
)


def latencies(seed: int, count: int = 120, median: float = 0.020,
              scale: float = 1.0) -> tuple[float, ...]:
    """`count` response times (seconds), log-normal around `median`, times `scale`; the same
    seed gives the same values."""
    rng = random.Random(seed)
    return tuple(scale * rng.lognormvariate(math.log(median), 0.3) for _ in range(count))


def group(seed: int, *, failed: int = 0, ok: int = 120, scale: float = 1.0) -> GroupSamples:
    """A group whose `ok` probes answered in log-normal times and `failed` probes failed."""
    return GroupSamples(ok=ok, failed=failed, latencies=latencies(seed, ok, scale=scale))


def by_metric(results: tuple[CheckResult, CheckResult]) -> dict[str, CheckResult]:
    return {result.metric: result for result in results}


# -- the verdicts the rollout relies on -----------------------------------------------------


def test_identical_groups_pass() -> None:
    """The very same samples in both groups: nothing is worse, both comparisons pass."""
    same = group(1, failed=2)
    results = by_metric(compare("http", same, same))
    assert results["failure_ratio"].verdict is Verdict.PASS
    assert results["latency"].verdict is Verdict.PASS
    assert results["latency"].p_value is not None and results["latency"].p_value > 0.5
    assert judge(results.values()).verdict is Verdict.PASS


def test_two_draws_of_one_distribution_pass() -> None:
    """Two groups drawn from the same distribution (different seeds) pass."""
    assert judge(compare("http", group(1), group(2))).verdict is Verdict.PASS


def test_canary_three_times_slower_fails_though_it_answers() -> None:
    """A canary 3x slower, every probe answering 200: the latency comparison fails it."""
    results = by_metric(compare("http", group(2, scale=3.0), group(1)))
    assert results["failure_ratio"].verdict is Verdict.PASS
    latency = results["latency"]
    assert latency.verdict is Verdict.FAIL
    assert latency.p_value is not None and latency.p_value < 1e-30
    assert "more than 20% slower" in latency.reason
    judgement = judge(results.values())
    assert judgement.verdict is Verdict.FAIL
    assert judgement.reason.startswith("http latency: median ")


def test_canary_slightly_slower_passes_though_significant() -> None:
    """5% slower with 120 samples is statistically significant, but within the 20% tolerance:
    it passes (the effect size gate is what lets it through)."""
    latency = by_metric(compare("http", group(2, scale=1.05), group(1)))["latency"]
    assert latency.p_value is not None and latency.p_value < 0.05
    assert latency.verdict is Verdict.PASS


def test_latency_tolerance_is_configurable() -> None:
    """With latency_increase 0.02, the same 5% slower canary fails."""
    strict = Tolerances(latency_increase=0.02)
    latency = by_metric(compare("http", group(2, scale=1.05), group(1), strict))["latency"]
    assert latency.verdict is Verdict.FAIL
    assert "more than 2% slower" in latency.reason


def test_too_few_samples_is_inconclusive() -> None:
    """9 probes on the canary (10 needed in each group): both comparisons inconclusive, with no
    test run, and the step never passes."""
    results = by_metric(compare("http", group(2, ok=9), group(1)))
    for result in results.values():
        assert result.verdict is Verdict.INCONCLUSIVE
        assert (result.statistic, result.p_value) == (None, None)
    assert results["failure_ratio"].reason == (
        "too few probes: canary 9, baseline 120 (need 10 each)")
    assert results["latency"].reason == (
        "too few answered probes: canary 9, baseline 120 (need 10 each)")
    assert judge(results.values()).verdict is Verdict.INCONCLUSIVE


def test_too_few_answers_only_makes_latency_inconclusive() -> None:
    """A canary that fails nearly every probe: too few times to compare, but its failures fail
    the step."""
    results = by_metric(compare("http", group(2, ok=3, failed=57), group(1)))
    assert results["latency"].verdict is Verdict.INCONCLUSIVE
    assert results["failure_ratio"].verdict is Verdict.FAIL
    assert judge(results.values()).verdict is Verdict.FAIL


def test_canary_errors_30_percent_against_none_fails() -> None:
    """18 of 60 canary probes fail, none of 60 on the baseline: fail, with the exact p-value."""
    result = by_metric(compare("http", group(2, ok=42, failed=18), group(1, ok=60)))[
        "failure_ratio"]
    assert result.verdict is Verdict.FAIL
    assert result.reason == ("canary fails 30% of 60 probes, baseline 0% of 60 (p=8.51e-07)")
    # Every one of the 18 failures landing on the canary: C(60, 18) / C(120, 18).
    expected = Fraction(math.comb(60, 18), math.comb(120, 18))
    assert result.p_value == pytest.approx(float(expected), rel=1e-9)
    assert result.statistic == 18
    assert (result.canary.failure_ratio, result.baseline.failure_ratio) == (0.3, 0.0)


def test_canary_worse_but_not_significant_is_inconclusive() -> None:
    """3 of 10 against 0 of 10 looks worse, but p = 0.105: the judge does not pass it, it waits
    (inconclusive)."""
    result = by_metric(compare("http", group(2, ok=7, failed=3), group(1, ok=10)))[
        "failure_ratio"]
    assert result.p_value == pytest.approx(120 / 1140)  # C(10,3) / C(20,3)
    assert result.verdict is Verdict.INCONCLUSIVE
    assert result.reason.endswith("worse, but not significantly yet")


def test_canary_slower_but_not_significant_is_inconclusive() -> None:
    """A canary median 50% above the baseline's that the test cannot confirm: inconclusive."""
    canary = GroupSamples(ok=10, latencies=(0.010, 0.011, 0.012, 0.013, 0.030, 0.031, 0.032,
                                            0.033, 0.034, 0.035))
    baseline = GroupSamples(ok=10, latencies=(0.005, 0.014, 0.015, 0.016, 0.019, 0.021,
                                              0.036, 0.037, 0.038, 0.039))
    latency = by_metric(compare("http", canary, baseline))["latency"]
    assert latency.canary.p50 is not None and latency.baseline.p50 is not None
    assert latency.canary.p50 > 1.2 * latency.baseline.p50
    assert latency.p_value is not None and latency.p_value > 0.05
    assert latency.verdict is Verdict.INCONCLUSIVE


def test_a_small_failure_difference_within_margin_passes() -> None:
    """Canary 3% failing, baseline 1%: within the 5-point margin, pass."""
    result = by_metric(compare("http", group(2, ok=970, failed=30), group(1, ok=990, failed=10))
                       )["failure_ratio"]
    assert result.p_value is not None and result.p_value < 0.05
    assert result.verdict is Verdict.PASS


# -- both failing ---------------------------------------------------------------------------


def test_both_failing_is_flagged_not_failed() -> None:
    """Baseline failing 60%, canary 62%: not the release's fault; inconclusive, both_failing."""
    results = by_metric(compare("http", group(2, ok=38, failed=62), group(1, ok=40, failed=60)))
    failures = results["failure_ratio"]
    assert failures.verdict is Verdict.INCONCLUSIVE
    assert failures.both_failing is True
    assert failures.reason.startswith("both failing: canary fails 62% of 100 probes, "
                                      "baseline 60% of 100")
    judgement = judge(results.values())
    assert (judgement.verdict, judgement.both_failing) == (Verdict.INCONCLUSIVE, True)


def test_both_failing_but_canary_much_worse_fails() -> None:
    """Baseline failing 55%, canary 100%: the canary is significantly worse still; fail."""
    result = by_metric(compare("http", GroupSamples(ok=0, failed=100),
                               GroupSamples(ok=45, failed=55)))["failure_ratio"]
    assert (result.verdict, result.both_failing) == (Verdict.FAIL, False)


def test_a_baseline_failing_less_than_half_is_no_excuse() -> None:
    """Baseline failing 40% (below both_failing_ratio), canary 40%: a plain pass, no flag."""
    result = by_metric(compare("http", group(2, ok=60, failed=40), group(1, ok=60, failed=40))
                       )["failure_ratio"]
    assert (result.verdict, result.both_failing) == (Verdict.PASS, False)


# -- the overall verdict ----------------------------------------------------------------------


def test_judge_fail_beats_inconclusive_beats_pass() -> None:
    """fail if any fails; inconclusive if any is and none fails; pass otherwise; no comparison
    at all is inconclusive."""
    passing = compare("a", group(1), group(1))
    slow = compare("b", group(2, scale=3.0), group(1))
    short = compare("c", group(2, ok=3), group(1))
    assert judge([*passing, *short, *slow]).verdict is Verdict.FAIL
    assert judge([*passing, *short]).verdict is Verdict.INCONCLUSIVE
    assert judge(passing).verdict is Verdict.PASS
    assert judge([]).verdict is Verdict.INCONCLUSIVE
    assert judge([*passing, *short]).reason == (
        "c failure_ratio: too few probes: canary 3, baseline 120 (need 10 each); "
        "c latency: too few answered probes: canary 3, baseline 120 (need 10 each)")


def test_judge_groups_compares_each_check() -> None:
    """judge_groups runs both comparisons of every check."""
    judgement = judge_groups({"http": (group(2), group(1)),
                              "api": (group(4, scale=3.0), group(3))})
    assert [(r.check, r.metric) for r in judgement.checks] == [
        ("http", "failure_ratio"), ("http", "latency"), ("api", "failure_ratio"),
        ("api", "latency")]
    assert judgement.verdict is Verdict.FAIL


def test_judgement_shows_its_work_as_json() -> None:
    """to_json carries each group's figures, the test and the verdict as plain values."""
    judgement = judge(compare("http", group(2, scale=3.0), group(1)))
    document = json.loads(json.dumps(judgement.to_json()))
    assert document["verdict"] == "fail"
    latency = document["checks"][1]
    assert latency["metric"] == "latency" and latency["verdict"] == "fail"
    assert set(latency["canary"]) == {"probes", "failed", "failure_ratio", "latency_samples",
                                      "p50", "p90"}
    assert latency["canary"]["p50"] > 2.5 * latency["baseline"]["p50"]
    assert latency["p_value"] < 0.05 and latency["statistic"] > 120 * 120 / 2


def test_group_figures() -> None:
    """Counts, failure ratio, p50 and p90 (interpolated) of one group."""
    figures = GroupFigures.of(GroupSamples(ok=4, failed=1, latencies=(0.4, 0.1, 0.3, 0.2)))
    assert (figures.probes, figures.failed, figures.failure_ratio) == (5, 1, 0.2)
    assert figures.latency_samples == 4
    assert figures.p50 == pytest.approx(0.25)
    assert figures.p90 == pytest.approx(0.37)
    assert GroupFigures.of(GroupSamples()) == GroupFigures(0, 0, None, 0, None, None)


def test_group_samples_add() -> None:
    """Groups add up host by host."""
    total = GroupSamples(2, 1, (0.1, 0.2)) + GroupSamples(1, 0, (0.3,))
    assert total == GroupSamples(3, 1, (0.1, 0.2, 0.3))
    assert total.probes == 4


# -- the statistics, against hand-computed values -----------------------------------------


def test_quantile_interpolates() -> None:
    """Linear interpolation between closest ranks; the median of an even count is the mean of
    the middle two."""
    assert quantile([], 0.5) is None
    assert quantile([3.0], 0.9) == 3.0
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert quantile([1.0, 2.0, 3.0], 0.5) == 2.0
    assert quantile([0.0, 10.0], 0.9) == pytest.approx(9.0)


def test_fisher_lady_tasting_tea() -> None:
    """Fisher's own example: 3 of 4 right against 1 of 4, one-sided p = 17/70."""
    assert fisher_greater(3, 4, 1, 4) == pytest.approx(17 / 70, rel=1e-12)
    assert fisher_greater(4, 4, 0, 4) == pytest.approx(1 / 70, rel=1e-12)
    assert fisher_greater(0, 4, 4, 4) == pytest.approx(1.0)
    assert fisher_greater(0, 10, 0, 10) == 1.0
    assert fisher_greater(0, 0, 0, 0) == 1.0


@pytest.mark.parametrize(("a", "n", "b", "m"), [(5, 20, 1, 30), (0, 7, 3, 9), (12, 40, 12, 40),
                                                (1, 1, 0, 1), (30, 500, 10, 600)])
def test_fisher_matches_the_hypergeometric_tail(a: int, n: int, b: int, m: int) -> None:
    """fisher_greater equals the exact tail sum of C(K,x) C(N-K,n-x) / C(N,n), x >= a."""
    total, failures = n + m, a + b
    tail = sum(Fraction(math.comb(failures, x) * math.comb(total - failures, n - x),
                        math.comb(total, n)) for x in range(a, min(n, failures) + 1))
    assert fisher_greater(a, n, b, m) == pytest.approx(float(tail), rel=1e-9)


def test_fisher_refuses_impossible_counts() -> None:
    """More failures than probes is a programming error."""
    with pytest.raises(ValueError, match="failure counts"):
        fisher_greater(5, 4, 0, 4)


def test_mann_whitney_exact_small_example() -> None:
    """Canary 4, 5, 6, 7 above baseline 1, 2, 3: U = 12 (every pair), and only 1 of the
    C(7, 3) = 35 orderings is that extreme: p = 1/35, counted exactly."""
    test = mann_whitney_greater([4, 5, 6, 7], [1, 2, 3])
    assert (test.u, test.z, test.exact) == (12.0, None, True)
    assert test.p_value == pytest.approx(1 / 35, rel=1e-12)
    assert mann_whitney_greater([1, 2, 3], [4, 5, 6, 7]).p_value == pytest.approx(1.0)


def brute_force_p(x: list[float], y: list[float]) -> float:
    """P(U >= observed U) over every equally likely split of the pooled values."""
    pooled = x + y

    def u_of(first: list[float], second: list[float]) -> float:
        return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in first for b in second)

    observed = u_of(x, y)
    splits = list(itertools.combinations(range(len(pooled)), len(x)))
    extreme = 0
    for chosen in splits:
        first = [pooled[i] for i in chosen]
        second = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        extreme += u_of(first, second) >= observed - 1e-9
    return extreme / len(splits)


def test_mann_whitney_exact_matches_enumeration() -> None:
    """Without ties, the exact p-value is the share of splits with U at least as large."""
    x = [0.31, 0.52, 0.18, 0.77, 0.64, 0.45]
    y = [0.12, 0.29, 0.40, 0.05, 0.36, 0.22, 0.58]
    test = mann_whitney_greater(x, y)
    assert test.exact
    assert test.u == sum(a > b for a in x for b in y)
    assert test.p_value == pytest.approx(brute_force_p(x, y), rel=1e-12)


def test_mann_whitney_ties_hand_computed() -> None:
    """Canary 2, 3, 3, 4 against baseline 1, 2, 2, 3 (ties): midranks 3 for the 2s, 6 for the
    3s give R = 3 + 6 + 6 + 8 = 23, U = 23 - 10 = 13; the tie-corrected variance is
    16/12 x (9 - 48/56) = 10.857; z = (13 - 8 - 0.5)/sqrt(10.857) = 1.3657; p = 0.0860."""
    test = mann_whitney_greater([2, 3, 3, 4], [1, 2, 2, 3])
    assert not test.exact
    assert test.u == 13.0
    variance = 16 / 12 * (9 - 48 / 56)
    assert test.z == pytest.approx(4.5 / math.sqrt(variance))
    assert test.z == pytest.approx(1.36570, abs=1e-5)
    assert test.p_value == pytest.approx(0.086017, abs=1e-6)
    assert test.u == sum(1.0 if a > b else 0.5 if a == b else 0.0
                         for a in [2, 3, 3, 4] for b in [1, 2, 2, 3])


def test_mann_whitney_normal_approximation_near_enumeration_with_ties() -> None:
    """With many ties (times rounded to the millisecond), the approximation stays within 0.02
    of the exact enumeration."""
    x = [0.012, 0.013, 0.013, 0.015, 0.016, 0.016, 0.018]
    y = [0.011, 0.012, 0.012, 0.013, 0.014, 0.015, 0.015]
    test = mann_whitney_greater(x, y)
    assert not test.exact
    assert test.p_value == pytest.approx(brute_force_p(x, y), abs=0.02)


def test_mann_whitney_all_tied_has_no_evidence() -> None:
    """Every value equal: the variance is zero, p = 1."""
    test = mann_whitney_greater([0.01] * 12, [0.01] * 15)
    assert (test.u, test.p_value) == (90.0, 1.0)


def test_mann_whitney_large_groups_use_the_normal_approximation() -> None:
    """Above n x m = 400 the p-value is approximated; canary above baseline everywhere gives a
    p-value matching sf(z)."""
    test = mann_whitney_greater([float(v) for v in range(100, 130)],
                                [float(v) for v in range(20)])
    assert not test.exact and test.u == 600
    z = (600 - 300 - 0.5) / math.sqrt(30 * 20 * 51 / 12)
    assert test.z == pytest.approx(z)
    assert test.p_value == pytest.approx(normal_sf(z))


def test_normal_sf_known_values() -> None:
    """Standard normal tail: 0.5 at 0, 0.05 at 1.6449, 0.025 at 1.96."""
    assert normal_sf(0.0) == 0.5
    assert normal_sf(1.6448536) == pytest.approx(0.05, abs=1e-7)
    assert normal_sf(1.959964) == pytest.approx(0.025, abs=1e-7)


# -- Prometheus checks per group ---------------------------------------------------------------

def query(outcome: str, value: float | None = 1.0) -> QueryFigures:
    return QueryFigures(outcome, value, f"{outcome} at {value}")


@pytest.mark.parametrize(("canary", "baseline", "verdict", "both_failing"), [
    ("success", "success", Verdict.PASS, False),
    ("failure", "success", Verdict.FAIL, False),
    ("success", "failure", Verdict.PASS, False),
    ("failure", "failure", Verdict.INCONCLUSIVE, True),
    ("no_data", "success", Verdict.INCONCLUSIVE, False),
    ("success", "no_data", Verdict.INCONCLUSIVE, False),
])
def test_a_query_per_group_is_judged_by_the_checks_bound(canary: str, baseline: str,
                                                          verdict: Verdict,
                                                          both_failing: bool) -> None:
    result = compare_query("errors", query(canary), query(baseline))
    assert (result.verdict, result.both_failing) == (verdict, both_failing)
    assert result.metric == "query"


def test_a_failing_query_fails_the_whole_judgement_beside_passing_probes() -> None:
    probes = compare("http", GroupSamples(ok=50, latencies=(0.01,) * 50),
                     GroupSamples(ok=50, latencies=(0.01,) * 50))
    judgement = judge([*probes, compare_query("errors", query("failure", 9.0),
                                              query("success", 0.1))])
    assert judgement.verdict is Verdict.FAIL
    assert "errors query" in judgement.reason
    assert judgement.to_json()["checks"][-1]["canary"]["value"] == 9.0
