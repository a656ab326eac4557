"""config/minimal.toml: check-config accepts it once its files exist, and its sample restart
hook, run by a real deploy over real sshd, detaches the app so the hook returns."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from deployd.config import Hooks
from deployd.fleet import Fleet
from deployd.hosts import HostPool
from tests.support.hostfixtures import Lab, make_tarball, sha
from tests.support.waiting import wait_until
from tests.test_config import ROOT, with_ssh_files

MINIMAL = ROOT / "config" / "minimal.toml"

# The app the hook starts: says which release and port it runs, writes to stderr too, and
# stays up like a server.
SERVER = """#!/bin/sh
echo "server $(cat VERSION) on port $2"
echo "a warning on stderr" >&2
exec sleep 300
"""


def test_check_config_accepts_minimal_toml_once_its_files_exist(tmp_path: Path) -> None:
    """`deployd check-config` on minimal.toml, its key and known_hosts present: ok."""
    path = with_ssh_files(tmp_path, MINIMAL)
    result = subprocess.run([sys.executable, "-m", "deployd.cli", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: ok (1 app(s), 1 host(s), 1 token(s))\n"


def test_check_config_names_what_minimal_toml_still_needs(tmp_path: Path) -> None:
    """Without the key and known_hosts, check-config names both (the steps at its top)."""
    text = MINIMAL.read_text().replace("/etc/deployd/", f"{tmp_path}/")
    path = tmp_path / "minimal.toml"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "deployd.cli", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert [line.split(": ")[1] for line in result.stderr.splitlines()] == [
        "apps.shop.ssh.key", "apps.shop.ssh.known_hosts"]


def restart_hook() -> str:
    hook = tomllib.loads(MINIMAL.read_text())["apps"]["shop"]["hooks"]["restart"]
    assert isinstance(hook, str)
    return hook


def release(n: int) -> bytes:
    return make_tarball({"VERSION": str(n), "bin/server": SERVER}, executable=("bin/server",))


def process_state(pid: int) -> str | None:
    """The process's state letter (Z for a zombie), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def running(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")


@pytest.fixture
def lab(lab_factory: Callable[[int], Lab]) -> Lab:
    return lab_factory(1)


@pytest.fixture
def scanned_known_hosts(lab: Lab) -> Path:
    """The lab host's known_hosts filled the way the README says: `ssh-keyscan -p PORT`."""
    host = lab.hosts[0]
    scanned = subprocess.run(["ssh-keyscan", "-p", str(host.port), "-t", "ed25519", host.address],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    assert scanned.startswith(f"[{host.address}]:{host.port} ssh-ed25519 "), scanned
    path = lab.workdir / "scanned_known_hosts"
    path.write_text(scanned)
    return path


@pytest.fixture
def servers() -> Iterator[list[int]]:
    """Pids of the servers a test's hooks started; killed after it (detached, they no longer
    belong to sshd, so the lab's clean-up does not reach them)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_minimal_restart_hook_detaches_the_app_over_ssh(
        lab: Lab, pool: HostPool, servers: list[int], scanned_known_hosts: Path) -> None:
    """Two deploys over real SSH run the sample restart hook: each returns at once (the app
    holds none of the channel's output), the app runs from the new release with its stdout and
    stderr in shared/log, and the second deploy stopped the first server."""
    host = lab.hosts[0]
    app = lab.app(hooks=Hooks(restart=restart_hook()), linked_dirs=("log",), hook_timeout=20,
                  hosts=[lab.host_config(host, app_port="8080")],
                  ssh=replace(lab.ssh(), known_hosts=scanned_known_hosts))
    deploy_to = Path(app.hosts[0].deploy_to)
    pidfile, log = deploy_to / "shared" / "shop.pid", deploy_to / "shared" / "log" / "server.log"
    fleet = Fleet(app, pool)
    pids: list[int] = []
    for n in (1, 2):
        started = time.monotonic()
        await fleet.deploy(sha(n), release(n), branch="production", actor="alice")
        # The hook waits up to 5 s for the old server to go; a hook the app kept open would
        # last until hooks.timeout (20 s) and fail the deploy.
        assert time.monotonic() - started < 12, f"deploy {n} took {time.monotonic() - started}"
        pid = int(pidfile.read_text())
        servers.append(pid)
        await wait_until(lambda pid=pid: running(pid), within=5.0, what=f"server {n} running")
        line = f"server {n} on port 8080"
        await wait_until(lambda line=line: line in log.read_text(), within=5.0,
                         what=f"{line!r} logged", explain=log.read_text)
        pids.append(pid)
    assert pids[0] != pids[1]
    assert not running(pids[0]), "the second deploy left the first server running"
    assert log.read_text().count("a warning on stderr") == 2

