"""Judging deploys end to end: the real daemon, real hosts, real health servers.

Each host's health endpoint is a real aiohttp server that answers as the live release says
(its health.txt; see tests/support/healthservers.py), so most tests only commit good or bad
releases and deployd deploys them, watches their health, bakes, rolls back, quarantines and
pauses by itself. Tests that need a fault not tied to a release switch a server to 500 directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.daemonfixtures import AppSpec, DaemonSpec, RunningDaemon
from tests.support.gitrepo import OriginRepo
from tests.support.healthservers import (
    BAD,
    GOOD,
    PrometheusServer,
    fail_after,
    fail_for,
    start_servers,
)
from tests.support.judging import (
    APP,
    HOOKS,
    DaemonProcess,
    Daemons,
    Lab,
    MakeLab,
    app_summary,
    current_release,
    current_revision,
    deployed_and_baked,
    events_of,
    hooks_log,
    http_check,
    lab_from,
    process_with_good_live,
    revisions_log,
    wait_event,
)
from tests.support.metrics import sample, scrape
from tests.support.sshd import ClientKey, SshdHost, write_known_hosts
from tests.support.waiting import timeline, wait_until

# -- bad deploys ----------------------------------------------------------------------------


async def test_bad_deploy_is_rolled_back_everywhere_quarantined_and_not_redeployed(
        make_lab: MakeLab, daemons: Daemons) -> None:
    """A deploy unhealthy in its bake: rolled back on every host, hooks run, quarantined, kept."""
    lab = await make_lab(2)
    good = lab.commit(GOOD, "good")
    daemon = await daemons(lab.config)
    await deployed_and_baked(daemon, good)
    good_release = current_release(lab.deploy_dirs[0])
    bad = lab.commit(fail_after(0.8), "bad batch: healthy at first, then not")

    succeeded = await wait_event(daemon, "rollback.succeeded")
    assert succeeded["revision"] == good
    for deploy_to in lab.deploy_dirs:
        assert current_revision(deploy_to) == good
        assert current_release(deploy_to) == good_release
        assert revisions_log(deploy_to)[-1] == f"deployd rolled back to release {good_release}"
        assert hooks_log(deploy_to) == [f"restart {good}", f"restart {bad}",
                                        f"rollback {good}", f"restart {good}"]

    # The events name the failing check and host: bake.failed (message and health data) and
    # health.changed for each host that turned.
    (failed,) = await events_of(daemon, "bake.failed", bad)
    named = [name for name, host in failed["data"]["health"]["hosts"].items()
             if host["checks"]["http"]["state"] == "unhealthy"]
    assert named and all(name in failed["message"] for name in named)
    for name in named:
        check = failed["data"]["health"]["hosts"][name]["checks"]["http"]
        assert "status 500" in check["last_reason"]
    # Before the first deploy nothing is live and the probes get 503s: only count from the bad
    # deploy on.
    (bad_started,) = await events_of(daemon, "deploy.started", bad)
    unhealthy = [e for e in await events_of(daemon, "health.changed")
                 if e["data"]["healthy"] is False and e["id"] > bad_started["id"]]
    assert set(named) <= {e["data"]["subject"] for e in unhealthy}
    assert all("http: status 500" in e["message"] for e in unhealthy)
    (quarantined,) = await events_of(daemon, "quarantine.added")
    assert quarantined["revision"] == bad
    (started,) = await events_of(daemon, "rollback.started")
    assert started["actor"] == "deployd" and good_release in started["message"]

    detail = await daemon.api.get(f"/api/v1/apps/{APP}")
    assert [q["revision"] for q in detail["quarantined"]] == [bad]
    # Both hosts are "local": each still shows its own live release and health.
    assert [h["deploy_to"] for h in detail["hosts"]] == [str(d) for d in lab.deploy_dirs]
    for host in detail["hosts"]:
        assert host["current"] == {"release": good_release, "revision": good}, host
        assert host["health"]["checks"]["http"]["last_outcome"] is not None, host
    assert detail["head"] == bad
    assert detail["deployed"] == {"revision": good, "release": good_release}
    assert detail["last_good"]["revision"] == good
    assert (await app_summary(daemon))["pristine"] is False

    # The branch stays at the bad head for many polls: it is never deployed again.
    await asyncio.sleep(1.0)
    assert len(await events_of(daemon, "deploy.started", bad)) == 1
    assert len(await events_of(daemon, "rollback.started")) == 1
    assert all(current_revision(d) == good for d in lab.deploy_dirs)


async def test_bad_deploy_on_real_sshd_hosts_is_rolled_back_on_each(
        tmp_path: Path, client_key: ClientKey, sshd_factory: Callable[[], SshdHost],
        daemons: Daemons) -> None:
    """Over SSH: three sshd hosts, a bad deploy is rolled back on all of them, hooks run."""
    hosts = [sshd_factory() for _ in range(3)]
    servers = await start_servers(3)
    try:
        origin = OriginRepo(tmp_path / "origin.git")
        app = AppSpec(name=APP, repo=origin.url, sshd_hosts=hosts, hooks=dict(HOOKS),
                      checks=[http_check()],
                      rollback={"grace": "300ms", "bake": "1500ms", "unhealthy_hosts": "2"},
                      host_vars=[{"health_port": s.port} for s in servers])
        spec = DaemonSpec(state_dir=tmp_path / "state", client_key=client_key.private,
                          known_hosts=write_known_hosts(tmp_path / "known_hosts", hosts),
                          apps=[app])
        lab = lab_from(tmp_path, origin, [h.home / "app" for h in hosts], servers, app, spec)
        good = lab.commit(GOOD, "good")
        daemon = await daemons(lab.config)
        await deployed_and_baked(daemon, good)
        good_release = current_release(lab.deploy_dirs[0])
        bad = lab.commit(BAD, "bad")
        await wait_event(daemon, "rollback.succeeded")
        for deploy_to in lab.deploy_dirs:
            assert current_release(deploy_to) == good_release
            assert current_revision(deploy_to) == good
            assert hooks_log(deploy_to)[-2:] == [f"rollback {good}", f"restart {good}"]
            assert sum("rolled back" in line for line in revisions_log(deploy_to)) == 1
        (failed,) = await events_of(daemon, "bake.failed", bad)
        assert "threshold 2" in failed["message"]
        assert [e["revision"] for e in await events_of(daemon, "quarantine.added")] == [bad]
        detail = await daemon.api.get(f"/api/v1/apps/{APP}")
        for host in detail["hosts"]:
            assert host["current"]["revision"] == good
            assert host["health"] is not None
    finally:
        for server in servers:
            await server.stop()


async def test_healthy_deploy_becomes_last_good_after_its_bake(
        make_lab: MakeLab, daemons: Daemons) -> None:
    """A deploy healthy through its bake window becomes last good; not before it ends."""
    lab = await make_lab(2)
    first = lab.commit(GOOD, "first")
    daemon = await daemons(lab.config)
    await deployed_and_baked(daemon, first)
    assert (await daemon.api.get(f"/api/v1/apps/{APP}"))["last_good"]["revision"] == first

    second = lab.commit(GOOD, "second", extra="2")
    await wait_event(daemon, "deploy.succeeded", second)
    detail = await daemon.api.get(f"/api/v1/apps/{APP}")
    assert detail["deployed"]["revision"] == second
    assert detail["last_good"]["revision"] == first  # still baking
    await wait_event(daemon, "bake.healthy", second)
    detail = await daemon.api.get(f"/api/v1/apps/{APP}")
    assert detail["last_good"] == {"revision": second,
                                   "release": current_release(lab.deploy_dirs[0])}
    assert detail["pristine"] is True
    assert not await events_of(daemon, "rollback.started")


async def test_flapping_host_below_the_threshold_does_not_roll_back(
        make_lab: MakeLab, daemons: Daemons) -> None:
    """One of three hosts flapping unhealthy with a 50% threshold: no rollback, bakes good."""
    lab = await make_lab(3, rollback={"unhealthy_hosts": "50%", "bake": "2s"})
    first = lab.commit(GOOD, "first")
    daemon = await daemons(lab.config)
    await deployed_and_baked(daemon, first)
    second = lab.commit(GOOD, "second", extra="2")
    deployed = await wait_event(daemon, "deploy.succeeded", second)
    await asyncio.sleep(0.45)  # past grace: these flaps count
    flapper = lab.servers[2]
    for _ in range(2):
        flapper.fail(500)
        await asyncio.sleep(0.45)
        flapper.resume_following()
        await asyncio.sleep(0.3)
    await wait_event(daemon, "bake.healthy", second)
    flaps = [e for e in await events_of(daemon, "health.changed")
             if e["data"]["healthy"] is False and e["id"] > deployed["id"]]
    assert len(flaps) == 2
    assert not await events_of(daemon, "bake.failed")
    assert not await events_of(daemon, "rollback.started")
    assert all(current_revision(d) == second for d in lab.deploy_dirs)


async def test_failures_during_grace_do_not_count(make_lab: MakeLab, daemons: Daemons) -> None:
    """A host failing only during the grace period (warming up), then healthy: no rollback."""
    lab = await make_lab(2, rollback={"grace": "1500ms", "bake": "1s"})
    first = lab.commit(GOOD, "first")
    daemon = await daemons(lab.config)
    await deployed_and_baked(daemon, first)
    warming = lab.commit(fail_for(0.6), "slow to start")
    started = await wait_event(daemon, "deploy.started", warming)
    await wait_event(daemon, "bake.healthy", warming)
    down = [e for e in await events_of(daemon, "health.changed")
            if not e["data"]["healthy"] and e["id"] > started["id"]]
    assert len(down) == 2  # both hosts were seen failing, during grace
    assert not await events_of(daemon, "bake.failed")
    assert not await events_of(daemon, "rollback.started")
    assert not await events_of(daemon, "quarantine.added")
    assert (await daemon.api.get(f"/api/v1/apps/{APP}"))["last_good"]["revision"] == warming


async def test_failures_counted_during_grace_do_not_carry_into_bake(
        make_lab: MakeLab, daemons: Daemons) -> None:
    """Unhealthy from grace failures, recovering before `failures` more after it: no rollback."""
    lab = await make_lab(1, checks=[http_check(failures=5)],
                         rollback={"grace": "1s", "bake": "1500ms"})
    first = lab.commit(GOOD, "first")
    daemon = await daemons(lab.config)
    await deployed_and_baked(daemon, first)
    # Fails all through grace and 0.3 s into bake: at most 4 failures (of 5) after grace.
    slow = lab.commit(fail_for(1.3), "slower to start than the grace period", extra="s")
    started = await wait_event(daemon, "deploy.started", slow)
    await wait_event(daemon, "bake.healthy", slow)
    down = [e for e in await events_of(daemon, "health.changed")
            if not e["data"]["healthy"] and e["id"] > started["id"]]
    assert down, "the host was never seen unhealthy: the test proves nothing"
    assert not await events_of(daemon, "bake.failed")
    assert not await events_of(daemon, "rollback.started")


async def test_failure_outside_bake_is_reported_not_rolled_back(
        make_lab: MakeLab, daemons: Daemons) -> None:
    """Unhealthy after the bake window: a health.changed event and host_healthy 0, no rollback."""
    lab = await make_lab(2)
    good = lab.commit(GOOD, "good")
    daemon = await daemons(lab.config)
    await deployed_and_baked(daemon, good)
    # Probes before the first deploy may have reported 503s (nothing live): count from here.
    since = (await daemon.events(APP))[-1]["id"]
    lab.servers[0].fail(503)
    await daemon.wait_until(lambda: _unhealthy_reported(daemon, since), what="health.changed")
    down = [e for e in await events_of(daemon, "health.changed")
            if not e["data"]["healthy"] and e["id"] > since]
    assert len(down) == 1 and "status 503" in down[0]["message"]
    host = down[0]["data"]["subject"]
    assert sample(await scrape(daemon), "deployd_host_healthy", app=APP, host=host) == 0
    await asyncio.sleep(1.0)
    for kind in ("bake.failed", "quarantine.added", "rollback.started", "app.paused"):
        assert not await events_of(daemon, kind), kind
    assert all(current_revision(d) == good for d in lab.deploy_dirs)
    assert (await app_summary(daemon))["health"]["unhealthy_hosts"] == [host]
    lab.servers[0].resume_following()
    await daemon.wait_until(
        lambda: _host_healthy(daemon, host), what=f"{host} healthy again")


async def _unhealthy_reported(daemon: RunningDaemon, since: int) -> bool:
    return any(not e["data"]["healthy"] and e["id"] > since
               for e in await events_of(daemon, "health.changed"))


async def _host_healthy(daemon: RunningDaemon, host: str) -> bool:
    return sample(await scrape(daemon), "deployd_host_healthy", app=APP, host=host) == 1


async def test_still_unhealthy_after_rollback_pauses_without_a_second_rollback(
        make_lab: MakeLab, daemons: Daemons) -> None:
    """No ping-pong: unhealthy after rolling back to last good pauses the app; one rollback."""
    lab = await make_lab(2)
    good = lab.commit(GOOD, "good")
    daemon = await daemons(lab.config)
    await deployed_and_baked(daemon, good)
    bad = lab.commit(GOOD, "looks fine, but the database went down with it", extra="x")
    await wait_event(daemon, "deploy.succeeded", bad)
    for server in lab.servers:
        server.fail(500)  # whatever runs now is unhealthy
    paused = await wait_event(daemon, "app.paused")
    assert "still unhealthy" in paused["message"]
    await asyncio.sleep(0.6)
    assert len(await events_of(daemon, "rollback.started")) == 1
    assert len(await events_of(daemon, "rollback.succeeded")) == 1
    assert [e["revision"] for e in await events_of(daemon, "quarantine.added")] == [bad]
    assert all(current_revision(d) == good for d in lab.deploy_dirs)
    summary = await app_summary(daemon)
    assert summary["paused"]["by"] == "deployd"
    assert "still unhealthy" in summary["paused"]["reason"]
    assert sample(await scrape(daemon), "deployd_paused", app=APP) == 1
    # Paused: a new head is not deployed by itself.
    newer = lab.commit(GOOD, "a fix", extra="y")
    await wait_event(daemon, "branch.moved", newer)
    await asyncio.sleep(0.6)
    assert not await events_of(daemon, "deploy.started", newer)


async def test_new_head_after_a_quarantined_one_is_deployed(
        make_lab: MakeLab, daemons: Daemons) -> None:
    """After a quarantined head, the next head on the branch is deployed and can bake good."""
    lab = await make_lab(1)
    good = lab.commit(GOOD, "good")
    daemon = await daemons(lab.config)
    await deployed_and_baked(daemon, good)
    bad = lab.commit(BAD, "bad")
    await wait_event(daemon, "quarantine.added", bad)
    await wait_event(daemon, "rollback.succeeded")
    fixed = lab.commit(GOOD, "fix on top of the bad commit", extra="fixed")
    await deployed_and_baked(daemon, fixed)
    assert current_revision(lab.deploy_dirs[0]) == fixed
    summary = await app_summary(daemon)
    assert summary["last_good"]["revision"] == fixed
    assert summary["pristine"] is True
    assert len(await events_of(daemon, "rollback.started")) == 1


# -- pause and resume -----------------------------------------------------------------------


async def test_pause_stops_deploys_and_rollbacks_survives_restart_and_resume_deploys(
        make_lab: MakeLab, daemons: Daemons) -> None:
    """Paused (who, when, why kept across a restart): no deploys, no rollbacks; resume deploys."""
    lab = await make_lab(1)
    first = lab.commit(GOOD, "first")
    daemon = await daemons(lab.config)
    await deployed_and_baked(daemon, first)

    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/pause", token="deployer",
                                         json_body={"reason": "database migration"})
    assert status == 200, body
    assert body["paused"]["by"] == "deployer"
    assert body["paused"]["reason"] == "database migration"
    paused_at = body["paused"]["at"]
    assert abs(paused_at - time.time()) < 10
    waiting = lab.commit(GOOD, "lands while paused", extra="w")
    await wait_event(daemon, "branch.moved", waiting)
    await asyncio.sleep(0.6)
    assert not await events_of(daemon, "deploy.started", waiting)

    # A restart keeps the pause with its who, when and why.
    await daemon.stop()
    daemon = await daemons(lab.config)
    await daemon.wait_until(lambda: _fetched(daemon), what="daemon fetched")
    summary = await app_summary(daemon)
    assert summary["paused"] == {"by": "deployer", "reason": "database migration",
                                 "at": paused_at}
    assert sample(await scrape(daemon), "deployd_paused", app=APP) == 1
    await asyncio.sleep(0.6)
    assert not await events_of(daemon, "deploy.started", waiting)

    # A human may still deploy by hand; a bad result is judged but not rolled back.
    bad = lab.origin.commit({"health.txt": BAD}, "experiment", branch="experiment")
    await asyncio.sleep(0.5)  # fetched by the next poll
    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/deploy",
                                         token="deployer",
                                         json_body={"revision": bad, "force": True})
    assert status == 202, body
    skipped = await wait_event(daemon, "rollback.skipped", bad)
    assert "paused" in skipped["message"]
    await asyncio.sleep(0.5)
    assert not await events_of(daemon, "rollback.started")
    assert current_revision(lab.deploy_dirs[0]) == bad

    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/resume", token="deployer",
                                         json_body={"reason": "migration done"})
    assert status == 200, body
    assert body["paused"] is None
    await deployed_and_baked(daemon, waiting)
    assert current_revision(lab.deploy_dirs[0]) == waiting
    assert sample(await scrape(daemon), "deployd_paused", app=APP) == 0
    resumed = await events_of(daemon, "app.resumed")
    assert resumed[0]["actor"] == "deployer"


async def _fetched(daemon: RunningDaemon) -> bool:
    status, _ = await daemon.api.call("GET", "/readyz", token=None)
    return status == 200


async def test_pause_needs_the_deploy_role(make_lab: MakeLab, daemons: Daemons) -> None:
    """Pause and resume need the deploy role: a reader gets 403 and nothing changes."""
    lab = await make_lab(1)
    lab.commit(GOOD, "first")
    daemon = await daemons(lab.config)
    for action in ("pause", "resume"):
        status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/{action}",
                                             token="reader", json_body={"reason": "x"})
        assert status == 403, body
    assert (await app_summary(daemon))["paused"] is None


# -- the automatic rollback is an operation like any other ---------------------------------


async def test_no_manual_deploy_while_an_automatic_rollback_runs(
        make_lab: MakeLab, daemons: Daemons) -> None:
    """While an automatic rollback runs, a deploy over REST is refused (409), not interleaved."""
    hooks = {**HOOKS, "rollback": "sleep 1.5; " + HOOKS["rollback"]}
    lab = await make_lab(1, hooks=hooks)
    good = lab.commit(GOOD, "good")
    daemon = await daemons(lab.config)
    other = lab.origin.commit({"health.txt": GOOD}, "other", branch="other")
    await deployed_and_baked(daemon, good)
    bad = lab.commit(BAD, "bad")
    await wait_event(daemon, "rollback.started")
    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/deploy",
                                         json_body={"revision": other, "force": True})
    assert status == 409, body
    await wait_event(daemon, "rollback.succeeded")
    await daemon.wait_until(lambda: _idle(daemon), what="the rollback operation to end")
    assert not await events_of(daemon, "deploy.started", other)
    assert bad


async def _idle(daemon: RunningDaemon) -> bool:
    return (await app_summary(daemon))["busy"] is None


# -- kill -9 ------------------------------------------------------------------------------


async def test_restart_in_the_middle_of_bake_resumes_it_and_rolls_back_once(
        make_lab: MakeLab, processes: Callable[[Lab], DaemonProcess]) -> None:
    """kill -9 during a bake: on restart the bake resumes; a host going bad rolls back once."""
    lab = await make_lab(2, rollback={"grace": "300ms", "bake": "2500ms"})
    daemon, good = await process_with_good_live(lab, processes)
    bad = lab.commit(fail_after(1.5), "goes bad after a while")
    await wait_event(daemon, "deploy.succeeded", bad)
    daemon.kill9()
    await asyncio.sleep(0.3)
    await daemon.start()
    resumed = await wait_event(daemon, "bake.resumed")
    assert resumed["revision"] == bad
    await wait_event(daemon, "rollback.succeeded")
    await asyncio.sleep(1.0)
    assert len(await events_of(daemon, "deploy.started", bad)) == 1
    assert len(await events_of(daemon, "rollback.started")) == 1
    assert [e["revision"] for e in await events_of(daemon, "quarantine.added")] == [bad]
    for deploy_to in lab.deploy_dirs:
        assert current_revision(deploy_to) == good
        assert sum("rolled back" in line for line in revisions_log(deploy_to)) == 1


async def test_bake_window_run_out_while_down_is_judged_on_fresh_evidence(
        make_lab: MakeLab, processes: Callable[[Lab], DaemonProcess]) -> None:
    """Down past the end of the bake window: at restart the failing release is rolled back."""
    lab = await make_lab(2, rollback={"grace": "300ms", "bake": "1s"})
    daemon, good = await process_with_good_live(lab, processes)
    bad = lab.commit(fail_after(0.5), "goes bad soon after going live")
    await wait_event(daemon, "deploy.succeeded", bad)
    daemon.kill9()
    await asyncio.sleep(2.0)  # the whole window passes with nobody watching
    await daemon.start()
    await wait_event(daemon, "rollback.succeeded")
    story = timeline(await daemon.events(APP))
    assert not await events_of(daemon, "bake.healthy", bad), story
    assert [e["revision"] for e in await events_of(daemon, "quarantine.added")] == [bad]
    for deploy_to in lab.deploy_dirs:
        assert current_revision(deploy_to) == good


@pytest.mark.parametrize("moment", ["rollback.started", "rollback.succeeded"])
async def test_kill_around_an_automatic_rollback_never_rolls_back_twice(
        moment: str, make_lab: MakeLab, processes: Callable[[Lab], DaemonProcess]) -> None:
    """kill -9 just after a rollback started or finished: after restart, no second rollback."""
    hooks = {**HOOKS, "rollback": "sleep 0.5; " + HOOKS["rollback"]}
    lab = await make_lab(2, hooks=hooks, rollback={"grace": "300ms", "bake": "1200ms"})
    daemon, good = await process_with_good_live(lab, processes)
    bad = lab.commit(BAD, "bad")
    await wait_event(daemon, moment)
    daemon.kill9()
    await asyncio.sleep(0.6)  # an interrupted hook finishes on the host meanwhile
    await daemon.start()
    await wait_event(daemon, "bake.healthy", good, count=2, within=30)
    await asyncio.sleep(0.6)
    story = timeline(await daemon.events(APP))
    assert len(await events_of(daemon, "rollback.started")) == 1, story
    assert len(await events_of(daemon, "rollback.succeeded")) <= 1, story
    assert len(await events_of(daemon, "deploy.started", bad)) == 1, story
    for deploy_to in lab.deploy_dirs:
        assert current_revision(deploy_to) == good
        assert sum("rolled back" in line for line in revisions_log(deploy_to)) == 1
        assert hooks_log(deploy_to).count(f"rollback {good}") == 1
    summary = await app_summary(daemon)
    assert summary["paused"] is None
    assert summary["latest"]["kind"] == "rollback"
    assert summary["latest"]["state"] == "succeeded"


async def test_kill_after_some_hosts_rolled_back_finishes_only_the_others(
        make_lab: MakeLab, processes: Callable[[Lab], DaemonProcess]) -> None:
    """kill -9 as soon as a host switched back, one host at a time (parallel = 1): either the
    other host had not switched yet (the restart rolls back only it) or it had and was held
    before its hooks, waiting for its turn (the vanished daemon lets it run them); either way
    each host ran its hooks and logged the rollback exactly once, and one rollback started."""
    hooks = {**HOOKS, "rollback": "sleep 0.8; " + HOOKS["rollback"]}
    lab = await make_lab(2, hooks=hooks, settings={"parallel": 1},
                         rollback={"grace": "300ms", "bake": "1200ms"})
    daemon, good = await process_with_good_live(lab, processes)
    good_release = current_release(lab.deploy_dirs[0])
    lab.commit(BAD, "bad")
    await wait_event(daemon, "rollback.started")
    first, second = lab.deploy_dirs
    await wait_until(lambda: good_release in (current_release(first), current_release(second)),
                     within=10, every=0.005, what="a host rolled back")
    daemon.kill9()
    await asyncio.sleep(1.0)  # the killed hosts' hooks finish meanwhile
    await daemon.start()
    await wait_event(daemon, "bake.healthy", good, count=2, within=30)
    for deploy_to in lab.deploy_dirs:
        assert current_revision(deploy_to) == good
        assert sum("rolled back" in line for line in revisions_log(deploy_to)) == 1, deploy_to
        assert hooks_log(deploy_to).count(f"rollback {good}") == 1, hooks_log(deploy_to)
    assert len(await events_of(daemon, "rollback.started")) == 1


# -- Prometheus metric checks ---------------------------------------------------------------


async def test_metric_check_over_its_max_during_bake_rolls_back(
        make_lab: MakeLab, daemons: Daemons, prometheus: PrometheusServer) -> None:
    """A PromQL check above its max during bake (real Prometheus) rolls the deploy back."""
    await prometheus.set_error_ratio(0.0)
    check = {"name": "error-rate", "type": "prometheus", "server": prometheus.url,
             "query": "deployd_test_error_ratio", "max": 0.05, "interval": "200ms",
             "timeout": "2s"}
    lab = await make_lab(1, checks=[http_check(), check],
                         rollback={"grace": "300ms", "bake": "2500ms"})
    good = lab.commit(GOOD, "good")
    daemon = await daemons(lab.config)
    try:
        await deployed_and_baked(daemon, good)
        bad = lab.commit(GOOD, "healthy endpoint, but errors climb", extra="x")
        await wait_event(daemon, "deploy.succeeded", bad)
        await prometheus.set_error_ratio(0.5)
        failed = await wait_event(daemon, "bake.failed", bad)
        assert "error-rate" in failed["message"]
        assert failed["data"]["health"]["metrics"]["error-rate"]["value"] == 0.5
        await wait_event(daemon, "rollback.started")
        await prometheus.set_error_ratio(0.0)
        await wait_event(daemon, "rollback.succeeded")
        assert current_revision(lab.deploy_dirs[0]) == good
        assert [e["revision"] for e in await events_of(daemon, "quarantine.added")] == [bad]
        samples = await scrape(daemon)
        assert sample(samples, "deployd_rollbacks_total", app=APP, trigger="health") == 1
    finally:
        await prometheus.set_error_ratio(0.0)


async def test_metric_check_without_data_through_bake_pauses_instead_of_rolling_back(
        make_lab: MakeLab, daemons: Daemons, prometheus: PrometheusServer) -> None:
    """A PromQL check with no data for the whole bake window pauses the app; no rollback."""
    check = {"name": "latency", "type": "prometheus", "server": prometheus.url,
             "query": "deployd_test_metric_nobody_exports", "max": 1, "interval": "200ms"}
    lab = await make_lab(1, checks=[http_check(), check],
                         rollback={"grace": "300ms", "bake": "1200ms"})
    good = lab.commit(GOOD, "good")
    daemon = await daemons(lab.config)
    paused = await wait_event(daemon, "app.paused")
    assert "no data" in paused["message"] and "latency" in paused["message"]
    assert paused["actor"] == "deployd"
    assert not await events_of(daemon, "rollback.started")
    assert not await events_of(daemon, "quarantine.added")
    assert not await events_of(daemon, "bake.healthy")
    assert sample(await scrape(daemon), "deployd_paused", app=APP) == 1
    assert sample(await scrape(daemon), "deployd_health_checks_total", app=APP, host="",
                  result="no_data") > 0  # type: ignore[operator]
    assert sample(await scrape(daemon), "deployd_bake_verdicts_total", app=APP,
                  verdict="no_data") == 1
    second = lab.commit(GOOD, "second", extra="2")
    await wait_event(daemon, "branch.moved", second)
    await asyncio.sleep(0.8)
    assert not await events_of(daemon, "deploy.started", second)
    assert current_revision(lab.deploy_dirs[0]) == good
