"""`[[notify]]` end to end: the real daemon tells a real HTTP receiver, and loses nothing.

The receiver records every request and can answer 500 or 429, hang, or stop listening. Bad
deploys are real (a release whose health endpoint fails), so the rollback and rescue-job
notifications come from the daemon's own judgement.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from deployd.config import load
from deployd.errors import ConfigError
from deployd.notifications import _retry_after, _slack_text
from tests.support.healthservers import BAD, GOOD
from tests.support.judging import (
    APP,
    DaemonProcess,
    Daemons,
    Lab,
    MakeLab,
    wait_event,
)
from tests.support.net import free_port
from tests.support.waiting import wait_until

SECRET = b"notify-secret-8e2f4a6c1b3d"
URL_TOKEN = "T0001/B0002/very-secret-path-token"


@dataclass
class Received:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP endpoint that records what it is sent; `mode` says how it answers."""

    port: int = field(default_factory=free_port)
    mode: str = "ok"  # ok | fail | hang | busy (429, Retry-After: 1, then ok) | zero (503, 0)
    received: list[Received] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{URL_TOKEN}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append(Received(time.monotonic(), request.path, dict(request.headers),
                                      await request.read()))
        if self.mode == "fail":
            return web.Response(status=500)
        if self.mode == "hang":
            await asyncio.sleep(30)
        if self.mode == "busy":
            self.mode = "ok"
            return web.Response(status=429, headers={"Retry-After": "1"})
        if self.mode == "zero":
            return web.Response(status=503, headers={"Retry-After": "0"})
        return web.Response(text="ok")

    def kinds(self) -> list[str]:
        return [r.json.get("kind") or r.json.get("text", "") for r in self.received]

    async def wait_for(self, predicate: Callable[[list[Received]], bool], *,
                       within: float = 15.0, what: str = "a notification") -> None:
        await wait_until(lambda: predicate(self.received), within=within, what=what,
                         explain=lambda: f"got {self.kinds()}")


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[[], Any]]:
    made: list[Receiver] = []

    async def make() -> Receiver:
        receiver = Receiver()
        await receiver.start()
        made.append(receiver)
        return receiver

    try:
        yield make
    finally:
        for receiver in made:
            await receiver.stop()


def target(lab: Lab, name: str, receiver: Receiver, **settings: Any) -> dict[str, Any]:
    """A [[notify]] entry for `receiver`, its URL in a file and (for json) a secret."""
    url_file = lab.root / f"{name}.url"
    url_file.write_text(receiver.url + "\n")
    entry: dict[str, Any] = {"name": name, "url_file": str(url_file)}
    if settings.get("format", "json") == "json":
        secret_file = lab.root / f"{name}.secret"
        secret_file.write_bytes(SECRET)
        entry["secret_file"] = str(secret_file)
    entry.update(settings)
    return entry


def with_targets(lab: Lab, *targets: dict[str, Any]) -> Path:
    lab.spec.notify = list(targets)
    return lab.write_config()


def signed(request: Received) -> bool:
    digest = hmac.new(SECRET, request.body, hashlib.sha256).hexdigest()
    return request.headers.get("X-Deployd-Signature-256") == f"sha256={digest}"


def of_kind(kind: str) -> Callable[[list[Received]], bool]:
    return lambda received: any(r.json.get("kind") == kind for r in received)


async def bad_deploy(lab: Lab, daemon: Any) -> str:
    """A good release baked, then a bad one: deployd rolls it back and opens a job."""
    good = lab.commit(GOOD, "good")
    await wait_event(daemon, "bake.healthy", good)
    bad = lab.commit(BAD, "fix the tax rounding\n\nRescue: yes\n")
    await wait_event(daemon, "job.opened")
    return bad


async def test_a_bad_deploy_tells_both_targets_signed_with_the_approve_call(
        make_lab: MakeLab, daemons: Daemons, receivers: Callable[[], Any]) -> None:
    """Rollback and pending job reach a signed JSON target and a Slack target within seconds."""
    lab = await make_lab(1)
    hook, slack = await receivers(), await receivers()
    config = with_targets(lab, target(lab, "hook", hook, remind="0"),
                          target(lab, "slack", slack, format="slack", remind="0"))
    daemon = await daemons(config)
    bad = await bad_deploy(lab, daemon)
    await hook.wait_for(of_kind("job.opened"), what="job.opened")
    kinds = hook.kinds()
    for kind in ("bake.failed", "rollback.started", "rollback.succeeded", "job.opened"):
        assert kind in kinds, kinds
    assert "deploy.succeeded" not in kinds  # not in the default events
    assert all(signed(r) for r in hook.received)
    assert all(r.headers["X-Deployd-Delivery"] == r.json["id"] for r in hook.received)
    assert len({r.json["id"] for r in hook.received}) == len(hook.received)
    assert all(r.path == f"/{URL_TOKEN}" for r in hook.received)
    failed = next(r.json for r in hook.received if r.json["kind"] == "bake.failed")
    assert failed["app"] == APP and failed["revision"] == bad and failed["actor"] == "deployd"

    job = (await daemon.api.get("/api/v1/jobs?state=pending"))["jobs"][0]
    await slack.wait_for(lambda got: any("job.opened" in r.json["text"] for r in got),
                         what="the Slack job message")
    text = next(r.json["text"] for r in slack.received if "job.opened" in r.json["text"])
    assert f"*{APP}*" in text
    assert f"/api/v1/jobs/{job['id']}/approve" in text and job["plan"] in text
    assert "X-Deployd-Signature-256" not in slack.received[0].headers


async def test_reminders_repeat_while_the_job_waits_and_stop_when_it_is_decided(
        make_lab: MakeLab, daemons: Daemons, receivers: Callable[[], Any]) -> None:
    """job.pending comes again every `remind` until a human rejects the job."""
    lab = await make_lab(1)
    hook = await receivers()
    daemon = await daemons(with_targets(lab, target(lab, "hook", hook, remind="1s",
                                                    events=["job.*"])))
    await bad_deploy(lab, daemon)

    def reminders(got: list[Received]) -> list[Received]:
        return [r for r in got if r.json["kind"] == "job.pending"]

    await hook.wait_for(lambda got: len(reminders(got)) >= 2, within=20, what="2 reminders")
    first, second = reminders(hook.received)[:2]
    assert second.at - first.at >= 0.9  # one `remind` apart, not a burst
    assert first.json["data"]["reminder"] is True and "still waiting" in first.json["message"]
    job = (await daemon.api.get("/api/v1/jobs?state=pending"))["jobs"][0]
    status, _ = await daemon.api.call("POST", f"/api/v1/jobs/{job['id']}/reject",
                                      json_body={"comment": "not this one"})
    assert status == 200
    await hook.wait_for(of_kind("job.rejected"), what="job.rejected")
    count = len(reminders(hook.received))
    await asyncio.sleep(2.5)
    assert len(reminders(hook.received)) == count


async def test_receiver_down_and_daemon_killed_meanwhile_loses_nothing(
        make_lab: MakeLab, processes: Callable[[Lab], DaemonProcess],
        receivers: Callable[[], Any]) -> None:
    """Queued while the receiver is down, kill -9, restart: each event arrives, one id each."""
    lab = await make_lab(1)
    hook = await receivers()
    await hook.stop()
    with_targets(lab, target(lab, "hook", hook, events=["app.*"]))
    daemon = processes(lab)
    await daemon.start()
    for reason in ("one", "two", "three"):
        assert (await daemon.api.call("POST", f"/api/v1/apps/{APP}/pause",
                                      json_body={"reason": reason}))[0] == 200
        assert (await daemon.api.call("POST", f"/api/v1/apps/{APP}/resume"))[0] == 200
    await asyncio.sleep(1.0)  # a few failed attempts
    daemon.kill9()
    await hook.start()
    await daemon.start()
    await hook.wait_for(lambda got: len({r.json["event"] for r in got}) >= 6,
                        what="all six pause/resume notifications")
    ids_by_event: dict[int, set[str]] = {}
    for request in hook.received:
        ids_by_event.setdefault(request.json["event"], set()).add(request.json["id"])
    assert all(len(ids) == 1 for ids in ids_by_event.values()), ids_by_event
    messages = [r.json["message"] for r in hook.received if r.json["kind"] == "app.paused"]
    assert [m.rsplit(": ", 1)[-1] for m in dict.fromkeys(messages)] == ["one", "two", "three"]


async def test_a_hanging_receiver_does_not_slow_a_rollback(
        make_lab: MakeLab, daemons: Daemons, receivers: Callable[[], Any]) -> None:
    """Every request to the receiver hangs; the rollback still follows the verdict at once."""
    lab = await make_lab(1)
    hook = await receivers()
    hook.mode = "hang"
    daemon = await daemons(with_targets(lab, target(lab, "hook", hook, timeout="20s",
                                                    events=["*"])))
    await bad_deploy(lab, daemon)
    events = await daemon.events(APP)
    failed = next(e for e in events if e["kind"] == "bake.failed")
    rolled = next(e for e in events if e["kind"] == "rollback.succeeded")
    took = _seconds(rolled["at"]) - _seconds(failed["at"])
    assert took < 5, f"rollback took {took:.1f}s after the verdict"
    assert hook.received  # it was being told, and hung


async def test_a_failing_target_gives_up_and_the_others_are_told(
        make_lab: MakeLab, daemons: Daemons, receivers: Callable[[], Any]) -> None:
    """500s until give_up_after: the delivery fails once, other targets get notify.failing."""
    lab = await make_lab(1)
    broken, other = await receivers(), await receivers()
    broken.mode = "fail"
    daemon = await daemons(with_targets(
        lab, target(lab, "broken", broken, give_up_after="1500ms", events=["app.*", "notify.*"]),
        target(lab, "other", other, events=["notify.*"])))
    await daemon.api.call("POST", f"/api/v1/apps/{APP}/pause", json_body={"reason": "x"})
    await other.wait_for(of_kind("notify.failing"), what="notify.failing")
    told = next(r.json for r in other.received if r.json["kind"] == "notify.failing")
    assert told["data"]["target"] == "broken"
    assert URL_TOKEN not in json.dumps(told)
    assert len(broken.received) >= 2  # retried before giving up
    assert all(r.json["kind"] != "notify.failing" for r in broken.received)
    registry = daemon.daemon.metrics.registry
    assert registry.get_sample_value("deployd_notifications_total",
                                     {"target": "broken", "result": "failed"}) == 1


async def test_retry_after_is_respected(
        make_lab: MakeLab, daemons: Daemons, receivers: Callable[[], Any]) -> None:
    """A 429 with Retry-After: 1 is retried a second later, with the same delivery id."""
    lab = await make_lab(1)
    hook = await receivers()
    hook.mode = "busy"
    daemon = await daemons(with_targets(lab, target(lab, "hook", hook, events=["app.*"])))
    await daemon.api.call("POST", f"/api/v1/apps/{APP}/pause", json_body={"reason": "x"})
    await hook.wait_for(lambda got: len(got) >= 2, what="the retry")
    first, second = hook.received[:2]
    assert second.at - first.at >= 0.9
    assert first.json["id"] == second.json["id"] and first.body == second.body


async def test_retry_after_zero_is_not_a_busy_loop(
        make_lab: MakeLab, daemons: Daemons, receivers: Callable[[], Any]) -> None:
    """503 with Retry-After: 0 forever: retries still back off (a handful in 2 s, not
    hundreds)."""
    lab = await make_lab(1)
    hook = await receivers()
    hook.mode = "zero"
    daemon = await daemons(with_targets(lab, target(lab, "hook", hook, events=["app.*"])))
    await daemon.api.call("POST", f"/api/v1/apps/{APP}/pause", json_body={"reason": "x"})
    await hook.wait_for(lambda got: len(got) >= 1, what="the first attempt")
    await asyncio.sleep(2.0)
    assert 2 <= len(hook.received) <= 5


def test_odd_retry_after_values_and_slack_markup_are_harmless() -> None:
    """Retry-After digits only (a superscript two once crashed every delivery round); text
    in Slack messages cannot become links or mentions."""
    assert _retry_after("²", 0.0) is None and _retry_after("", 0.0) is None
    assert _retry_after("7", 0.0) == 7.0 and _retry_after("99999", 0.0) == 300.0
    text = _slack_text({"app": "shop", "kind": "deploy.failed", "actor": "<!here>",
                        "message": "<!channel> <https://evil.example|Approve job 1> & co",
                        "revision": None})
    assert "<" not in text and ">" not in text and "&amp; co" in text


async def test_no_url_or_secret_reaches_a_log_line_or_an_event(
        make_lab: MakeLab, daemons: Daemons, receivers: Callable[[], Any],
        caplog: pytest.LogCaptureFixture) -> None:
    """A target that cannot be reached is logged and retried by name only."""
    caplog.set_level(logging.DEBUG)
    lab = await make_lab(1)
    hook = await receivers()
    await hook.stop()
    daemon = await daemons(with_targets(lab, target(lab, "hook", hook, give_up_after="1s",
                                                    events=["app.*"])))
    await daemon.api.call("POST", f"/api/v1/apps/{APP}/pause", json_body={"reason": "x"})
    await wait_event(daemon, "notify.failing")
    text = caplog.text + json.dumps(await daemon.events(APP))
    assert "notifications to hook" in caplog.text
    assert URL_TOKEN not in text and SECRET.decode() not in text


def _seconds(iso: str) -> float:
    return time.mktime(time.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S")) + float(iso[19:-1] or 0)


# -- config -------------------------------------------------------------------------------------

BASE = """\
[daemon]
state_dir = "state"

[apps.shop]
repo = "/srv/repo.git"
deploy_to = "/srv/shop"

[[apps.shop.hosts]]
address = "local"
allow_local_as_daemon = true
"""


def problems(tmp_path: Path, notify: str) -> list[str]:
    path = tmp_path / "deployd.toml"
    path.write_text(BASE + notify)
    with pytest.raises(ConfigError) as caught:
        load(path)
    return caught.value.problems


def test_notify_config_problems_are_named_without_the_url(tmp_path: Path) -> None:
    """Each mistake is named with its key path; a malformed URL is not echoed back."""
    (tmp_path / "short.secret").write_text("short")
    found = problems(tmp_path, f"""
[[notify]]
name = "a"
url = "ftp://{URL_TOKEN}"

[[notify]]
name = "b"
url = "https://example.com/x"
url_file = "b.url"

[[notify]]
name = "c"
url = "https://example.com/x"
apps = ["nope"]
secret_file = "short.secret"
format = "xml"
""")
    assert sorted(found) == sorted([
        "notify[0].url: expected an http:// or https:// URL",
        "notify[1]: set exactly one of url or url_file",
        "notify[2].apps: no app named 'nope'",
        f"notify[2].secret_file: {tmp_path}/short.secret holds 5 bytes; a secret needs 16 "
        "or more",
        "notify[2].format: expected one of 'json', 'slack', got 'xml'",
    ])
    assert URL_TOKEN not in "\n".join(found)


def test_notify_target_filters_by_glob_and_app(tmp_path: Path) -> None:
    (tmp_path / "deployd.toml").write_text(BASE + """
[[notify]]
name = "a"
url = "https://example.com/x"
events = ["rollback.*", "job.pending"]
apps = ["shop"]
""")
    [notify] = load(tmp_path / "deployd.toml").notify
    assert notify.wants("shop", "rollback.succeeded") and notify.wants("shop", "job.pending")
    assert not notify.wants("shop", "deploy.succeeded")
    assert not notify.wants("blog", "rollback.succeeded")
    assert "example.com" not in repr(notify)
