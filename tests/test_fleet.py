"""One app's hosts together, each a real sshd on loopback."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deployd.config import AppConfig, Hooks, HostConfig
from deployd.errors import (
    CommandError,
    ConnectError,
    FleetError,
    Invalid,
    LockHeld,
    ReleaseError,
)
from deployd.fleet import Fleet, RollbackIncomplete
from deployd.hosts import HostPool
from deployd.releases import HostState, LockInfo
from deployd.retry import instant_retries
from tests.support.hostfixtures import Lab, make_tarball, sha, vanish
from tests.support.waiting import wait_until

START = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    """A clock that advances one minute per reading (or stands still)."""

    def __init__(self, step: timedelta = timedelta(minutes=1)) -> None:
        self.now = START
        self.step = step

    def __call__(self) -> datetime:
        self.now += self.step
        return self.now


def tarball(n: int) -> bytes:
    return make_tarball({"index.html": f"version {n}", "VERSION": str(n)})


def roots(app: AppConfig) -> list[Path]:
    return [Path(host.deploy_to) for host in app.hosts]


def current(root: Path) -> str | None:
    """The release `current` points at, checking it is an absolute link into releases/."""
    if not os.path.lexists(root / "current"):
        return None
    target = os.readlink(root / "current")
    assert target.startswith(str(root / "releases") + "/")
    return target.rsplit("/", 1)[-1]


def releases_on(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "releases").iterdir())


def no_locks(app: AppConfig) -> bool:
    return not any((root / ".deployd.lock").exists() for root in roots(app))


@pytest.fixture
def lab(lab_factory: Callable[[int], Lab]) -> Lab:
    return lab_factory(3)


async def test_deploy_of_several_commits(lab: Lab, pool: HostPool) -> None:
    """Three deploys: every host switches to each new release, logs it, prunes the oldest,
    and the outcome reports the previous release and per-phase timings per host."""
    app = lab.app(keep_releases=2)
    fleet = Fleet(app, pool, clock=Clock())
    names: list[str] = []
    for n in (1, 2, 3):
        outcome = await fleet.deploy(sha(n), tarball(n), branch="production", actor="alice")
        assert set(outcome.hosts) == set(fleet.hosts)
        assert all(prev == (names[-1] if names else None) for prev in outcome.previous.values())
        assert all({"check", "prepare", "switch", "finish"} <= set(t)
                   for t in outcome.timings.values())
        names.append(outcome.release)
    assert names == sorted(names) and len(set(names)) == 3
    for root in roots(app):
        assert current(root) == names[-1]
        assert (root / "current/index.html").read_text() == "version 3"
        assert releases_on(root) == names[1:]
        assert (root / "revisions.log").read_text().splitlines() == [
            f"Branch production (at {sha(n)}) deployed as release {name} by alice"
            for n, name in zip((1, 2, 3), names, strict=True)]
    assert no_locks(app)
    states = await fleet.state()
    assert all(isinstance(s, HostState) and s.current_revision == sha(3)
               for s in states.values())


async def test_build_failure_on_one_host_switches_no_host(lab: Lab, pool: HostPool) -> None:
    """A build hook failing on ONE host: no host switches and no host keeps the new
    release or a lock; the error names that host."""
    hosts = [lab.host_config(h, fail="1" if i == 1 else "0") for i, h in enumerate(lab.hosts)]
    build = f'[ "$DEPLOYD_VAR_FAIL$DEPLOYD_REVISION" = "1{sha(2)}" ] && exit 9; true'
    app = lab.app(hosts=hosts, hooks=Hooks(build=build))
    fleet = Fleet(app, pool, clock=Clock())
    first = await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    with pytest.raises(FleetError) as caught:
        await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice")
    assert caught.value.action == "prepare"
    assert list(caught.value.failures) == [hosts[1].name]
    failure = caught.value.failures[hosts[1].name]
    assert isinstance(failure, CommandError) and failure.exit_status == 9
    for root in roots(app):
        assert current(root) == first.release
        assert releases_on(root) == [first.release]
    assert no_locks(app)


async def test_sshd_killed_mid_deploy_leaves_the_fleet_consistent(
        lab: Lab, pool: HostPool) -> None:
    """A host vanishing during the build: a per-host ConnectError, and every reachable host
    stays on the previous release without the new one or a lock; the next deploy works."""
    gate = lab.workdir / "gate"
    build = (f'[ "$DEPLOYD_REVISION" = "{sha(2)}" ] || exit 0; touch building; '
             f'while [ ! -e {gate} ]; do sleep 0.05; done')
    app = lab.app(hooks=Hooks(build=build))
    fleet = Fleet(app, pool, clock=Clock())
    first = await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    deploying = asyncio.create_task(
        fleet.deploy(sha(2), tarball(2), branch="production", actor="alice"))
    await wait_until(lambda: all(list((root / "releases").glob("*/building"))
                                 for root in roots(app)), within=5.0, what="every host building")
    vanish(lab.hosts[1])
    gate.touch()
    with pytest.raises(FleetError) as caught:
        await deploying
    assert caught.value.action == "prepare"
    assert list(caught.value.failures) == [app.hosts[1].name]
    assert isinstance(caught.value.failures[app.hosts[1].name], ConnectError)
    for index, root in enumerate(roots(app)):
        assert current(root) == first.release
        if index != 1:
            assert releases_on(root) == [first.release]
            assert not (root / ".deployd.lock").exists()
    lab.hosts[1].start()
    third = await fleet.deploy(sha(3), tarball(3), branch="production", actor="alice")
    assert all(current(root) == third.release for root in roots(app))
    assert no_locks(app)


async def test_switch_failure_on_one_host_reverts_the_others(lab: Lab, pool: HostPool) -> None:
    """A restart hook failing on one host after its switch: every host goes back to the
    previous release, the new release is dropped, and the error names that host."""
    hosts = [lab.host_config(h, fail="1" if i == 2 else "0") for i, h in enumerate(lab.hosts)]
    restart = f'[ "$DEPLOYD_VAR_FAIL$DEPLOYD_REVISION" = "1{sha(2)}" ] && exit 4; true'
    app = lab.app(hosts=hosts, hooks=Hooks(restart=restart))
    fleet = Fleet(app, pool, clock=Clock())
    first = await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    with pytest.raises(FleetError) as caught:
        await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice")
    assert caught.value.action == "switch"
    assert list(caught.value.failures) == [hosts[2].name]
    for root in roots(app):
        assert current(root) == first.release
        assert releases_on(root) == [first.release]
        log = (root / "revisions.log").read_text().splitlines()
        assert log[-1] == f"alice rolled back to release {first.release}"
    assert no_locks(app)


async def test_deploy_refuses_a_host_locked_by_someone_else(lab: Lab, pool: HostPool) -> None:
    """A live lock on one host stops the deploy before anything is uploaded, naming the
    holder."""
    app = lab.app()
    fleet = Fleet(app, pool, clock=Clock())
    first = await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    other = LockInfo.new("carol", "maintenance")
    host = pool.host(app, app.hosts[0])
    await host.run(f"printf '%s' '{other.content()}' > {app.hosts[0].deploy_to}/.deployd.lock",
                   timeout=10)
    with pytest.raises(FleetError) as caught:
        await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice")
    error = caught.value.failures[app.hosts[0].name]
    assert isinstance(error, LockHeld) and "carol" in str(error)
    assert all(releases_on(root) == [first.release] for root in roots(app))


async def test_rollback_to_a_target_missing_on_one_host_switches_nothing(
        lab: Lab, pool: HostPool) -> None:
    """The target missing on one host: an error naming it, and no host switched."""
    app = lab.app()
    fleet = Fleet(app, pool, clock=Clock())
    first = await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    second = await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice")
    victim = app.hosts[1]
    await pool.host(app, victim).run(f"rm -rf {victim.deploy_to}/releases/{first.release}",
                                     timeout=10)
    with pytest.raises(FleetError) as caught:
        await fleet.rollback(first.release, reason="bad deploy", actor="bob")
    assert caught.value.action == "rollback check"
    assert list(caught.value.failures) == [victim.name]
    assert "does not exist" in str(caught.value)
    assert all(current(root) == second.release for root in roots(app))
    assert not any((root / "releases" / second.release / "ROLLED_BACK").exists()
                   for root in roots(app))


async def test_rollback_refuses_hosts_that_disagree(lab: Lab, pool: HostPool) -> None:
    """The target holding another revision on one host is an explicit error naming the
    hosts and revisions, not a guess; nothing is switched."""
    app = lab.app()
    fleet = Fleet(app, pool, clock=Clock())
    first = await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    second = await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice")
    odd = app.hosts[0]
    await pool.host(app, odd).run(
        f"echo {sha(9)} > {odd.deploy_to}/releases/{first.release}/REVISION", timeout=10)
    with pytest.raises(FleetError, match="disagree") as caught:
        await fleet.rollback(first.release, reason="bad deploy", actor="bob")
    assert set(caught.value.failures) == set(fleet.hosts)
    assert sha(9)[:12] in str(caught.value)
    assert all(current(root) == second.release for root in roots(app))
    with pytest.raises(FleetError) as named:
        await fleet.rollback(first.release, reason="bad deploy", actor="bob", revision=sha(1))
    assert list(named.value.failures) == [odd.name]


async def test_rollback_with_one_host_down_rolls_back_the_others(
        lab: Lab, pool: HostPool) -> None:
    """A host down: the others roll back, the error names it, and retrying just that host
    later completes the rollback."""
    app = lab.app()
    fleet = Fleet(app, pool, clock=Clock())
    first = await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    second = await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice")
    down = app.hosts[2]
    vanish(lab.hosts[2])
    with pytest.raises(RollbackIncomplete) as caught:
        await fleet.rollback(first.release, reason="bad deploy", actor="bob")
    assert list(caught.value.failures) == [down.name]
    assert isinstance(caught.value.failures[down.name], ConnectError)
    assert set(caught.value.outcome.hosts) == {app.hosts[0].name, app.hosts[1].name}
    assert caught.value.outcome.revision == sha(1)
    assert [current(root) for root in roots(app)] == [first.release, first.release,
                                                      second.release]
    lab.hosts[2].start()
    outcome = await fleet.rollback(first.release, reason="bad deploy", actor="bob",
                                   hosts=[down.name])
    assert outcome.hosts == (down.name,) and outcome.previous[down.name] == second.release
    assert all(current(root) == first.release for root in roots(app))
    assert all((root / "releases" / second.release / "ROLLED_BACK").exists()
               for root in roots(app))
    assert no_locks(app)


async def test_host_vanishing_mid_rollback_does_not_stop_the_others(
        lab: Lab, pool: HostPool) -> None:
    """A host vanishing while its rollback hook runs: the others complete and the error
    names only that host."""
    gate = lab.workdir / "rollback-gate"
    hook = f"touch ../../rolling; while [ ! -e {gate} ]; do sleep 0.05; done"
    app = lab.app(hooks=Hooks(rollback=hook))
    fleet = Fleet(app, pool, clock=Clock())
    first = await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice")
    rolling = asyncio.create_task(fleet.rollback(first.release, reason="bad", actor="bob"))
    await wait_until(lambda: all((root / "rolling").exists() for root in roots(app)),
                     within=5.0, what="every host rolling back")
    vanish(lab.hosts[0])
    gate.touch()
    with pytest.raises(RollbackIncomplete) as caught:
        await rolling
    assert list(caught.value.failures) == [app.hosts[0].name]
    assert set(caught.value.outcome.hosts) == {app.hosts[1].name, app.hosts[2].name}
    assert all(current(root) == first.release for root in roots(app)[1:])


async def test_release_name_bumps_when_two_deploys_land_in_the_same_second(
        lab: Lab, pool: HostPool) -> None:
    """Two deploys in the same second get distinct, increasing release names."""
    app = lab.app()
    fleet = Fleet(app, pool, clock=Clock(step=timedelta(0)))
    first = await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    second = await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice")
    assert first.release == START.strftime("%Y%m%d%H%M%S")
    assert second.release == (START + timedelta(seconds=1)).strftime("%Y%m%d%H%M%S")
    assert all(current(root) == second.release for root in roots(app))


async def test_release_name_moves_past_a_newer_release_on_any_host(
        lab: Lab, pool: HostPool) -> None:
    """A release newer than now on one host (another tool, clock skew) pushes the name
    past it on every host."""
    app = lab.app()
    future = "20990101000000"
    await pool.host(app, app.hosts[1]).run(
        f"mkdir -p {app.hosts[1].deploy_to}/releases/{future}", timeout=10)
    fleet = Fleet(app, pool, clock=Clock())
    outcome = await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    assert outcome.release == "20990101000001"


async def test_fan_out_is_bounded_by_parallel(lab_factory: Callable[[int], Lab],
                                              pool: HostPool) -> None:
    """With parallel=2, at most two hosts run their build at the same time."""
    lab = lab_factory(4)
    trace = lab.workdir / "trace"
    build = (f"echo start >> {trace}; sleep 0.3; echo end >> {trace}")
    app = lab.app(parallel=2, hooks=Hooks(build=build))
    await Fleet(app, pool, clock=Clock()).deploy(sha(1), tarball(1), branch="production",
                                                 actor="alice")
    running = peak = 0
    for event in trace.read_text().split():
        running += 1 if event == "start" else -1
        peak = max(peak, running)
    assert peak == 2


async def test_state_reports_each_hosts_error(lab: Lab, pool: HostPool) -> None:
    """state() gives every host's state, and the error for a host that is down."""
    app = lab.app()
    fleet = Fleet(app, pool, clock=Clock())
    await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    vanish(lab.hosts[0])
    states = await fleet.state()
    assert list(states) == list(fleet.hosts)
    assert isinstance(states[app.hosts[0].name], ConnectError)
    assert all(isinstance(states[h.name], HostState) for h in app.hosts[1:])


async def test_rollback_of_unknown_target_everywhere(lab: Lab, pool: HostPool) -> None:
    """A target that exists nowhere is refused on every host."""
    app = lab.app()
    fleet = Fleet(app, pool, clock=Clock())
    await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    with pytest.raises(FleetError) as caught:
        await fleet.rollback("20000101000000", reason="x", actor="bob")
    assert set(caught.value.failures) == set(fleet.hosts)
    assert all(isinstance(e, ReleaseError) for e in caught.value.failures.values())


async def test_cancelling_a_deploy_during_the_switch_finishes_the_switch(
        lab: Lab, pool: HostPool) -> None:
    """Cancelled while switching, a deploy still switches every host (never a split fleet)
    and releases its locks before passing the cancellation on."""
    restart = (f'[ "$DEPLOYD_REVISION" = "{sha(2)}" ] || exit 0; touch ../../restarting; '
               "sleep 0.5")
    app = lab.app(hooks=Hooks(restart=restart))
    fleet = Fleet(app, pool, clock=Clock())
    await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    deploying = asyncio.create_task(
        fleet.deploy(sha(2), tarball(2), branch="production", actor="alice"))
    await wait_until(lambda: any((root / "restarting").exists() for root in roots(app)),
                     within=5.0, what="a host restarting")
    deploying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await deploying
    revisions = {(root / "current/REVISION").read_text().strip() for root in roots(app)}
    assert revisions == {sha(2)}
    assert no_locks(app)


async def test_errors_name_the_host_once(lab: Lab, pool: HostPool) -> None:
    """A fleet error names each failing host once, not `host: host: ...`."""
    missing_key = lab.workdir / "no-such-key"
    app = lab.app(ssh=replace(lab.ssh(), key=missing_key))
    with instant_retries(), pytest.raises(FleetError) as caught:
        await Fleet(app, pool, clock=Clock()).deploy(sha(1), tarball(1), branch="production",
                                                     actor="alice")
    message = str(caught.value)
    for host in app.hosts:
        assert message.count(host.name) == 1, message
        assert f"{host.name}: cannot read SSH key files" in message


async def test_hook_failure_is_worded_once_with_its_output_in_order(
        lab: Lab, pool: HostPool) -> None:
    """A failing hook: `host: the build hook failed (exit 3): <its output, in order>`."""
    app = lab.app(hosts=[lab.host_config(lab.hosts[0])],
                  hooks=Hooks(build="echo building on vm; echo oops >&2; exit 3"))
    with pytest.raises(FleetError) as caught:
        await Fleet(app, pool, clock=Clock()).deploy(sha(1), tarball(1), branch="production",
                                                     actor="alice")
    name = app.hosts[0].name
    assert str(caught.value.failures[name]) == (
        f"{name}: the build hook failed (exit 3): building on vm | oops")
    assert str(caught.value) == (
        f"prepare failed on 1 host(s): {name}: the build hook failed (exit 3): "
        "building on vm | oops")


async def test_hook_timeout_is_worded_once(lab: Lab, pool: HostPool) -> None:
    app = lab.app(hosts=[lab.host_config(lab.hosts[0])], hook_timeout=0.5,
                  hooks=Hooks(build="echo started; sleep 30"))
    with pytest.raises(FleetError) as caught:
        await Fleet(app, pool, clock=Clock()).deploy(sha(1), tarball(1), branch="production",
                                                     actor="alice")
    name = app.hosts[0].name
    assert str(caught.value.failures[name]) == (
        f"{name}: the build hook timed out after 0.5s: started")


def seen_by_hooks(trace: Path) -> list[tuple[str, str, list[str | None]]]:
    """(hook, host, release every host's current pointed at when it ran), one per hook run."""
    runs = []
    for line in trace.read_text().splitlines():
        hook, host, *links = line.split()
        runs.append((hook, host, [link.rsplit("/", 1)[-1] if link != "-" else None
                                  for link in links]))
    return runs


def recording_hook(hook: str, app_roots: list[Path], trace: Path, only: str = "") -> str:
    """A hook appending `hook host <readlink current of every host>` to `trace`, for
    DEPLOYD_REVISION `only` (every revision when empty). The hosts share this filesystem, so
    one host's hook can read every host's `current`."""
    links = " ".join(f'"$(readlink {root}/current || echo -)"' for root in app_roots)
    guard = f'[ "$DEPLOYD_REVISION" = "{only}" ] || exit 0; ' if only else ""
    return f'{guard}echo "{hook} $DEPLOYD_HOST {links}" >> {trace}'


@pytest.mark.parametrize("parallel", [1, 50])
async def test_deploy_switches_every_host_before_any_restart_hook(
        lab: Lab, pool: HostPool, parallel: int) -> None:
    """Every restart hook of a deploy runs after `current` switched on every host (even one
    host at a time); each host's hook output is kept, and the restart phase is timed."""
    trace = lab.workdir / "trace"
    app = lab.app(parallel=parallel)
    restart = recording_hook("restart", roots(app), trace, only=sha(2)) + "; echo restarted"
    app = replace(app, hooks=Hooks(restart=restart))
    fleet = Fleet(app, pool, clock=Clock())
    await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    second = await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice")
    runs = seen_by_hooks(trace)
    assert sorted(host for _, host, _ in runs) == sorted(fleet.hosts)
    assert all(links == [second.release] * 3 for _, _, links in runs), runs
    assert second.output == {name: {"restart": "restarted"} for name in fleet.hosts}
    assert all({"check", "prepare", "switch", "restart", "finish"} <= set(t)
               for t in second.timings.values())
    assert no_locks(app)


@pytest.mark.parametrize("parallel", [1, 50])
async def test_rollback_switches_every_host_before_any_hook(
        lab: Lab, pool: HostPool, parallel: int) -> None:
    """The rollback and restart hooks of a rollback run after every host switched, in that
    order on each host, under the rollback's lock (released afterwards); their output is kept
    per host, in order."""
    trace = lab.workdir / "trace"
    app = lab.app(parallel=parallel)
    locks = lab.workdir / "locks"
    hooks = Hooks(
        rollback=recording_hook("rollback", roots(app), trace, only=sha(1))
        + f'; [ -e "$DEPLOYD_DEPLOY_TO/.deployd.lock" ] && echo locked >> {locks}'
        + "; echo rolling back",
        restart=recording_hook("restart", roots(app), trace, only=sha(1)) + "; echo restarted")
    app = replace(app, hooks=hooks)
    fleet = Fleet(app, pool, clock=Clock())
    first = await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice")
    trace.unlink()
    outcome = await fleet.rollback(first.release, reason="bad", actor="bob")
    runs = seen_by_hooks(trace)
    assert all(links == [first.release] * 3 for _, _, links in runs), runs
    for name in fleet.hosts:
        assert [hook for hook, host, _ in runs if host == name] == ["rollback", "restart"]
    assert locks.read_text().split() == ["locked"] * 3
    assert outcome.output == {name: {"rollback": "rolling back\nrestarted"}
                              for name in fleet.hosts}
    assert all({"check", "rollback", "restart"} <= set(phases)
               for phases in outcome.phases.values())
    assert all(outcome.timings[name] >= outcome.phases[name]["restart"] for name in fleet.hosts)
    assert no_locks(app)


@pytest.mark.parametrize("parallel", [1, 50])
async def test_undoing_a_switch_switches_every_host_back_before_restarting(
        lab: Lab, pool: HostPool, parallel: int) -> None:
    """A restart hook failing on one host: every host switches back, and only then do the
    restart hooks of the previous release run, seeing every host on it."""
    trace = lab.workdir / "trace"
    hosts = [lab.host_config(h, fail="1" if i == 2 else "0") for i, h in enumerate(lab.hosts)]
    app = lab.app(hosts=hosts, parallel=parallel)
    restart = (f'[ "$DEPLOYD_VAR_FAIL$DEPLOYD_REVISION" = "1{sha(2)}" ] && exit 4; '
               + recording_hook("restart", roots(app), trace, only=sha(1)))
    app = replace(app, hooks=Hooks(restart=restart))
    fleet = Fleet(app, pool, clock=Clock())
    first = await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    trace.unlink()
    with pytest.raises(FleetError) as caught:
        await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice")
    assert caught.value.action == "switch"
    error = caught.value.failures[hosts[2].name]
    assert str(error).startswith(f"{hosts[2].name}: the restart hook failed (exit 4)")
    runs = seen_by_hooks(trace)
    assert sorted(host for _, host, _ in runs) == sorted(fleet.hosts)
    assert all(links == [first.release] * 3 for _, _, links in runs), runs
    assert no_locks(app)


async def test_subset_deploys_contact_only_their_hosts_and_share_one_release_name(
        lab: Lab, pool: HostPool) -> None:
    """Two steps of a rollout: a deploy to the first host, then to the other two with the
    same release name. While the first step runs, the other hosts are down and never needed
    (no check, no prune); a name that is not a release name, or an unknown host, is refused."""
    app = lab.app(keep_releases=1)
    fleet = Fleet(app, pool, clock=Clock())
    first = await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    canary, rest = fleet.hosts[0], list(fleet.hosts[1:])
    for host in lab.hosts[1:]:
        vanish(host)
    step1 = await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice",
                               hosts=[canary])
    assert step1.hosts == (canary,) and set(step1.timings) == {canary} and not step1.warnings
    assert step1.pruned == {canary: (first.release,)}
    for host in lab.hosts[1:]:
        host.start()
    step2 = await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice",
                               hosts=rest, release=step1.release)
    assert step2.release == step1.release and step2.hosts == tuple(rest)
    assert all(current(root) == step1.release for root in roots(app))
    assert all(releases_on(root) == [step1.release] for root in roots(app))
    with pytest.raises(Invalid, match="not a release name"):
        await fleet.deploy(sha(3), tarball(3), branch="production", actor="alice",
                           release="2024-05-01")
    with pytest.raises(Invalid, match="no such host"):
        await fleet.deploy(sha(3), tarball(3), branch="production", actor="alice",
                           hosts=["elsewhere:22"])
    with pytest.raises(Invalid, match="at least one host"):
        await fleet.deploy(sha(3), tarball(3), branch="production", actor="alice", hosts=[])
    assert no_locks(app)


async def test_subset_rollback_never_contacts_the_other_hosts(
        lab: Lab, pool: HostPool) -> None:
    """A rollback of some hosts (a failed rollout step) with another host's sshd killed:
    the check and the rollback run on the named hosts only, and succeed."""
    app = lab.app(hooks=Hooks(restart="true"))
    fleet = Fleet(app, pool, clock=Clock())
    first = await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    second = await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice",
                                hosts=fleet.hosts[:2])
    vanish(lab.hosts[2])
    outcome = await fleet.rollback(first.release, reason="canary failed", actor="deployd",
                                   hosts=fleet.hosts[:2])
    assert outcome.hosts == fleet.hosts[:2]
    assert all(outcome.previous[name] == second.release for name in outcome.hosts)
    assert [current(root) for root in roots(app)] == [first.release] * 3
    assert no_locks(app)


async def test_local_hosts_switch_together_before_their_hooks_too(tmp_path: Path) -> None:
    """Three `local` hosts (one machine, three deploy_to): the same two halves, deploy and
    rollback; no host's hook runs before every host switched."""
    configs = tuple(HostConfig(address="local", deploy_to=str(tmp_path / f"app{i}"))
                    for i in range(3))
    trace = tmp_path / "trace"
    paths = [Path(config.deploy_to) for config in configs]
    app = AppConfig(name="shop", repo="/nonexistent", branch="production",
                    deploy_to=configs[0].deploy_to, hosts=configs,
                    hooks=Hooks(restart=recording_hook("restart", paths, trace)))
    pool = HostPool()
    fleet = Fleet(app, pool, clock=Clock())
    first = await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    second = await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice")
    await fleet.rollback(first.release, reason="bad", actor="bob")
    seen = [links for _, _, links in seen_by_hooks(trace)]
    assert seen == [[first.release] * 3] * 3 + [[second.release] * 3] * 3 + [
        [first.release] * 3] * 3
    await pool.close()


async def test_more_hosts_on_one_connection_than_it_has_channels_still_deploy(
        lab: Lab, pool: HostPool) -> None:
    """Ten deploy_to on one sshd share one connection of eight channels: their steps are not
    held (they would wait for each other), each host restarts right after its switch, and
    the deploy and the rollback complete."""
    one = lab.hosts[0]
    app = lab.app(hosts=[replace(lab.host_config(one), deploy_to=str(one.home / f"app{i}"))
                         for i in range(10)], hooks=Hooks(restart="echo restarted"))
    fleet = Fleet(app, pool, clock=Clock())
    first = await asyncio.wait_for(
        fleet.deploy(sha(1), tarball(1), branch="production", actor="alice"), 60)
    await asyncio.wait_for(
        fleet.deploy(sha(2), tarball(2), branch="production", actor="alice"), 60)
    outcome = await asyncio.wait_for(
        fleet.rollback(first.release, reason="bad", actor="bob"), 60)
    assert set(outcome.output) == set(fleet.hosts)
    assert all(current(root) == first.release for root in roots(app))


async def test_a_held_rollback_hook_failing_on_one_host_is_worded_as_before(
        lab: Lab, pool: HostPool) -> None:
    """A rollback hook failing on one host once every host switched: that host still runs
    restart after it, keeps the target and drops its lock; the error is `host: the rollback
    hook failed (exit 6): <its output, in order>` and the other hosts are in the outcome."""
    hosts = [lab.host_config(h, fail="1" if i == 1 else "0") for i, h in enumerate(lab.hosts)]
    restarts = lab.workdir / "restarts"
    app = lab.app(hosts=hosts, hooks=Hooks(
        rollback='echo undoing; [ "$DEPLOYD_VAR_FAIL" = 1 ] && { echo broken >&2; exit 6; }; '
                 "true",
        restart=f'echo "$DEPLOYD_HOST" >> {restarts}'))
    fleet = Fleet(app, pool, clock=Clock())
    first = await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice")
    restarts.unlink()
    with pytest.raises(RollbackIncomplete) as caught:
        await fleet.rollback(first.release, reason="bad", actor="bob")
    failed = hosts[1].name
    assert str(caught.value.failures[failed]) == (
        f"{failed}: the rollback hook failed (exit 6): undoing | broken")
    assert caught.value.outcome.hosts == (hosts[0].name, hosts[2].name)
    assert sorted(restarts.read_text().split()) == sorted(fleet.hosts)
    assert all(current(root) == first.release for root in roots(app))
    assert no_locks(app)


def local_fleet(tmp_path: Path, hosts: int = 2) -> tuple[Fleet, list[Path]]:
    configs = tuple(HostConfig(address="local", deploy_to=str(tmp_path / f"app{i}"))
                    for i in range(hosts))
    app = AppConfig(name="shop", repo="/nonexistent", branch="production",
                    deploy_to=configs[0].deploy_to, hosts=configs)
    return Fleet(app, HostPool(), clock=Clock()), [Path(c.deploy_to) for c in configs]


def lock_from_elsewhere(root: Path, owner: str) -> LockInfo:
    """A fresh lock a deployd on another machine left on a host (killed mid-operation)."""
    lock = replace(LockInfo.new("deployd", "deploy abc", owner=owner), machine="elsewhere",
                   instance="gone")
    (root / ".deployd.lock").write_text(lock.content())
    return lock


async def test_a_lock_left_by_an_earlier_ownership_of_the_app_is_taken_over_at_once(
        tmp_path: Path) -> None:
    """node-a (another machine) owned the app under epoch 2 and died between steps, its lock
    still on a host and only seconds old: node-b, owner under epoch 3, deploys anyway."""
    fleet, paths = local_fleet(tmp_path)
    await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    lock_from_elsewhere(paths[0], "node-a epoch 2")
    fleet.own("node-b", 3)
    second = await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice")
    assert [current(path) for path in paths] == [second.release] * 2
    assert not (paths[0] / ".deployd.lock").exists()
    await fleet.pool.close()


@pytest.mark.parametrize("owner", ["node-c epoch 4", "node-a epoch 3", ""])
async def test_a_lock_of_this_or_a_later_ownership_or_a_humans_is_held(
        tmp_path: Path, owner: str) -> None:
    """Only an earlier epoch is superseded: a lock of a later owner (this node is the one
    fenced off), of the same epoch, or with no owner (a person, another tool) stops the
    deploy until it is older than lock_stale_after."""
    fleet, paths = local_fleet(tmp_path)
    first = await fleet.deploy(sha(1), tarball(1), branch="production", actor="alice")
    lock_from_elsewhere(paths[1], owner)
    fleet.own("node-b", 3)
    with pytest.raises(FleetError) as caught:
        await fleet.deploy(sha(2), tarball(2), branch="production", actor="alice")
    assert isinstance(caught.value.failures[fleet.hosts[1]], LockHeld)
    assert [current(path) for path in paths] == [first.release] * 2
    await fleet.pool.close()


def test_a_locks_epoch_is_read_from_its_owner_line() -> None:
    def epoch(owner: str) -> int | None:
        return LockInfo.new("deployd", "deploy", owner=owner).epoch

    assert epoch("node-b epoch 3") == 3
    assert epoch("my epoch node epoch 12") == 12
    assert epoch("") is None
    assert epoch("node-b epoch x") is None
    assert epoch("node-b epoch -1") is None
