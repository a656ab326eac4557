"""Transports against real sshd hosts on loopback, and the local transport."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import pwd
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from deployd.config import HostConfig
from deployd.errors import CommandError, ConnectError
from deployd.hosts import Gate, Host, HostPool, LocalHost, SSHHost, privilege_drop
from deployd.metrics import Metrics
from deployd.retry import RetryPolicy, instant_retries
from tests.support.hostfixtures import (
    Lab,
    command_lines_holding,
    make_tarball,
    processes_matching,
    vanish,
)
from tests.support.net import free_port
from tests.support.sshd import TEST_USER
from tests.support.waiting import wait_until


def _connections(listener_pid: int) -> int:
    """How many client connections an sshd listener is serving (one child each)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(listener_pid)],
                         capture_output=True, text=True, check=False)
    return len(out.stdout.split())


@pytest.fixture
def lab(lab_factory: Callable[[int], Lab]) -> Lab:
    return lab_factory(1)


async def test_run_returns_stdout_stderr_and_exit_status(lab: Lab, pool: HostPool) -> None:
    """run() gives stdout, stderr and the exit status; check=False does not raise."""
    app = lab.app()
    host = pool.host(app, app.hosts[0])
    result = await host.run("echo out; echo err >&2; exit 3", timeout=10, check=False)
    assert (result.stdout, result.stderr, result.exit_status) == ("out\n", "err\n", 3)
    ok = await host.run("printf '%s' \"$(id -un)\"", timeout=10)
    assert ok.stdout == lab.hosts[0].user and ok.exit_status == 0


async def test_failed_command_raises_command_error(lab: Lab, pool: HostPool) -> None:
    """check=True turns a non-zero exit into CommandError with status and stderr."""
    app = lab.app()
    host = pool.host(app, app.hosts[0])
    with pytest.raises(CommandError) as caught:
        await host.run("echo boom >&2; exit 7", timeout=10)
    assert caught.value.exit_status == 7
    assert "boom" in caught.value.stderr and "boom" in str(caught.value)


async def test_unknown_host_key_is_refused(lab: Lab, pool: HostPool) -> None:
    """A host whose key is not in known_hosts is refused, naming the host key."""
    empty = lab.workdir / "empty_known_hosts"
    empty.write_text("")
    app = lab.app()
    host = SSHHost(app.hosts[0], replace(app.ssh, known_hosts=empty))
    with instant_retries(), pytest.raises(ConnectError, match="host key"):
        await host.run("true", timeout=10)


@pytest.fixture
def other_key(tmp_path: Path) -> tuple[str, str]:
    """A host key type and key that no test sshd uses."""
    path = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    kind, key = path.with_suffix(".pub").read_text().split()[:2]
    return kind, key


async def test_changed_host_key_is_refused(lab: Lab, pool: HostPool,
                                           other_key: tuple[str, str]) -> None:
    """A host presenting a key other than the one in known_hosts is refused."""
    kind, key = other_key
    changed = lab.workdir / "changed_known_hosts"
    sshd = lab.hosts[0]
    changed.write_text(f"[{sshd.address}]:{sshd.port} {kind} {key}\n")
    app = lab.app()
    with instant_retries(), pytest.raises(ConnectError, match="host key"):
        await SSHHost(app.hosts[0], replace(app.ssh, known_hosts=changed)).run("true", timeout=10)


async def test_connection_is_opened_once_and_reused(lab: Lab, pool: HostPool) -> None:
    """Many commands, also concurrent and from two apps, use one SSH connection."""
    shop, blog = lab.app(name="shop"), lab.app(name="blog")
    host = pool.host(shop, shop.hosts[0])
    assert pool.host(shop, shop.hosts[0]) is host
    other_app_host = pool.host(blog, blog.hosts[0])
    await asyncio.gather(*(host.run("true", timeout=10) for _ in range(20)))
    await other_app_host.run("true", timeout=10)
    assert isinstance(host, SSHHost) and isinstance(other_app_host, SSHHost)
    assert host.connection is other_app_host.connection
    assert host.connection.opened == 1
    sshd = lab.hosts[0]
    assert sshd.process is not None
    assert _connections(sshd.process.pid) == 1


async def test_refused_port_raises_connect_error_after_retries(
        lab: Lab, pool: HostPool, caplog: pytest.LogCaptureFixture) -> None:
    """A port nobody listens on is retried (bounded), then raises ConnectError."""
    app = lab.app()
    config = HostConfig(address="127.0.0.1", port=free_port(), deploy_to="/srv/x")
    host = SSHHost(config, app.ssh, policy=RetryPolicy(attempts=3, total=10))
    caplog.set_level(logging.INFO, logger="deployd.retry")
    began = time.monotonic()
    with instant_retries(), pytest.raises(ConnectError, match=r"refused|Connect call failed"):
        await host.run("true", timeout=10)
    assert time.monotonic() - began < 2
    assert sum("retrying" in record.getMessage() for record in caplog.records) == 2


async def test_timeout_stops_the_remote_command(lab: Lab, pool: HostPool) -> None:
    """A command past its time limit raises CommandError(None) and is gone from the host."""
    app = lab.app()
    host = pool.host(app, app.hosts[0])
    began = time.monotonic()
    with pytest.raises(CommandError) as caught:
        await host.run("sleep 987.25; echo never", timeout=1, check=False)
    assert caught.value.exit_status is None
    assert time.monotonic() - began < 4
    await wait_until(lambda: not processes_matching("sleep 987.25"), within=3,
                     what="the remote command gone")
    assert (await host.run("echo still usable", timeout=10)).stdout == "still usable\n"


async def test_reconnects_after_sshd_restart(lab: Lab, pool: HostPool) -> None:
    """After the host's sshd is killed and restarted, the next command reconnects."""
    app = lab.app()
    host = pool.host(app, app.hosts[0])
    await host.run("true", timeout=10)
    vanish(lab.hosts[0])
    with pytest.raises(ConnectError):
        await host.run("true", timeout=10)
    lab.hosts[0].start()
    assert (await host.run("echo back", timeout=10)).stdout == "back\n"
    assert isinstance(host, SSHHost) and host.connection.opened == 2


async def test_connection_lost_mid_command_is_connect_error(lab: Lab, pool: HostPool) -> None:
    """A connection dropping under a running command raises ConnectError, without retry."""
    app = lab.app()
    host = pool.host(app, app.hosts[0])
    await host.run("true", timeout=10)
    running = asyncio.create_task(host.run("sleep 30", timeout=60))
    await asyncio.sleep(0.3)
    vanish(lab.hosts[0])
    with pytest.raises(ConnectError, match="during a command"):
        await asyncio.wait_for(running, 5)


async def test_large_input_streams_to_stdin(lab: Lab, pool: HostPool) -> None:
    """20 MB of input reaches the remote command's stdin intact."""
    app = lab.app()
    host = pool.host(app, app.hosts[0])
    data = os.urandom(1 << 20) * 20
    result = await host.run("sha256sum", input=data, timeout=60)
    assert result.stdout.split()[0] == hashlib.sha256(data).hexdigest()


class Pieces:
    """A payload: `pieces` one after the other, then OSError if `fail` (a disk gone bad)."""

    def __init__(self, pieces: list[bytes], *, fail: bool = False) -> None:
        self.pieces = pieces
        self.fail = fail

    async def chunks(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            await asyncio.sleep(0)
            yield piece
        if self.fail:
            raise OSError("input/output error")


async def test_payload_streams_to_stdin_each_time_it_is_sent(
        lab: Lab, pool: HostPool, tmp_path: Path) -> None:
    """A payload reaches stdin piece by piece, intact, as often as it is sent, over SSH and
    on the local host."""
    app = lab.app()
    pieces = [os.urandom(1 << 20) for _ in range(6)]
    payload = Pieces(pieces)
    digest = hashlib.sha256(b"".join(pieces)).hexdigest()
    local = LocalHost(HostConfig(address="local", deploy_to=str(tmp_path)))
    for host in (pool.host(app, app.hosts[0]), local, pool.host(app, app.hosts[0])):
        result = await host.run("sha256sum", input=payload, timeout=60)
        assert result.stdout.split()[0] == digest


async def test_unreadable_payload_stops_the_command(
        lab: Lab, pool: HostPool, tmp_path: Path) -> None:
    """A payload failing between two tar members must not look like the end of the input
    (GNU tar would unpack the members so far and exit 0): the command is stopped instead,
    over SSH (a TERM through the channel) and locally (its process group is killed)."""
    whole = make_tarball({"a": "x" * 512, "b": "y" * 512})
    payload = Pieces([whole[:1024]], fail=True)  # member a only, then the read fails
    ssh = pool.host(app := lab.app(), app.hosts[0])
    remote = f"{app.hosts[0].deploy_to}/unpacked"
    with pytest.raises(CommandError):
        await ssh.run(f"mkdir -p {remote} && tar -xf - -C {remote} && touch {remote}/DONE",
                      input=payload, timeout=30)
    local = LocalHost(HostConfig(address="local", deploy_to=str(tmp_path)))
    target = tmp_path / "unpacked"
    with pytest.raises(CommandError):
        await local.run(f"mkdir -p {target} && tar -xf - -C {target} && touch {target}/DONE",
                        input=payload, timeout=30)
    assert not (target / "DONE").exists()
    result = await ssh.run(f"test -e {remote}/DONE", timeout=30, check=False)
    assert result.exit_status == 1


async def test_warm_connects_every_host_and_reports_failures(
        lab_factory: Callable[[int], Lab], pool: HostPool) -> None:
    """warm() opens every host's connection at once and returns the unreachable ones."""
    lab = lab_factory(3)
    dead = HostConfig(address="127.0.0.1", port=free_port(), deploy_to="/srv/x")
    app = lab.app(hosts=[*(lab.host_config(h) for h in lab.hosts), dead])
    hosts = [pool.host(app, config) for config in app.hosts]
    failures = await pool.warm(hosts)
    assert list(failures) == [dead.name]
    assert all(isinstance(h, SSHHost) and h.connection.is_open for h in hosts[:3])


async def test_ssh_errors_are_counted(lab: Lab) -> None:
    """Connect failures and failed commands count in ssh_errors_total{app,host}."""
    metrics = Metrics()
    app = lab.app()
    with instant_retries():
        counted = HostPool(metrics=metrics)
        host = counted.host(app, app.hosts[0])
        with pytest.raises(CommandError):
            await host.run("exit 1", timeout=10)
        vanish(lab.hosts[0])
        with pytest.raises(ConnectError):
            await host.run("true", timeout=10)
        await counted.close()
    value = metrics.registry.get_sample_value(
        "deployd_ssh_errors_total", {"app": "shop", "host": app.hosts[0].name})
    assert value == 2


async def test_local_host_same_contract(tmp_path: Path) -> None:
    """The local transport: output, status, input, CommandError, and a timeout that kills
    the whole process group."""
    host = LocalHost(HostConfig(address="local", deploy_to=str(tmp_path)))
    result = await host.run("cat; echo err >&2; exit 4", input=b"in", timeout=10, check=False)
    assert (result.stdout, result.stderr, result.exit_status) == ("in", "err\n", 4)
    with pytest.raises(CommandError) as failed:
        await host.run("exit 9", timeout=10)
    assert failed.value.exit_status == 9
    with pytest.raises(CommandError) as timed_out:
        await host.run("sleep 876.5 & sleep 876.5; wait", timeout=0.5)
    assert timed_out.value.exit_status is None
    await wait_until(lambda: not processes_matching("sleep 876.5"), within=3,
                     what="the local command gone")
    assert host.name == "local"


async def test_local_script_never_reaches_a_command_line(tmp_path: Path) -> None:
    """A local host also gets its script over stdin: a value in the script shows in no
    process's command line while it runs."""
    secret = f"secret-{os.urandom(8).hex()}"
    host = LocalHost(HostConfig(address="local", deploy_to=str(tmp_path)))
    script = (f"value={secret}; touch {tmp_path}/started; "
              f"while [ ! -e {tmp_path}/go ]; do sleep 0.05; done; printf %s \"$value\"")
    running = asyncio.create_task(host.run(script, timeout=30))
    try:
        await wait_until((tmp_path / "started").exists, every=0.02, what="the script started")
        assert command_lines_holding(secret) == []
    finally:
        (tmp_path / "go").touch()
    assert (await running).stdout == secret


def test_privilege_drop_is_setpriv_as_root_and_sudo_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As root, run_as drops privileges with setpriv (the user's own groups, a clean
    environment); as anyone else it needs sudo, without a password prompt."""
    user = pwd.getpwnam(TEST_USER)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert privilege_drop(TEST_USER) == [
        "setpriv", f"--reuid={TEST_USER}", f"--regid={user.pw_gid}", "--init-groups",
        "--reset-env", "--"]
    monkeypatch.setattr(os, "geteuid", lambda: user.pw_uid)
    assert privilege_drop(TEST_USER) == ["sudo", "-n", "-u", TEST_USER, "--"]


async def test_local_run_as_refuses_root_or_deployds_own_user(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_as is checked again when commands run (the config may have been checked by
    another user): never root, never deployd's own user, never an unknown user."""
    for user in ("root", "no-such-user-here"):
        host = LocalHost(HostConfig(address="local", deploy_to=str(tmp_path), run_as=user))
        with pytest.raises(ConnectError, match="run_as user"):
            await host.run("true", timeout=10)
    monkeypatch.setattr(os, "geteuid", lambda: pwd.getpwnam(TEST_USER).pw_uid)
    host = LocalHost(HostConfig(address="local", deploy_to=str(tmp_path), run_as=TEST_USER))
    with pytest.raises(ConnectError, match="the user deployd runs as"):
        await host.run("true", timeout=10)


HELD_SCRIPT = ("echo before; printf 'held=1\\n'; while IFS= read -r _l; do :; done; "
               "echo after; echo done >&2")


async def _held_then_released(host: Host) -> None:
    gate = Gate(budget=0)
    running = asyncio.create_task(host.run(HELD_SCRIPT, timeout=30, gate=gate))
    await asyncio.wait_for(gate.reached.wait(), 10)
    await asyncio.sleep(0.2)  # were the end of stdin sent, the command would end now
    assert not running.done()
    gate.release()
    result = await asyncio.wait_for(running, 10)
    assert (result.stdout, result.stderr) == ("before\nheld=1\nafter\n", "done\n")
    ended = Gate(budget=0)
    quick = await host.run("echo no hold; exit 3", timeout=10, check=False, gate=ended)
    assert not ended.reached.is_set() and quick.exit_status == 3


async def test_a_gated_command_waits_at_its_held_line_until_released(
        lab: Lab, pool: HostPool) -> None:
    """A command printing `held=1` marks its gate reached and waits for the end of its
    stdin, which comes once the gate is released; a command ending without holding just
    ends."""
    app = lab.app()
    await _held_then_released(pool.host(app, app.hosts[0]))


async def test_a_gated_local_command_waits_the_same_way(tmp_path: Path) -> None:
    await _held_then_released(LocalHost(HostConfig(address="local", deploy_to=str(tmp_path))))
