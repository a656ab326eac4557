"""Helpers for the judging tests: apps whose health follows the live release, and readers.

`ReleaseHealthServer` is a `HealthServer` that, in "follow" mode, answers like the app that
`<deploy_to>/current` points at: the release's `health.txt` says `ok` (200), `fail-after N`
(200 for N seconds after that release went live on this host, then 500), `fail-for N` (500
for N seconds, then 200: an app warming up) or anything else (500). Tests then only commit
good or bad releases and let deployd find out by itself; the server's other modes
(`.fail(500)`, `.ok()`, `await .refuse()`) still override it until `.resume_following()`.

`DaemonProcess` runs `deployd run` as a real subprocess, for `kill -9`.

`Lab` builds an origin repository, N hosts (local directories or real sshd hosts), one health
server per host and a daemon config whose check URL uses the per-host `health_port` var.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.daemonfixtures import (
    AppSpec,
    DaemonProcess,
    DaemonSpec,
    RunningDaemon,
    start_daemon,
)
from tests.gitrepo import OriginRepo
from tests.healthservers import HealthServer

GOOD = "ok\n"
BAD = "broken: cannot reach the database\n"

# Hooks append to a file in shared/ on each host, so tests can count what ran where.
HOOKS = {
    "restart": 'echo "restart $DEPLOYD_REVISION" >> "$DEPLOYD_DEPLOY_TO/shared/hooks.log"',
    "rollback": 'echo "rollback $DEPLOYD_REVISION" >> "$DEPLOYD_DEPLOY_TO/shared/hooks.log"',
}


def fail_after(seconds: float) -> str:
    """health.txt content for an app that goes bad `seconds` after it went live."""
    return f"fail-after {seconds:g}\n"


def fail_for(seconds: float) -> str:
    """health.txt content for an app that fails for `seconds` after it went live, then is ok."""
    return f"fail-for {seconds:g}\n"


class ReleaseHealthServer(HealthServer):
    """A health endpoint that, in follow mode, answers as the live release says."""

    def __init__(self) -> None:
        super().__init__()
        self.deploy_to: Path | None = None

    def follow(self, deploy_to: Path) -> None:
        """Answer from `<deploy_to>/current/health.txt` from now on."""
        self.deploy_to = deploy_to
        self.mode = "follow"

    def resume_following(self) -> None:
        """Go back to answering as the live release says."""
        assert self.deploy_to is not None
        self.mode = "follow"

    async def restore(self) -> None:
        """Listen again on the same port; keep following if we were."""
        following = self.mode == "follow"
        await super().restore()
        if following:
            self.mode = "follow"

    def _verdict(self) -> tuple[int, str]:
        assert self.deploy_to is not None
        current = self.deploy_to / "current"
        try:
            # The symlink's own mtime is the moment `current` was switched: the app's clock
            # starts then, whether or not anyone asked it anything since.
            went_live = current.lstat().st_mtime
            text = (current / "health.txt").read_text()
        except OSError:
            return 503, "no release live"
        if text.startswith("ok"):
            return 200, "ok"
        if text.startswith(("fail-after ", "fail-for ")):
            word, seconds = text.split()[:2]
            early = time.time() - went_live < float(seconds)
            if early == (word == "fail-after"):
                return 200, "ok"
        return 500, text.strip()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.mode != "follow":
            return await super()._handle(request)
        status, body = self._verdict()
        return web.Response(status=status, text=body)


async def start_servers(count: int) -> list[ReleaseHealthServer]:
    servers = [ReleaseHealthServer() for _ in range(count)]
    for server in servers:
        await server.start()
    return servers


def http_check(**overrides: Any) -> dict[str, Any]:
    """A fast HTTP check on each host's health server (`health_port` var)."""
    check: dict[str, Any] = {"name": "http", "url": "http://127.0.0.1:{health_port}/healthz",
                             "expect_status": [200], "timeout": "500ms",
                             "interval": "100ms", "failures": 2, "successes": 1}
    check.update(overrides)
    return check


@dataclass
class Lab:
    """An origin, hosts, health servers and the spec of a daemon config for one app."""

    root: Path
    origin: OriginRepo
    deploy_dirs: list[Path]
    servers: list[ReleaseHealthServer]
    spec: DaemonSpec
    app: AppSpec
    config: Path = field(default_factory=Path)

    @property
    def name(self) -> str:
        return self.app.name

    def commit(self, health: str, message: str, **files: str) -> str:
        """A commit on production whose health.txt is `health`."""
        return self.origin.commit({"health.txt": health, **files}, message)

    def write_config(self) -> Path:
        self.config = self.spec.write(self.root / "deployd.toml")
        return self.config

    def follow(self) -> None:
        for server, deploy_to in zip(self.servers, self.deploy_dirs, strict=True):
            server.follow(deploy_to)

    async def stop_servers(self) -> None:
        for server in self.servers:
            await server.stop()


def current_revision(deploy_to: Path) -> str | None:
    try:
        return (deploy_to / "current" / "REVISION").read_text().strip()
    except OSError:
        return None


def current_release(deploy_to: Path) -> str | None:
    try:
        return os.readlink(deploy_to / "current").rstrip("/").rsplit("/", 1)[-1]
    except OSError:
        return None


def revisions_log(deploy_to: Path) -> list[str]:
    try:
        return (deploy_to / "revisions.log").read_text().splitlines()
    except OSError:
        return []


def hooks_log(deploy_to: Path) -> list[str]:
    try:
        return (deploy_to / "shared" / "hooks.log").read_text().splitlines()
    except OSError:
        return []


def kinds(events: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [event for event in events if event["kind"] == kind]


async def scrape(daemon: RunningDaemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics parsed with prometheus_client: (sample name, labels) -> value."""
    status, text = await daemon.api.call("GET", "/metrics", token=None)
    assert status == 200, (status, text)
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return {key[1]: value for key, value in samples.items()
            if key[0] == name and want <= set(key[1])}




# -- fixtures and waiting ----------------------------------------------------------------------

APP = "shop"
MakeLab = Callable[..., Awaitable[Lab]]
Daemons = Callable[[Path], Awaitable[RunningDaemon]]
Waiter = RunningDaemon | DaemonProcess


def lab_from(root: Path, origin: OriginRepo, dirs: list[Path],
             servers: list[ReleaseHealthServer], app: AppSpec, spec: DaemonSpec) -> Lab:
    """A Lab of these parts, its config written and its servers following the releases."""
    lab = Lab(root=root, origin=origin, deploy_dirs=dirs, servers=servers, spec=spec, app=app)
    lab.write_config()
    lab.follow()
    return lab


@contextlib.asynccontextmanager
async def lab_maker(tmp_path: Path) -> AsyncIterator[MakeLab]:
    """Build Labs: one app on N local hosts, each its own directory and health server."""
    labs: list[Lab] = []

    async def make(hosts: int = 1, *, rollback: dict[str, Any] | None = None,
                   checks: list[dict[str, Any]] | None = None,
                   hooks: dict[str, str] | None = None,
                   settings: dict[str, Any] | None = None) -> Lab:
        root = tmp_path / f"lab{len(labs)}"
        root.mkdir()
        origin = OriginRepo(root / "origin.git")
        dirs = [root / f"host{i}" for i in range(hosts)]
        servers = await start_servers(hosts)
        app = AppSpec(
            name=APP, repo=origin.url, local_dirs=dirs,
            hooks=dict(HOOKS if hooks is None else hooks),
            checks=checks if checks is not None else [http_check()],
            rollback={"grace": "300ms", "bake": "1200ms", "unhealthy_hosts": "1",
                      **(rollback or {})},
            host_vars=[{"health_port": server.port} for server in servers],
            settings=dict(settings or {}),
        )
        lab = lab_from(root, origin, dirs, servers, app,
                       DaemonSpec(state_dir=root / "state", apps=[app]))
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            await lab.stop_servers()


@contextlib.asynccontextmanager
async def daemon_starter() -> AsyncIterator[Daemons]:
    """Start in-process daemons from config files; all stop at the end."""
    running: list[RunningDaemon] = []

    async def start(config: Path) -> RunningDaemon:
        daemon = await start_daemon(config)
        running.append(daemon)
        return daemon

    try:
        yield start
    finally:
        for daemon in running:
            await daemon.stop()


@contextlib.asynccontextmanager
async def process_starter() -> AsyncIterator[Callable[[Lab], DaemonProcess]]:
    """Real `deployd run` subprocesses for Labs; each is stopped at the end."""
    made: list[DaemonProcess] = []

    def make(lab: Lab) -> DaemonProcess:
        process = DaemonProcess(lab.config, lab.root / "deployd.log")
        made.append(process)
        return process

    try:
        yield make
    finally:
        for process in made:
            await process.close()


async def events_of(daemon: Waiter, kind: str, revision: str | None = None
                    ) -> list[dict[str, Any]]:
    """The app's events of `kind` (about `revision`, if given)."""
    found = kinds(await daemon.events(APP), kind)
    return [e for e in found if revision is None or e["revision"] == revision]


async def wait_event(daemon: Waiter, kind: str, revision: str | None = None, *,
                     count: int = 1, within: float = 20.0) -> dict[str, Any]:
    """Wait for the `count`-th event of `kind` about `revision` (any when None)."""
    deadline = time.monotonic() + within
    while True:
        found = await events_of(daemon, kind, revision)
        if len(found) >= count:
            return found[count - 1]
        if time.monotonic() > deadline:
            timeline = [f"{e['kind']}: {e['message']}" for e in await daemon.events(APP)]
            raise AssertionError(f"no {kind} ({revision}) after {within}s: {timeline}")
        await asyncio.sleep(0.03)


async def app_summary(daemon: Waiter) -> dict[str, Any]:
    body = await daemon.api.get("/api/v1/apps")
    (found,) = [app for app in body["apps"] if app["name"] == APP]
    return dict(found)


async def deployed_and_baked(daemon: Waiter, revision: str) -> None:
    """Wait until `revision` was deployed and baked healthy."""
    await wait_event(daemon, "deploy.succeeded", revision)
    await wait_event(daemon, "bake.healthy", revision)
