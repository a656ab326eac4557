"""systemd's readiness and watchdog protocol (sd_notify), without libsystemd.

Under `Type=notify` systemd passes `$NOTIFY_SOCKET`: an `AF_UNIX` datagram socket that takes
newline-separated `KEY=value` assignments. A leading `@` names a socket in the abstract
namespace (the `@` stands for a NUL byte). With `WatchdogSec=` systemd also passes
`$WATCHDOG_USEC` (and `$WATCHDOG_PID`): the service must send `WATCHDOG=1` more often than that
or systemd kills and restarts it.

Lifecycle, as the daemon uses it::

    notifier = Notifier.from_env()          # a no-op outside systemd
    ...open the store, load the config, bind the REST port...
    notifier.ready()
    watchdog = asyncio.create_task(notifier.watchdog_loop())
    on SIGHUP:  notifier.reloading(); reload the config; notifier.ready()
    on SIGTERM: notifier.stopping(); finish in-flight host steps; watchdog.cancel()

The watchdog pings go out from the event loop itself, so a loop that is wedged (a blocking call,
a runaway coroutine that never yields) stops pinging and systemd restarts the daemon.

Sending never blocks and never raises into the caller: the socket is non-blocking, and a
failure is logged (logger `deployd.notify`) and dropped. A lost notification is better than a
daemon that stalls or dies because its supervisor is busy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("deployd.notify")

_ENV_SOCKET = "NOTIFY_SOCKET"
_ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
_ENV_WATCHDOG_PID = "WATCHDOG_PID"


def socket_address(value: str) -> str | None:
    """The `AF_UNIX` address for a `$NOTIFY_SOCKET` value, or None if it is not usable.

    `/path` is a socket in the file system; `@name` is `\\0name` in the abstract namespace.
    Other forms (such as `vsock:` on newer systemd) are not supported here.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """The watchdog timeout in seconds that applies to this process, or None when off.

    Like `sd_watchdog_enabled()`: `$WATCHDOG_USEC` must be a positive integer, and
    `$WATCHDOG_PID`, when set, must name this process (otherwise it is meant for another one).
    """
    raw = environ.get(_ENV_WATCHDOG_USEC)
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not an integer", _ENV_WATCHDOG_USEC, raw)
        return None
    if usec <= 0:
        return None
    raw_pid = environ.get(_ENV_WATCHDOG_PID)
    if raw_pid:
        try:
            target = int(raw_pid)
        except ValueError:
            log.warning("ignoring %s=%r: not an integer", _ENV_WATCHDOG_PID, raw_pid)
            return None
        if target != (os.getpid() if pid is None else pid):
            return None
    return usec / 1_000_000


class Notifier:
    """Sends sd_notify messages to systemd; does nothing when not started by systemd."""

    def __init__(self, address: str | None, watchdog_seconds: float | None = None) -> None:
        """`address` as `socket_address()` returns it; None makes every call a no-op."""
        self._address = address
        self._watchdog_seconds = watchdog_seconds if address is not None else None
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> Notifier:
        """Build from `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` (default os.environ).

        With `unset_environment`, the three variables are removed afterwards, so that commands
        deployd starts itself (hooks of `local` hosts) do not inherit them.
        """
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        raw = env.get(_ENV_SOCKET, "")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("ignoring unsupported %s=%r", _ENV_SOCKET, raw)
        interval = watchdog_interval(env) if address is not None else None
        if unset_environment:
            for key in (_ENV_SOCKET, _ENV_WATCHDOG_USEC, _ENV_WATCHDOG_PID):
                env.pop(key, None)
        return cls(address, interval)

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self._address is not None

    @property
    def watchdog_seconds(self) -> float | None:
        """The watchdog timeout systemd enforces on us, or None when there is none."""
        return self._watchdog_seconds

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` assignments in one datagram; True if it was sent.

        Never blocks and never raises: failures are logged and reported as False.
        """
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode("utf-8", errors="replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            # Includes BlockingIOError when systemd's receive queue is full: drop the message.
            log.warning("sd_notify %r failed: %s", assignments[0], exc)
            self._close()
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete: systemd may consider the service started."""
        return self.notify("READY=1", *(() if status is None else (f"STATUS={status}",)))

    def reloading(self) -> bool:
        """A reload started; call `ready()` when it is done.

        `MONOTONIC_USEC` lets systemd 253+ (`Type=notify-reload`) match the reload to its
        request; older systemd ignores the extra field.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown started."""
        return self.notify("STOPPING=1", *(() if status is None else (f"STATUS={status}",)))

    def status(self, text: str) -> bool:
        """A one-line status shown by `systemctl status`."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before systemd's start/stop timeout hits (while stopping)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog(self) -> bool:
        """One keep-alive ping."""
        return self.notify("WATCHDOG=1")

    async def watchdog_loop(self) -> None:
        """Ping the watchdog every half interval until cancelled; return at once when off."""
        interval = self._watchdog_seconds
        if interval is None:
            return
        period = interval / 2
        log.debug("watchdog enabled: pinging every %.3fs", period)
        while True:
            self.watchdog()
            await asyncio.sleep(period)

    def close(self) -> None:
        """Release the socket (a later message opens a new one)."""
        self._close()

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:  # pragma: no cover - close of a datagram socket does not fail
                pass
            self._sock = None

    def __repr__(self) -> str:
        return f"Notifier(address={self._address!r}, watchdog_seconds={self._watchdog_seconds!r})"
