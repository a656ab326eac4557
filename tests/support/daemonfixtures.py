"""Run the real daemon (REST server, supervisors, store) against real hosts in a test.

`DaemonSpec` writes a real TOML config, `start_daemon` serves it on 127.0.0.1 with the
daemon's own aiohttp application, and `Api` talks to it over HTTP with bearer tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from deployd.app import DAEMON, Daemon, create_application
from deployd.config import load
from deployd.listener import make_runner
from tests.support.net import free_port
from tests.support.processes import stop_process
from tests.support.sshd import SshdHost
from tests.support.waiting import eventually, wait_event

TOKENS = {
    "reader": ("read-secret-0123456789", ["read"]),
    "deployer": ("deploy-secret-0123456789", ["read", "deploy"]),
    "approver": ("approve-secret-0123456789", ["read", "approve"]),
    "admin": ("admin-secret-0123456789", ["read", "deploy", "approve"]),
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def table(name: str, values: dict[str, Any], *, array: bool = False) -> str:
    header = f"[[{name}]]" if array else f"[{name}]"
    return header + "\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()) + "\n"


@dataclass
class AppSpec:
    """One app of the test config; hosts are real sshd hosts or 'local' directories."""

    name: str
    repo: str
    sshd_hosts: list[SshdHost] = field(default_factory=list)
    local_dirs: list[Path] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    hooks: dict[str, str] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    rollback: dict[str, Any] = field(default_factory=dict)
    rescue: dict[str, Any] = field(default_factory=dict)
    host_vars: list[dict[str, Any]] = field(default_factory=list)
    webhook: dict[str, Any] = field(default_factory=dict)
    # Who runs commands on the local hosts; None: deployd itself (allow_local_as_daemon).
    local_run_as: str | None = None


@dataclass
class DaemonSpec:
    """Everything needed to write a config file for the daemon under test."""

    state_dir: Path
    client_key: Path | None = None
    known_hosts: Path | None = None
    apps: list[AppSpec] = field(default_factory=list)
    notify: list[dict[str, Any]] = field(default_factory=list)
    daemon_settings: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        parts = [table("daemon", {"state_dir": str(self.state_dir),
                                  "listen": "127.0.0.1:0", "shutdown_grace": "10s",
                                  **self.daemon_settings})]
        for name, (secret, roles) in TOKENS.items():
            parts.append(table("tokens", {
                "name": name, "token_sha256": hashlib.sha256(secret.encode()).hexdigest(),
                "roles": roles}, array=True))
        for app in self.apps:
            parts.append(self._render_app(app))
        for target in self.notify:
            parts.append(table("notify", target, array=True))
        return "".join(parts)

    def _render_app(self, app: AppSpec) -> str:
        values: dict[str, Any] = {"repo": app.repo, "branch": "production",
                                  "poll_interval": "200ms", "deploy_to": "/nonexistent"}
        values.update(app.settings)
        out = table(f"apps.{app.name}", values)
        if app.sshd_hosts:
            assert self.client_key is not None and self.known_hosts is not None
            out += table(f"apps.{app.name}.ssh", {
                "user": app.sshd_hosts[0].user, "key": str(self.client_key),
                "known_hosts": str(self.known_hosts), "connect_timeout": "3s"})
        if app.hooks:
            out += table(f"apps.{app.name}.hooks", app.hooks)
        hosts = [{"address": h.address, "port": h.port, "deploy_to": str(h.home / "app")}
                 for h in app.sshd_hosts]
        identity: dict[str, Any] = ({"run_as": app.local_run_as} if app.local_run_as
                                    else {"allow_local_as_daemon": True})
        hosts += [{"address": "local", "deploy_to": str(d), **identity} for d in app.local_dirs]
        for index, host in enumerate(hosts):
            if index < len(app.host_vars):
                host["vars"] = app.host_vars[index]
            out += table(f"apps.{app.name}.hosts", host, array=True)
        for check in app.checks:
            out += table(f"apps.{app.name}.checks", check, array=True)
        if app.rollback:
            out += table(f"apps.{app.name}.rollback", app.rollback)
        if app.rescue:
            out += table(f"apps.{app.name}.rescue", app.rescue)
        if app.webhook:
            out += table(f"apps.{app.name}.webhook", app.webhook)
        return out

    def write(self, path: Path) -> Path:
        path.write_text(self.render())
        return path


# Rollback settings that judge a deploy in a blink: no grace, a 200 ms bake.
QUICK_BAKE = {"grace": "0s", "bake": "200ms"}


def one_local_app(tmp_path: Path, repo: str | Path, *, name: str = "shop",
                  rollback: dict[str, Any] | None = None,
                  settings: dict[str, Any] | None = None,
                  daemon_settings: dict[str, Any] | None = None) -> DaemonSpec:
    """A config for one app on one local host (`tmp_path/host`), state in `tmp_path/state`."""
    app = AppSpec(name=name, repo=str(repo), local_dirs=[tmp_path / "host"],
                  rollback=dict(rollback or {}), settings=dict(settings or {}))
    return DaemonSpec(state_dir=tmp_path / "state", apps=[app],
                      daemon_settings=dict(daemon_settings or {}))


class Api:
    """An HTTP client for the daemon under test, one bearer token at a time."""

    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base = base
        self.session = session

    async def call(self, method: str, path: str, *, token: str | None = "admin",
                   json_body: Any = None, data: bytes | str | None = None,
                   ) -> tuple[int, Any]:
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {TOKENS[token][0] if token in TOKENS else token}"
        kwargs: dict[str, Any] = {"headers": headers}
        if json_body is not None:
            kwargs["json"] = json_body
        if data is not None:
            kwargs["data"] = data
        async with self.session.request(method, self.base + path, **kwargs) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text

    async def get(self, path: str, **kwargs: Any) -> Any:
        status, body = await self.call("GET", path, **kwargs)
        assert status == 200, (status, body)
        return body


@dataclass
class RunningDaemon:
    app: web.Application
    runner: web.AppRunner
    base: str
    api: Api
    session: aiohttp.ClientSession

    @property
    def daemon(self) -> Daemon:
        return self.app[DAEMON]

    async def stop(self) -> None:
        await self.session.close()
        await self.runner.cleanup()

    async def events(self, app: str) -> list[dict[str, Any]]:
        body = await self.api.get(f"/api/v1/apps/{app}/events")
        return list(body["events"])

    async def wait_for_event(self, app: str, kind: str, *, timeout: float = 20.0,
                             count: int = 1) -> dict[str, Any]:
        """Wait until the app's timeline holds `count` events of `kind`; return the last."""
        return await wait_event(self, app, kind, count=count, within=timeout)

    async def wait_until(self, predicate: Callable[[], Awaitable[bool]], *,
                         timeout: float = 20.0, what: str = "condition") -> None:
        await eventually(predicate, within=timeout, what=what)


async def start_daemon(config_path: Path) -> RunningDaemon:
    """Start the daemon from a config file on a free 127.0.0.1 port."""
    config = load(config_path)
    app = create_application(config)
    runner = make_runner(app, config.daemon)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    session = aiohttp.ClientSession()
    return RunningDaemon(app=app, runner=runner, base=base, api=Api(base, session),
                         session=session)


REPO_ROOT = Path(__file__).resolve().parents[2]


class DaemonProcess:
    """`python3 -m deployd.cli run --config FILE` as a real subprocess, killable with -9."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.port = free_port()
        text = config.read_text().replace('listen = "127.0.0.1:0"',
                                          f'listen = "127.0.0.1:{self.port}"')
        config.write_text(text)
        self.base = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.api = Api(self.base, None)  # type: ignore[arg-type]

    def spawn(self) -> None:
        """Start `deployd run` (without waiting for it)."""
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "daemon")}
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "deployd.cli", "run", "--config", str(self.config)],
                stdout=output, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)

    async def start(self, wait: float = 30.0) -> None:
        """Start the daemon and wait until /readyz says ready."""
        self.spawn()
        assert self.process is not None
        if self.session is None:
            self.session = aiohttp.ClientSession()
            self.api = Api(self.base, self.session)
        async def log_tail() -> str:
            return self.log.read_text()[-3000:]

        await eventually(self._ready, within=wait, what="deployd ready", explain=log_tail)

    async def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"deployd exited: {self.log.read_text()[-3000:]}")
        try:
            status, _ = await self.api.call("GET", "/readyz", token=None)
        except aiohttp.ClientError:
            return False
        return bool(status == 200)

    def kill9(self) -> None:
        """SIGKILL the daemon, as a crash would."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process = None

    async def close(self) -> None:
        if self.process is not None:
            await asyncio.to_thread(stop_process, self.process, 15)
            self.process = None
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def events(self, app: str) -> list[dict[str, Any]]:
        body = await self.api.get(f"/api/v1/apps/{app}/events")
        return list(body["events"])

    async def wait_for_event(self, app: str, kind: str, *, within: float = 20.0,
                             count: int = 1, revision: str | None = None) -> dict[str, Any]:
        """Wait for the `count`-th event of `kind` (about `revision`, if given)."""
        return await wait_event(self, app, kind, revision, count=count, within=within,
                                every=0.02)
