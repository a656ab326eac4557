"""The OpenAPI document is served and describes exactly the routes the server has."""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

from deployd import api
from deployd.openapi import document
from tests.daemonfixtures import AppSpec, DaemonSpec, start_daemon
from tests.gitrepo import OriginRepo


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
        role = re.search(r'require\(request, "(\w+)"\)', body)
        operation = document()["paths"][path][method]
        assert operation.get("x-deployd-role") == (role.group(1) if role else None), path


async def test_document_is_served(tmp_path: Path) -> None:
    """GET /api/v1/openapi.json answers the document without a token."""
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"a": "1"}, "one")
    spec = DaemonSpec(state_dir=tmp_path / "state",
                      apps=[AppSpec(name="shop", repo=origin.url,
                                    local_dirs=[tmp_path / "host"])])
    daemon = await start_daemon(spec.write(tmp_path / "deployd.toml"))
    try:
        status, body = await daemon.api.call("GET", "/api/v1/openapi.json", token=None)
        assert status == 200
        assert body["openapi"].startswith("3.")
        assert "/api/v1/jobs/{job}/approve" in body["paths"]
    finally:
        await daemon.stop()
