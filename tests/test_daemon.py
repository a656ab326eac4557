"""The daemon end to end: real sshd hosts, a real origin repo, the real REST server.

Each test starts the daemon on a config written to disk, moves the origin's branch or calls
REST, and checks what landed on the hosts (the Capistrano layout, read from disk) and what the
daemon says about it (events, GET /apps).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemonfixtures import QUICK_BAKE, RunningDaemon, one_local_app, start_daemon
from tests.support.daemonlab import (
    APP,
    RELEASE,
    World,
    WorldFactory,
    app_dir,
    current_link,
    current_release,
    host_label,
    lay_out_capistrano_release,
    releases,
    revision_of,
    revisions_log,
)
from tests.support.gitrepo import OriginRepo
from tests.support.hostfixtures import vanish
from tests.support.sshd import TEST_USER, chown_tree, shared_dir
from tests.support.waiting import eventually, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent


def kinds(events: list[dict]) -> list[str]:
    return [e["kind"] for e in events]


async def count(daemon: RunningDaemon, kind: str) -> int:
    return kinds(await daemon.events(APP)).count(kind)


async def deployed(daemon: RunningDaemon, n: int) -> dict:
    """Wait for the n-th deploy.succeeded and return it."""
    return await daemon.wait_for_event(APP, "deploy.succeeded", count=n)


async def wait_for_revision(daemon: RunningDaemon, kind: str, revision: str) -> None:
    async def seen() -> bool:
        return any(e["kind"] == kind and e["revision"] == revision
                   for e in await daemon.events(APP))
    await daemon.wait_until(seen, what=f"{kind} of {revision[:12]}")


def assert_live(world: World, release: str, revision: str) -> None:
    for host in world.hosts:
        assert current_release(host) == release, host_label(host)
        assert revision_of(host, release) == revision


async def test_deploys_branch_head_on_start_then_each_new_commit(
        daemon_lab: WorldFactory) -> None:
    """Head on start, then each pushed commit: absolute current -> releases/<14 digits> with
    the commit's files and REVISION on every host, Capistrano's revisions.log, and GET /apps."""
    world = daemon_lab(hosts=3)
    first = world.origin.commit({"index.html": "v1\n", "bin/run": "#!/bin/sh\n"},
                                "first", executable={"bin/run"})
    daemon = await world.start()
    event = await deployed(daemon, 1)
    release1 = event["data"]["release"]
    assert RELEASE.match(release1)
    for host in world.hosts:
        root = app_dir(host)
        assert current_link(host) == str(root / "releases" / release1)  # absolute
        assert (root / "current" / "index.html").read_text() == "v1\n"
        assert os.access(root / "current" / "bin" / "run", os.X_OK)
        assert revision_of(host, release1) == first
    second = world.origin.commit({"index.html": "v2\n"}, "second")
    event = await deployed(daemon, 2)
    release2 = event["data"]["release"]
    assert release2 > release1
    assert_live(world, release2, second)
    for host in world.hosts:
        assert (app_dir(host) / "current" / "index.html").read_text() == "v2\n"
        assert revisions_log(host) == [
            f"Branch production (at {first}) deployed as release {release1} by deployd",
            f"Branch production (at {second}) deployed as release {release2} by deployd",
        ]

    apps = (await daemon.api.get("/api/v1/apps", token="reader"))["apps"]
    assert [a["name"] for a in apps] == [APP]
    assert apps[0]["head"] == second
    assert apps[0]["deployed"] == {"revision": second, "release": release2}
    detail = await daemon.api.get(f"/api/v1/apps/{APP}", token="reader")
    assert detail["head"] == second
    assert {h["name"]: h["current"] for h in detail["hosts"]} == {
        host_label(h): {"release": release2, "revision": second} for h in world.hosts}
    assert kinds(await daemon.events(APP)).count("deploy.started") == 2


def make_shared_file(world: World, host_index: int, path: str, content: str) -> None:
    host = world.hosts[host_index]
    target = app_dir(host) / "shared" / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content)
    chown_tree(app_dir(host))


async def test_linked_dirs_and_files_are_symlinks_into_shared(daemon_lab: WorldFactory) -> None:
    """A missing linked file fails the deploy naming it with no host switched; once present,
    linked dirs and files are symlinks into deploy_to/shared."""
    world = daemon_lab(hosts=2, settings={"linked_dirs": ["log", "tmp/cache"],
                                          "linked_files": ["config/database.yml"]})
    make_shared_file(world, 0, "config/database.yml", "db: one\n")
    world.origin.commit({"index.html": "v1\n", "config/app.yml": "app\n",
                         "log/.keep": ""}, "first")
    daemon = await world.start()
    failed = await daemon.wait_for_event(APP, "deploy.failed")
    missing = world.hosts[1]
    assert "shared/config/database.yml" in failed["message"]
    assert list(failed["data"]["hosts"]) == [host_label(missing)]
    assert "config/database.yml" in failed["data"]["hosts"][host_label(missing)]
    for host in world.hosts:
        assert current_link(host) is None
        assert releases(host) == []

    make_shared_file(world, 1, "config/database.yml", "db: two\n")
    world.origin.commit({"index.html": "v2\n"}, "second")
    release = (await deployed(daemon, 1))["data"]["release"]
    for index, host in enumerate(world.hosts):
        root = app_dir(host)
        rel = root / "releases" / release
        for linked in ("log", "tmp/cache", "config/database.yml"):
            assert (rel / linked).is_symlink(), linked
            assert os.readlink(rel / linked) == str(root / "shared" / linked)
        assert (root / "shared" / "log").is_dir()
        assert (root / "shared" / "tmp" / "cache").is_dir()
        expected = "db: one\n" if index == 0 else "db: two\n"
        assert (root / "current" / "config" / "database.yml").read_text() == expected
        assert (root / "current" / "config" / "app.yml").read_text() == "app\n"


async def test_build_hook_failing_on_one_host_switches_no_host(daemon_lab: WorldFactory) -> None:
    """A build hook failing on one host: no host switches, deploy.failed names that host and
    its hook error, the new release is gone everywhere, and the head is not retried."""
    world = daemon_lab(hosts=3)
    bad = world.hosts[1]
    world.app.hooks["build"] = (f'test ! -f FAIL || test "$DEPLOYD_HOST" != "{host_label(bad)}" '
                                '|| { echo "build broke on $DEPLOYD_HOST" >&2; exit 7; }')
    first = world.origin.commit({"index.html": "v1\n"}, "first")
    daemon = await world.start()
    release1 = (await deployed(daemon, 1))["data"]["release"]

    second = world.origin.commit({"index.html": "v2\n", "FAIL": ""}, "second")
    failed = await daemon.wait_for_event(APP, "deploy.failed")
    assert failed["revision"] == second
    assert list(failed["data"]["hosts"]) == [host_label(bad)]
    error = failed["data"]["hosts"][host_label(bad)]
    assert "build hook" in error and "exit 7" in error
    assert_live(world, release1, first)
    for host in world.hosts:
        assert releases(host) == [release1]
        assert not (app_dir(host) / ".deployd.lock").exists()
        assert len(revisions_log(host)) == 1

    await asyncio.sleep(1.2)  # six polls of the same head
    events = await daemon.events(APP)
    assert [e["revision"] for e in events if e["kind"] == "deploy.started"] == [first, second]
    detail = await daemon.api.get(f"/api/v1/apps/{APP}")
    assert detail["latest"]["state"] == "failed" and detail["latest"]["revision"] == second
    assert detail["deployed"] == {"revision": first, "release": release1}

    third = world.origin.commit({"FAIL": None, "index.html": "v3\n"}, "third")
    release3 = (await deployed(daemon, 2))["data"]["release"]
    assert_live(world, release3, third)


async def test_sshd_killed_mid_deploy_leaves_fleet_on_previous_release(
        daemon_lab: WorldFactory) -> None:
    """An sshd vanishing during the build hook: deploy.failed and GET name that host with a
    connection error; the other hosts stay on the previous release, none switched."""
    world = daemon_lab(hosts=3, hooks={"build": "if [ -f SLOW ]; then sleep 1; fi"})
    first = world.origin.commit({"index.html": "v1\n"}, "first")
    daemon = await world.start()
    release1 = (await deployed(daemon, 1))["data"]["release"]

    world.origin.commit({"index.html": "v2\n", "SLOW": ""}, "second")
    victim = world.hosts[2]
    # The new release is being prepared there.
    await wait_until(lambda: len(releases(victim)) >= 2, within=10, every=0.02,
                     what="the deploy reaching the host")
    await asyncio.sleep(0.3)
    vanish(victim)

    failed = await daemon.wait_for_event(APP, "deploy.failed")
    assert list(failed["data"]["hosts"]) == [host_label(victim)]
    assert "connection" in failed["data"]["hosts"][host_label(victim)]
    for host in world.hosts:
        assert current_release(host) == release1
        assert revision_of(host, release1) == first
    for host in world.hosts[:2]:
        assert releases(host) == [release1]
        assert not (app_dir(host) / ".deployd.lock").exists()
    detail = await daemon.api.get(f"/api/v1/apps/{APP}")
    hosts = {h["name"]: h for h in detail["hosts"]}
    assert "error" in hosts[host_label(victim)]
    assert host_label(victim) in hosts[host_label(victim)]["error"]
    for host in world.hosts[:2]:
        assert hosts[host_label(host)]["current"]["release"] == release1
    assert detail["deployed"]["release"] == release1

    victim.start()  # the host comes back on the same port
    third = world.origin.commit({"index.html": "v3\n", "SLOW": None}, "third")
    release3 = (await deployed(daemon, 2))["data"]["release"]
    assert_live(world, release3, third)


async def test_force_pushed_branch_head_is_deployed(daemon_lab: WorldFactory) -> None:
    """A non-fast-forward head (history rewritten, force-pushed) is noticed on the next poll
    and deployed like any new head."""
    world = daemon_lab(hosts=2)
    first = world.origin.commit({"index.html": "v1\n"}, "first")
    daemon = await world.start()
    await deployed(daemon, 1)
    world.origin.commit({"index.html": "v2\n"}, "second")
    await deployed(daemon, 2)

    rewritten = world.origin.commit({"index.html": "v2 rewritten\n"}, "second, rewritten",
                                    parents=[first])
    release = (await deployed(daemon, 3))["data"]["release"]
    assert_live(world, release, rewritten)
    moved = [e for e in await daemon.events(APP) if e["kind"] == "branch.moved"]
    assert moved[-1]["revision"] == rewritten
    assert (app_dir(world.hosts[0]) / "current" / "index.html").read_text() == "v2 rewritten\n"


async def test_keep_releases_prunes_old_ones_but_never_live_or_last_good(
        daemon_lab: WorldFactory) -> None:
    """More deploys than keep_releases: the oldest releases go, the newest keep_releases stay,
    and so does the last good one even when it is older than those."""
    world = daemon_lab(hosts=2, settings={"keep_releases": 2})
    world.origin.commit({"index.html": "v1\n"}, "first")
    daemon = await world.start()
    good = (await deployed(daemon, 1))["data"]["release"]
    await daemon.wait_for_event(APP, "bake.healthy")
    # From now on deploys stay in their bake window: the first release remains the last good.
    world.app.rollback["bake"] = "1h"
    daemon = await world.restart(daemon)
    made = [good]
    for n in range(2, 6):
        world.origin.commit({"index.html": f"v{n}\n"}, f"commit {n}")
        made.append((await deployed(daemon, n))["data"]["release"])
    assert len(set(made)) == 5
    summary = (await daemon.api.get("/api/v1/apps"))["apps"][0]
    assert summary["last_good"]["release"] == good
    for host in world.hosts:
        assert releases(host) == [good, made[3], made[4]]
        assert current_release(host) == made[4]


async def test_post_deploy_revision_then_rollbacks_by_record(daemon_lab: WorldFactory) -> None:
    """POST /deploy with a short sha deploys it (202, then deploy.succeeded) and the head is not
    redeployed over it; POST /rollback {} returns to the previous release by deployd's record
    even when file times say otherwise, {"release": ...} to a named one; the release rolled
    away from is kept with its marker."""
    world = daemon_lab(hosts=2)
    first = world.origin.commit({"index.html": "v1\n"}, "first")
    daemon = await world.start()
    r1 = (await deployed(daemon, 1))["data"]["release"]
    second = world.origin.commit({"index.html": "v2\n"}, "second")
    r2 = (await deployed(daemon, 2))["data"]["release"]

    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/deploy",
                                         token="deployer", json_body={"revision": first[:8]})
    assert status == 202, body
    assert body["deploy"]["revision"] == first
    assert body["deploy"]["actor"] == "deployer"
    r3 = (await deployed(daemon, 3))["data"]["release"]
    assert_live(world, r3, first)
    await asyncio.sleep(1.0)  # five polls: the branch head must not be redeployed over it
    assert await count(daemon, "deploy.started") == 3
    assert_live(world, r3, first)

    # Capistrano would pick the second newest by mtime: make that the oldest release.
    for host in world.hosts:
        rel = app_dir(host) / "releases"
        os.utime(rel / r1, (time.time() + 100, time.time() + 100))
        os.utime(rel / r2, (time.time() - 1000, time.time() - 1000))
    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/rollback", json_body={})
    assert status == 202, body
    assert body["rollback"]["release"] == r2
    await daemon.wait_for_event(APP, "rollback.succeeded")
    assert_live(world, r2, second)
    for host in world.hosts:
        assert releases(host) == [r1, r2, r3]  # rolled-away release kept
        marker = (app_dir(host) / "releases" / r3 / "ROLLED_BACK").read_text()
        assert "by=admin" in marker and f"to_release={r2}" in marker
        assert "reason=requested over REST" in marker
        assert revisions_log(host)[-1] == f"admin rolled back to release {r2}"

    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/rollback",
                                         json_body={"release": r1, "reason": "back to one"})
    assert status == 202, body
    await daemon.wait_for_event(APP, "rollback.succeeded", count=2)
    assert_live(world, r1, first)
    marker = (app_dir(world.hosts[0]) / "releases" / r2 / "ROLLED_BACK").read_text()
    assert "reason=back to one" in marker
    detail = await daemon.api.get(f"/api/v1/apps/{APP}")
    assert detail["deployed"] == {"revision": first, "release": r1}
    assert await count(daemon, "deploy.started") == 3


async def test_rollback_target_missing_on_one_host_switches_nothing(
        daemon_lab: WorldFactory) -> None:
    """A named rollback target missing on one host: rollback.failed naming that host, and
    every host stays on the live release."""
    world = daemon_lab(hosts=3)
    world.origin.commit({"index.html": "v1\n"}, "first")
    daemon = await world.start()
    r1 = (await deployed(daemon, 1))["data"]["release"]
    second = world.origin.commit({"index.html": "v2\n"}, "second")
    r2 = (await deployed(daemon, 2))["data"]["release"]
    broken = world.hosts[1]
    shutil.rmtree(app_dir(broken) / "releases" / r1)

    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/rollback",
                                         json_body={"release": r1})
    assert status == 202, body
    failed = await daemon.wait_for_event(APP, "rollback.failed")
    assert list(failed["data"]["hosts"]) == [host_label(broken)]
    assert f"release {r1} does not exist" in failed["data"]["hosts"][host_label(broken)]
    assert_live(world, r2, second)
    for host in world.hosts:
        assert len(revisions_log(host)) == 2
        assert not (app_dir(host) / "releases" / r2 / "ROLLED_BACK").exists()
        assert not (app_dir(host) / ".deployd.lock").exists()
    detail = await daemon.api.get(f"/api/v1/apps/{APP}")
    assert detail["deployed"] == {"revision": second, "release": r2}


async def test_deploy_or_rollback_while_one_runs_is_409(daemon_lab: WorldFactory) -> None:
    """While a deploy (slow build hook) or a rollback (slow rollback hook) runs, POST
    deploy and POST rollback answer 409 and start nothing."""
    world = daemon_lab(hosts=2, hooks={"build": "if [ -f SLOW ]; then sleep 1.5; fi",
                                       "rollback": "sleep 1"})
    first = world.origin.commit({"index.html": "v1\n"}, "first")
    daemon = await world.start()
    r1 = (await deployed(daemon, 1))["data"]["release"]
    world.origin.commit({"index.html": "v2\n"}, "second")
    await deployed(daemon, 2)
    third = world.origin.commit({"index.html": "v3\n", "SLOW": ""}, "third")
    await daemon.wait_for_event(APP, "deploy.started", count=3)
    for path, body in (("deploy", {"revision": first}), ("rollback", {}),
                       ("rollback", {"release": r1})):
        status, answer = await daemon.api.call("POST", f"/api/v1/apps/{APP}/{path}",
                                               json_body=body)
        assert status == 409, (path, answer)
        assert answer["error"]["code"] == "conflict"
        assert "already running" in answer["error"]["message"]
    r3 = (await deployed(daemon, 3))["data"]["release"]
    assert_live(world, r3, third)
    assert await count(daemon, "rollback.started") == 0
    assert await count(daemon, "deploy.started") == 3

    status, answer = await daemon.api.call("POST", f"/api/v1/apps/{APP}/rollback",
                                           json_body={})
    assert status == 202, answer
    for path, body in (("deploy", {"revision": first}), ("rollback", {"release": r1})):
        status, answer = await daemon.api.call("POST", f"/api/v1/apps/{APP}/{path}",
                                               json_body=body)
        assert status == 409, (path, answer)
        assert "a rollback is already running" in answer["error"]["message"]
    await daemon.wait_for_event(APP, "rollback.succeeded")
    assert await count(daemon, "deploy.started") == 3
    assert await count(daemon, "rollback.started") == 1


async def test_restart_keeps_history_and_does_not_redeploy(daemon_lab: WorldFactory) -> None:
    """Stopping and starting the daemon on the same state_dir keeps events and deploys and
    deploys nothing that is already live; a manual rollback is not undone by the restart."""
    world = daemon_lab(hosts=2)
    world.origin.commit({"index.html": "v1\n"}, "first")
    daemon = await world.start()
    r1 = (await deployed(daemon, 1))["data"]["release"]
    second = world.origin.commit({"index.html": "v2\n"}, "second")
    r2 = (await deployed(daemon, 2))["data"]["release"]
    await wait_for_revision(daemon, "bake.healthy", second)
    before = await daemon.events(APP)

    daemon = await world.restart(daemon)
    await daemon.wait_until(lambda: _ready(daemon), what="first fetch after restart")
    await asyncio.sleep(0.8)
    after = await daemon.events(APP)
    assert after[:len(before)] == before
    assert "deploy.started" not in kinds(after[len(before):])
    assert_live(world, r2, second)
    for host in world.hosts:
        assert releases(host) == [r1, r2]
    summary = (await daemon.api.get("/api/v1/apps"))["apps"][0]
    assert summary["deployed"] == {"revision": second, "release": r2}
    assert summary["last_good"]["release"] == r2

    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/rollback", json_body={})
    assert status == 202, body
    await daemon.wait_for_event(APP, "rollback.succeeded")
    daemon = await world.restart(daemon)
    await daemon.wait_until(lambda: _ready(daemon), what="first fetch after restart")
    await asyncio.sleep(0.8)
    assert await count(daemon, "deploy.started") == 2
    for host in world.hosts:
        assert current_release(host) == r1


async def _ready(daemon: RunningDaemon) -> bool:
    status, _ = await daemon.api.call("GET", "/readyz", token=None)
    return status == 200


async def test_observe_mode_records_capistrano_releases_and_rolls_back(
        daemon_lab: WorldFactory) -> None:
    """observe mode: a release laid out the Capistrano way is recorded (deploy.observed, GET);
    the daemon never deploys even when the branch moves; POST /rollback works on that layout."""
    world = daemon_lab(hosts=2, settings={"mode": "observe"})
    first = world.origin.commit({"index.html": "v1\n"}, "first")
    r1 = "20240101120000"
    for host in world.hosts:
        lay_out_capistrano_release(host, r1, first, {"index.html": "v1\n"})
    daemon = await world.start()
    observed = await daemon.wait_for_event(APP, "deploy.observed")
    assert observed["revision"] == first and observed["data"]["release"] == r1
    detail = await daemon.api.get(f"/api/v1/apps/{APP}")
    assert detail["mode"] == "observe"
    assert detail["deployed"] == {"revision": first, "release": r1}
    assert {h["current"]["release"] for h in detail["hosts"]} == {r1}

    second = world.origin.commit({"index.html": "v2\n"}, "second")
    await wait_for_revision(daemon, "branch.moved", second)
    await asyncio.sleep(1.0)  # five polls
    assert await count(daemon, "deploy.started") == 0
    for host in world.hosts:
        assert releases(host) == [r1] and current_release(host) == r1

    r2 = "20240102120000"
    for host in world.hosts:  # Capistrano deploys the new head
        lay_out_capistrano_release(host, r2, second, {"index.html": "v2\n"})
    observed = await daemon.wait_for_event(APP, "deploy.observed", count=2)
    assert observed["revision"] == second and observed["data"]["release"] == r2

    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/rollback", json_body={})
    assert status == 202, body
    assert body["rollback"]["release"] == r1
    await daemon.wait_for_event(APP, "rollback.succeeded")
    for host in world.hosts:
        root = app_dir(host)
        assert current_link(host) == str(root / "releases" / r1)
        assert releases(host) == [r1, r2]
        assert "by=admin" in (root / "releases" / r2 / "ROLLED_BACK").read_text()
        assert revisions_log(host)[-1] == f"admin rolled back to release {r1}"
    await asyncio.sleep(0.6)
    assert await count(daemon, "deploy.observed") == 2
    assert await count(daemon, "deploy.started") == 0
    detail = await daemon.api.get(f"/api/v1/apps/{APP}")
    assert detail["deployed"] == {"revision": first, "release": r1}


async def test_sigterm_mid_deploy_finishes_the_deploy_and_exits_0(
        daemon_lab: WorldFactory) -> None:
    """`deployd run` as a process: SIGTERM during the build hook lets the deploy finish on every
    host (none half switched, no lock left), then the process exits 0 without a traceback."""
    world = daemon_lab(hosts=2, hooks={"build": "sleep 1"})
    first = world.origin.commit({"index.html": "v1\n"}, "first")
    config = world.write()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "daemon")}
    env.pop("NOTIFY_SOCKET", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deployd.cli", "run", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=REPO_ROOT)
    try:
        async def building() -> bool:  # build hooks running on every host
            assert process.returncode is None, await process.communicate()
            return all(releases(host) for host in world.hosts)

        await eventually(building, within=20, every=0.02, what="the deploy reaching the hosts")
        assert all(current_link(host) is None for host in world.hosts)
        signalled = time.time()
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr
    release = releases(world.hosts[0])[0]
    for host in world.hosts:
        assert releases(host) == [release]
        assert current_link(host) == str(app_dir(host) / "releases" / release)
        assert revision_of(host, release) == first
        assert not (app_dir(host) / ".deployd.lock").exists()
        assert len(revisions_log(host)) == 1
    with contextlib.closing(sqlite3.connect(world.spec.state_dir / "deployd.sqlite3")) as db:
        rows = db.execute("SELECT kind, state, revision, release, finished_at FROM deploys"
                          ).fetchall()
    assert [row[:4] for row in rows] == [("deploy", "succeeded", first, release)]
    assert rows[0][4] > signalled  # the deploy finished after the signal, then it exited


async def test_state_dir_and_its_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """Under umask 000, with a state_dir and database left world-readable before: state_dir
    and its directories end up 0700, the SQLite files 0600, the mirror's files private."""
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "first")
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o755)
    (state / "deployd.sqlite3").touch()
    (state / "deployd.sqlite3").chmod(0o644)
    config = one_local_app(tmp_path, origin.path, rollback=QUICK_BAKE).write(tmp_path / "d.toml")
    old_umask = os.umask(0)
    try:
        daemon = await start_daemon(config)
        try:
            await daemon.wait_for_event(APP, "deploy.succeeded")
            modes = {path.relative_to(state).as_posix(): path.lstat().st_mode & 0o777
                     for path in [state, *state.rglob("*")] if not path.is_symlink()}
        finally:
            await daemon.stop()
    finally:
        os.umask(old_umask)
    for name in (".", "mirrors", "git-home", f"mirrors/{APP}.git"):
        assert modes[name] == 0o700, (name, oct(modes[name]))
    for name in ("deployd.sqlite3", "deployd.sqlite3-wal", "deployd.sqlite3-shm"):
        assert modes[name] == 0o600, (name, oct(modes[name]))
    public = {name: oct(mode) for name, mode in modes.items() if mode & 0o077}
    assert public == {}


@pytest.fixture
def user_dir() -> Iterator[Path]:
    """A directory the test user owns, readable by all (not under root's private tmp)."""
    path = shared_dir("deployd-local-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


STEAL_SCRIPT = """\
cat "$DEPLOYD_VAR_STATE" "$DEPLOYD_VAR_CONFIG" > stolen 2> denied
echo forged 2>> denied >> "$DEPLOYD_VAR_STATE"
id -un > who
"""


async def test_build_hook_from_the_commit_cannot_touch_the_daemons_files(
        daemon_lab: WorldFactory, user_dir: Path) -> None:
    """On a `local` host with run_as, a build script from the repository runs as that user:
    reading deployd's state and config, or rewriting its state, is refused by the OS, and the
    daemon goes on with its state intact."""
    world = daemon_lab(hosts=0)
    state = world.spec.state_dir / "deployd.sqlite3"
    world.app.local_dirs = [user_dir / "app"]
    world.app.local_run_as = TEST_USER
    world.app.host_vars = [{"state": str(state), "config": str(world.config)}]
    world.app.hooks["build"] = "sh ./build.sh"
    world.origin.commit({"index.html": "v1\n", "build.sh": STEAL_SCRIPT}, "first")
    daemon = await world.start()
    release = (await deployed(daemon, 1))["data"]["release"]
    built = user_dir / "app" / "releases" / release
    assert (built / "who").read_text().strip() == TEST_USER
    assert (built / "stolen").read_text() == ""
    assert (built / "denied").read_text().count("Permission denied") == 3
    with contextlib.closing(sqlite3.connect(state)) as db:
        assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    detail = await daemon.api.get(f"/api/v1/apps/{APP}")
    assert detail["deployed"]["release"] == release


async def test_hook_output_is_kept_in_the_events_also_when_hooks_succeed(
        daemon_lab: WorldFactory) -> None:
    """The last lines of each hook's output (stdout and stderr, in order) are in the
    deploy.succeeded and rollback.succeeded events, per host and hook, and in the latest
    deploy of GET /apps/{app}, even when every hook exits 0: a hook that half-works is
    visible."""
    world = daemon_lab(hosts=1, host_vars=[{"health_port": 8080}])
    world.app.hooks["build"] = ("for n in $(seq 1 40); do echo step $n; done; "
                                "echo \"port $DEPLOYD_VAR_HEALTH_PORT\"; "
                                "echo 'background job: oops' >&2")
    world.app.hooks["restart"] = "echo restarted"
    world.app.hooks["rollback"] = "echo rolling back"
    world.origin.commit({"index.html": "v1\n"}, "first")
    daemon = await world.start()
    first = await deployed(daemon, 1)
    label = host_label(world.hosts[0])
    output = first["data"]["output"][label]
    build = output["build"].splitlines()
    assert build[-2:] == ["port 8080", "background job: oops"]
    assert build[0] == "step 23" and len(build) == 20
    assert output["restart"] == "restarted"
    detail = await daemon.api.get(f"/api/v1/apps/{APP}")
    assert detail["latest"]["output"] == first["data"]["output"]

    world.origin.commit({"index.html": "v2\n"}, "second")
    await deployed(daemon, 2)
    status, _ = await daemon.api.call("POST", f"/api/v1/apps/{APP}/rollback", json_body={})
    assert status in (200, 202)
    rolled = await daemon.wait_for_event(APP, "rollback.succeeded")
    assert rolled["data"]["output"][label]["rollback"].splitlines() == [
        "rolling back", "restarted"]
    detail = await daemon.api.get(f"/api/v1/apps/{APP}")
    assert detail["latest"]["kind"] == "rollback"
    assert detail["latest"]["output"] == rolled["data"]["output"]
