"""Several `deployd run` nodes on one PostgreSQL database, as killable subprocesses.

`node_process` writes one node's config (its own state_dir, the shared database, the same
apps) and returns a `DaemonProcess` that listens where it advertises, so the other nodes can
forward actions to it. With `machine`, the node runs in a UTS namespace of its own under that
host name, as a node on another machine would (a host lock it leaves is then not one "this
machine" can judge stale by its pid). `owners` and `wait_owner` read who runs what from
`GET /api/v1/nodes`; `host_files` snapshots what a host's deploy directory holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.daemonfixtures import REPO_ROOT, AppSpec, DaemonProcess, DaemonSpec
from tests.support.postgres import Database
from tests.support.waiting import eventually

_ADVERTISE_PLACEHOLDER = 'advertise = "http://127.0.0.1:0"'


class NodeProcess(DaemonProcess):
    """A `deployd run` node; with `machine`, under that host name (its own UTS namespace)."""

    def __init__(self, name: str, config: Path, log: Path, machine: str | None = None) -> None:
        super().__init__(config, log)
        self.name = name
        self.machine = machine
        text = config.read_text().replace(_ADVERTISE_PLACEHOLDER,
                                          f'advertise = "{self.base}"')
        config.write_text(text)

    def spawn(self) -> None:
        if self.machine is None:
            super().spawn()
            return
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "daemon")}
        command = [sys.executable, "-m", "deployd.cli", "run", "--config", str(self.config)]
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.machine,
                 *command], stdout=output, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def node_process(root: Path, name: str, database: Database, apps: list[AppSpec], *,
                 failover: str, client_key: Path | None = None,
                 known_hosts: Path | None = None, machine: str | None = None,
                 settings: dict[str, Any] | None = None) -> NodeProcess:
    """One node of the cluster: config and log under `root`, not started."""
    password_file = root / "db.password"
    password_file.write_text(database.password + "\n")
    password_file.chmod(0o600)
    spec = DaemonSpec(state_dir=root / f"state-{name}", client_key=client_key,
                      known_hosts=known_hosts, apps=apps, daemon_settings={
                          "database": database.url,
                          "database_password_file": str(password_file),
                          "node": name, "failover": failover,
                          "advertise": "http://127.0.0.1:0", **(settings or {})})
    config = spec.write(root / f"{name}.toml")
    return NodeProcess(name, config, root / f"{name}.log", machine)


async def owners(node: DaemonProcess) -> dict[str, list[str]]:
    """Live node -> the apps it owns, as `node` reads them from the database."""
    body = await node.api.get("/api/v1/nodes", token="reader")
    return {entry["name"]: sorted(entry["apps"]) for entry in body["nodes"] if entry["live"]}


async def owner_of(node: DaemonProcess, app: str) -> str | None:
    for name, apps in (await owners(node)).items():
        if app in apps:
            return name
    return None


async def wait_owner(node: DaemonProcess, app: str, *, among: set[str], within: float) -> str:
    """Until a node of `among` owns `app` (as `node` sees it); that node's name."""
    seen: dict[str, list[str]] = {}

    async def owned() -> str | None:  # None: not yet
        nonlocal seen
        try:
            seen = await owners(node)
        except (aiohttp.ClientError, AssertionError):
            return None
        found = next((name for name, apps in seen.items() if app in apps), None)
        return found if found in among else None

    async def explain() -> str:
        return f"owners last seen: {seen}"

    found = await eventually(owned, within=within, every=0.05,
                             what=f"{app} owned by one of {sorted(among)}", explain=explain)
    assert found is not None
    return found


def host_files(deploy_to: Path) -> dict[str, tuple[str, int, str]]:
    """Every path under a host's deploy directory: (kind, mtime in ns, content or target);
    two snapshots differ if anything was written, renamed or removed there."""
    found: dict[str, tuple[str, int, str]] = {}
    for directory, dirs, files in os.walk(deploy_to):
        for name in [*dirs, *files]:
            path = Path(directory) / name
            stat = path.lstat()
            relative = str(path.relative_to(deploy_to))
            if path.is_symlink():
                found[relative] = ("link", stat.st_mtime_ns, os.readlink(path))
            elif path.is_dir():
                found[relative] = ("dir", stat.st_mtime_ns, "")
            else:
                found[relative] = ("file", stat.st_mtime_ns,
                                   path.read_bytes().decode(errors="replace"))
    return found
