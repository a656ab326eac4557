"""Transports to hosts: run a shell script on a host and get its output and exit status.

`SSHHost` speaks SSH through asyncssh (the only module that imports it): key login, host keys
always checked against the configured known_hosts, one connection per endpoint kept open and
reopened when it drops, a bounded number of channels on it. `LocalHost` runs the same scripts on
this machine for one-box setups and the demo. `HostPool` hands out hosts and shares connections.

Every command is a shell script, and no script ever travels on a command line (anyone on a host
can read every process's arguments in /proc): the only command a host runs is the fixed
`BOOTSTRAP`, which reads the script from stdin (its length in bytes on a first line, then the
script) and runs it; the rest of stdin (a release tarball) is left to the script. This also lifts
the kernel's limit on one argument (E2BIG at 128 KiB). The time limit is enforced ON the host by
wrapping the bootstrap in `timeout`, because closing an SSH channel does not stop the command
behind it. A command that ran and failed is never retried here: only failing to connect is. A
command may also wait half way for the caller (see `Gate`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import pwd
import shlex
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import asyncssh

from deployd.config import AppConfig, HostConfig, SSHConfig
from deployd.errors import CommandError, ConnectError, DeploydError, RemoteError
from deployd.metrics import Metrics
from deployd.retry import DEFAULT_POLICY, RetryPolicy, retry_async

log = logging.getLogger(__name__)

# OpenSSH's MaxSessions defaults to 10 channels per connection; stay under it.
MAX_CHANNELS = 8
# OpenSSH's MaxStartups defaults to 10 unauthenticated connections; stay under it per address.
MAX_HANDSHAKES = 10
# After the time limit, `timeout` sends TERM, then KILL this many seconds later.
KILL_GRACE = 5.0
# Extra time the client waits beyond the on-host limit before giving up on the channel.
CLIENT_MARGIN = 5.0
# AES-GCM runs in C with hardware AES; asyncssh's chacha20 costs several Python calls per
# packet, which adds up over 50 hosts. The rest of asyncssh's default list follows.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                     "chacha20-poly1305@openssh.com", "aes256-ctr", "aes192-ctr", "aes128-ctr")
# Input is written in pieces so that a large tarball is not buffered twice.
STDIN_CHUNK = 1 << 20
# `timeout` exits with 124 after TERM worked, 137 when it had to KILL.
_TIMEOUT_STATUSES = (124, 137)
# Reads `<length>\n<script>` from stdin and runs the script in this shell. `head -c` (GNU
# coreutils) reads no further than asked, so whatever follows the script stays on stdin.
BOOTSTRAP = ('IFS= read -r _deployd_len || exit 126; '
             'case $_deployd_len in ""|*[!0-9]*) exit 126 ;; esac; '
             '_deployd_script=$(head -c "$_deployd_len") || exit 126; '
             'eval "$_deployd_script"')


# The line a script prints on stdout when it waits at its gate (see Gate).
HELD_LINE = b"held=1\n"
# Stdout is read in pieces of this size while looking for HELD_LINE.
READ_CHUNK = 1 << 16


class Gate:
    """Holds a command at a point it chooses: there the script prints HELD_LINE and reads its
    stdin to the end. `reached` is set once the command printed it (a command may also end
    without: wait for both), and the end of its stdin is sent once `release()` was called, so
    it goes on. A connection that drops ends its stdin too: a held command never waits for
    deployd to come back.

    `budget`: how many seconds the command may wait there; its caller adds them to the
    command's time limit."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.reached = asyncio.Event()
        self.released = asyncio.Event()

    def release(self) -> None:
        self.released.set()


def frame(script: str) -> bytes:
    """`script` as BOOTSTRAP reads it from stdin."""
    data = script.encode()
    return f"{len(data)}\n".encode() + data


class Payload(Protocol):
    """Input made piece by piece (a release archive); each `chunks()` call starts over, so
    one payload can go to many hosts, and again to one."""

    def chunks(self) -> AsyncIterator[bytes]: ...


Stdin = bytes | Payload
"""What a command may read on its stdin."""


@dataclass(frozen=True)
class Result:
    """What a command printed and how it exited."""

    stdout: str
    stderr: str
    exit_status: int


class Host(abc.ABC):
    """One host as seen by one app: run shell scripts there."""

    def __init__(self, config: HostConfig, *, app: str = "", metrics: Metrics | None = None):
        self.config = config
        self.app = app
        self._metrics = metrics

    @property
    def name(self) -> str:
        """The host's label in errors, events and metrics."""
        return self.config.name

    # The limit is enforced on the host (`timeout`), so it cannot be an asyncio.timeout.
    async def run(self, command: str, *, input: Stdin | None = None,
                  timeout: float, check: bool = True,  # noqa: ASYNC109
                  gate: Gate | None = None) -> Result:
        """Run the shell script `command` (sent over stdin, see BOOTSTRAP), feeding `input`
        to its stdin after it (and ending its stdin only once `gate` is released, if given).

        Raises ConnectError when the host cannot be reached or the connection drops during the
        command, CommandError with exit_status None when `timeout` seconds pass (the command is
        stopped on the host), and CommandError on a non-zero exit when `check` is true.
        """
        try:
            result = await self._execute(command, input, timeout, gate)
        except RemoteError:
            self._count_error()
            raise
        if check and result.exit_status != 0:
            self._count_error()
            raise CommandError(self.name, command, result.exit_status, result.stderr)
        return result

    async def connect(self) -> None:
        """Open the connection now rather than on first use (no-op without one)."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the host's connection, if any; the next command opens a new one."""

    @abc.abstractmethod
    async def _execute(self, command: str, input: Stdin | None, limit: float,
                       gate: Gate | None) -> Result:
        """Run BOOTSTRAP for at most `limit` seconds with `frame(command)` then `input` on its
        stdin (ended once `gate` is released); raise ConnectError, or CommandError(None) when
        the limit passed."""

    def _count_error(self) -> None:
        if self._metrics is not None and not self.config.is_local:
            self._metrics.ssh_errors_total.labels(app=self.app, host=self.name).inc()


# -- SSH ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """What makes two hosts share one SSH connection."""

    address: str
    port: int
    user: str | None
    key: str | None
    known_hosts: str | None

    @classmethod
    def of(cls, host: HostConfig, ssh: SSHConfig) -> Endpoint:
        return cls(host.address, host.port, ssh.user, _str_or_none(ssh.key),
                   _str_or_none(ssh.known_hosts))


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


class SSHConnection:
    """One SSH connection to an endpoint: opened on first use, reopened after it drops."""

    def __init__(self, endpoint: Endpoint, ssh: SSHConfig, *, label: str,
                 policy: RetryPolicy = DEFAULT_POLICY,
                 handshakes: asyncio.Semaphore | None = None) -> None:
        self.endpoint = endpoint
        self.ssh = ssh
        self.label = label
        self.policy = policy
        self.channels = asyncio.Semaphore(MAX_CHANNELS)
        self.opened = 0  # connections made so far (a reconnect adds one)
        self._handshakes = handshakes or asyncio.Semaphore(MAX_HANDSHAKES)
        self._conn: Any = None
        self._lock = asyncio.Lock()

    @property
    def is_open(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def get(self) -> Any:
        """The open connection, connecting (with retries) when there is none."""
        if self.is_open:
            return self._conn
        async with self._lock:
            if not self.is_open:
                self._conn = await self._open()
                self.opened += 1
            return self._conn

    def discard(self, conn: Any) -> None:
        """Forget a connection that failed under a command, so the next use reconnects."""
        if self._conn is conn:
            self._conn = None
        conn.abort()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await conn.wait_closed()

    async def _open(self) -> Any:
        options = self._options()

        async def attempt() -> Any:
            async with self._handshakes:
                return await asyncssh.connect(self.endpoint.address, self.endpoint.port,
                                              options=options)

        try:
            return await retry_async(attempt, should_retry=_retryable, policy=self.policy,
                                     describe=f"connect to {self.label}")
        except asyncssh.HostKeyNotVerifiable as exc:
            where = self.endpoint.known_hosts or "~/.ssh/known_hosts"
            raise ConnectError(self.label, f"host key not verifiable against {where} "
                                           f"(unknown or changed host key): {exc}") from exc
        except asyncssh.PermissionDenied as exc:
            raise ConnectError(self.label, f"login as {self.endpoint.user or 'default user'} "
                                           f"refused: {exc}") from exc
        except (OSError, TimeoutError, asyncssh.Error) as exc:
            raise ConnectError(self.label, f"cannot connect: {_describe(exc)}") from exc

    def _options(self) -> Any:
        """Connection options; reads the key and known_hosts now so that bad files fail fast."""
        extra: dict[str, Any] = {}
        try:
            if self.endpoint.key is not None:
                extra["client_keys"] = [asyncssh.read_private_key(self.endpoint.key)]
            if self.endpoint.known_hosts is not None:
                extra["known_hosts"] = asyncssh.read_known_hosts(self.endpoint.known_hosts)
        except (OSError, asyncssh.KeyImportError) as exc:
            raise ConnectError(self.label, f"cannot read SSH key files: {exc}") from exc
        if self.endpoint.user is not None:
            extra["username"] = self.endpoint.user
        return asyncssh.SSHClientConnectionOptions(
            connect_timeout=self.ssh.connect_timeout,
            keepalive_interval=self.ssh.keepalive_interval,
            keepalive_count_max=3,
            config=[],  # deployd's own settings only, not ~/.ssh/config
            encryption_algs=PREFERRED_CIPHERS,
            **extra,
        )


def _retryable(exc: BaseException) -> bool:
    """Connect failures worth another try: network trouble, not a refused key or login."""
    if isinstance(exc, asyncssh.HostKeyNotVerifiable | asyncssh.PermissionDenied):
        return False
    return isinstance(exc, OSError | TimeoutError | asyncssh.Error)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


class SSHHost(Host):
    """A host reached over SSH; its connection may be shared with other apps' hosts."""

    def __init__(self, config: HostConfig, ssh: SSHConfig, *, app: str = "",
                 metrics: Metrics | None = None, connection: SSHConnection | None = None,
                 policy: RetryPolicy = DEFAULT_POLICY) -> None:
        super().__init__(config, app=app, metrics=metrics)
        self.ssh = ssh
        self.connection = connection or SSHConnection(
            Endpoint.of(config, ssh), ssh, label=config.name, policy=policy)

    async def connect(self) -> None:
        try:
            await self.connection.get()
        except RemoteError:
            self._count_error()
            raise

    async def close(self) -> None:
        await self.connection.close()

    async def _execute(self, command: str, input: Stdin | None, limit: float,
                       gate: Gate | None) -> Result:
        wrapped = f"exec timeout -k {KILL_GRACE:g} {limit:.3f} sh -c {shlex.quote(BOOTSTRAP)}"
        conn = await self.connection.get()
        async with self.connection.channels:
            started = time.monotonic()
            try:
                completed = await self._exchange(conn, wrapped, frame(command), input, limit,
                                                 gate)
            except (OSError, asyncssh.Error) as exc:
                self.connection.discard(conn)
                raise ConnectError(self.name, f"connection failed during a command: "
                                              f"{_describe(exc)}") from exc
            if completed is None:
                raise CommandError(self.name, command, None,
                                   f"no answer within {limit + KILL_GRACE:g}s")
            stdout, stderr, status = completed
            if status is None:
                self.connection.discard(conn)
                raise ConnectError(self.name, "connection lost during a command")
            if status in _TIMEOUT_STATUSES and time.monotonic() - started >= limit:
                raise CommandError(self.name, command, None,
                                   stderr or f"timed out after {limit:g}s")
            return Result(stdout, stderr, status)

    @staticmethod
    async def _exchange(conn: Any, command: str, script: bytes, input: Stdin | None,
                        limit: float, gate: Gate | None,
                        ) -> tuple[str, str, int | None] | None:
        """Send one command, its script and input; None when even the on-host limit was
        overrun."""
        async with conn.create_process(command, encoding=None) as process:
            feeder = asyncio.create_task(_feed(process.stdin, script, input,
                                               lambda: _terminate(process), gate))

            async def exchange() -> tuple[bytes, bytes]:
                held = await _until_held(process.stdout, gate)
                stdout, stderr = await process.communicate()
                return held + stdout, stderr

            try:
                stdout, stderr = await asyncio.wait_for(exchange(),
                                                        limit + KILL_GRACE + CLIENT_MARGIN)
            except TimeoutError:
                return None
            finally:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
            return _text(stdout), _text(stderr), process.returncode


class PayloadError(Exception):
    """Reading a payload failed part way: the command must not see a clean end of input."""


async def _pieces(data: Stdin | None) -> AsyncIterator[bytes]:
    """`data` in pieces of at most STDIN_CHUNK bytes (a payload in its own pieces)."""
    if data is None:
        return
    if isinstance(data, bytes):
        view = memoryview(data)
        for offset in range(0, len(view), STDIN_CHUNK):
            yield bytes(view[offset:offset + STDIN_CHUNK])
        return
    try:
        async for piece in data.chunks():
            yield piece
    except OSError as exc:
        raise PayloadError(str(exc)) from exc


def _terminate(process: Any) -> None:
    """TERM a remote command: `timeout` passes it to the whole command. Closing the channel
    would not do: the command would read that as the end of its input. Where sshd refuses
    signals (root logins), the command waits for input until its time limit kills it."""
    with contextlib.suppress(OSError, asyncssh.Error):
        process.send_signal("TERM")


async def _feed(stdin: Any, script: bytes, data: Stdin | None,
                abort: Callable[[], object], gate: Gate | None = None) -> None:
    """Stream the framed `script`, then `data`, to a remote stdin in chunks, then EOF (once
    `gate` is released, if given). A command may exit without reading it all (a refused
    lock, say): its exit status tells, so a closed stdin is fine. When the payload cannot be
    read, `abort` stops the command instead and no EOF is sent: `tar` would take an end of
    input between two members for the end of the archive."""
    try:
        for part in (script, data):
            async for piece in _pieces(part):
                stdin.write(piece)
                await stdin.drain()
        if gate is not None:
            await gate.released.wait()
        stdin.write_eof()
    except PayloadError:
        log.error("input for a command could not be read; stopping the command")
        abort()
    except (OSError, asyncssh.Error):
        pass


async def _until_held(stdout: Any, gate: Gate | None) -> bytes:
    """Read stdout until the command prints HELD_LINE (then set `gate.reached`) or ends;
    returns what was read. Nothing without a gate."""
    if gate is None:
        return b""
    read = b""
    while not (read.startswith(HELD_LINE) or b"\n" + HELD_LINE in read):
        piece = await stdout.read(READ_CHUNK)
        if not piece:
            return read
        read += piece
    gate.reached.set()
    return read


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", errors="replace")


# -- local ----------------------------------------------------------------------------------


class LocalHost(Host):
    """This machine (host address `local`): the same contract and BOOTSTRAP, run locally as
    the host's `run_as` user (or as deployd itself when the config allows it explicitly)."""

    async def close(self) -> None:
        """Nothing to release."""

    def _argv(self, limit: float) -> list[str]:
        user = self.config.run_as
        if user is None:
            return ["sh", "-c", BOOTSTRAP]
        # `timeout` runs as the user too: it can stop the command's processes even where
        # deployd cannot signal them (sudo).
        return [*privilege_drop(user), "timeout", "-k", f"{KILL_GRACE:g}", f"{limit:.3f}",
                "sh", "-c", BOOTSTRAP]

    async def _execute(self, command: str, input: Stdin | None, limit: float,
                       gate: Gate | None) -> Result:
        user = self.config.run_as
        try:
            if user is not None and pwd.getpwnam(user).pw_uid in (0, os.geteuid()):
                raise ConnectError(self.name, f"run_as user {user!r} is root or the user "
                                              "deployd runs as; refusing to run as it")
            argv = self._argv(limit)
        except KeyError:
            raise ConnectError(self.name, f"run_as user {user!r} does not exist") from None
        # Before the start: the user's `timeout` may begin counting before this task resumes.
        started = time.monotonic()
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group, so a timeout kills it all
                cwd="/" if self.config.run_as else None,
            )
        except OSError as exc:
            raise ConnectError(self.name, f"cannot start {argv[0]}: {exc}") from exc
        try:
            stdout, stderr = await asyncio.wait_for(
                _communicate(process, frame(command), input, gate), limit)
        except TimeoutError:
            await _stop_group(process)
            raise CommandError(self.name, command, None, f"timed out after {limit:g}s") from None
        except BaseException:
            await _stop_group(process)
            raise
        status = -1 if process.returncode is None else process.returncode
        if (self.config.run_as and status in _TIMEOUT_STATUSES
                and time.monotonic() - started >= limit):
            raise CommandError(self.name, command, None, f"timed out after {limit:g}s")
        return Result(_text(stdout), _text(stderr), status)


def privilege_drop(user: str) -> list[str]:
    """The command prefix that runs what follows as `user`, with that user's groups and a
    clean environment: `setpriv` when deployd is root, else `sudo -n` (which needs a sudoers
    rule letting deployd's user run commands as `user` without a password)."""
    if os.geteuid() == 0:
        return ["setpriv", f"--reuid={user}", f"--regid={_group_of(user)}", "--init-groups",
                "--reset-env", "--"]
    return ["sudo", "-n", "-u", user, "--"]


def _group_of(user: str) -> int:
    """`user`'s primary group; KeyError for an unknown user."""
    return pwd.getpwnam(user).pw_gid


async def _communicate(process: asyncio.subprocess.Process, script: bytes,
                       data: Stdin | None, gate: Gate | None) -> tuple[bytes, bytes]:
    """Feed the framed `script` and `data` to a local command while reading its output;
    wait for it to exit."""
    assert process.stdin is not None and process.stdout is not None
    assert process.stderr is not None

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    feeder = asyncio.create_task(_feed(_LocalStdin(process.stdin), script, data, kill, gate))

    async def output() -> bytes:
        assert process.stdout is not None
        held = await _until_held(process.stdout, gate)
        return held + await process.stdout.read()

    try:
        stdout, stderr, _ = await asyncio.gather(output(), process.stderr.read(),
                                                 process.wait())
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
    return stdout, stderr


class _LocalStdin:
    """A local pipe with the two calls `_feed` makes of an SSH channel's stdin."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    def write_eof(self) -> None:
        self._writer.close()


async def _stop_group(process: asyncio.subprocess.Process) -> None:
    """TERM the command's process group, KILL it after the grace period (as `timeout -k`)."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            await asyncio.wait_for(process.wait(), grace)
            return
        except TimeoutError:
            continue


# -- pool -----------------------------------------------------------------------------------


class HostPool:
    """Every host of every app, created once per daemon; hosts with one endpoint share a
    connection, and handshakes to one address are bounded (sshd's MaxStartups)."""

    def __init__(self, metrics: Metrics | None = None, *,
                 policy: RetryPolicy = DEFAULT_POLICY) -> None:
        self.metrics = metrics
        self.policy = policy
        self._connections: dict[Endpoint, SSHConnection] = {}
        self._handshakes: dict[str, asyncio.Semaphore] = {}
        self._hosts: dict[tuple[str, str, SSHConfig], Host] = {}

    def host(self, app: AppConfig, host: HostConfig) -> Host:
        """The Host for `host` of `app`: the same object every time, and the same SSH
        connection as every other host with the same address, port, user, key and
        known_hosts."""
        key = (app.name, repr(host), app.ssh)
        existing = self._hosts.get(key)
        if existing is not None:
            return existing
        made: Host
        if host.is_local:
            made = LocalHost(host, app=app.name, metrics=self.metrics)
        else:
            made = SSHHost(host, app.ssh, app=app.name, metrics=self.metrics,
                           connection=self._connection(host, app.ssh))
        self._hosts[key] = made
        return made

    def _connection(self, host: HostConfig, ssh: SSHConfig) -> SSHConnection:
        endpoint = Endpoint.of(host, ssh)
        connection = self._connections.get(endpoint)
        if connection is None:
            slots = self._handshakes.setdefault(host.address, asyncio.Semaphore(MAX_HANDSHAKES))
            connection = SSHConnection(endpoint, ssh, label=host.name, policy=self.policy,
                                       handshakes=slots)
            self._connections[endpoint] = connection
        return connection

    async def warm(self, hosts: Iterable[Host]) -> dict[str, DeploydError]:
        """Connect to all `hosts` at once; returns the hosts that failed, with their error."""
        listed = list(hosts)
        results = await asyncio.gather(*(host.connect() for host in listed),
                                       return_exceptions=True)
        failures: dict[str, DeploydError] = {}
        for host, result in zip(listed, results, strict=True):
            if isinstance(result, DeploydError):
                failures[host.name] = result
            elif isinstance(result, BaseException):
                raise result
        return failures

    async def close(self) -> None:
        """Close every connection."""
        await asyncio.gather(*(c.close() for c in self._connections.values()))
        self._connections.clear()
        self._hosts.clear()
