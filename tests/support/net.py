"""Loopback ports and HTTP readiness for servers the tests start."""

from __future__ import annotations

import socket
import urllib.request

from tests.support.waiting import wait_until_blocking


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers_200(url: str) -> bool:
    """Whether a GET of `url` answers 200 now (a refused or failing request is False)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def wait_http(url: str, timeout: float = 15.0) -> None:
    """Block until a GET of `url` answers 200; fail the test after `timeout` seconds."""
    wait_until_blocking(lambda: answers_200(url), within=timeout, every=0.1,
                        what=f"{url} answering 200")
