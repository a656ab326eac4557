"""`deployd run` under a NOTIFY_SOCKET: readiness, status, watchdog and stopping, for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.daemonfixtures import AppSpec, DaemonSpec
from tests.support.gitrepo import OriginRepo
from tests.support.net import free_port
from tests.support.postgres import Database
from tests.test_notify import Listener

ROOT = Path(__file__).resolve().parents[1]


def collect(listener: Listener, until: float) -> list[dict[str, str]]:
    messages = []
    while time.monotonic() < until:
        try:
            messages.append(listener.receive(timeout=0.2).fields)
        except (TimeoutError, BlockingIOError):
            continue
    return messages


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Nothing for SQLite; for PostgreSQL, a database of the tests' cluster and this node."""
    if request.param == "sqlite":
        return {}
    database: Database = request.getfixturevalue("pg_database")
    password_file = tmp_path / "db.password"
    password_file.write_text(database.password + "\n")
    password_file.chmod(0o600)
    return {"database": database.url, "database_password_file": str(password_file),
            "node": "node-a", "failover": "2s"}


def test_daemon_notifies_systemd(tmp_path: Path, backend_settings: dict[str, str]) -> None:
    """READY=1 once serving, STATUS= with events, WATCHDOG=1 pings, STOPPING=1 on SIGTERM;
    the same on SQLite and on PostgreSQL (where the node owns the app before deploying)."""
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "v1")
    spec = DaemonSpec(state_dir=tmp_path / "state", apps=[AppSpec(
        name="shop", repo=origin.url, local_dirs=[tmp_path / "host"],
        rollback={"grace": "0s", "bake": "100ms"})], daemon_settings=dict(backend_settings))
    config = tmp_path / "deployd.toml"
    config.write_text(spec.render().replace("127.0.0.1:0", f"127.0.0.1:{free_port()}"))
    socket_path = str(tmp_path / "notify.sock")
    listener = Listener(socket_path, socket_path)
    env = {**os.environ, "PYTHONPATH": "daemon", "NOTIFY_SOCKET": socket_path,
           "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    process = subprocess.Popen([sys.executable, "-m", "deployd.cli", "run", "-c", str(config)],
                               env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        messages = collect(listener, time.monotonic() + 4)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        messages += collect(listener, time.monotonic() + 0.5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        listener.close()
    ready = [m for m in messages if m.get("READY") == "1"]
    assert len(ready) == 1
    statuses = [m["STATUS"] for m in messages if "STATUS" in m]
    assert any("shop deploy.succeeded" in s for s in statuses), statuses
    assert sum(1 for m in messages if m.get("WATCHDOG") == "1") >= 5
    assert messages.index(ready[0]) < next(i for i, m in enumerate(messages)
                                           if m.get("STOPPING") == "1")
