"""The daemon with `[daemon] database`: its state in PostgreSQL, nothing in a SQLite file.

The database is one of the session's throwaway PostgreSQL cluster (tests/support/postgres.py);
the daemon reaches it over TCP with the password from a 0600 file, as it would in production.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import pytest

from deployd.errors import StoreError
from tests.support.daemonfixtures import QUICK_BAKE, DaemonSpec, one_local_app, start_daemon
from tests.support.daemonlab import APP
from tests.support.gitrepo import OriginRepo
from tests.support.postgres import Database

REPO_ROOT = Path(__file__).resolve().parent.parent


def postgres_config(tmp_path: Path, origin: OriginRepo, database: Database,
                    password: str) -> DaemonSpec:
    """One local app, its state in `database`, the password in a 0600 file."""
    password_file = tmp_path / "db.password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    return one_local_app(tmp_path, origin.path, rollback=QUICK_BAKE, daemon_settings={
        "database": database.url, "database_password_file": str(password_file)})


async def test_daemon_keeps_its_state_in_postgresql(tmp_path: Path, pg_database: Database,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A deploy by the daemon configured with a PostgreSQL database: its deploy and events
    are in that database (read there directly), REST reads them back, and no SQLite file is
    made in state_dir. The log names the database, never the password."""
    caplog.set_level(logging.INFO)
    origin = OriginRepo(tmp_path / "origin.git")
    head = origin.commit({"index.html": "v1\n"}, "first")
    spec = postgres_config(tmp_path, origin, pg_database, pg_database.password)
    daemon = await start_daemon(spec.write(tmp_path / "deployd.toml"))
    try:
        succeeded = await daemon.wait_for_event(APP, "deploy.succeeded")
        assert succeeded["revision"] == head
        rest_kinds = [event["kind"] for event in await daemon.events(APP)]
    finally:
        await daemon.stop()

    stored = pg_database.query(f"SELECT kind, revision FROM events WHERE app = '{APP}' "
                               "ORDER BY id")
    assert [kind for kind, _ in stored] == rest_kinds
    assert ("deploy.succeeded", head) in stored
    deploys = pg_database.query(f"SELECT kind, state, revision FROM deploys WHERE app = '{APP}'")
    assert deploys == [("deploy", "succeeded", head)]
    assert not (spec.state_dir / "deployd.sqlite3").exists()
    assert (spec.state_dir / "mirrors" / f"{APP}.git").is_dir()
    assert f"state store open: {pg_database.url}" in caplog.messages
    assert pg_database.password not in caplog.text


async def test_wrong_database_password_is_a_clear_startup_error(tmp_path: Path,
                                                                 pg_database: Database) -> None:
    """With a wrong password the daemon does not start: a StoreError naming the database and
    saying authentication failed, in process and from `deployd run` (exit 1, one line on
    stderr), and neither the wrong password nor the right one is shown."""
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "first")
    wrong = "wrong-password-7d3e9b1f"
    config = postgres_config(tmp_path, origin, pg_database, wrong).write(
        tmp_path / "deployd.toml")

    with pytest.raises(StoreError) as raised:
        await start_daemon(config)
    message = str(raised.value)
    assert message.startswith(f"cannot open state store {pg_database.url}: ")
    assert "password authentication failed" in message

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "daemon")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deployd.cli", "run", "--config", str(config), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    output = (stdout + stderr).decode()
    assert proc.returncode == 1, output
    assert f"deployd: cannot open state store {pg_database.url}: " in stderr.decode()
    assert "password authentication failed" in stderr.decode()
    for secret in (wrong, pg_database.password):
        assert secret not in message and secret not in output
