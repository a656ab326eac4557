"""The bake judge: gathers the facts about the live release in its bake window and asks
`policy.judge_bake` for a verdict. It only keeps the bake's own clock (grace, then baking);
acting on a verdict is `verdicts.Verdicts`' work.

During a rollout step the facts are the hosts on the new release (the canary group), with the
hosts still on last good (the baseline) beside them; with `compare`, a step whose window ran
out healthy is also judged canary against baseline (`analysis`) before it passes. While a
rollout is paused only a bad verdict counts: the absolute checks keep watching the canaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deployd import analysis, policy
from deployd.config import HttpCheck
from deployd.context import AppContext
from deployd.health import GroupValue
from deployd.progressive import Steps
from deployd.rollout_store import Rollout
from deployd.store import Deploy
from deployd.vocabulary import BakeState, RolloutState


@dataclass(frozen=True)
class Judgement:
    """A final verdict (good, bad or no_data) on one live release."""

    record: Deploy
    verdict: policy.BakeVerdict
    rollout: Rollout | None = None


class BakeJudge:
    def __init__(self, ctx: AppContext, steps: Steps) -> None:
        self.ctx = ctx
        self.steps = steps

    async def baking(self) -> Deploy | None:
        """The live release's record while it is in its bake window.

        The live record, not the newest one: a later deploy that failed before switching
        (or a failed rollback) must not leave what is live unjudged.
        """
        live = await self.ctx.store.last_live(self.ctx.name)
        if live is not None and live.bake_state in (BakeState.GRACE, BakeState.BAKING):
            return live
        return None

    async def next_check(self) -> float:
        """Seconds until the bake needs looking at again (inf: nothing is baking)."""
        record = await self.baking()
        if record is None:
            return float("inf")
        if record.bake_state == BakeState.GRACE and record.bake_started_at is not None:
            # Start the bake when grace ends, not up to a second later.
            left = record.bake_started_at + self.ctx.app.rollback.grace - self.ctx.clock()
            return max(0.0, min(left, 1.0))
        # Re-judge at least every second while baking: the health monitor wakes us sooner.
        return 1.0

    async def judge(self) -> Judgement | None:
        """The verdict on the release in its bake window, or None while it is still open."""
        ctx = self.ctx
        record = await self.baking()
        if record is None:
            return None
        assert record.bake_started_at is not None and record.bake_until is not None
        if record.bake_state == BakeState.GRACE \
                and ctx.clock() >= record.bake_started_at + ctx.app.rollback.grace:
            # Failures during grace do not count: a host made unhealthy by them alone (an app
            # still starting) must fail `failures` times again in the bake to count.
            ctx.health.reset()
            await ctx.store.update_deploy(record.id, bake_state=BakeState.BAKING)
            return None
        rollout = await self.steps.of(record)
        verdict = policy.judge_bake(self.facts(record, rollout))
        if rollout is not None:
            verdict = await self._rollout_verdict(record, rollout, verdict)
        if verdict.verdict != "wait":
            return Judgement(record, verdict, rollout)
        if verdict.reason == "baking" and record.bake_state == BakeState.GRACE:
            await ctx.store.update_deploy(record.id, bake_state=BakeState.BAKING)
        return None

    def facts(self, record: Deploy, rollout: Rollout | None = None) -> policy.BakeFacts:
        assert record.bake_started_at is not None and record.bake_until is not None
        health, rollback = self.ctx.health, self.ctx.app.rollback
        unhealthy = health.unhealthy_hosts()
        canary, baseline = self.groups(rollout)
        return policy.BakeFacts(
            now=self.ctx.clock(), bake_started_at=record.bake_started_at,
            grace=rollback.grace, bake_until=record.bake_until,
            unhealthy_hosts=[h for h in unhealthy if h in canary], total_hosts=len(canary),
            failing_metrics=health.metric_failing(),
            no_data_metrics=self._silent_through_bake(record),
            threshold=rollback.unhealthy_hosts, evidence_since=health.evidence_since,
            observation=self.observation_time(),
            baseline_unhealthy=[h for h in unhealthy if h in baseline],
            baseline_total=len(baseline),
            baseline_failing=self._failing_lately(baseline))

    def _failing_lately(self, hosts: tuple[str, ...]) -> list[str]:
        """The hosts with a failed HTTP probe within the checks' observation time."""
        since = self.ctx.clock() - self.observation_time()
        return [host for host in hosts if self.ctx.health.samples([host], since).failed]

    def groups(self, rollout: Rollout | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(hosts on the new release, hosts on last good): every host and none, unless a
        rollout is part way. Hosts that run nothing yet (a first rollout) are no baseline:
        they are neither judged nor compared with."""
        hosts = tuple(self.ctx.app.host_labels)
        if rollout is None:
            return hosts, ()
        if rollout.baseline_release is None:
            return rollout.on_new, ()
        return rollout.on_new, rollout.baseline(hosts)

    async def _rollout_verdict(self, record: Deploy, rollout: Rollout,
                               verdict: policy.BakeVerdict) -> policy.BakeVerdict:
        """A step's verdict: while paused only bad counts; a healthy step is compared with
        the baseline (with `compare`) before it passes."""
        if rollout.state is RolloutState.PAUSED:
            return verdict if verdict.verdict == "bad" else policy.BakeVerdict("wait", "paused")
        if verdict.verdict != "good" or not self.comparing(rollout):
            return verdict
        judgement = await self.compare(record, rollout)
        self.ctx.metrics.analysis_verdicts_total.labels(
            app=self.ctx.name, verdict=judgement.verdict.value).inc()
        await self.steps.store.update(record.id, analysis=judgement.to_json())
        if judgement.verdict is analysis.Verdict.FAIL:
            return policy.BakeVerdict("bad", f"worse than the hosts on last good: "
                                             f"{judgement.reason}")
        if judgement.verdict is analysis.Verdict.INCONCLUSIVE:
            why = "the hosts on last good fail too" if judgement.both_failing \
                else "the comparison with last good could not tell"
            return policy.BakeVerdict("inconclusive", f"{why}: {judgement.reason}")
        return verdict

    def comparing(self, rollout: Rollout) -> bool:
        """Whether the step is judged against a baseline (`compare`, and hosts left on it)."""
        return self.ctx.app.rollout.compare and bool(self.groups(rollout)[1])

    async def compare(self, record: Deploy, rollout: Rollout) -> analysis.Judgement:
        """The canary group against the baseline over the step's window so far: every HTTP
        check's probes, and each Prometheus check whose query names `{hosts}` run per group."""
        assert record.bake_started_at is not None
        since = record.bake_started_at + self.ctx.app.rollback.grace
        canary, baseline = self.groups(rollout)
        health = self.ctx.health
        results: list[analysis.CheckResult | analysis.QueryResult] = []
        for check in self.ctx.app.checks:
            if isinstance(check, HttpCheck):
                results += analysis.compare(check.name,
                                            health.samples(canary, since, check=check.name),
                                            health.samples(baseline, since, check=check.name))
            elif "{hosts}" in check.query:
                results.append(analysis.compare_query(
                    check.name, _figures(await health.query_group(check.name, canary)),
                    _figures(await health.query_group(check.name, baseline))))
        return analysis.judge(results)

    def observation_time(self) -> float:
        """How long the slowest check takes to call a failing host unhealthy."""
        spans = [check.interval * check.failures + check.timeout for check in self.ctx.app.checks]
        return max(spans, default=0.0)

    def _silent_through_bake(self, record: Deploy) -> list[str]:
        """Metric checks with no data since the bake began (not a blip at its end)."""
        assert record.bake_started_at is not None
        bake_start = record.bake_started_at + self.ctx.app.rollback.grace
        silent = []
        metrics = self.ctx.health.snapshot().metrics
        for check in self.ctx.app.checks:
            state = metrics.get(check.name)
            if state is None or state.no_data_since is None:
                continue
            # The first probe after the bake began may come one interval (and timeout) later.
            if state.no_data_since <= bake_start + check.interval + check.timeout + 1.0:
                silent.append(check.name)
        return silent

    def failing_checks(self) -> str:
        """`; failing: web1 http (status 500 ...)` for the event a human reads first."""
        failing = [f"{host.name} {check.name} ({check.last_reason})"
                   for host in self.ctx.health.snapshot().hosts.values() if host.healthy is False
                   for check in host.checks.values() if check.state == "unhealthy"]
        return "; failing: " + ", ".join(failing) if failing else ""

    def health_detail(self) -> dict[str, Any]:
        return self.ctx.health.snapshot().to_json()


def _figures(value: GroupValue) -> analysis.QueryFigures:
    return analysis.QueryFigures(value.outcome.value, value.value, value.reason)
