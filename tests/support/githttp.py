"""A real git smart-HTTP server on loopback: git's own `git http-backend` behind basic auth.

`GitHttpServer(root, user, password)` serves the bare repositories under `root` at
`http://127.0.0.1:<port>/<name>.git`, answering 401 until a request carries the right
credentials, and records every Authorization header it saw.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

from aiohttp import web

from tests.support.net import free_port

HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"


class GitHttpServer:
    def __init__(self, root: Path, user: str, password: str) -> None:
        self.root = root
        self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.port = free_port()
        self.seen_authorization: list[str] = []
        self._runner: web.AppRunner | None = None

    def url(self, name: str, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}/{name}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        given = request.headers.get("Authorization")
        if given is not None:
            self.seen_authorization.append(given)
        if given != self.expected:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="git"'})
        body = await request.read()
        env = {"GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1",
               "PATH_INFO": request.path, "REQUEST_METHOD": request.method,
               "QUERY_STRING": request.query_string, "REMOTE_USER": "deploy",
               "CONTENT_TYPE": request.headers.get("Content-Type", ""),
               "CONTENT_LENGTH": str(len(body)), "PATH": "/usr/bin:/bin"}
        if "Content-Encoding" in request.headers:
            env["HTTP_CONTENT_ENCODING"] = request.headers["Content-Encoding"]
        process = await asyncio.create_subprocess_exec(
            HTTP_BACKEND, env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, _err = await process.communicate(body)
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = 200, {}
        for line in head.decode().splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            else:
                headers[name.strip()] = value.strip()
        return web.Response(status=status, body=payload, headers=headers)
