"""What a human does over REST: rollbacks quarantine, observe mode deploys nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from deployd.git import CherryPickResult
from tests.support.daemonfixtures import (
    DaemonSpec,
    RunningDaemon,
    one_local_app,
    start_daemon,
)
from tests.support.gitrepo import OriginRepo, commits_sharing_a_prefix
from tests.support.metrics import sample, scrape


def spec_for(tmp_path: Path, **settings: object) -> tuple[DaemonSpec, OriginRepo]:
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "v1")
    return one_local_app(tmp_path, origin.path, rollback={"grace": "0s", "bake": "100ms"},
                         settings=dict(settings)), origin


async def test_manual_rollback_quarantines_the_revision_it_leaves(tmp_path: Path) -> None:
    """After a REST rollback, the revision rolled away from is quarantined and not redeployed."""
    spec, origin = spec_for(tmp_path)
    daemon = await start_daemon(spec.write(tmp_path / "deployd.toml"))
    try:
        await daemon.wait_for_event("shop", "bake.healthy")
        second = origin.commit({"index.html": "v2\n"}, "v2")
        await daemon.wait_for_event("shop", "bake.healthy", count=2)
        status, _ = await daemon.api.call("POST", "/api/v1/apps/shop/rollback",
                                          json_body={"reason": "v2 looks wrong"})
        assert status == 202
        event = await daemon.wait_for_event("shop", "quarantine.added")
        assert event["revision"] == second and "v2 looks wrong" in event["message"]
        await daemon.wait_for_event("shop", "rollback.succeeded")
        app = await daemon.api.get("/api/v1/apps/shop")
        assert [q["revision"] for q in app["quarantined"]] == [second]
        assert app["pristine"] is False
        kinds = [e["kind"] for e in await daemon.events("shop")]
        assert kinds.count("deploy.started") == 2
    finally:
        await daemon.stop()


async def test_observe_mode_refuses_rest_deploys(tmp_path: Path) -> None:
    """An app in observe mode answers 409 to POST deploy: another tool deploys it."""
    spec, origin = spec_for(tmp_path, mode="observe")
    daemon = await start_daemon(spec.write(tmp_path / "deployd.toml"))
    try:
        status, body = await daemon.api.call("POST", "/api/v1/apps/shop/deploy",
                                             json_body={"revision": origin.head()})
        assert status == 409
        assert "observe mode" in body["error"]["message"]
        assert not (tmp_path / "host" / "current").exists()
    finally:
        await daemon.stop()


async def test_failed_build_shows_the_hooks_own_output(tmp_path: Path) -> None:
    """deploy.failed carries what the build hook printed, not only its exit status."""
    spec, _ = spec_for(tmp_path)
    spec.apps[0].hooks = {"build": "echo 'npm ERR! missing script: build' >&2; exit 7"}
    daemon = await start_daemon(spec.write(tmp_path / "deployd.toml"))
    try:
        event = await daemon.wait_for_event("shop", "deploy.failed")
        assert "npm ERR! missing script: build" in event["message"]
        assert "exit 7" in event["message"]
    finally:
        await daemon.stop()


async def test_deploy_names_one_commit_and_forces_only_on_request(tmp_path: Path) -> None:
    """POST deploy: a short sha wins over a branch named like it; an ambiguous abbreviation is
    a 422 listing the commits; a quarantined revision, or one not on the branch, is a 422
    naming why and deploys only with "force": true, recorded as forced."""
    spec, origin = spec_for(tmp_path)
    first = origin.head()
    daemon = await start_daemon(spec.write(tmp_path / "deployd.toml"))
    deploy = "/api/v1/apps/shop/deploy"
    try:
        await daemon.wait_for_event("shop", "bake.healthy")
        second = origin.commit({"index.html": "v2\n"}, "v2")
        await daemon.wait_for_event("shop", "bake.healthy", count=2)
        status, body = await daemon.api.call("POST", "/api/v1/apps/shop/rollback",
                                             json_body={"reason": "v2 looks wrong"})
        assert status == 202, body
        await daemon.wait_for_event("shop", "rollback.succeeded")
        # A branch named like the first commit's short sha, at a commit production never held.
        evil = origin.commit({"index.html": "evil\n"}, "evil", branch=first[:8],
                             parents=[second])
        one, other = commits_sharing_a_prefix(origin)

        async def fetched() -> bool:
            status, _ = await daemon.api.call("POST", deploy,
                                              json_body={"revision": "refs/heads/amb-b"})
            return status != 404
        await daemon.wait_until(fetched, what="the side branches fetched")

        async def refused(revision: str, *words: str) -> None:
            status, body = await daemon.api.call("POST", deploy, token="deployer",
                                                 json_body={"revision": revision})
            assert status == 422 and body["error"]["code"] == "invalid", (revision, body)
            for word in words:
                assert word in body["error"]["message"], (revision, word, body)

        await refused(one[:4], "ambiguous", one[:12], other[:12])
        await refused(one[:4].upper(), "ambiguous")
        await refused(evil, "not on production", '"force": true')
        await refused(f"refs/heads/{first[:8]}", "not on production")
        await refused("amb-a", "not on production")
        await refused(second, "quarantined", "v2 looks wrong", '"force": true')
        status, body = await daemon.api.call("POST", deploy, json_body={
            "revision": second, "force": "yes"})
        assert status == 422 and "force" in body["error"]["message"], body
        kinds = [e["kind"] for e in await daemon.events("shop")]
        assert kinds.count("deploy.started") == 2

        status, body = await daemon.api.call("POST", deploy, token="deployer",
                                             json_body={"revision": first[:8]})
        assert status == 202, body
        assert body["deploy"]["revision"] == first and body["deploy"]["forced"] is None
        await daemon.wait_for_event("shop", "deploy.succeeded", count=3)

        status, body = await daemon.api.call("POST", deploy, token="deployer",
                                             json_body={"revision": second, "force": True})
        assert status == 202, body
        assert body["deploy"]["revision"] == second
        assert "quarantined" in body["deploy"]["forced"]
        started = await daemon.wait_for_event("shop", "deploy.started", count=4)
        assert started["revision"] == second and started["actor"] == "deployer"
        assert "quarantined" in started["data"]["forced"] and "forced" in started["message"]
        await daemon.wait_for_event("shop", "deploy.succeeded", count=4)

        status, body = await daemon.api.call("POST", deploy, token="deployer",
                                             json_body={"revision": evil, "force": True})
        assert status == 202 and body["deploy"]["forced"] == "not on production", body
        await daemon.wait_for_event("shop", "deploy.succeeded", count=5)
        assert (tmp_path / "host" / "current" / "index.html").read_text() == "evil\n"
    finally:
        await daemon.stop()


async def fetches(daemon: RunningDaemon) -> float:
    """How many fetches of shop's mirror the daemon has made (its own metric)."""
    found = sample(await scrape(daemon), "deployd_git_fetch_duration_seconds_count", app="shop")
    assert found is not None
    return found


async def test_opening_jobs_shares_a_recent_fetch_and_needs_a_base_in_history(
        tmp_path: Path) -> None:
    """POST jobs: thirty calls at once cost one fetch, a later call its own; a base from
    another branch is a 422 (its code would land unseen), an older commit of the branch is
    accepted."""
    spec, origin = spec_for(tmp_path, poll_interval="1h")
    v1 = origin.head()
    v2 = origin.commit({"index.html": "v2\n"}, "v2")
    v3 = origin.commit({"index.html": "v3\n"}, "v3")
    side = origin.commit({"index.html": "side\n", "backdoor": "x\n"}, "side", branch="side",
                         parents=[v1])
    daemon = await start_daemon(spec.write(tmp_path / "deployd.toml"))
    jobs = "/api/v1/apps/shop/jobs"
    try:
        await daemon.wait_for_event("shop", "bake.healthy")
        before = await fetches(daemon)
        answers = await asyncio.gather(*(
            daemon.api.call("POST", jobs, token="deployer",
                            json_body={"commits": [v3], "base": "no-such-base"})
            for _ in range(30)))
        assert all(status == 422 for status, _ in answers), answers
        assert await fetches(daemon) - before == 1
        # Each call still sees the remote as it is when the call arrives.
        v4 = origin.commit({"index.html": "v4\n"}, "v4")
        status, body = await daemon.api.call("POST", jobs, token="deployer",
                                             json_body={"commits": [v4], "base": v1})
        assert status == 201, body
        assert [c["sha"] for c in body["candidates"]] == [v2, v3, v4]
        assert await fetches(daemon) - before == 2

        status, body = await daemon.api.call("POST", jobs, token="deployer",
                                             json_body={"commits": [v3], "base": side})
        assert status == 422 and "not in the history of production" in body["error"]["message"]
        status, body = await daemon.api.call("POST", jobs, token="deployer",
                                             json_body={"commits": [v3], "base": v2})
        assert status == 201, body
        assert [c["sha"] for c in body["candidates"]] == [v3, v4]
        assert [c["sha"] for c in body["candidates"] if c["selected"]] == [v3]
    finally:
        await daemon.stop()


async def test_a_job_is_never_seen_without_its_preview_and_plan(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a new job's preview is being computed nobody sees the job; the moment it is
    listed, it shows its selection, a plan and `ready`."""
    spec, origin = spec_for(tmp_path, poll_interval="1h")
    v1 = origin.head()
    v2 = origin.commit({"index.html": "v2\n"}, "v2")
    daemon = await start_daemon(spec.write(tmp_path / "deployd.toml"))
    try:
        await daemon.wait_for_event("shop", "bake.healthy")
        mirror = daemon.daemon.supervisors["shop"].mirror
        picking, go_on = asyncio.Event(), asyncio.Event()
        cherry_pick = mirror.cherry_pick

        async def held_cherry_pick(*args: Any, **kwargs: Any) -> CherryPickResult:
            picking.set()
            await go_on.wait()
            return await cherry_pick(*args, **kwargs)

        monkeypatch.setattr(mirror, "cherry_pick", held_cherry_pick)
        opening = asyncio.create_task(daemon.api.call(
            "POST", "/api/v1/apps/shop/jobs", token="deployer",
            json_body={"commits": [v2], "base": v1}))
        await asyncio.wait_for(picking.wait(), 20)
        assert (await daemon.api.get("/api/v1/jobs"))["jobs"] == []
        go_on.set()
        status, body = await opening
        assert status == 201, body
        (listed,) = (await daemon.api.get("/api/v1/jobs"))["jobs"]
        assert listed["selected"] == [v2] and listed["ready"] is True and listed["plan"]
        job = await daemon.api.get(f"/api/v1/jobs/{listed['id']}")
        assert job["ready"] is True and job["plan"] == listed["plan"]
        assert [c["selected"] for c in job["candidates"]] == [True]
    finally:
        await daemon.stop()
