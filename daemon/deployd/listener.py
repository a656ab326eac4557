"""How the REST server holds its connections: nobody may hold them open for free.

Each connection costs a file descriptor, and the daemon needs descriptors for SSH, probes and
rollbacks. So:

- a client has `client_timeout` to send a request's headers, counted from the connection
  (or from the end of its previous request); aiohttp's keep-alive timer does that, since it
  closes a connection still waiting for a whole request head, however many bytes trickled in;
- one client address holds at most `max_connections_per_client` connections; further ones
  are closed as soon as they are accepted, before any byte is read;
- an unread request body is never drained after the answer (aiohttp would read it for up to
  10 s): the connection is closed instead. Reading a body has its own deadline in `api`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from deployd.config import DaemonConfig

log = logging.getLogger("deployd.api")
WARN_EVERY = 60.0


def client_of(transport: asyncio.BaseTransport) -> str:
    """The client's address (without the port): what the per-client limit counts."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


class ClientLimitedServer(web.Server):
    """aiohttp's connection manager, counting connections per client address."""

    def __init__(self, *args: Any, max_per_client: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_per_client = max_per_client
        self.per_client: Counter[str] = Counter()
        self._client: dict[RequestHandler, str] = {}
        self._warned: dict[str, float] = {}
        self.refused = 0

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        client = client_of(transport)
        self._client[handler] = client
        self.per_client[client] += 1
        if self.per_client[client] > self.max_per_client:
            self.refused += 1
            self._warn(client)
            transport.close()

    def _warn(self, client: str) -> None:
        """One warning per client a minute: a client reconnecting in a loop must not flood
        the log."""
        now = time.monotonic()
        if now - self._warned.get(client, -WARN_EVERY) >= WARN_EVERY:
            self._warned = {c: t for c, t in self._warned.items() if now - t < WARN_EVERY}
            self._warned[client] = now
            log.warning("client %s holds %d connections: closing further ones",
                        client, self.max_per_client)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        client = self._client.pop(handler, None)
        if client is not None:
            self.per_client[client] -= 1
            if self.per_client[client] <= 0:
                del self.per_client[client]


class DaemonRunner(web.AppRunner):
    """An AppRunner whose server is a ClientLimitedServer."""

    def __init__(self, app: web.Application, *, max_per_client: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._max_per_client = max_per_client

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts the app, as AppRunner does
        return ClientLimitedServer(
            plain.request_handler, request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            max_per_client=self._max_per_client, **self._kwargs)


def make_runner(app: web.Application, settings: DaemonConfig) -> DaemonRunner:
    """The runner serving `app` under the daemon's connection rules."""
    return DaemonRunner(app, max_per_client=settings.max_connections_per_client,
                        handle_signals=False, access_log=None, lingering_time=0,
                        keepalive_timeout=settings.client_timeout)
