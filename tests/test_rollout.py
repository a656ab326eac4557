"""Progressive rollouts end to end: six real sshd hosts, a health server per host following
the release live on it, the real daemon (in-process, or `deployd run` for kill -9).

A release's `health.txt` says how it behaves on every host that runs it (see
tests/support/healthservers.Behaviour); a host's server can be made to fail whatever runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemonfixtures import AppSpec, DaemonSpec, RunningDaemon
from tests.support.gitrepo import OriginRepo
from tests.support.healthservers import BAD, GOOD, HealthServer, start_servers
from tests.support.judging import (
    APP,
    HOOKS,
    DaemonProcess,
    Daemons,
    Lab,
    current_release,
    current_revision,
    events_of,
    http_check,
    lab_from,
    revisions_log,
    wait_event,
)
from tests.support.metrics import sample, scrape
from tests.support.sshd import ClientKey, SshdHost, write_known_hosts
from tests.support.waiting import timeline

HOSTS = 6
SLOW = "ok delay 0.06\n"  # answers 200, about 3x slower than the baseline's ~20 ms
BASELINE = "ok delay 0.02\n"
MakeFleet = Callable[..., Awaitable[Lab]]


@pytest.fixture
async def make_fleet(tmp_path: Path, client_key: ClientKey,
                     sshd_factory: Callable[[], SshdHost]) -> AsyncIterator[MakeFleet]:
    """make(steps=[...], step_bake=..., compare=...) -> a Lab of six sshd hosts."""
    servers: list[HealthServer] = []

    async def make(*, steps: list[str], step_bake: str = "1500ms", compare: bool = False,
                   check: dict[str, Any] | None = None,
                   rollback: dict[str, Any] | None = None) -> Lab:
        hosts = [sshd_factory() for _ in range(HOSTS)]
        servers.extend(await start_servers(HOSTS))
        mine = servers[-HOSTS:]
        origin = OriginRepo(tmp_path / "origin.git")
        app = AppSpec(
            name=APP, repo=origin.url, sshd_hosts=hosts, hooks=dict(HOOKS),
            checks=[http_check(**(check or {}))],
            rollback={"grace": "300ms", "bake": "1500ms", "unhealthy_hosts": "1",
                      **(rollback or {})},
            host_vars=[{"health_port": s.port} for s in mine],
            settings={"rollout": {"steps": steps, "step_bake": step_bake,
                                  "compare": compare}})
        spec = DaemonSpec(state_dir=tmp_path / "state", client_key=client_key.private,
                          known_hosts=write_known_hosts(tmp_path / "known_hosts", hosts),
                          apps=[app])
        return lab_from(tmp_path, origin, [h.home / "app" for h in hosts], mine, app, spec)

    yield make
    for server in servers:
        await server.stop()


async def good_everywhere(lab: Lab, daemon: RunningDaemon | DaemonProcess) -> str:
    """A first release rolled out to every host and judged good; its revision."""
    good = lab.commit(GOOD, "good")
    await wait_event(daemon, "rollout.done", good, within=60)
    return good


def on(lab: Lab, revision: str) -> list[int]:
    """The indexes of the hosts whose `current` is `revision`."""
    return [i for i, d in enumerate(lab.deploy_dirs) if current_revision(d) == revision]


def ever_ran(lab: Lab, revision: str) -> list[int]:
    """The hosts whose deploy log names `revision`: those that ever had it live."""
    return [i for i, d in enumerate(lab.deploy_dirs)
            if any(revision in line for line in revisions_log(d))]


async def rollout_of(daemon: RunningDaemon | DaemonProcess) -> dict[str, Any]:
    body = await daemon.api.get(f"/api/v1/apps/{APP}")
    rollout = body["rollout"]
    assert rollout is not None, body
    return dict(rollout)


async def test_a_good_release_walks_every_step_and_a_bad_one_stops_at_the_canary(
        make_fleet: MakeFleet, daemons: Daemons) -> None:
    lab = await make_fleet(steps=["1", "50%", "100%"])
    daemon = await daemons(lab.config)
    good = await good_everywhere(lab, daemon)
    steps = await events_of(daemon, "rollout.step", good)
    assert [len(e["data"]["canary"]) for e in steps] == [1, 3, 6]
    assert on(lab, good) == list(range(HOSTS))
    assert (await daemon.api.get(f"/api/v1/apps/{APP}"))["last_good"]["revision"] == good

    bad = lab.commit(BAD, "bad")
    await wait_event(daemon, "rollout.rolled_back", bad, within=30)
    await wait_event(daemon, "rollback.succeeded", within=30)
    story = timeline(await daemon.events(APP))
    assert on(lab, good) == list(range(HOSTS)), story
    assert ever_ran(lab, bad) == [0], story  # the blast radius: the canary alone
    failed = (await events_of(daemon, "bake.failed", bad))[0]
    assert failed["data"]["step"] == 1 and len(failed["data"]["hosts"]) == 1
    rollback = (await events_of(daemon, "rollback.started"))[-1]
    assert "rolling back" in rollback["message"]
    rollout = await rollout_of(daemon)
    assert (rollout["revision"], rollout["state"], rollout["step"]) == (bad, "rolled_back", 1)
    assert [e["revision"] for e in await events_of(daemon, "quarantine.added")] == [bad]
    releases = {current_release(d) for d in lab.deploy_dirs}
    assert len(releases) == 1  # one release on the whole fleet again


async def test_a_canary_three_times_slower_is_rolled_back_by_the_compare_judge(
        make_fleet: MakeFleet, daemons: Daemons) -> None:
    lab = await make_fleet(steps=["2", "100%"], step_bake="2500ms", compare=True,
                           check={"interval": "50ms"})
    daemon = await daemons(lab.config)
    good = lab.commit(BASELINE, "good, 20 ms")
    await wait_event(daemon, "rollout.done", good, within=60)
    slow = lab.commit(SLOW, "slow but answering 200")
    await wait_event(daemon, "rollout.rolled_back", slow, within=30)
    await wait_event(daemon, "rollback.succeeded", within=30)
    story = timeline(await daemon.events(APP))
    assert ever_ran(lab, slow) == [0, 1], story
    assert on(lab, good) == list(range(HOSTS)), story
    assert not await events_of(daemon, "health.changed", slow)  # absolute checks passed it
    rollout = await rollout_of(daemon)
    analysis = rollout["analysis"]
    assert analysis["verdict"] == "fail", analysis
    (latency,) = [c for c in analysis["checks"] if c["metric"] == "latency"]
    assert latency["verdict"] == "fail" and latency["p_value"] < 0.05
    assert latency["canary"]["p50"] > 2 * latency["baseline"]["p50"]
    samples = await scrape(daemon)
    assert sample(samples, "deployd_analysis_verdicts_total", app=APP, verdict="fail") == 1


async def test_canary_and_baseline_failing_together_pause_instead_of_rolling_back(
        make_fleet: MakeFleet, daemons: Daemons) -> None:
    lab = await make_fleet(steps=["1", "100%"], step_bake="60s")
    daemon = await daemons(lab.config)
    first = lab.commit(GOOD, "first")
    await wait_event(daemon, "rollout.step", first)
    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/promote", json_body={})
    assert status == 200, body  # an hour's step bake ended early by hand
    await wait_event(daemon, "rollout.done", first, within=30)
    new = lab.commit(GOOD, "fine, but the database goes down", extra="2")
    await wait_event(daemon, "rollout.step", new)
    for server in lab.servers:  # a shared dependency fails: every host answers 500
        server.fail(500)
    paused = await wait_event(daemon, "rollout.paused", new, within=30)
    assert "not the release's fault" in paused["message"]
    assert not await events_of(daemon, "rollback.started")
    assert on(lab, new) == [0]
    assert (await rollout_of(daemon))["state"] == "paused"
    samples = await scrape(daemon)
    assert sample(samples, "deployd_rollout_step", app=APP) == 1
    assert sample(samples, "deployd_rollout_paused_timestamp_seconds", app=APP) is not None


async def test_too_little_data_to_compare_pauses_and_never_passes(
        make_fleet: MakeFleet, daemons: Daemons) -> None:
    lab = await make_fleet(steps=["1", "100%"], step_bake="1s", compare=True,
                           check={"interval": "400ms"})
    daemon = await daemons(lab.config)
    # The first rollout has no baseline (the other hosts run nothing): absolute checks only.
    await good_everywhere(lab, daemon)
    second = lab.commit(GOOD, "second", extra="2")
    paused = await wait_event(daemon, "rollout.paused", second, within=30)
    assert "could not tell" in paused["message"], paused
    await asyncio.sleep(1.5)
    assert on(lab, second) == [0]
    rollout = await rollout_of(daemon)
    assert rollout["state"] == "paused"
    assert rollout["analysis"]["verdict"] == "inconclusive"


async def test_pause_promote_and_abort_over_rest(make_fleet: MakeFleet,
                                                 daemons: Daemons) -> None:
    lab = await make_fleet(steps=["1", "pause", "100%"])
    daemon = await daemons(lab.config)
    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/promote", json_body={})
    assert status == 409 and "no rollout in progress" in body["error"]["message"]

    first = lab.commit(GOOD, "first")
    await wait_event(daemon, "rollout.paused", first, within=30)
    assert on(lab, first) == [0]
    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/promote", json_body={})
    assert status == 200, body
    await wait_event(daemon, "rollout.done", first, within=30)
    assert on(lab, first) == list(range(HOSTS))
    (promoted,) = await events_of(daemon, "rollout.promoted", first)
    assert promoted["actor"] != "deployd"

    second = lab.commit(GOOD, "second", extra="2")
    await wait_event(daemon, "rollout.paused", second, within=30)
    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/abort",
                                         json_body={"reason": "checkout looks odd"})
    assert status == 202, body
    await wait_event(daemon, "rollback.succeeded", within=30)
    assert on(lab, first) == list(range(HOSTS))
    assert ever_ran(lab, second) == [0]
    rollout = await rollout_of(daemon)
    assert rollout["state"] == "aborted" and "checkout looks odd" in rollout["reason"]
    assert [e["revision"] for e in await events_of(daemon, "quarantine.added")] == [second]
    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/abort", json_body={})
    assert status == 409


async def test_kill_9_in_a_step_resumes_the_step(make_fleet: MakeFleet,
                                                 processes: Callable[[Lab], DaemonProcess]
                                                 ) -> None:
    lab = await make_fleet(steps=["1", "50%", "100%"], step_bake="2s")
    daemon = processes(lab)
    await daemon.start()
    await good_everywhere(lab, daemon)
    new = lab.commit(GOOD, "second", extra="2")
    await wait_event(daemon, "rollout.step", new, count=2, within=30)
    daemon.kill9()
    await asyncio.sleep(0.3)
    await daemon.start()
    await wait_event(daemon, "rollout.done", new, within=60)
    story = timeline(await daemon.events(APP))
    assert on(lab, new) == list(range(HOSTS)), story
    assert len(await events_of(daemon, "deploy.started", new)) == 1, story
    assert await events_of(daemon, "bake.resumed", new), story
    assert not await events_of(daemon, "rollback.started"), story
