"""Several daemons on one PostgreSQL database: each app run by one node, spread evenly, a dead
node's apps taken over, a joining node's share handed over between operations only.

Real daemons (in process, or `deployd run` subprocesses for kill -9) on a database of the
session's throwaway PostgreSQL cluster (tests/support/postgres.py); local hosts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from deployd.config import load, parse_duration
from deployd.errors import StoreError
from deployd.git import Mirror
from deployd.ownership import FencedBackend
from deployd.store import Store
from deployd.vocabulary import DeployKind, DeployState, EventKind, Trigger
from tests.support.daemonfixtures import (
    Api,
    AppSpec,
    DaemonProcess,
    DaemonSpec,
    RunningDaemon,
    start_daemon,
)
from tests.support.gitrepo import OriginRepo
from tests.support.metrics import sample, scrape
from tests.support.net import free_port
from tests.support.nodespecs import start_node
from tests.support.postgres import Database
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow

FAILOVER = "2s"
APPS = ["alpha", "bravo", "charlie", "delta"]


def node_spec(tmp_path: Path, node: str, origin: OriginRepo, database: Database,
              apps: list[AppSpec], *, port: int | None = None) -> DaemonSpec:
    """One node's config: its own state_dir, the shared database and apps (hosts shared);
    with `port`, listening there and advertising it (else a loopback port nobody answers
    at)."""
    password_file = tmp_path / "db.password"
    password_file.write_text(database.password + "\n")
    password_file.chmod(0o600)
    where = ({"listen": f"127.0.0.1:{port}", "advertise": f"http://127.0.0.1:{port}"}
             if port is not None else {"advertise": f"http://127.0.0.1:{free_port()}"})
    return DaemonSpec(state_dir=tmp_path / f"state-{node}", apps=apps, daemon_settings={
        "database": database.url, "database_password_file": str(password_file),
        "node": node, "failover": FAILOVER, **where})


def local_apps(tmp_path: Path, origin: OriginRepo, names: list[str], *,
               rollback: dict[str, Any] | None = None,
               hooks: dict[str, dict[str, str]] | None = None) -> list[AppSpec]:
    return [AppSpec(name=name, repo=str(origin.path), local_dirs=[tmp_path / f"host-{name}"],
                    rollback=dict(rollback or {"grace": "0s", "bake": "200ms"}),
                    hooks=(hooks or {}).get(name, {}))
            for name in names]


async def owners(api: Api) -> dict[str, list[str]]:
    """Live node -> apps it owns, from GET /api/v1/nodes."""
    body = await api.get("/api/v1/nodes", token="reader")
    return {node["name"]: sorted(node["apps"]) for node in body["nodes"] if node["live"]}


async def wait_owners(api: Api, expected: dict[str, int] | dict[str, list[str]], *,
                      within: float) -> dict[str, list[str]]:
    """Until the live nodes own exactly `expected` (counts per node, or the app lists)."""
    seen: dict[str, list[str]] = {}

    async def settled() -> bool:
        nonlocal seen
        seen = await owners(api)
        got: dict[str, Any] = {name: (apps if isinstance(next(iter(expected.values())), list)
                                      else len(apps)) for name, apps in seen.items()}
        return {k: v for k, v in got.items() if v} == expected

    await eventually(settled, within=within, what=f"owners {expected}",
                     explain=lambda: _explain(seen))
    return seen


def admin(database: Database, sql: str) -> None:
    with database.server.admin() as conn:
        conn.execute(sql.encode())


async def _explain(seen: dict[str, list[str]]) -> str:
    return f"last seen: {seen}"


async def test_two_daemons_share_four_apps(tmp_path: Path, pg_database: Database) -> None:
    """Two nodes on one database own 2 apps each; each lists all 4 apps; an action on the
    other node's app, which does not answer where it advertises, is a 502 naming that node
    and its URL; the metrics say who owns what."""
    origin = OriginRepo(tmp_path / "origin.git")
    head = origin.commit({"index.html": "v1\n"}, "first")
    apps = local_apps(tmp_path, origin, APPS)
    first = await start_daemon(node_spec(tmp_path, "node-a", origin, pg_database, apps)
                               .write(tmp_path / "a.toml"))
    second: RunningDaemon | None = None
    try:
        await wait_owners(first.api, {"node-a": 4}, within=10)
        second = await start_daemon(node_spec(tmp_path, "node-b", origin, pg_database, apps)
                                    .write(tmp_path / "b.toml"))
        seen = await wait_owners(first.api, {"node-a": 2, "node-b": 2}, within=15)
        for daemon in (first, second):
            listed = await daemon.api.get("/api/v1/apps", token="reader")
            assert sorted(app["name"] for app in listed["apps"]) == APPS
        # node-b never ran node-a's apps, yet keeps their mirrors fetched: a takeover
        # would not start with a clone.
        for name in seen["node-a"]:
            mirror = second.daemon.supervisors[name].mirror

            async def fetched(mirror: Mirror = mirror) -> bool:
                return await mirror.branch_head("production") == head

            await eventually(fetched, within=10, what=f"node-b's mirror of {name}")
            assert name not in second.daemon.tasks
        other = seen["node-b"][0]
        # A read of an app whose owner does not answer is served here: the database, and
        # head and pristine from this node's mirror.
        shown = await first.api.get(f"/api/v1/apps/{other}", token="reader")
        assert (shown["head"], shown["pristine"], shown["deployed"]["revision"]) == (
            head, True, head)
        status, body = await first.api.call("POST", f"/api/v1/apps/{other}/pause",
                                            json_body={"reason": "test"})
        assert status == 502, body
        assert body["error"]["code"] == "owner_unreachable"
        advertise = second.daemon.config.daemon.advertise
        assert f"run by node node-b, which did not answer at {advertise}: " in (
            body["error"]["message"])
        mine = seen["node-a"][0]
        status, body = await first.api.call("POST", f"/api/v1/apps/{mine}/pause",
                                            json_body={"reason": "test"})
        assert status == 200, body
        samples = await scrape(first)
        assert sample(samples, "deployd_app_owned", app=mine) == 1
        assert sample(samples, "deployd_app_owned", app=other) == 0
        assert sample(samples, "deployd_database_up") == 1
        ready = await first.api.call("GET", "/readyz", token=None)
        assert ready[0] == 200 and ready[1]["checks"]["database"] is True
    finally:
        if second is not None:
            await second.stop()
        await first.stop()


async def test_kill9_of_a_node_moves_its_apps_and_recovery_runs(
        tmp_path: Path, pg_database: Database) -> None:
    """kill -9 of one of two `deployd run` nodes: the other owns all 4 apps within failover
    plus a margin, and recovers each app it took (a bake cut short resumes: bake.resumed)."""
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "first")
    apps = local_apps(tmp_path, origin, APPS, rollback={"grace": "0s", "bake": "5m"})
    nodes = {name: DaemonProcess(node_spec(tmp_path, name, origin, pg_database, apps)
                                 .write(tmp_path / f"{name}.toml"), tmp_path / f"{name}.log")
             for name in ("node-a", "node-b")}
    try:
        await nodes["node-a"].start()
        for app in APPS:  # every app deployed by node-a, each in its bake
            await nodes["node-a"].wait_for_event(app, "deploy.succeeded")
        await nodes["node-b"].start()
        seen = await wait_owners(nodes["node-b"].api, {"node-a": 2, "node-b": 2}, within=15)
        doomed = seen["node-a"]

        nodes["node-a"].kill9()
        killed_at = time.monotonic()
        survivor = nodes["node-b"]
        margin = 2 * parse_duration(FAILOVER) + 3.0
        await wait_owners(survivor.api, {"node-b": APPS}, within=margin)
        took = time.monotonic() - killed_at
        for app in doomed:
            owned = await survivor.wait_for_event(app, "app.owned", count=2)
            assert owned["data"]["node"] == "node-b"
            resumed = await survivor.wait_for_event(app, "bake.resumed")
            assert resumed["id"] > owned["id"]  # node-b's recovery, after it took the app
        print(f"kill -9 to every app owned by the survivor: {took:.2f}s "
              f"(failover {FAILOVER})")
    finally:
        for node in nodes.values():
            await node.close()


async def test_a_joining_node_takes_its_share_only_between_operations(
        tmp_path: Path, pg_database: Database) -> None:
    """node-a runs 2 apps, one of them mid-deploy (its build waits on a gate). node-b joins:
    its share (1) is the idle app, never the busy one, whose deploy finishes on node-a."""
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "first")
    gate = tmp_path / "gate"
    # "zulu" sorts last: the one a node gives back first, were busy apps not skipped.
    apps = local_apps(tmp_path, origin, ["alpha", "zulu"], hooks={
        "zulu": {"build": f"while [ ! -e {gate} ]; do sleep 0.05; done"}})
    first = await start_daemon(node_spec(tmp_path, "node-a", origin, pg_database, apps)
                               .write(tmp_path / "a.toml"))
    second: RunningDaemon | None = None
    try:
        await first.wait_for_event("alpha", "deploy.succeeded")
        await first.wait_for_event("zulu", "deploy.started")
        second = await start_daemon(node_spec(tmp_path, "node-b", origin, pg_database, apps)
                                    .write(tmp_path / "b.toml"))
        await wait_owners(second.api, {"node-a": ["zulu"], "node-b": ["alpha"]}, within=15)
        assert first.daemon.supervisors["zulu"].busy == "deploy"
        # The host's lock, held through the build, names the owning node and its epoch.
        epoch = pg_database.query("SELECT epoch FROM app_owners WHERE app = 'zulu'")[0][0]
        lock = (tmp_path / "host-zulu" / ".deployd.lock").read_text()
        assert f"owner=node-a epoch {epoch}\n" in lock
        gate.touch()
        succeeded = await first.wait_for_event("zulu", "deploy.succeeded")
        zulu = await first.events("zulu")
        assert [e["data"]["node"] for e in zulu if e["kind"] == "app.owned"] == ["node-a"]
        assert succeeded["id"] > max(e["id"] for e in zulu if e["kind"] == "app.owned")
        assert await owners(second.api) == {"node-a": ["zulu"], "node-b": ["alpha"]}
    finally:
        if second is not None:
            await second.stop()
        await first.stop()


async def test_a_node_that_loses_the_database_stops_every_app_until_it_is_back(
        tmp_path: Path, pg_database: Database) -> None:
    """The node's ownership connection is killed and it cannot log in again: it stops
    running every app (no supervisor left), /readyz answers 503 and database_up is 0. Once
    it can log in again it owns its apps again, under a new epoch, and is ready."""
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "first")
    apps = local_apps(tmp_path, origin, ["alpha", "bravo"])
    node = await start_daemon(node_spec(tmp_path, "node-a", origin, pg_database, apps)
                              .write(tmp_path / "a.toml"))
    try:
        await wait_owners(node.api, {"node-a": 2}, within=10)
        assert sorted(node.daemon.tasks) == ["alpha", "bravo"]
        admin(pg_database, "ALTER ROLE deployd NOLOGIN")
        try:
            admin(pg_database, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                  "WHERE application_name = 'deployd node node-a'")

            async def stopped() -> bool:
                status, _ = await node.api.call("GET", "/readyz", token=None)
                return status == 503 and not node.daemon.tasks

            await eventually(stopped, within=parse_duration(FAILOVER), what="apps stopped")
            samples = await scrape(node)
            assert sample(samples, "deployd_database_up") == 0
            assert sample(samples, "deployd_app_owned", app="alpha") == 0
            status, body = await node.api.call("POST", "/api/v1/apps/alpha/pause",
                                               json_body={"reason": "test"})
            assert status == 409 and body["error"]["code"] == "not_owner", body
        finally:
            admin(pg_database, "ALTER ROLE deployd LOGIN")

        async def back() -> bool:
            status, _ = await node.api.call("GET", "/readyz", token=None)
            return status == 200 and sorted(node.daemon.tasks) == ["alpha", "bravo"]

        await eventually(back, within=10, what="apps owned again")
        epochs = [row[0] for row in pg_database.query(
            "SELECT epoch FROM app_owners ORDER BY app")]
        assert epochs == [2, 2]
    finally:
        await node.stop()


async def test_an_action_sent_to_another_node_is_carried_out_by_the_owner(
        tmp_path: Path, pg_database: Database) -> None:
    """Two nodes listening where they advertise: pausing node-b's app through node-a is done
    by node-b, with the caller's token (the event names its actor), and answers as node-b
    does; a call already forwarded once is not forwarded again (409 naming the owner); a bad
    token is refused by node-a itself."""
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "first")
    apps = local_apps(tmp_path, origin, ["alpha", "bravo"])
    ports = {"node-a": free_port(), "node-b": free_port()}
    first = await start_node(node_spec(tmp_path, "node-a", origin, pg_database, apps,
                                       port=ports["node-a"]).write(tmp_path / "a.toml"),
                             ports["node-a"])
    second: RunningDaemon | None = None
    try:
        await wait_owners(first.api, {"node-a": 2}, within=10)
        second = await start_node(node_spec(tmp_path, "node-b", origin, pg_database, apps,
                                            port=ports["node-b"]).write(tmp_path / "b.toml"),
                                  ports["node-b"])
        seen = await wait_owners(first.api, {"node-a": 1, "node-b": 1}, within=15)
        (other,) = seen["node-b"]

        status, body = await first.api.call("POST", f"/api/v1/apps/{other}/pause",
                                            token="deployer", json_body={"reason": "fwd"})
        assert status == 200, body
        assert body["name"] == other and body["paused"]["by"] == "deployer"
        paused = await second.wait_for_event(other, "app.paused")
        assert paused["actor"] == "deployer"

        status, body = await first.api.call("POST", f"/api/v1/apps/{other}/pause",
                                            token="reader", json_body={"reason": "fwd"})
        assert status == 403, body

        url = f"{first.base}/api/v1/apps/{other}/resume"
        headers = {"Authorization": "Bearer deploy-secret-0123456789",
                   "X-Deployd-Forwarded-By": "node-c"}
        async with first.session.post(url, json={}, headers=headers) as response:
            refused = await response.json()
            assert response.status == 409, refused
        assert refused["error"]["code"] == "not_owner"
        assert f"node node-b; send this call to {second.base}" in refused["error"]["message"]
    finally:
        if second is not None:
            await second.stop()
        await first.stop()


async def test_a_node_that_lost_the_app_can_no_longer_write_its_state(
        pg_database: Database) -> None:
    """The store as node-a's ownership (epoch 1) writes it: events, deploys, app state. Once
    another node took the app (epoch bumped, node-b), every write fails with a StoreError
    naming the epoch and nothing is written; reads still work."""
    store = Store(pg_database.backend())
    await store.open()
    try:
        pg_database.query("INSERT INTO app_owners (app, node, epoch, since) "
                          "VALUES ('shop', 'node-a', 1, 0)")
        fenced = Store(FencedBackend(store.backend, app="shop", node="node-a", epoch=1))
        await fenced.add_event("shop", EventKind.APP_PAUSED, "before")
        deploy = await fenced.start_deploy("shop", DeployKind.DEPLOY, "a" * 40,
                                           trigger=Trigger.MANUAL, actor="t")
        pg_database.query("UPDATE app_owners SET node = 'node-b', epoch = 2 WHERE app = 'shop'")
        writes = [fenced.add_event("shop", EventKind.APP_PAUSED, "after"),
                  fenced.set_paused("shop", True, actor="t", reason="late"),
                  fenced.update_deploy(deploy.id, state=DeployState.FAILED)]
        for write in writes:
            with pytest.raises(StoreError, match=r"node node-a no longer owns it \(epoch 1 "):
                await write
        assert [e.message for e in await fenced.events("shop")] == ["before"]
        assert not (await store.app_state("shop")).paused
        assert (await store.deploy(deploy.id)).state == DeployState.RUNNING
        epoch_two = Store(FencedBackend(store.backend, app="shop", node="node-b", epoch=2))
        await epoch_two.add_event("shop", EventKind.APP_OWNED, "node-b owns shop")
    finally:
        await store.close()


async def test_a_reload_restarts_an_owned_app_under_its_ownership(
        tmp_path: Path, pg_database: Database) -> None:
    """A config reload that changes an owned app restarts it still fenced by its epoch and
    naming it in host locks; an app added is taken by the next round."""
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "first")
    apps = local_apps(tmp_path, origin, ["alpha"])
    spec = node_spec(tmp_path, "node-a", origin, pg_database, apps)
    node = await start_daemon(spec.write(tmp_path / "a.toml"))
    try:
        await wait_owners(node.api, {"node-a": ["alpha"]}, within=10)
        spec.apps = local_apps(tmp_path, origin, ["alpha", "bravo"],
                               rollback={"grace": "0s", "bake": "300ms"})
        changes = await node.daemon.reload(load(spec.write(tmp_path / "a.toml")))
        assert changes == ["app alpha changed", "app bravo added"]
        await wait_owners(node.api, {"node-a": ["alpha", "bravo"]}, within=10)
        for name in ("alpha", "bravo"):
            sup = node.daemon.supervisors[name]
            assert isinstance(sup.ctx.store.backend, FencedBackend)
            assert sup.ctx.fleet.owner == f"node-a epoch {node.daemon.epochs[name]}"
            assert name in node.daemon.tasks
    finally:
        await node.stop()
