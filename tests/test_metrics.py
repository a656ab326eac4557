"""`GET /metrics` of the real daemon, parsed with prometheus_client, after real deploys.

One app on two local hosts with real health servers: a good deploy, a deploy whose build hook
fails, then a bad deploy that deployd rolls back by itself. After each step the values of
every metric DESIGN.md lists (that exists so far) are read back from the text format.
"""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from deployd import __version__
from tests.support.healthservers import BAD, GOOD
from tests.support.judging import (
    APP,
    HOOKS,
    Daemons,
    Lab,
    MakeLab,
    deployed_and_baked,
    wait_event,
)
from tests.support.metrics import sample, scrape, series

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def host_ids(lab: Lab) -> list[str]:
    """The host label health metrics use for each local host (several share "local")."""
    return [f"local:{d}" for d in lab.deploy_dirs]


def value(samples: Samples, name: str, **labels: str) -> float:
    found = sample(samples, name, app=APP, **labels)
    assert found is not None, f"no {name}{labels}"
    return found


def verdicts(samples: Samples) -> dict[str, float]:
    """The app's bake_verdicts_total by verdict."""
    return {verdict: value(samples, "deployd_bake_verdicts_total", verdict=verdict)
            for verdict in ("good", "bad", "no_data")}


def check_release_info(samples: Samples, revision: str) -> None:
    """Exactly one release_info series for the app, for the live revision."""
    assert series(samples, "deployd_release_info", app=APP) == {
        frozenset({("app", APP), ("revision", revision)}): 1.0}


async def test_metrics_after_a_good_deploy_a_failed_one_and_an_automatic_rollback(
        make_lab: MakeLab, daemons: Daemons) -> None:
    """Every metric's value after a good deploy, a failed build and a health rollback."""
    hooks = {**HOOKS, "build": "test ! -e FAIL_BUILD"}
    lab = await make_lab(2, hooks=hooks)
    started = time.time()
    good = lab.commit(GOOD, "good")
    daemon = await daemons(lab.config)
    await deployed_and_baked(daemon, good)

    samples = await scrape(daemon)
    assert series(samples, "deployd_build_info") == {
        frozenset({("version", __version__)}): 1.0}
    assert value(samples, "deployd_deploys_total", result="succeeded") == 1
    assert value(samples, "deployd_deploys_total", result="failed") == 0
    assert verdicts(samples) == {"good": 1, "bad": 0, "no_data": 0}
    assert value(samples, "deployd_rollbacks_total", trigger="health") == 0
    assert value(samples, "deployd_rollbacks_total", trigger="manual") == 0
    assert value(samples, "deployd_branch_pristine") == 1
    assert value(samples, "deployd_paused") == 0
    check_release_info(samples, good)
    deployed_at = value(samples, "deployd_last_deploy_timestamp_seconds")
    assert started <= deployed_at <= time.time()
    assert sample(samples, "deployd_last_rollback_timestamp_seconds", app=APP) is None
    assert value(samples, "deployd_deploy_duration_seconds_count") == 1
    assert value(samples, "deployd_deploy_duration_seconds_bucket", le="+Inf") == 1
    assert 0 < value(samples, "deployd_deploy_duration_seconds_sum") < 30
    assert sample(samples, "deployd_rollback_duration_seconds_count", app=APP) in (None, 0)
    for host in host_ids(lab):
        assert value(samples, "deployd_host_healthy", host=host) == 1
        assert value(samples, "deployd_health_checks_total", host=host, result="success") >= 1
    assert value(samples, "deployd_health_check_duration_seconds_count") >= 2

    # A build hook that fails: counted as a failed deploy; the live release is unchanged.
    broken = lab.commit(GOOD, "does not build", FAIL_BUILD="1")
    await wait_event(daemon, "deploy.failed", broken)
    samples = await scrape(daemon)
    assert value(samples, "deployd_deploys_total", result="failed") == 1
    assert value(samples, "deployd_deploys_total", result="succeeded") == 1
    assert value(samples, "deployd_deploy_duration_seconds_count") == 2
    assert value(samples, "deployd_last_deploy_timestamp_seconds") == deployed_at
    check_release_info(samples, good)

    # A bad deploy, rolled back by deployd itself.
    bad = lab.origin.commit({"health.txt": BAD, "FAIL_BUILD": None}, "builds, but bad")
    await wait_event(daemon, "deploy.succeeded", bad)
    samples = await scrape(daemon)
    check_release_info(samples, bad)
    assert value(samples, "deployd_deploys_total", result="succeeded") == 2  # not judged yet
    bad_deployed_at = value(samples, "deployd_last_deploy_timestamp_seconds")
    assert bad_deployed_at > deployed_at
    await wait_event(daemon, "rollback.succeeded")

    samples = await scrape(daemon)
    assert value(samples, "deployd_deploys_total", result="succeeded") == 2
    assert value(samples, "deployd_deploys_total", result="failed") == 1
    assert value(samples, "deployd_rollbacks_total", trigger="health") == 1
    assert value(samples, "deployd_rollbacks_total", trigger="manual") == 0
    assert verdicts(samples) == {"good": 1, "bad": 1, "no_data": 0}
    assert value(samples, "deployd_rollback_duration_seconds_count") == 1
    assert 0 < value(samples, "deployd_rollback_duration_seconds_sum") < 30
    rolled_back_at = value(samples, "deployd_last_rollback_timestamp_seconds")
    assert bad_deployed_at <= rolled_back_at <= time.time()
    assert value(samples, "deployd_last_deploy_timestamp_seconds") == bad_deployed_at
    check_release_info(samples, good)
    assert value(samples, "deployd_branch_pristine") == 0
    assert value(samples, "deployd_paused") == 0
    failures = [sample(samples, "deployd_health_checks_total", app=APP, host=host,
                       result="failure") for host in host_ids(lab)]
    assert any(count and count >= 2 for count in failures), failures

    # Healthy again on the last good release: the gauges follow.
    async def healthy_again() -> bool:
        now = await scrape(daemon)
        return all(sample(now, "deployd_host_healthy", app=APP, host=host) == 1
                   for host in host_ids(lab))

    await daemon.wait_until(healthy_again, what="host_healthy back to 1")
    await wait_event(daemon, "bake.healthy", good, count=2)
    samples = await scrape(daemon)
    check_release_info(samples, good)
    assert value(samples, "deployd_rollbacks_total", trigger="health") == 1
    assert verdicts(samples) == {"good": 2, "bad": 1, "no_data": 0}  # the rollback's bake


async def test_a_bad_first_deploy_counts_as_a_bad_verdict(
        make_lab: MakeLab, daemons: Daemons) -> None:
    """The very first deploy fails its bake: nothing to roll back to, so the app pauses. It
    counts as a succeeded deploy (it went live everywhere) and as a bad bake verdict."""
    lab = await make_lab(1, rollback={"grace": "200ms", "bake": "5s"})
    bad = lab.commit(BAD, "bad from the start")
    daemon = await daemons(lab.config)
    paused = await wait_event(daemon, "app.paused")
    assert "no earlier release to roll back to" in paused["message"]
    await wait_event(daemon, "bake.failed", bad)
    samples = await scrape(daemon)
    assert value(samples, "deployd_deploys_total", result="succeeded") == 1
    assert value(samples, "deployd_deploys_total", result="failed") == 0
    assert verdicts(samples) == {"good": 0, "bad": 1, "no_data": 0}
    assert value(samples, "deployd_rollbacks_total", trigger="health") == 0
    assert value(samples, "deployd_paused") == 1


async def test_metrics_text_is_valid_and_has_help_and_types(
        make_lab: MakeLab, daemons: Daemons) -> None:
    """/metrics is Prometheus text with the right content type; every family has HELP/TYPE."""
    lab = await make_lab(1)
    good = lab.commit(GOOD, "good")
    daemon = await daemons(lab.config)
    await wait_event(daemon, "deploy.succeeded", good)
    async with daemon.session.get(daemon.base + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    expected = {
        "deployd_deploys": "counter", "deployd_rollbacks": "counter",
        "deployd_health_checks": "counter", "deployd_git_fetch_errors": "counter",
        "deployd_deploy_duration_seconds": "histogram",
        "deployd_rollback_duration_seconds": "histogram",
        "deployd_health_check_duration_seconds": "histogram",
        "deployd_host_healthy": "gauge", "deployd_branch_pristine": "gauge",
        "deployd_paused": "gauge", "deployd_last_deploy_timestamp_seconds": "gauge",
        "deployd_last_rollback_timestamp_seconds": "gauge", "deployd_release_info": "gauge",
        "deployd_build_info": "gauge",
    }
    for name, kind in expected.items():
        assert name in families, name
        assert families[name].type == kind, (name, families[name].type)
        assert families[name].documentation, name
    assert "# HELP deployd_deploys_total" in text and "# TYPE deployd_deploys_total counter" in text
