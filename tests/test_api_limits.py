"""What a client may send: bounded bodies, bounded patches, bounded text fields; diffs as bytes.

Each test talks to the real daemon's REST server over loopback with a job opened by hand
(base: the first commit, candidate: the second).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pygit2
import pytest
from pygit2.enums import DiffOption

from deployd.api import MAX_JSON_BYTES, MAX_PATCH_BYTES, MAX_TEXT_CHARS
from deployd.git import MAX_BINARY_BYTES
from tests.support.daemonfixtures import (
    QUICK_BAKE,
    TOKENS,
    RunningDaemon,
    one_local_app,
    start_daemon,
)
from tests.support.gitrepo import OriginRepo
from tests.test_api import APP, assert_error

APPROVER = {"Authorization": f"Bearer {TOKENS['approver'][0]}"}


@dataclass
class Lab:
    daemon: RunningDaemon
    origin: OriginRepo
    base: str
    job: int


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    """The daemon with one app and a pending rescue job (base: first commit)."""
    origin = OriginRepo(tmp_path / "origin.git")
    base = origin.commit({"index.html": "v1\n", "logo.bin": b"\x00\x01logo"}, "first")
    config = one_local_app(tmp_path, origin.path, name=APP, rollback=QUICK_BAKE).write(
        tmp_path / "d.toml")
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for_event(APP, "deploy.succeeded")
        second = origin.commit({"index.html": "v2\n", "menu.txt": b"caf\xe9 cr\xe8me\n"},
                               "second")
        status, body = await daemon.api.call("POST", f"/api/v1/apps/{APP}/jobs",
                                             json_body={"commits": [second], "base": base})
        assert status == 201, body
        yield Lab(daemon, origin, base, body["id"])
    finally:
        await daemon.stop()


def binary_patch(origin: OriginRepo, base: str, content: bytes) -> bytes:
    """A real `GIT binary patch` turning base's logo.bin into `content`."""
    changed = origin.commit({"logo.bin": content}, "new logo", branch="scratch",
                            parents=[base])
    old, new = origin.repo[base], origin.repo[changed]
    assert isinstance(old, pygit2.Commit) and isinstance(new, pygit2.Commit)
    diff = old.tree.diff_to_tree(new.tree, flags=DiffOption.SHOW_BINARY)
    return b"".join(patch.data for patch in diff if patch is not None)


async def send_raw(daemon: RunningDaemon, head: bytes, body: bytes) -> bytes:
    """Write a request's head and part of its body; return all the server answers before it
    closes the connection (which it must do without waiting for the rest)."""
    host, port = daemon.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + body)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()  # until the server closes
    finally:
        writer.close()


async def test_a_patch_over_the_limit_is_413_without_reading_it(lab: Lab) -> None:
    """A declared Content-Length over the patch limit is refused at once (the body is never
    read, the connection closed); a chunked body is cut off once it passes the limit."""
    path = f"/api/v1/jobs/{lab.job}/patch"
    head = (f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {APPROVER['Authorization']}\r\n"
            f"Content-Length: {100 * 1024 * 1024}\r\n\r\n").encode()
    answer = await send_raw(lab.daemon, head, b"diff --git a/x b/x\n")
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b'"too_large"' in answer

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_PATCH_BYTES // (256 * 1024) + 2):
            yield b"+" * (256 * 1024)

    async with lab.daemon.session.put(lab.daemon.base + path, data=chunks(),
                                      headers=APPROVER) as response:
        assert_error(response.status, await response.json(), 413, "too_large")
    job = await lab.daemon.api.get(f"/api/v1/jobs/{lab.job}")
    assert job["resolved_patch"] is False


async def test_a_json_body_over_the_limit_is_413(lab: Lab) -> None:
    """JSON bodies have their own, smaller limit."""
    padding = "x" * MAX_JSON_BYTES
    status, body = await lab.daemon.api.call("POST", f"/api/v1/apps/{APP}/pause",
                                             json_body={"reason": padding})
    assert_error(status, body, 413, "too_large")
    assert (await lab.daemon.api.get(f"/api/v1/apps/{APP}"))["paused"] is None


async def test_a_binary_patch_declaring_a_huge_file_is_422_naming_it(lab: Lab) -> None:
    """A binary hunk declaring more than the limit is refused, naming the file, before
    libgit2 parses it; the same patch with its real size is accepted."""
    patch = binary_patch(lab.origin, lab.base, b"\x00\x02new logo" * 10)
    assert b"GIT binary patch" in patch and b"\nliteral " in patch
    path = f"/api/v1/jobs/{lab.job}/patch"
    forged = b"\n".join(b"literal 268435456" if line.startswith(b"literal ") else line
                        for line in patch.split(b"\n"))
    status, body = await lab.daemon.api.call("PUT", path, token="approver", data=forged)
    assert_error(status, body, 422, "invalid")
    assert "logo.bin" in body["error"]["message"]
    assert "268435456" in body["error"]["message"]

    many = b"".join(patch.replace(b"logo.bin", f"logo{i}.bin".encode()) for i in range(3))
    many = b"\n".join(f"literal {MAX_BINARY_BYTES // 2}".encode()
                      if line.startswith(b"literal ") else line for line in many.split(b"\n"))
    status, body = await lab.daemon.api.call("PUT", path, token="approver", data=many)
    assert_error(status, body, 422, "invalid")
    assert "in all" in body["error"]["message"]
    assert (await lab.daemon.api.get(f"/api/v1/jobs/{lab.job}"))["resolved_patch"] is False

    status, body = await lab.daemon.api.call("PUT", path, token="approver", data=patch)
    assert status == 200, body
    assert body["resolved_patch"] is True


async def test_text_that_cannot_be_stored_is_422_and_changes_nothing(lab: Lab) -> None:
    """A JSON lone surrogate ("\\udc80") is valid JSON but not storable text: a 422 naming the
    field, before anything is recorded (it once left a job approved with no approval row)."""
    job = f"/api/v1/jobs/{lab.job}"
    plan = (await lab.daemon.api.get(job))["plan"]
    calls = [
        ("POST", f"/api/v1/apps/{APP}/rollback", b'{"reason": "\\udc80"}', "deployer",
         "reason"),
        ("POST", f"/api/v1/apps/{APP}/pause", b'{"reason": "x\\udc80"}', "deployer", "reason"),
        ("POST", f"{job}/approve",
         b'{"plan": "%s", "comment": "\\ud800"}' % plan.encode(), "approver", "comment"),
    ]
    for method, path, raw, token, name in calls:
        status, body = await lab.daemon.api.call(method, path, token=token, data=raw)
        assert_error(status, body, 422, "invalid")
        assert repr(name) in body["error"]["message"], (path, body)
    assert (await lab.daemon.api.get(job))["state"] == "pending"
    kinds = [e["kind"] for e in await lab.daemon.events(APP)]
    assert "rollback.started" not in kinds and "app.paused" not in kinds


async def test_text_fields_over_1_kib_are_422(lab: Lab) -> None:
    """reason, comment and commit ids longer than the limit are refused by name; a reason
    of exactly the limit is taken."""
    long = "r" * (MAX_TEXT_CHARS + 1)
    job = f"/api/v1/jobs/{lab.job}"
    calls = [
        ("POST", f"/api/v1/apps/{APP}/rollback", {"reason": long}, "deployer", "reason"),
        ("POST", f"/api/v1/apps/{APP}/pause", {"reason": long}, "deployer", "reason"),
        ("POST", f"/api/v1/apps/{APP}/resume", {"reason": long}, "deployer", "reason"),
        ("POST", f"/api/v1/apps/{APP}/jobs", {"commits": [long]}, "deployer", "commits"),
        ("POST", f"/api/v1/apps/{APP}/jobs", {"commits": ["a"], "base": long}, "deployer",
         "base"),
        ("PUT", f"{job}/selection", {"commits": [long]}, "approver", "commits"),
        ("POST", f"{job}/approve", {"plan": "x", "comment": long}, "approver", "comment"),
        ("POST", f"{job}/reject", {"comment": long}, "approver", "comment"),
    ]
    for method, path, body_in, token, name in calls:
        status, body = await lab.daemon.api.call(method, path, token=token, json_body=body_in)
        assert_error(status, body, 422, "invalid")
        assert repr(name) in body["error"]["message"], (path, body)
    assert (await lab.daemon.api.get(job))["state"] == "pending"
    kinds = [e["kind"] for e in await lab.daemon.events(APP)]
    assert "rollback.started" not in kinds and "app.paused" not in kinds

    exact = "p" * MAX_TEXT_CHARS
    status, body = await lab.daemon.api.call("POST", f"/api/v1/apps/{APP}/pause",
                                             token="deployer", json_body={"reason": exact})
    assert status == 200, body
    assert body["paused"]["reason"] == exact


async def test_a_diff_that_is_not_utf8_is_served_and_taken_as_bytes(lab: Lab) -> None:
    """GET .../patch serves a diff holding Latin-1 bytes exactly (it was a 500), and PUT
    takes such bytes back as the resolved patch (it was a 400)."""
    path = f"/api/v1/jobs/{lab.job}/patch"
    async with lab.daemon.session.get(lab.daemon.base + path, headers=APPROVER) as response:
        assert response.status == 200
        diff = await response.read()
    assert b"+caf\xe9 cr\xe8me\n" in diff

    async with lab.daemon.session.put(lab.daemon.base + path, data=diff,
                                      headers=APPROVER) as response:
        body = await response.json()
        assert response.status == 200, body
    assert body["resolved_patch"] is True and body["ready"] is True
    job = await lab.daemon.api.get(f"/api/v1/jobs/{lab.job}")
    assert job["plan"] == body["plan"]
    async with lab.daemon.session.get(lab.daemon.base + path, headers=APPROVER) as response:
        assert response.status == 200
        assert await response.read() == diff
