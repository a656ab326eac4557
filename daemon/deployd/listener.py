"""How the REST server holds its connections: nobody may hold them open for free.

aiohttp would otherwise drain an unread request body for up to 10 s after answering (a 413
would still read the upload).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from deployd.config import DaemonConfig


def make_runner(app: web.Application, settings: DaemonConfig) -> web.AppRunner:
    """The runner serving `app` under the daemon's connection rules."""
    del settings  # the connection limits come next
    options: dict[str, Any] = {"lingering_time": 0}
    return web.AppRunner(app, handle_signals=False, access_log=None, **options)
