"""sd_notify against a real AF_UNIX datagram listener, as systemd would run it."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deployd.notify import Notifier, socket_address, watchdog_interval

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass
class Message:
    """One datagram as systemd would see it: the assignments and the sender's pid."""

    fields: dict[str, str]
    pid: int
    at: float


class Listener:
    """A NOTIFY_SOCKET stand-in: a datagram socket that records sender credentials."""

    def __init__(self, env_value: str, address: str) -> None:
        self.env_value = env_value
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def receive(self, timeout: float = 2.0) -> Message:
        """The next message, waiting up to `timeout` seconds."""
        self.sock.settimeout(timeout)
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_CRED.size))
        at = time.monotonic()
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = _CRED.unpack(payload[: _CRED.size])
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        return Message(fields, pid, at)

    def drain(self) -> list[Message]:
        """Every message already queued, without waiting."""
        messages: list[Message] = []
        self.sock.setblocking(False)
        while True:
            try:
                messages.append(self.receive(timeout=0.0))
            except (BlockingIOError, TimeoutError):
                return messages

    def watch(self) -> list[Message]:
        """Record messages as they arrive, from the running event loop, until `unwatch()`."""
        seen: list[Message] = []

        def on_readable() -> None:
            seen.extend(self.drain())

        asyncio.get_running_loop().add_reader(self.sock.fileno(), on_readable)
        return seen

    def unwatch(self) -> None:
        """Stop recording (see `watch()`)."""
        asyncio.get_running_loop().remove_reader(self.sock.fileno())

    def close(self) -> None:
        """Close the listening socket."""
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    """A listener on a file-system socket and on an abstract `@name` one."""
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        lst = Listener(path, path)
    else:
        name = f"deployd-test-{uuid.uuid4().hex}"
        lst = Listener("@" + name, "\0" + name)
    yield lst
    lst.close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No systemd variables inherited from whatever runs the tests."""
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_socket_address_forms() -> None:
    """`/path` stays, `@name` becomes an abstract address, anything else is refused."""
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abc") == "\0abc"
    assert socket_address("@") is None
    assert socket_address("relative/sock") is None
    assert socket_address("vsock:2:1234") is None


def test_ready_status_stopping_carry_our_pid(
    listener: Listener, clean_env: pytest.MonkeyPatch
) -> None:
    """READY=1, STATUS= and STOPPING=1 arrive, sent by this very process."""
    clean_env.setenv("NOTIFY_SOCKET", listener.env_value)
    notifier = Notifier.from_env()
    assert notifier.enabled
    try:
        assert notifier.ready()
        first = listener.receive()
        assert first.fields == {"READY": "1"}
        assert first.pid == os.getpid()

        assert notifier.status("deploying shop\nto 3 hosts")
        assert listener.receive().fields == {"STATUS": "deploying shop to 3 hosts"}

        assert notifier.ready(status="serving 2 apps")
        assert listener.receive().fields == {"READY": "1", "STATUS": "serving 2 apps"}

        assert notifier.stopping()
        last = listener.receive()
        assert last.fields == {"STOPPING": "1"}
        assert last.pid == os.getpid()
    finally:
        notifier.close()


def test_reloading_sends_monotonic_usec(listener: Listener, clean_env: pytest.MonkeyPatch) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC taken from CLOCK_MONOTONIC."""
    clean_env.setenv("NOTIFY_SOCKET", listener.env_value)
    notifier = Notifier.from_env()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = listener.receive()
    notifier.close()
    assert message.fields["RELOADING"] == "1"
    assert before <= int(message.fields["MONOTONIC_USEC"]) <= after


def test_extend_timeout(listener: Listener, clean_env: pytest.MonkeyPatch) -> None:
    """EXTEND_TIMEOUT_USEC is sent in microseconds."""
    clean_env.setenv("NOTIFY_SOCKET", listener.env_value)
    notifier = Notifier.from_env()
    assert notifier.extend_timeout(1.5)
    notifier.close()
    assert listener.receive().fields == {"EXTEND_TIMEOUT_USEC": "1500000"}


async def test_watchdog_loop_pings_at_half_interval(
    listener: Listener, clean_env: pytest.MonkeyPatch
) -> None:
    """With WATCHDOG_USEC=200000, WATCHDOG=1 goes out about every 0.1 s until cancelled."""
    clean_env.setenv("NOTIFY_SOCKET", listener.env_value)
    clean_env.setenv("WATCHDOG_USEC", "200000")
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_env()
    assert notifier.watchdog_seconds == pytest.approx(0.2)

    pings = listener.watch()
    task = asyncio.create_task(notifier.watchdog_loop())
    await asyncio.sleep(0.55)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)
    listener.unwatch()
    pings.extend(listener.drain())
    assert all(p.fields == {"WATCHDOG": "1"} and p.pid == os.getpid() for p in pings)
    # One at once, then one per 0.1 s: 6 in 0.55 s; allow for a slow machine.
    assert 4 <= len(pings) <= 7, [p.at for p in pings]
    gaps = [b.at - a.at for a, b in itertools.pairwise(pings)]
    assert all(0.07 <= gap <= 0.2 for gap in gaps), gaps

    # Cancelled: nothing more arrives.
    await asyncio.sleep(0.25)
    assert listener.drain() == []
    notifier.close()


async def test_watchdog_stops_when_the_loop_is_wedged(
    listener: Listener, clean_env: pytest.MonkeyPatch
) -> None:
    """Pings come from the event loop: a blocking call in the loop stops them."""
    clean_env.setenv("NOTIFY_SOCKET", listener.env_value)
    clean_env.setenv("WATCHDOG_USEC", "200000")
    notifier = Notifier.from_env()
    task = asyncio.create_task(notifier.watchdog_loop())
    await asyncio.sleep(0.05)
    assert len(listener.drain()) == 1
    time.sleep(0.5)  # noqa: ASYNC251 - wedge the loop on purpose
    assert listener.drain() == []
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    notifier.close()


async def test_watchdog_pid_of_another_process_disables_it(
    listener: Listener, clean_env: pytest.MonkeyPatch
) -> None:
    """WATCHDOG_PID naming another process: watchdog_loop returns at once, sends nothing."""
    clean_env.setenv("NOTIFY_SOCKET", listener.env_value)
    clean_env.setenv("WATCHDOG_USEC", "200000")
    clean_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    notifier = Notifier.from_env()
    assert notifier.watchdog_seconds is None
    await asyncio.wait_for(notifier.watchdog_loop(), timeout=1)
    assert listener.drain() == []
    notifier.close()


async def test_no_notify_socket_is_a_no_op(clean_env: pytest.MonkeyPatch) -> None:
    """Without NOTIFY_SOCKET every call does nothing and watchdog_loop returns at once."""
    clean_env.setenv("WATCHDOG_USEC", "200000")
    notifier = Notifier.from_env()
    assert not notifier.enabled
    assert notifier.watchdog_seconds is None
    assert not notifier.ready()
    assert not notifier.reloading()
    assert not notifier.status("x")
    assert not notifier.stopping()
    assert not notifier.watchdog()
    await asyncio.wait_for(notifier.watchdog_loop(), timeout=1)


def test_watchdog_interval_parsing() -> None:
    """WATCHDOG_USEC must be a positive integer; WATCHDOG_PID must match when set."""
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "7"}, pid=7) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "x"}, pid=7) is None


def test_unset_environment_hides_variables_from_children() -> None:
    """from_env(unset_environment=True) removes the variables but keeps notifying."""
    env = {"NOTIFY_SOCKET": "@deployd-x", "WATCHDOG_USEC": "1000000"}
    notifier = Notifier.from_env(env, unset_environment=True)
    assert env == {}
    assert notifier.enabled
    assert notifier.watchdog_seconds == 1.0


def test_send_failure_is_logged_not_raised(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A socket nobody listens on: the call returns False and logs under deployd.notify."""
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody.sock"))
    notifier = Notifier.from_env()
    with caplog.at_level("WARNING", logger="deployd.notify"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    assert any(r.name == "deployd.notify" for r in caplog.records)
    notifier.close()


def test_full_receive_queue_does_not_block(
    listener: Listener, clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the listener stops reading, sends fail fast instead of blocking the caller."""
    clean_env.setenv("NOTIFY_SOCKET", listener.env_value)
    notifier = Notifier.from_env()
    started = time.monotonic()
    results = [notifier.status("x" * 1000) for _ in range(2000)]
    assert time.monotonic() - started < 2.0
    assert results[0] is True
    assert False in results  # the queue filled up and messages were dropped, not waited on
    notifier.close()
