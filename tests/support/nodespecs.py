"""Several daemons ("nodes") on one PostgreSQL database, for tests of what they share.

`node_spec` writes one node's config (its own state_dir, the shared database, the same apps and
`[[notify]]` targets as every other node); `start_node` serves it in process where it
advertises, `node_process` runs it as `deployd run` (killable with -9) advertising its own
port. `wait_owners` waits until the live nodes own what a test expects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from deployd.app import create_application
from deployd.config import load
from deployd.listener import make_runner
from tests.support.daemonfixtures import Api, AppSpec, DaemonProcess, DaemonSpec, RunningDaemon
from tests.support.gitrepo import OriginRepo
from tests.support.net import free_port
from tests.support.postgres import Database
from tests.support.waiting import eventually

FAILOVER = "2s"


def node_spec(tmp_path: Path, node: str, database: Database, apps: list[AppSpec], *,
              port: int | None = None, notify: list[dict[str, Any]] | None = None,
              ) -> DaemonSpec:
    """One node's config; with `port`, listening and advertising there (else advertising a
    loopback port nobody answers at)."""
    password_file = tmp_path / "db.password"
    password_file.write_text(database.password + "\n")
    password_file.chmod(0o600)
    where = ({"listen": f"127.0.0.1:{port}", "advertise": f"http://127.0.0.1:{port}"}
             if port is not None else {"advertise": f"http://127.0.0.1:{free_port()}"})
    return DaemonSpec(state_dir=tmp_path / f"state-{node}", apps=apps,
                      notify=list(notify or []), daemon_settings={
                          "database": database.url,
                          "database_password_file": str(password_file),
                          "node": node, "failover": FAILOVER, **where})


def local_apps(tmp_path: Path, origin: OriginRepo, names: list[str], *,
               settings: dict[str, Any] | None = None,
               webhook: dict[str, Any] | None = None) -> list[AppSpec]:
    """Apps on one local host directory each, judged in a blink."""
    return [AppSpec(name=name, repo=str(origin.path), local_dirs=[tmp_path / f"host-{name}"],
                    rollback={"grace": "0s", "bake": "200ms"}, settings=dict(settings or {}),
                    webhook=dict(webhook or {}))
            for name in names]


async def start_node(config_path: Path, port: int) -> RunningDaemon:
    """The daemon in process, on the port its config advertises."""
    config = load(config_path)
    app = create_application(config)
    runner = make_runner(app, config.daemon)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    session = aiohttp.ClientSession()
    return RunningDaemon(app=app, runner=runner, base=base, api=Api(base, session),
                         session=session)


def node_process(spec: DaemonSpec, config: Path, log: Path) -> DaemonProcess:
    """`deployd run` on the config, advertising the port it listens on."""
    process = DaemonProcess(spec.write(config), log)
    text = config.read_text()
    advertise = spec.daemon_settings["advertise"]
    config.write_text(text.replace(f'advertise = "{advertise}"',
                                   f'advertise = "{process.base}"'))
    return process


async def owners(api: Api) -> dict[str, list[str]]:
    """Live node -> the apps it owns, from GET /api/v1/nodes."""
    body = await api.get("/api/v1/nodes", token="reader")
    return {node["name"]: sorted(node["apps"]) for node in body["nodes"] if node["live"]}


async def wait_owners(api: Api, expected: dict[str, list[str]], *,
                      within: float) -> None:
    """Until the live nodes owning apps own exactly `expected`."""
    seen: dict[str, list[str]] = {}

    async def settled() -> bool:
        nonlocal seen
        seen = {name: apps for name, apps in (await owners(api)).items() if apps}
        return seen == expected

    async def explain() -> str:
        return f"last seen: {seen}"

    await eventually(settled, within=within, what=f"owners {expected}", explain=explain)
