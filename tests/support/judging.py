"""Labs for the judging tests: one app on N local hosts whose health follows the live release.

`Lab` builds an origin repository, N hosts (local directories or real sshd hosts), one
`HealthServer` per host following that host's live release (healthservers.py: a commit's
`health.txt` decides how the app answers) and a daemon config whose check URL uses the
per-host `health_port` var. Tests then only commit good or bad releases and let deployd find
out by itself. Also: readers of a host's layout, and waiting for the app's events.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import waiting
from tests.support.daemonfixtures import (
    AppSpec,
    DaemonProcess,
    DaemonSpec,
    RunningDaemon,
    start_daemon,
)
from tests.support.gitrepo import OriginRepo
from tests.support.healthservers import GOOD, HealthServer, start_servers
from tests.support.waiting import matching

# Hooks append to a file in shared/ on each host, so tests can count what ran where.
HOOKS = {
    "restart": 'echo "restart $DEPLOYD_REVISION" >> "$DEPLOYD_DEPLOY_TO/shared/hooks.log"',
    "rollback": 'echo "rollback $DEPLOYD_REVISION" >> "$DEPLOYD_DEPLOY_TO/shared/hooks.log"',
}


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
    servers: list[HealthServer]
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


# -- fixtures and waiting ----------------------------------------------------------------------

APP = "shop"
MakeLab = Callable[..., Awaitable[Lab]]
Daemons = Callable[[Path], Awaitable[RunningDaemon]]
Waiter = RunningDaemon | DaemonProcess


def lab_from(root: Path, origin: OriginRepo, dirs: list[Path],
             servers: list[HealthServer], app: AppSpec, spec: DaemonSpec) -> Lab:
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
    return matching(await daemon.events(APP), kind, revision)


async def wait_event(daemon: Waiter, kind: str, revision: str | None = None, *,
                     count: int = 1, within: float = 20.0) -> dict[str, Any]:
    """Wait for the `count`-th event of `kind` about `revision` (any when None)."""
    return await waiting.wait_event(daemon, APP, kind, revision, count=count, within=within,
                                    every=0.03)


async def app_summary(daemon: Waiter) -> dict[str, Any]:
    body = await daemon.api.get("/api/v1/apps")
    (found,) = [app for app in body["apps"] if app["name"] == APP]
    return dict(found)


async def deployed_and_baked(daemon: Waiter, revision: str) -> None:
    """Wait until `revision` was deployed and baked healthy."""
    await wait_event(daemon, "deploy.succeeded", revision)
    await wait_event(daemon, "bake.healthy", revision)


async def process_with_good_live(lab: Lab, processes: Callable[[Lab], DaemonProcess]
                                 ) -> tuple[DaemonProcess, str]:
    """`deployd run` on the lab with a good release deployed and baked; that revision."""
    good = lab.commit(GOOD, "good")
    daemon = processes(lab)
    await daemon.start()
    await wait_event(daemon, "bake.healthy", good)
    return daemon, good
