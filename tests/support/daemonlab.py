"""End-to-end set-ups for the daemon tests: an origin repo, real sshd hosts, a config, the daemon.

`daemon_lab` gives a factory that makes one app's world (origin repo owned by root, n sshd
hosts, a TOML config written by DaemonSpec) and starts the real daemon on it; every daemon it
started is stopped after the test. Helpers read each host's Capistrano layout from disk.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemonfixtures import AppSpec, DaemonSpec, RunningDaemon, start_daemon
from tests.support.gitrepo import OriginRepo
from tests.support.sshd import ClientKey, SshdHost, chown_tree, write_known_hosts

APP = "shop"
RELEASE = re.compile(r"^[0-9]{14}$")
FAST_ROLLBACK = {"grace": "0s", "bake": "200ms"}


def app_dir(host: SshdHost) -> Path:
    """deploy_to of the app on this host (as DaemonSpec writes it)."""
    return host.home / "app"


def current_link(host: SshdHost) -> str | None:
    """The raw target of deploy_to/current, or None if there is none."""
    link = app_dir(host) / "current"
    return os.readlink(link) if link.is_symlink() else None


def current_release(host: SshdHost) -> str | None:
    """The release name current points at."""
    target = current_link(host)
    return target.rstrip("/").rsplit("/", 1)[-1] if target else None


def releases(host: SshdHost) -> list[str]:
    """Release directory names on the host, oldest first."""
    path = app_dir(host) / "releases"
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def revision_of(host: SshdHost, release: str) -> str:
    return (app_dir(host) / "releases" / release / "REVISION").read_text().strip()


def revisions_log(host: SshdHost) -> list[str]:
    path = app_dir(host) / "revisions.log"
    return path.read_text().splitlines() if path.exists() else []


def host_label(host: SshdHost) -> str:
    """The host's name in events and REST (address:port)."""
    return f"{host.address}:{host.port}"


@dataclass
class World:
    """One app's world: origin, hosts, the config and the daemon(s) started on it."""

    origin: OriginRepo
    hosts: list[SshdHost]
    spec: DaemonSpec
    app: AppSpec
    config: Path
    started: list[RunningDaemon] = field(default_factory=list)

    def write(self) -> Path:
        return self.spec.write(self.config)

    async def start(self) -> RunningDaemon:
        self.write()
        daemon = await start_daemon(self.config)
        self.started.append(daemon)
        return daemon

    async def restart(self, daemon: RunningDaemon) -> RunningDaemon:
        await daemon.stop()
        self.started.remove(daemon)
        return await self.start()


WorldFactory = Callable[..., World]


@pytest.fixture
async def daemon_lab(tmp_path: Path, client_key: ClientKey,
                     sshd_factory: Callable[[], SshdHost]) -> AsyncIterator[WorldFactory]:
    """make(hosts=2, settings=..., hooks=..., host_vars=..., rollback=...) -> World."""
    worlds: list[World] = []

    def make(hosts: int = 2, *, settings: dict[str, Any] | None = None,
             hooks: dict[str, str] | None = None,
             host_vars: list[dict[str, Any]] | None = None,
             rollback: dict[str, Any] | None = None) -> World:
        index = len(worlds)
        origin = OriginRepo(tmp_path / f"origin{index}.git")  # root-owned, as libgit2 wants
        sshd_hosts = [sshd_factory() for _ in range(hosts)]
        known = write_known_hosts(tmp_path / f"known_hosts{index}", sshd_hosts)
        app = AppSpec(name=APP, repo=origin.url, sshd_hosts=sshd_hosts,
                      settings=dict(settings or {}), hooks=dict(hooks or {}),
                      host_vars=list(host_vars or []),
                      rollback=dict(FAST_ROLLBACK if rollback is None else rollback))
        spec = DaemonSpec(state_dir=tmp_path / f"state{index}", client_key=client_key.private,
                          known_hosts=known, apps=[app])
        world = World(origin=origin, hosts=sshd_hosts, spec=spec, app=app,
                      config=tmp_path / f"deployd{index}.toml")
        worlds.append(world)
        return world

    yield make
    for world in worlds:
        for daemon in world.started:
            await daemon.stop()


def lay_out_capistrano_release(host: SshdHost, release: str, revision: str,
                               files: dict[str, str], *, branch: str = "production",
                               user: str = "capistrano") -> None:
    """Make releases/<release> the way Capistrano does, point current at it (absolute
    symlink, renamed over the old one) and append its revisions.log line."""
    root = app_dir(host)
    path = root / "releases" / release
    path.mkdir(parents=True)
    (root / "shared").mkdir(exist_ok=True)
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(content)
    (path / "REVISION").write_text(revision + "\n")
    (path / "REVISION_TIME").write_text("1700000000\n")
    tmp = root / f"current_{release}"
    tmp.symlink_to(path)
    tmp.rename(root / "current")
    with (root / "revisions.log").open("a") as log:
        log.write(f"Branch {branch} (at {revision}) deployed as release {release} by {user}\n")
    chown_tree(root)
