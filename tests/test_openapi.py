"""The OpenAPI document is served and describes exactly the routes the server has."""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

from deployd import api
from deployd.openapi import document
from tests.support.daemonfixtures import one_local_app, start_daemon
from tests.support.gitrepo import OriginRepo


def server_routes() -> set[tuple[str, str]]:
    app = web.Application()
    api.add_routes(app)
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        path = route.resource.canonical if route.resource is not None else ""
        routes.add((route.method.lower(), path))
    return routes


def documented_routes() -> set[tuple[str, str]]:
    return {(method, path) for path, operations in document()["paths"].items()
            for method in operations}


def test_every_route_is_documented_and_nothing_else() -> None:
    """Each registered route has an operation in the document, and the document no extra."""
    assert server_routes() == documented_routes()


def test_every_reference_resolves() -> None:
    """Every $ref in the document points at a schema it defines."""
    text = repr(document())
    schemas = document()["components"]["schemas"]
    for name in re.findall(r"#/components/schemas/(\w+)", text):
        assert name in schemas, name


def test_roles_match_the_handlers() -> None:
    """The role each operation claims is the role its handler requires."""
    source = Path(api.__file__).read_text()
    handlers = {}
    for match in re.finditer(r'add_(get|post|put)\("([^"]+)", (\w+)\)', source):
        handlers[(match.group(1), match.group(2))] = match.group(3)
    for (method, path), handler in handlers.items():
        if path == "/metrics":
            continue  # open unless daemon.metrics_auth asks for the read role
        body = source[source.index(f"async def {handler}("):]
        body = body[:body.index("\nasync def ") if "\nasync def " in body else len(body)]
        role = re.search(r'(?:require|app_call|job_call)\(request, "(\w+)"', body)
        operation = document()["paths"][path][method]
        assert operation.get("x-deployd-role") == (role.group(1) if role else None), path


async def test_document_is_served(tmp_path: Path) -> None:
    """GET /api/v1/openapi.json answers the document without a token."""
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"a": "1"}, "one")
    spec = one_local_app(tmp_path, origin.path)
    daemon = await start_daemon(spec.write(tmp_path / "deployd.toml"))
    try:
        status, body = await daemon.api.call("GET", "/api/v1/openapi.json", token=None)
        assert status == 200
        assert body["openapi"].startswith("3.")
        assert "/api/v1/jobs/{job}/approve" in body["paths"]
    finally:
        await daemon.stop()


async def served_server_url(tmp_path: Path, daemon_lines: str) -> tuple[str, str]:
    """The `servers` URL of the document a daemon serves with `daemon_lines` in place of the
    test config's `listen` line, and the daemon's real base URL."""
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"a": "1"}, "one")
    spec = one_local_app(tmp_path, origin.path)
    text = spec.render()
    assert 'listen = "127.0.0.1:0"\n' in text
    path = tmp_path / "deployd.toml"
    path.write_text(text.replace('listen = "127.0.0.1:0"\n', daemon_lines + "\n", 1))
    daemon = await start_daemon(path)  # bound to a free 127.0.0.1 port whatever listen says
    try:
        body = await daemon.api.get("/api/v1/openapi.json", token=None)
        (server,) = body["servers"]
        return server["url"], daemon.base
    finally:
        await daemon.stop()


async def test_server_is_the_configured_listen_address(tmp_path: Path) -> None:
    """The document names the `listen` address the config gives, not a fixed default."""
    url, _ = await served_server_url(tmp_path, 'listen = "127.0.0.2:9321"')
    assert url == "http://127.0.0.2:9321"


async def test_server_for_listen_port_0_is_the_port_really_bound(tmp_path: Path) -> None:
    """With `listen` on port 0 the document names the port the request arrived on."""
    url, base = await served_server_url(tmp_path, 'listen = "127.0.0.1:0"')
    assert url == base


async def test_server_is_the_public_url_when_set(tmp_path: Path) -> None:
    """`daemon.public_url` wins over `listen` (a reverse proxy in front of deployd)."""
    url, _ = await served_server_url(
        tmp_path, 'listen = "127.0.0.2:9321"\npublic_url = "https://deployd.example.com/"')
    assert url == "https://deployd.example.com"
