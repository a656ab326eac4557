"""`POST /hooks/{app}` against the real daemon: signed pushes deploy at once, the rest is refused.

Signatures are computed the way GitHub and Gitea (HMAC-SHA256 of the raw body) and GitLab
(the shared token) send them. The app polls only every minute, so a deploy within seconds can
only come from the webhook.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.daemonfixtures import AppSpec, DaemonSpec, RunningDaemon, start_daemon
from tests.support.gitrepo import OriginRepo

APP = "shop"
SECRET = b"webhook-secret-5c1d9e0f7a2b"
WATCHED = "refs/heads/production"


class Lab:
    def __init__(self, daemon: RunningDaemon, origin: OriginRepo) -> None:
        self.daemon = daemon
        self.origin = origin

    async def post(self, app: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        async with self.daemon.session.post(f"{self.daemon.base}/hooks/{app}", data=body,
                                            headers=headers) as response:
            text = await response.text()
            return response.status, json.loads(text) if text else None

    async def push(self, ref: str = WATCHED, *, event: str = "push",
                   secret: bytes = SECRET) -> tuple[int, Any]:
        body = json.dumps({"ref": ref, "after": "0" * 40}).encode()
        return await self.post(APP, body, github_headers(body, event=event, secret=secret))

    def fetches(self) -> float:
        registry = self.daemon.daemon.metrics.registry
        return registry.get_sample_value("deployd_git_fetch_duration_seconds_count",
                                         {"app": APP}) or 0.0

    def webhooks(self, result: str) -> float:
        registry = self.daemon.daemon.metrics.registry
        return registry.get_sample_value("deployd_webhooks_total",
                                         {"app": APP, "result": result}) or 0.0


def github_headers(body: bytes, *, event: str = "push", secret: bytes = SECRET
                   ) -> dict[str, str]:
    digest = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return {"X-GitHub-Event": event, "X-Hub-Signature-256": f"sha256={digest}",
            "Content-Type": "application/json"}


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "first")
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_bytes(SECRET + b"\n")
    shop = AppSpec(name=APP, repo=str(origin.path), local_dirs=[tmp_path / "host"],
                   settings={"poll_interval": "60s"}, rollback={"grace": "0s", "bake": "100ms"},
                   webhook={"secret_file": str(secret_file), "max_body": 4096})
    plain = AppSpec(name="blog", repo=str(origin.path), local_dirs=[tmp_path / "blog"],
                    settings={"poll_interval": "60s"})
    spec = DaemonSpec(state_dir=tmp_path / "state", apps=[shop, plain],
                      daemon_settings={"client_timeout": "1s"})
    daemon = await start_daemon(spec.write(tmp_path / "deployd.toml"))
    try:
        await daemon.wait_for_event(APP, "deploy.succeeded")
        yield Lab(daemon, origin)
    finally:
        await daemon.stop()


async def deployed(lab: Lab, revision: str, *, timeout: float = 10.0) -> None:
    async def live() -> bool:
        return any(e["kind"] == "deploy.succeeded" and e["revision"] == revision
                   for e in await lab.daemon.events(APP))
    await lab.daemon.wait_until(live, timeout=timeout, what=f"{revision[:12]} deployed")


async def test_signed_push_to_the_branch_deploys_now(lab: Lab) -> None:
    """A GitHub-signed push to the watched branch: 202, and the new head is live in seconds."""
    second = lab.origin.commit({"index.html": "v2\n"}, "second")
    status, body = await lab.push()
    assert (status, body) == (202, {"accepted": "fetching production"})
    await deployed(lab, second)
    assert lab.webhooks("accepted") == 1


async def test_gitlab_token_and_gitea_signature_are_accepted(lab: Lab) -> None:
    """GitLab's X-Gitlab-Token and Gitea's bare hex signature work as GitHub's does."""
    body = json.dumps({"object_kind": "push", "ref": WATCHED}).encode()
    gitlab = {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": SECRET.decode()}
    assert (await lab.post(APP, body, gitlab))[0] == 202
    gitea = {"X-Gitea-Event": "push",
             "X-Gitea-Signature": hmac.new(SECRET, body, hashlib.sha256).hexdigest()}
    assert (await lab.post(APP, body, gitea))[0] == 202
    wrong = {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "not-the-secret-at-all"}
    assert (await lab.post(APP, body, wrong))[0] == 401


@pytest.mark.parametrize("tamper", ["wrong secret", "no signature", "other body",
                                    "sha1 scheme", "empty signature", "not ascii"])
async def test_bad_signatures_are_401_and_fetch_nothing(lab: Lab, tamper: str) -> None:
    """Any signature that is not the secret's HMAC of this very body is refused."""
    body = json.dumps({"ref": WATCHED}).encode()
    headers = github_headers(body)
    if tamper == "wrong secret":
        headers = github_headers(body, secret=b"guessed-secret-0000000000")
    elif tamper == "no signature":
        del headers["X-Hub-Signature-256"]
    elif tamper == "other body":  # a replay of a signed body's signature with another body
        headers = github_headers(json.dumps({"ref": "refs/heads/other"}).encode())
    elif tamper == "sha1 scheme":
        headers["X-Hub-Signature-256"] = headers["X-Hub-Signature-256"].replace("sha256", "sha1")
    elif tamper == "not ascii":  # compare_digest refuses such a str: once a 500
        headers["X-Hub-Signature-256"] = "sha256=\u00e9" * 10
    else:
        headers["X-Hub-Signature-256"] = "sha256="
    before = lab.fetches()
    status, answer = await lab.post(APP, body, headers)
    assert status == 401
    assert answer["error"]["code"] == "unauthorized"
    assert SECRET.decode() not in json.dumps(answer)
    assert lab.webhooks("unauthorized") == 1
    await asyncio.sleep(0.3)
    assert lab.fetches() == before


async def test_pings_tags_and_other_branches_are_ignored(lab: Lab) -> None:
    """Signed, but nothing to deploy: 200 with what was ignored, and no fetch."""
    before = lab.fetches()
    assert await lab.push(event="ping") == (200, {"ignored": "ping event"})
    assert await lab.push("refs/heads/main") == (
        200, {"ignored": f"push to refs/heads/main, not {WATCHED}"})
    assert (await lab.push("refs/tags/v1"))[0] == 200
    assert lab.webhooks("ignored") == 3
    await asyncio.sleep(0.3)
    assert lab.fetches() == before


async def test_unknown_app_and_app_without_webhook_answer_alike(lab: Lab) -> None:
    """404 with the same body either way, so app names cannot be probed."""
    body = json.dumps({"ref": WATCHED}).encode()
    unknown = await lab.post("nope", body, github_headers(body))
    no_webhook = await lab.post("blog", body, github_headers(body))
    assert unknown[0] == no_webhook[0] == 404
    assert unknown[1] == no_webhook[1]


async def test_bodies_over_the_limit_are_413(lab: Lab) -> None:
    """Declared or streamed, a body past max_body is refused without being read whole."""
    body = json.dumps({"ref": WATCHED, "pad": "x" * 5000}).encode()
    status, answer = await lab.post(APP, body, github_headers(body))
    assert status == 413 and answer["error"]["code"] == "too_large"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"x" * 1024

    async with lab.daemon.session.post(f"{lab.daemon.base}/hooks/{APP}", data=chunks(),
                                       headers=github_headers(b"")) as response:
        assert response.status == 413
    assert lab.webhooks("too_large") == 2


async def test_a_trickled_body_is_cut_off_at_the_client_timeout(lab: Lab) -> None:
    """No token needed, so /hooks must not let a client hold a connection by sending its body
    a byte at a time: 408 and the connection closed once client_timeout (1 s here) passes."""
    host, port = lab.daemon.base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /hooks/{APP} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                 "X-GitHub-Event: push\r\nX-Hub-Signature-256: sha256=00\r\n\r\n".encode())
    started = asyncio.get_running_loop().time()
    answer = b""
    try:
        async with asyncio.timeout(10):
            while not answer.endswith(b"}") and not reader.at_eof():
                with contextlib.suppress(ConnectionError):  # closed while we trickle
                    writer.write(b"x")
                    await writer.drain()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.3):
                        answer += await reader.read(4096)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert asyncio.get_running_loop().time() - started < 5


async def test_signed_garbage_is_400(lab: Lab) -> None:
    """A correctly signed body that is not JSON is a 400, not a 500."""
    body = b"\xff\xfe not json"
    status, answer = await lab.post(APP, body, github_headers(body))
    assert status == 400 and answer["error"]["code"] == "bad_json"


@pytest.mark.slow
async def test_a_flood_of_pushes_costs_a_fetch_a_second(lab: Lab) -> None:
    """360 signed pushes over 3 s: every one is accepted, and they cost a handful of fetches."""
    second = lab.origin.commit({"index.html": "v2\n"}, "second")
    before = lab.fetches()
    connector = aiohttp.TCPConnector(limit=20)
    body = json.dumps({"ref": WATCHED}).encode()
    statuses: list[int] = []
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            async with session.post(f"{lab.daemon.base}/hooks/{APP}", data=body,
                                    headers=github_headers(body)) as response:
                return response.status

        for _ in range(12):  # a wave every quarter second
            statuses += await asyncio.gather(*(one() for _ in range(30)))
            await asyncio.sleep(0.25)
    assert set(statuses) == {202}
    await deployed(lab, second)
    await asyncio.sleep(1.5)  # let a fetch still asked for run
    # One per second of the flood, one after the deploy, and slack for a slow machine.
    assert 1 <= lab.fetches() - before <= 7
