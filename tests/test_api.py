"""The REST contract against the real daemon: probes, auth, JSON errors, events paging.

The daemon runs on a real config file with one app whose host is a local directory (the API
does not care how hosts are reached) and a real origin repo.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from deployd.config import load
from tests.support.daemonfixtures import (
    QUICK_BAKE,
    TOKENS,
    DaemonSpec,
    RunningDaemon,
    one_local_app,
    start_daemon,
)
from tests.support.gitrepo import OriginRepo

APP = "shop"
WRONG_TOKEN = "not-a-real-token-4f9a1c"
SECRETS = [secret for secret, _ in TOKENS.values()] + [WRONG_TOKEN]


def spec_for(tmp_path: Path, repo: Path) -> DaemonSpec:
    return one_local_app(tmp_path, repo, name=APP, rollback=QUICK_BAKE)


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[RunningDaemon, OriginRepo]]:
    """The daemon with one app whose first commit is deployed."""
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "first")
    daemon = await start_daemon(spec_for(tmp_path, origin.path).write(tmp_path / "d.toml"))
    try:
        await daemon.wait_for_event(APP, "deploy.succeeded")
        yield daemon, origin
    finally:
        await daemon.stop()


def assert_error(status: int, body: Any, expected: int, code: str | None = None) -> None:
    """An error answer: the status, `{"error": {"code", "message"}}` and no secret in it."""
    assert status == expected, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    text = json.dumps(body)
    for secret in SECRETS:
        assert secret not in text
    for secret in SECRETS:
        assert hashlib.sha256(secret.encode()).hexdigest() not in text


async def raw(daemon: RunningDaemon, method: str, path: str, *,
              headers: dict[str, str] | None = None,
              data: bytes | None = None) -> tuple[int, dict[str, str], Any]:
    async with daemon.session.request(method, daemon.base + path, headers=headers or {},
                                      data=data) as response:
        text = await response.text()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return response.status, dict(response.headers), body


async def test_probes_and_metrics_answer_without_a_token(
        running: tuple[RunningDaemon, OriginRepo]) -> None:
    """/healthz, /readyz and /metrics need no token; /metrics is Prometheus text."""
    daemon, _ = running
    status, _, body = await raw(daemon, "GET", "/healthz")
    assert (status, body) == (200, {"status": "ok"})
    status, _, body = await raw(daemon, "GET", "/readyz")
    assert status == 200 and body["ready"] is True
    status, headers, body = await raw(daemon, "GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert f'deployd_deploys_total{{app="{APP}",result="succeeded"}} 1.0' in body


async def test_readyz_is_503_until_the_first_fetch(tmp_path: Path) -> None:
    """/readyz is 503 while the app's mirror has never been fetched (origin missing), and
    200 once a fetch worked."""
    repo = tmp_path / "origin.git"
    daemon = await start_daemon(spec_for(tmp_path, repo).write(tmp_path / "d.toml"))
    try:
        await daemon.wait_for_event(APP, "git.fetch_failed")
        status, _, body = await raw(daemon, "GET", "/readyz")
        assert status == 503, body
        assert body["ready"] is False and body["checks"][f"mirror:{APP}"] is False
        status, _, _ = await raw(daemon, "GET", "/healthz")
        assert status == 200

        OriginRepo(repo).commit({"index.html": "v1\n"}, "first")

        async def ready() -> bool:
            return (await raw(daemon, "GET", "/readyz"))[0] == 200
        await daemon.wait_until(ready, timeout=10, what="readyz 200")
    finally:
        await daemon.stop()


async def test_auth_errors(running: tuple[RunningDaemon, OriginRepo]) -> None:
    """401 without a token or with a wrong one (with WWW-Authenticate), 403 for a token
    lacking the role; nothing echoes a token back."""
    daemon, _ = running
    path = f"/api/v1/apps/{APP}"
    for headers in ({}, {"Authorization": f"Bearer {WRONG_TOKEN}"},
                    {"Authorization": f"Basic {WRONG_TOKEN}"},
                    {"Authorization": "Bearer "},
                    {"Authorization": f"Bearer {TOKENS['reader'][0]}x"}):
        for method, where in (("GET", path), ("GET", "/api/v1/apps"),
                              ("POST", f"{path}/deploy"), ("GET", f"{path}/events")):
            status, answer_headers, body = await raw(daemon, method, where, headers=headers,
                                                     data=b'{"revision": "x"}')
            assert_error(status, body, 401, "unauthorized")
            assert answer_headers["WWW-Authenticate"].startswith("Bearer")
            assert WRONG_TOKEN not in json.dumps(dict(answer_headers))

    status, body = await daemon.api.call("POST", f"{path}/deploy", token="reader",
                                         json_body={"revision": "production"})
    assert_error(status, body, 403, "forbidden")
    status, body = await daemon.api.call("POST", f"{path}/rollback", token="approver",
                                         json_body={})
    assert_error(status, body, 403, "forbidden")
    status, body = await daemon.api.call("GET", path, token="reader")
    assert status == 200 and body["name"] == APP


async def test_an_authorization_header_that_is_not_utf8_is_401(
        running: tuple[RunningDaemon, OriginRepo]) -> None:
    """A bearer token holding bytes that are not UTF-8 is an unknown token (401), not a 500."""
    daemon, _ = running
    host, port = daemon.base.removeprefix("http://").split(":")
    for token in (b"\xff\xfe\xfd", TOKENS["admin"][0].encode() + b"\xe9"):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"GET /api/v1/apps HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Authorization: Bearer " + token + b"\r\n\r\n")
            async with asyncio.timeout(10):
                answer = await reader.read()
        finally:
            writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401 "), answer[:300]
        assert_error(401, json.loads(body), 401, "unauthorized")


async def test_unknown_app_and_unknown_route_are_404_json(
        running: tuple[RunningDaemon, OriginRepo]) -> None:
    """An unknown app (for every app call) and an unknown route answer 404 as JSON errors;
    a wrong method on a known route is a JSON 405 with an Allow header."""
    daemon, _ = running
    for method, path in (("GET", "/api/v1/apps/nope"), ("GET", "/api/v1/apps/nope/events"),
                         ("POST", "/api/v1/apps/nope/deploy"),
                         ("POST", "/api/v1/apps/nope/rollback")):
        status, body = await daemon.api.call(method, path, json_body={"revision": "x"}
                                             if path.endswith("deploy") else {})
        assert_error(status, body, 404, "not_found")
        assert "nope" in body["error"]["message"]
    for token in ("admin", None):
        status, body = await daemon.api.call("GET", "/api/v1/nothing/here", token=token)
        assert_error(status, body, 404)
    status, headers, body = await raw(daemon, "GET", f"/api/v1/apps/{APP}/deploy")
    assert_error(status, body, 405)
    assert headers["Allow"] == "POST"  # RFC 9110: a 405 names the methods that work
    for job in ("12345", "\u00b2", "9" * 40, "x"):
        status, body = await daemon.api.call("GET", f"/api/v1/jobs/{job}")
        assert_error(status, body, 404, "not_found")


async def test_bad_bodies_are_400_or_422(running: tuple[RunningDaemon, OriginRepo]) -> None:
    """A body that is not JSON is 400; JSON of the wrong shape, a missing, mistyped or unknown
    field, and a malformed release name are 422; nothing is deployed."""
    daemon, _ = running
    deploy, rollback = f"/api/v1/apps/{APP}/deploy", f"/api/v1/apps/{APP}/rollback"
    deep = b"[" * 20_000 + b"]" * 20_000  # deeper than the JSON parser can recurse
    for data in (b"{not json", b"revision=abc", b'{"revision": "abc"', b"\xff\xfe", deep,
                 b'{"revision": ' + deep + b"}"):
        for path in (deploy, rollback):
            status, body = await daemon.api.call("POST", path, data=data)
            assert_error(status, body, 400)
    for path, body_in in (
            (deploy, {}), (deploy, {"revision": 5}), (deploy, {"revision": ""}),
            (deploy, {"revision": ["abc"]}), (deploy, {"revision": "abc", "force": "yes"}),
            (deploy, {"revision": "a b"}), (deploy, [1, 2]), (deploy, "abc"),
            (rollback, {"release": 20240101120000}), (rollback, {"release": "yesterday"}),
            (rollback, {"release": "../../etc"}), (rollback, {"reason": 3}),
            (rollback, {"release": "20240101120000", "to": "x"}), (rollback, [])):
        status, body = await daemon.api.call("POST", path, json_body=body_in)
        assert_error(status, body, 422, "invalid")
    events = await daemon.events(APP)
    assert [e["kind"] for e in events].count("deploy.started") == 1
    assert "rollback.started" not in [e["kind"] for e in events]


async def test_unknown_revision_or_release_is_404_not_500(
        running: tuple[RunningDaemon, OriginRepo]) -> None:
    """Deploying a revision the repo does not have, or rolling back to a release nobody has,
    is a 404 JSON error and starts nothing."""
    daemon, origin = running
    for revision in ("deadbeef", "0" * 40, "no-such-branch", "refs/heads/nope", "v9.9.9",
                     origin.head()[:1]):
        status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/deploy",
                                             json_body={"revision": revision})
        assert 400 <= status < 500, (revision, status, body)
        assert_error(status, body, status)
    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/deploy",
                                         json_body={"revision": "deadbeef"})
    assert_error(status, body, 404, "not_found")
    status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/rollback",
                                         json_body={"release": "20000101000000"})
    assert_error(status, body, 404, "not_found")
    kinds = [e["kind"] for e in await daemon.events(APP)]
    assert kinds.count("deploy.started") == 1 and "rollback.started" not in kinds


async def test_events_since_returns_only_newer_events_with_a_next_link(
        running: tuple[RunningDaemon, OriginRepo]) -> None:
    """GET /events?since=<id> returns the events after that id, oldest first, and a `next`
    link that continues from the last one; `since` may be an ISO time; a bad `since` or
    `limit` is 422."""
    daemon, origin = running
    origin.commit({"index.html": "v2\n"}, "second")
    await daemon.wait_for_event(APP, "deploy.succeeded", count=2)
    path = f"/api/v1/apps/{APP}/events"
    everything = await daemon.api.get(path, token="reader")
    events = everything["events"]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(ids) >= 6
    assert everything["next"] == f"{path}?since={ids[-1]}"

    middle = ids[2]
    newer = await daemon.api.get(f"{path}?since={middle}", token="reader")
    assert [e["id"] for e in newer["events"]] == [i for i in ids if i > middle]
    assert newer["next"] == f"{path}?since={ids[-1]}"
    assert newer["events"] == events[3:]

    page = await daemon.api.get(f"{path}?since={middle}&limit=2", token="reader")
    assert [e["id"] for e in page["events"]] == ids[3:5]
    assert page["next"] == f"{path}?since={ids[4]}&limit=2"  # keeps the page size
    following = await daemon.api.get(page["next"], token="reader")
    assert [e["id"] for e in following["events"]] == ids[5:7]

    latest = await daemon.api.get(everything["next"], token="reader")
    assert latest["events"] == []
    assert latest["next"] == everything["next"]  # nothing new: the same place, not lost
    origin.commit({"index.html": "v3\n"}, "third")
    await daemon.wait_for_event(APP, "deploy.succeeded", count=3)
    resumed = await daemon.api.get(latest["next"], token="reader")
    assert resumed["events"] and resumed["events"][0]["id"] == ids[-1] + 1
    assert [e["kind"] for e in resumed["events"]][:2] == ["branch.moved", "deploy.started"]

    by_time = await daemon.api.get(f"{path}?since=2000-01-01T00:00:00Z", token="reader")
    assert [e["id"] for e in by_time["events"]][:len(ids)] == ids
    future = await daemon.api.get(f"{path}?since=2999-01-01T00:00:00Z", token="reader")
    assert future["events"] == []
    again = await daemon.api.get(future["next"], token="reader")
    assert again["events"] == []

    for bad in ("yesterday", "-1", "1.5", "2026-13-45T99:00:00Z", "%00", "\u00b2",
                "9" * 40):
        status, body = await daemon.api.call("GET", f"{path}?since={bad}", token="reader")
        assert_error(status, body, 422, "invalid")
    for bad in ("0", "-3", "x", "100000"):
        status, body = await daemon.api.call("GET", f"{path}?limit={bad}", token="reader")
        assert_error(status, body, 422, "invalid")


async def test_apps_list_and_detail_shapes(running: tuple[RunningDaemon, OriginRepo]) -> None:
    """GET /apps and /apps/{app} with a reader token: head, deployed, last good and links."""
    daemon, origin = running
    apps = (await daemon.api.get("/api/v1/apps", token="reader"))["apps"]
    assert len(apps) == 1
    summary = apps[0]
    assert summary["name"] == APP and summary["branch"] == "production"
    assert summary["head"] == origin.head()
    assert summary["deployed"]["revision"] == origin.head()
    assert summary["links"]["events"] == f"/api/v1/apps/{APP}/events"
    detail = await daemon.api.get(f"/api/v1/apps/{APP}", token="reader")
    assert [h["name"] for h in detail["hosts"]] == ["local"]
    assert detail["hosts"][0]["current"]["revision"] == origin.head()


async def test_server_listens_on_loopback_by_default(tmp_path: Path) -> None:
    """A config without `listen` binds 127.0.0.1 (port 8765), never every interface."""
    text = spec_for(tmp_path, tmp_path / "origin.git").render()
    lines = [line for line in text.splitlines() if not line.startswith("listen")]
    path = tmp_path / "d.toml"
    path.write_text("\n".join(lines) + "\n")
    config = load(path)
    assert config.daemon.listen_host == "127.0.0.1"
    assert config.daemon.listen_port == 8765


async def test_error_bodies_of_a_plain_client_are_json(
        running: tuple[RunningDaemon, OriginRepo]) -> None:
    """A client sending JSON with no content type, or form data, still gets JSON answers."""
    daemon, _ = running
    async with aiohttp.ClientSession() as session:
        async with session.post(
                f"{daemon.base}/api/v1/apps/{APP}/deploy", data=b'{"revision": 12}',
                headers={"Authorization": f"Bearer {TOKENS['deployer'][0]}"}) as response:
            assert response.status == 422
            assert response.content_type == "application/json"
            assert_error(response.status, await response.json(), 422, "invalid")


async def test_nodes_on_sqlite_is_this_daemon_running_every_app(
        running: tuple[RunningDaemon, OriginRepo]) -> None:
    """GET /api/v1/nodes (read role): with SQLite, one live node, this one, owning every
    app; no token is a 401."""
    daemon, _ = running
    status, body = await daemon.api.call("GET", "/api/v1/nodes", token=None)
    assert_error(status, body, 401)
    body = await daemon.api.get("/api/v1/nodes", token="reader")
    settings = daemon.daemon.config.daemon
    (node,) = body["nodes"]
    assert node["name"] == settings.node and node["advertise"] == settings.advertise_url
    assert node["live"] is True and node["apps"] == [APP]
