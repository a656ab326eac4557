"""Config reload (SIGHUP): apps come and go, history stays, a broken file changes nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from deployd.app import reload_config
from tests.support.daemonfixtures import AppSpec, DaemonSpec, RunningDaemon, start_daemon
from tests.support.gitrepo import OriginRepo
from tests.support.net import free_port, wait_http
from tests.support.waiting import wait_until_blocking


def two_app_spec(tmp_path: Path) -> tuple[DaemonSpec, OriginRepo]:
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "v1")
    apps = [AppSpec(name=name, repo=origin.url, local_dirs=[tmp_path / f"{name}-host"],
                    rollback={"grace": "0s", "bake": "100ms"})
            for name in ("shop", "blog")]
    return DaemonSpec(state_dir=tmp_path / "state", apps=apps), origin


async def names(daemon: RunningDaemon) -> list[str]:
    body = await daemon.api.get("/api/v1/apps")
    return [app["name"] for app in body["apps"]]


async def test_reload_adds_removes_and_changes_apps_keeping_history(tmp_path: Path) -> None:
    """A reload starts new apps, stops removed ones and keeps the store's history."""
    spec, origin = two_app_spec(tmp_path)
    config = spec.write(tmp_path / "deployd.toml")
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for_event("shop", "deploy.succeeded")
        await daemon.wait_for_event("blog", "deploy.succeeded")
        shop_events = len(await daemon.events("shop"))

        spec.apps = [spec.apps[0]]
        spec.apps[0].settings["keep_releases"] = 3
        spec.apps.append(AppSpec(name="docs", repo=origin.url,
                                 local_dirs=[tmp_path / "docs-host"]))
        spec.write(config)
        assert await reload_config(daemon.daemon) is True

        assert sorted(await names(daemon)) == ["docs", "shop"]
        assert daemon.daemon.supervisors["shop"].app.keep_releases == 3
        await daemon.wait_for_event("docs", "deploy.succeeded")
        # The changed app kept its history and did not redeploy what is live.
        await asyncio.sleep(0.5)
        events = await daemon.events("shop")
        assert len(events) >= shop_events
        assert [e["kind"] for e in events].count("deploy.started") == 1
        status, _ = await daemon.api.call("GET", "/api/v1/apps/blog")
        assert status == 404
    finally:
        await daemon.stop()


async def test_reload_with_errors_keeps_the_running_config(tmp_path: Path) -> None:
    """A config with errors is refused on reload; the old apps and tokens keep working."""
    spec, _ = two_app_spec(tmp_path)
    config = spec.write(tmp_path / "deployd.toml")
    daemon = await start_daemon(config)
    try:
        config.write_text(config.read_text() + "\n[apps.shop.rollback]\nbake = \"5 minutes\"\n")
        assert await reload_config(daemon.daemon) is False
        assert sorted(await names(daemon)) == ["blog", "shop"]
    finally:
        await daemon.stop()


async def test_reload_naming_a_missing_ssh_key_is_refused(tmp_path: Path) -> None:
    """A reload checks the SSH files the new config names, like `deployd run` does: a
    missing key is refused and the running config stays."""
    spec, _ = two_app_spec(tmp_path)
    config = spec.write(tmp_path / "deployd.toml")
    daemon = await start_daemon(config)
    try:
        config.write_text(config.read_text()
                          + f'\n[apps.shop.ssh]\nkey = "{tmp_path / "no_such_key"}"\n')
        assert await reload_config(daemon.daemon) is False
        assert daemon.daemon.supervisors["shop"].app.ssh.key is None
    finally:
        await daemon.stop()


async def test_reload_changes_tokens(tmp_path: Path) -> None:
    """Tokens removed from the config stop working after a reload."""
    spec, _ = two_app_spec(tmp_path)
    config = spec.write(tmp_path / "deployd.toml")
    daemon = await start_daemon(config)
    try:
        assert (await daemon.api.call("GET", "/api/v1/apps", token="reader"))[0] == 200
        text = config.read_text()
        start = text.index('name = "reader"')
        block_start = text.rindex("[[tokens]]", 0, start)
        block_end = text.index("[[tokens]]", start)
        config.write_text(text[:block_start] + text[block_end:])
        assert await reload_config(daemon.daemon) is True
        assert (await daemon.api.call("GET", "/api/v1/apps", token="reader"))[0] == 401
        assert (await daemon.api.call("GET", "/api/v1/apps", token="admin"))[0] == 200
    finally:
        await daemon.stop()


def test_sighup_reloads_a_running_daemon(tmp_path: Path) -> None:
    """`kill -HUP` makes `deployd run` pick up a new app without restarting."""
    spec, origin = two_app_spec(tmp_path)
    spec.apps = [spec.apps[0]]
    port = free_port()
    config = spec.write(tmp_path / "deployd.toml")
    config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    env = {**os.environ, "PYTHONPATH": "daemon"}
    process = subprocess.Popen([sys.executable, "-m", "deployd.cli", "run", "--config",
                                str(config)], env=env, stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[1])
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        spec.apps.append(AppSpec(name="docs", repo=origin.url,
                                 local_dirs=[tmp_path / "docs-host"]))
        text = spec.render().replace("127.0.0.1:0", f"127.0.0.1:{port}")
        config.write_text(text)
        process.send_signal(signal.SIGHUP)
        def deployed() -> bool:
            assert process.poll() is None, "SIGHUP stopped the daemon"
            return (tmp_path / "docs-host" / "current").exists()

        wait_until_blocking(deployed, within=15, every=0.1, what="the added app deployed")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert process.stderr is not None
        assert "app docs added" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

