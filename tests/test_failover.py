"""Failover between nodes that share one PostgreSQL database, with real crashes.

Every node is a `deployd run` subprocess (kill -9 is a real crash), apps run on real sshd
hosts, the database is a throwaway PostgreSQL cluster. A node killed in the middle of a
rollback or right after a rescue job's approval leaves its app to another node, which
finishes the work exactly once; a database killed outright stops every node from touching a
host until it is back; any node answers a REST call as the owner does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pygit2
import pytest

from tests.support.daemonfixtures import AppSpec
from tests.support.gitrepo import OriginRepo
from tests.support.hostfixtures import Lab
from tests.support.judging import current_release, current_revision, hooks_log
from tests.support.nodes import NodeProcess, host_files, node_process, owners, wait_owner
from tests.support.postgres import (
    ROLE,
    Database,
    PostgresServer,
    remove_postgres,
    start_postgres,
)
from tests.support.rescuelab import APP, MakeLab, RescueLab, wait_job
from tests.support.sshd import write_known_hosts
from tests.support.waiting import eventually, matching, timeline, wait_until

pytestmark = pytest.mark.slow

FAILOVER = "3s"
# From a kill -9 to another node owning the app: failover, a round, the new owner's start.
TAKEOVER_WITHIN = 45.0


@pytest.fixture
async def cluster() -> AsyncIterator[list[NodeProcess]]:
    """The nodes a test starts (append them); every one still running is stopped after it."""
    nodes: list[NodeProcess] = []
    yield nodes
    for node in nodes:
        await node.close()


def sshd_app(name: str, origin: OriginRepo, lab: Lab, **fields: Any) -> AppSpec:
    write_known_hosts(lab.known_hosts, lab.hosts)
    return AppSpec(name=name, repo=str(origin.path), sshd_hosts=lab.hosts,
                   rollback={"grace": "0s", "bake": "300ms"}, **fields)


def deploy_dirs(lab: Lab) -> list[Path]:
    return [host.home / "app" for host in lab.hosts]


async def wait_live(nodes: list[NodeProcess], names: set[str], *, within: float = 30) -> None:
    """Until `nodes[0]` lists exactly `names` as the live nodes."""
    seen: dict[str, list[str]] = {}

    async def live() -> bool:
        nonlocal seen
        seen = await owners(nodes[0])
        return set(seen) == names

    async def explain() -> str:
        return f"live nodes seen: {seen}"

    await eventually(live, within=within, what=f"live nodes {sorted(names)}", explain=explain)


async def story(node: NodeProcess, app: str = APP) -> str:
    return timeline(await node.events(app))


# -- kill -9 of the owner in the middle of a rollback ------------------------------------------


@pytest.mark.parametrize("machines", ["one machine", "a machine each"])
async def test_kill9_of_the_owner_mid_rollback_another_node_finishes_it(
        machines: str, tmp_path: Path, pg_database: Database,
        lab_factory: Callable[[int], Lab], cluster: list[NodeProcess]) -> None:
    """node-a owns the app on 3 sshd hosts and rolls it back (asked through node-b): every
    host switched, its rollback hook held. kill -9 of node-a: node-b or node-c owns the app,
    its recovery finishes the rollback (one rollback, recorded succeeded after the takeover),
    every host's `current` is the target and its hook ran once; the next head deploys
    everywhere. The nodes run on one machine, or each under a host name of its own (then a
    host lock the dead node left cannot be judged stale by its pid)."""
    lab = lab_factory(3)
    gate = lab.workdir / "gate"
    log = '"$DEPLOYD_DEPLOY_TO/shared/hooks.log"'
    hook = (f'echo "hold $DEPLOYD_REVISION" >> {log}; '
            f"while [ ! -e {gate} ]; do sleep 0.05; done; "
            f'echo "rollback $DEPLOYD_REVISION" >> {log}')
    origin = OriginRepo(tmp_path / "origin.git")
    v1 = origin.commit({"index.html": "v1\n"}, "v1")
    apps = [sshd_app(APP, origin, lab, hooks={"rollback": hook})]
    for name in ("node-a", "node-b", "node-c"):
        cluster.append(node_process(tmp_path, name, pg_database, apps, failover=FAILOVER,
                                    client_key=lab.client_key.private,
                                    known_hosts=lab.known_hosts,
                                    machine=None if machines == "one machine"
                                    else f"machine-{name}"))
    first, second, third = cluster
    dirs = deploy_dirs(lab)

    await first.start()
    await first.wait_for_event(APP, "bake.healthy", revision=v1, within=60)
    target = current_release(dirs[0])
    v2 = origin.commit({"index.html": "v2\n"}, "v2")
    await first.wait_for_event(APP, "bake.healthy", revision=v2, within=60)
    await second.start()
    await third.start()
    await wait_live(cluster, {"node-a", "node-b", "node-c"})
    assert await wait_owner(second, APP, among={"node-a"}, within=5) == "node-a"

    status, body = await second.api.call("POST", f"/api/v1/apps/{APP}/rollback",
                                         token="deployer",
                                         json_body={"release": target, "reason": "test"})
    assert status == 202, body
    rollback_id = body["rollback"]["id"]
    await wait_until(lambda: all(f"hold {v1}" in hooks_log(d) for d in dirs), within=30,
                     what="every host switched, its rollback hook running")
    assert [current_release(d) for d in dirs] == [target] * 3
    first.kill9()
    killed = time.monotonic()

    survivors = {"node-b", "node-c"}
    owner = await wait_owner(second, APP, among=survivors, within=TAKEOVER_WITHIN)
    took = time.monotonic() - killed
    gate.touch()  # the dead node's hooks, orphaned on the hosts, may end now
    new_owner = second if owner == "node-b" else third

    await wait_record(new_owner, rollback_id, "succeeded")
    events = await new_owner.events(APP)
    owned = matching(events, "app.owned")[-1]
    assert owned["data"]["node"] == owner, timeline(events)
    ended = [e for e in events if e["kind"] in ("rollback.recovered", "rollback.succeeded")
             and e["id"] > owned["id"]]
    assert ended, timeline(events)  # the new owner's recovery closed it
    assert len(matching(events, "rollback.started")) == 1, timeline(events)
    assert [current_release(d) for d in dirs] == [target] * 3
    assert [current_revision(d) for d in dirs] == [v1] * 3
    await wait_until(lambda: all(f"rollback {v1}" in hooks_log(d) for d in dirs), within=30,
                     what="every host's rollback hook ended")

    v3 = origin.commit({"index.html": "v3\n"}, "v3")
    await new_owner.wait_for_event(APP, "deploy.succeeded", revision=v3, within=60)
    assert [current_revision(d) for d in dirs] == [v3] * 3
    assert len({current_release(d) for d in dirs}) == 1
    for deploy_to in dirs:
        assert hooks_log(deploy_to).count(f"rollback {v1}") == 1, hooks_log(deploy_to)
    print(f"kill -9 to the app owned by {owner}: {took:.2f}s (failover {FAILOVER})")


# -- kill -9 of the owner right after a rescue job's approval ----------------------------------

PUSH_LOG_HOOK = """#!/bin/sh
cat >> {log}
"""


def rescue_commits(lab: RescueLab, job_id: int) -> list[str]:
    """Every commit object in the origin made by job `job_id`'s transplant."""
    repo = lab.origin.repo
    found: list[str] = []
    for oid in repo.odb:
        obj = repo.get(oid)
        if isinstance(obj, pygit2.Commit) and f"Rescue-Job: {APP}#{job_id}" in obj.message:
            found.append(str(oid))
    return found


async def test_kill9_of_the_owner_right_after_a_rescue_approval_transplants_once(
        rescue_lab: MakeLab, pg_database: Database, cluster: list[NodeProcess]) -> None:
    """A bad batch is rolled back and a rescue job opened on node-a; the job is approved over
    REST and node-a is killed -9 at once. Another node carries the job on: one rebuilt
    commit, one push of the branch and one of the backup branch (as the origin saw them),
    one job.pushed; the job succeeds and the rebuilt head is live on the 3 hosts."""
    lab: RescueLab = await rescue_lab(3)
    good = lab.commit_good()
    for name in ("node-a", "node-b", "node-c"):
        cluster.append(node_process(lab.root, name, pg_database, [lab.app],
                                    failover=FAILOVER, client_key=lab.client_key.private,
                                    known_hosts=lab.known_hosts))
    first, second, third = cluster
    await first.start()
    await first.wait_for_event(APP, "bake.healthy", revision=good, within=60)
    await second.start()
    await third.start()
    await wait_live(cluster, {"node-a", "node-b", "node-c"})
    assert await wait_owner(second, APP, among={"node-a"}, within=5) == "node-a"

    batch = lab.land_bad_batch()
    await first.wait_for_event(APP, "rollback.succeeded", revision=good, within=60)
    opened = await first.wait_for_event(APP, "job.opened", within=30)
    job_id = int(opened["data"]["job"])
    plan = (await first.api.get(f"/api/v1/jobs/{job_id}"))["plan"]
    pushes = lab.origin.path / "pushes.log"
    lab.install_hook("post-receive", PUSH_LOG_HOOK.format(log=pushes))

    status, body = await first.api.call("POST", f"/api/v1/jobs/{job_id}/approve",
                                        token="approver", json_body={"plan": plan})
    assert status == 202, body
    first.kill9()

    owner = await wait_owner(second, APP, among={"node-b", "node-c"},
                             within=TAKEOVER_WITHIN)
    new_owner = second if owner == "node-b" else third
    job = await wait_job(new_owner, job_id, "succeeded", "failed", "superseded", within=90)
    assert job["state"] == "succeeded", (job, await story(new_owner))

    head = lab.remote_head()
    assert head == job["new_head"]
    backup = f"refs/heads/deployd/backup/{APP}/{job_id}"
    assert lab.remote_head(f"deployd/backup/{APP}/{job_id}") == batch.b
    seen = [line.split() for line in pushes.read_text().splitlines()]
    to_branch = [line for line in seen if line[2] == "refs/heads/production"]
    to_backup = [line for line in seen if line[2] == backup]
    assert to_branch == [[batch.b, head, "refs/heads/production"]], seen
    assert len(to_backup) == 1, seen
    assert rescue_commits(lab, job_id) == [head]

    events = await new_owner.events(APP)
    assert len(matching(events, "job.approved")) == 1, timeline(events)
    assert len(matching(events, "job.pushed")) == 1, timeline(events)
    assert len(matching(events, "job.succeeded")) == 1, timeline(events)
    assert [e["kind"] for e in job["log"]].count("job.pushed") == 1
    assert lab.live_revisions() == [head] * 3


# -- the database killed and restarted ---------------------------------------------------------


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of this test's own: it gets killed."""
    server = start_postgres()
    yield server
    remove_postgres(server)


def kill_postmaster(server: PostgresServer) -> None:
    pid = int((server.data / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)


async def start_again(server: PostgresServer, within: float = 60) -> None:
    """pg_ctl start, until it works: the killed postmaster's backends may still hold its
    shared memory for a moment."""
    async def started() -> bool:
        try:
            await asyncio.to_thread(server.start)
        except AssertionError:
            return False
        return True

    await eventually(started, within=within, every=0.5, what="PostgreSQL started again")


async def ready_statuses(nodes: list[NodeProcess]) -> list[int]:
    return [(await node.api.call("GET", "/readyz", token=None))[0] for node in nodes]


async def test_the_database_killed_stops_every_node_until_it_is_back(
        tmp_path: Path, own_postgres: PostgresServer, lab_factory: Callable[[int], Lab],
        cluster: list[NodeProcess]) -> None:
    """Two nodes, two apps (3 sshd hosts; a local one). SIGKILL of the postmaster: every node
    answers /readyz 503 and, while the database is down and a new head waits, nothing on any
    host changes. PostgreSQL started again: both apps are owned again (new epochs), every
    node is ready, and the new head deploys on every host."""
    with own_postgres.admin() as admin:
        admin.execute(f"CREATE DATABASE failover OWNER {ROLE}".encode())
    database = Database(own_postgres, "failover")
    lab = lab_factory(3)
    origin = OriginRepo(tmp_path / "origin.git")
    v1 = origin.commit({"index.html": "v1\n"}, "v1")
    local = tmp_path / "host-blog"
    apps = [sshd_app(APP, origin, lab),
            AppSpec(name="blog", repo=str(origin.path), local_dirs=[local],
                    rollback={"grace": "0s", "bake": "300ms"})]
    for name in ("node-a", "node-b"):
        cluster.append(node_process(tmp_path, name, database, apps, failover=FAILOVER,
                                    client_key=lab.client_key.private,
                                    known_hosts=lab.known_hosts))
    first, second = cluster
    dirs = [*deploy_dirs(lab), local]

    await first.start()
    for app in ("shop", "blog"):
        await first.wait_for_event(app, "bake.healthy", revision=v1, within=60)
    await second.start()

    async def spread() -> bool:
        return sorted(len(apps) for apps in (await owners(first)).values()) == [1, 1]

    await eventually(spread, within=30, what="one app per node")
    owned_before = {app: len(matching(await first.events(app), "app.owned"))
                    for app in ("shop", "blog")}

    kill_postmaster(own_postgres)
    try:
        async def all_unready() -> bool:
            return await ready_statuses(cluster) == [503, 503]

        await eventually(all_unready, within=30, what="every node answering /readyz 503")
        before = {str(d): host_files(d) for d in dirs}
        v2 = origin.commit({"index.html": "v2\n"}, "v2")
        # Long enough for several polls of the new head and ownership rounds of both nodes:
        # nothing may change on a host, and no node may become ready.
        deadline = time.monotonic() + 3 * 3.0
        while time.monotonic() < deadline:
            assert await ready_statuses(cluster) == [503, 503]
            assert {str(d): host_files(d) for d in dirs} == before
            await asyncio.sleep(0.2)
    finally:
        await start_again(own_postgres)

    async def all_ready() -> bool:
        return await ready_statuses(cluster) == [200, 200]

    await eventually(all_ready, within=60, what="every node ready again")
    await eventually(spread, within=30, what="both apps owned again, one per node")
    for app in ("shop", "blog"):
        await first.wait_for_event(app, "deploy.succeeded", revision=v2, within=60)
        events = await first.events(app)
        assert len(matching(events, "app.owned")) > owned_before[app], timeline(events)
    assert [current_revision(d) for d in dirs] == [v2] * 4


# -- any node answers as the owner ---------------------------------------------------------------


async def test_calls_sent_round_robin_to_every_node_answer_as_the_owner(
        tmp_path: Path, pg_database: Database, cluster: list[NodeProcess]) -> None:
    """Three nodes, one app run by node-a. A read, an unknown job, an unknown app and a
    deploy of an unknown revision answer the same on every node as on the owner (the app's
    head and pristine flag aside: see the next test); deploys sent to each node in turn are
    all carried out by the owner, one after the other."""
    origin = OriginRepo(tmp_path / "origin.git")
    v1 = origin.commit({"index.html": "v1\n"}, "v1")
    apps = [AppSpec(name=APP, repo=str(origin.path), local_dirs=[tmp_path / "host"],
                    rollback={"grace": "0s", "bake": "200ms"})]
    for name in ("node-a", "node-b", "node-c"):
        cluster.append(node_process(tmp_path, name, pg_database, apps, failover=FAILOVER))
    first = cluster[0]
    await first.start()
    await first.wait_for_event(APP, "bake.healthy", revision=v1, within=60)
    for node in cluster[1:]:
        await node.start()
    await wait_live(cluster, {"node-a", "node-b", "node-c"})
    assert await wait_owner(cluster[2], APP, among={"node-a"}, within=5) == "node-a"

    calls: list[tuple[str, str, Any, int]] = [  # ..., the owner's status
        ("GET", f"/api/v1/apps/{APP}", None, 200),
        ("GET", f"/api/v1/apps/{APP}/events?limit=5", None, 200),
        ("GET", "/api/v1/jobs/4242", None, 404),
        ("GET", "/api/v1/apps/nope", None, 404),
        ("POST", f"/api/v1/apps/{APP}/deploy", {"revision": "0" * 40}, 404),
        ("POST", "/api/v1/jobs/4242/approve", {"plan": "0" * 32}, 404),
    ]
    for method, path, body, expected in calls:
        answers = [await node.api.call(method, path, token="admin", json_body=body)
                   for node in cluster]
        assert answers[0][0] == expected, (method, path, answers[0])
        assert answers[1:] == [answers[0]] * 2, (method, path, answers)

    r0 = origin.commit({"index.html": "r0\n"}, "r0")
    r1 = origin.commit({"index.html": "r1\n"}, "r1")
    await first.wait_for_event(APP, "bake.healthy", revision=r1, within=60)
    # Older commits of the branch, each sent to another node: v1 to node-b, r0 to node-c,
    # then r1 to node-a.
    for node, revision in zip([*cluster[1:], first], [v1, r0, r1], strict=True):
        status, body = await node.api.call("POST", f"/api/v1/apps/{APP}/deploy",
                                           token="deployer", json_body={"revision": revision})
        assert status == 202, (node.name, body)
        assert body["deploy"]["revision"] == revision and body["deploy"]["actor"] == "deployer"
        await wait_record(first, body["deploy"]["id"], "succeeded")
        assert current_revision(tmp_path / "host") == revision
    events = await cluster[1].events(APP)
    assert [e["data"]["node"] for e in matching(events, "app.owned")] == ["node-a"]


async def wait_record(node: NodeProcess, record_id: int, state: str, *,
                      within: float = 60) -> None:
    """Until the app's latest deploy or rollback is `record_id`, in `state`."""
    async def reached() -> bool:
        latest = (await node.api.get(f"/api/v1/apps/{APP}"))["latest"]
        return bool(latest["id"] == record_id and latest["state"] == state)

    await eventually(reached, within=within, what=f"record {record_id} {state}",
                     explain=lambda: story(node))


async def test_a_read_on_a_node_that_does_not_run_the_app_shows_the_owners_head(
        tmp_path: Path, pg_database: Database, cluster: list[NodeProcess]) -> None:
    """GET /api/v1/apps/{app} and /api/v1/apps on node-b show the app's head and whether the
    branch is pristine as node-a, which runs it, does."""
    origin = OriginRepo(tmp_path / "origin.git")
    v1 = origin.commit({"index.html": "v1\n"}, "v1")
    apps = [AppSpec(name=APP, repo=str(origin.path), local_dirs=[tmp_path / "host"],
                    rollback={"grace": "0s", "bake": "200ms"})]
    for name in ("node-a", "node-b"):
        cluster.append(node_process(tmp_path, name, pg_database, apps, failover=FAILOVER))
    first, second = cluster
    await first.start()
    await first.wait_for_event(APP, "bake.healthy", revision=v1, within=60)
    await second.start()
    await wait_live(cluster, {"node-a", "node-b"})
    assert await wait_owner(second, APP, among={"node-a"}, within=5) == "node-a"
    owner = await first.api.get(f"/api/v1/apps/{APP}")
    assert owner["head"] == v1 and owner["pristine"] is True
    other = await second.api.get(f"/api/v1/apps/{APP}")
    listed = (await second.api.get("/api/v1/apps"))["apps"][0]
    assert (other["head"], other["pristine"]) == (v1, True)
    assert (listed["head"], listed["pristine"]) == (v1, True)
