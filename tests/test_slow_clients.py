"""Slow and greedy HTTP clients cannot hold the daemon's connections.

Attackers connect from 127.0.0.3 and trickle header bytes; the well-behaved client talks from
127.0.0.2. Everything runs against the real daemon's REST server on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from deployd.listener import ClientLimitedServer
from tests.support.daemonfixtures import (
    TOKENS,
    RunningDaemon,
    one_local_app,
    start_daemon,
)
from tests.support.gitrepo import OriginRepo
from tests.support.waiting import wait_until
from tests.test_api import APP

ATTACKER, CLIENT = "127.0.0.3", "127.0.0.2"
READER = {"Authorization": f"Bearer {TOKENS['reader'][0]}"}


@dataclass
class SlowClient:
    """One connection that sends a request head a byte at a time and never finishes it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    started: float
    closed_after: float | None = None
    received: bytes = b""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def closed(self) -> bool:
        return self.closed_after is not None


async def slow_client(base: str, head: bytes = b"GET /api/v1/apps HTTP/1.1\r\nX-Slow: ",
                      every: float = 0.2) -> SlowClient:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=(ATTACKER, 0))
    client = SlowClient(reader, writer, time.monotonic())
    writer.write(head)

    async def trickle() -> None:
        with contextlib.suppress(OSError):
            while not client.closed:
                await asyncio.sleep(every)
                writer.write(b"a")
                await writer.drain()

    async def watch() -> None:
        with contextlib.suppress(OSError):
            client.received = await reader.read()  # returns once the server closes
        client.closed_after = time.monotonic() - client.started

    client.tasks = [asyncio.create_task(trickle()), asyncio.create_task(watch())]
    return client


async def close_all(clients: list[SlowClient]) -> None:
    for client in clients:
        for task in client.tasks:
            task.cancel()
        client.writer.close()
    await asyncio.gather(*(t for c in clients for t in c.tasks), return_exceptions=True)


@contextlib.asynccontextmanager
async def daemon_with(tmp_path: Path, **settings: object) -> AsyncIterator[RunningDaemon]:
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "first")
    spec = one_local_app(tmp_path, origin.path, name=APP, daemon_settings=settings)
    daemon = await start_daemon(spec.write(tmp_path / "d.toml"))
    try:
        yield daemon
    finally:
        await daemon.stop()


async def normal_get(base: str, local: str) -> int:
    connector = aiohttp.TCPConnector(local_addr=(local, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"{base}/api/v1/apps", headers=READER) as response:
            await response.read()
            return response.status


async def test_trickling_clients_are_closed_and_others_are_still_served(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """40 connections trickling a header byte every 0.2 s from one address: 32 past the
    per-client limit are closed at once (one warning logged), the 8 admitted ones when the
    client timeout ends although bytes keep coming, and meanwhile another client is served
    normally."""
    async with daemon_with(tmp_path, client_timeout="6s",
                           max_connections_per_client=8) as daemon:
        server = daemon.runner.server
        assert isinstance(server, ClientLimitedServer)
        slow = [await slow_client(daemon.base) for _ in range(40)]
        try:
            await wait_until(lambda: server.refused == 32, within=10,
                             what="32 connections refused")
            await wait_until(lambda: sum(c.closed for c in slow) >= 32, within=10,
                             what="the refused connections closed")
            open_while_served = sum(not c.closed for c in slow)
            assert await normal_get(daemon.base, CLIENT) == 200
            assert open_while_served == 8
            assert server.per_client[ATTACKER] <= 8
            warnings = [r for r in caplog.records if "closing further ones" in r.getMessage()]
            assert len(warnings) == 1 and ATTACKER in warnings[0].getMessage()

            await wait_until(lambda: all(c.closed for c in slow), within=6 + 10,
                             what="every slow connection closed")
            admitted = sorted(c.closed_after or 0 for c in slow)[-8:]
            assert min(admitted) >= 5.5, admitted  # trickling did not reset the deadline
            await wait_until(lambda: ATTACKER not in server.per_client, within=5,
                             what="the attacker's connections forgotten")
            assert await normal_get(daemon.base, ATTACKER) == 200
        finally:
            await close_all(slow)


async def test_a_body_that_never_arrives_is_408(tmp_path: Path) -> None:
    """An authenticated request whose body stops coming is answered 408 after the client
    timeout and its connection closed."""
    async with daemon_with(tmp_path, client_timeout="1s") as daemon:
        head = (f"POST /api/v1/apps/{APP}/pause HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {TOKENS['deployer'][0]}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()
        client = await slow_client(daemon.base, head + b'{"reason": ', every=0.2)
        try:
            await wait_until(lambda: client.closed, within=10,
                             what="the slow body's connection closed")
        finally:
            await close_all([client])
        assert client.received.startswith(b"HTTP/1.1 408 "), client.received[:100]
        assert b'"request_timeout"' in client.received
        status, body = await daemon.api.call("GET", f"/api/v1/apps/{APP}")
        assert status == 200 and body["paused"] is None


async def test_an_unauthenticated_body_is_not_waited_for(tmp_path: Path) -> None:
    """Without a token the answer is a 401 at once and the announced body is never read
    (aiohttp would drain it for 10 s before closing)."""
    async with daemon_with(tmp_path) as daemon:
        host, port = daemon.base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"POST /api/v1/apps/{APP}/pause HTTP/1.1\r\nHost: x\r\n"
                         "Content-Length: 1000000\r\n\r\n{".encode())
            async with asyncio.timeout(5):
                answer = await reader.read()
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:100]
