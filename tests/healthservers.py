"""Real health endpoints and a real Prometheus server for tests, all on 127.0.0.1.

`HealthServer` is an aiohttp app whose answer a test switches at runtime: ok, a status like
500, slow (sleeps past the check's timeout), a wrong body, a JSON document, a connection reset,
or refusing (the server is shut, so its port refuses) and back. `health_servers` starts any
number of them; `prometheus` starts Debian's `prometheus` binary scraping a small target whose
gauges the test sets. A test module imports the fixtures it uses by name.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import math
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry, Gauge, start_http_server


@dataclass
class Request:
    """One request a health server received."""

    at: float  # time.monotonic()
    method: str
    path: str
    headers: dict[str, str]


class HealthServer:
    """A controllable health endpoint: every path answers according to the current mode."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.mode = "ok"
        self.status = 200
        self.body = "ok"
        self.document: Any = None
        self.delay = 0.0
        self.port = 0
        self.requests: list[Request] = []
        self._ssl_context = ssl_context
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The health URL (any path works)."""
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}/healthz"

    async def start(self) -> None:
        """Listen on 127.0.0.1 (a free port the first time, the same port after `refuse`)."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Close the listener and every connection; the port then refuses."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def ok(self, body: str = "ok") -> None:
        """Answer 200 with `body`."""
        self.mode, self.status, self.body = "ok", 200, body

    def respond(self, status: int, body: str = "") -> None:
        """Answer with `status` and `body`."""
        self.mode, self.status, self.body = "ok", status, body

    def fail(self, status: int = 500) -> None:
        """Answer with an error status."""
        self.respond(status, "failing")

    def slow(self, seconds: float) -> None:
        """Wait `seconds` before answering 200 ok."""
        self.mode, self.delay, self.status, self.body = "slow", seconds, 200, "ok"

    def json(self, document: Any, status: int = 200) -> None:
        """Answer with a JSON document."""
        self.mode, self.document, self.status = "json", document, status

    def reset(self) -> None:
        """Abort each connection with a TCP reset instead of answering."""
        self.mode = "reset"

    async def refuse(self) -> None:
        """Shut the server so connections to its port are refused."""
        await self.stop()

    async def restore(self) -> None:
        """Listen again on the same port and answer 200 ok."""
        self.ok()
        if self._runner is None:
            await self.start()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(Request(time.monotonic(), request.method, request.path,
                                     dict(request.headers)))
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        if self.mode == "reset":
            _abort_with_reset(request)
            return web.Response(status=500)
        if self.mode == "json":
            return web.Response(status=self.status, text=json.dumps(self.document),
                                content_type="application/json")
        return web.Response(status=self.status, text=self.body)


def _abort_with_reset(request: web.Request) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger 0: closing sends a RST rather than a FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


StartServers = Callable[[int], Awaitable[list[HealthServer]]]


@pytest.fixture
async def health_servers() -> AsyncIterator[StartServers]:
    """Start N real health servers (`await health_servers(3)`); all stop after the test."""
    started: list[HealthServer] = []

    async def start(count: int = 1) -> list[HealthServer]:
        servers = [HealthServer() for _ in range(count)]
        for server in servers:
            await server.start()
        started.extend(servers)
        return servers

    yield start
    for server in started:
        await server.stop()


def self_signed_tls(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context for 127.0.0.1 with a fresh self-signed certificate, and its path."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deployd test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context, cert_path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class PrometheusServer:
    """A running Prometheus scraping a target with test gauges, every second."""

    url: str
    process: subprocess.Popen[bytes]
    registry: CollectorRegistry
    error_ratio: Gauge  # deployd_test_error_ratio: one series
    requests: Gauge  # deployd_test_requests{path}: two series
    log: Path

    def query(self, promql: str) -> dict[str, Any]:
        """The raw JSON answer of an instant query."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                answer: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as exc:
            answer = json.load(exc)
        return answer

    def wait_until(self, promql: str, accept: Callable[[list[Any]], bool],
                   timeout: float = 20.0) -> None:
        """Poll `promql` until `accept(result)` holds; fail the test after `timeout`."""
        deadline = time.monotonic() + timeout
        result: list[Any] = []
        while time.monotonic() < deadline:
            answer = self.query(promql)
            result = answer.get("data", {}).get("result", [])
            if answer.get("status") == "success" and accept(result):
                return
            time.sleep(0.2)
        raise AssertionError(f"prometheus: {promql!r} never satisfied the test: {result!r}")

    async def set_error_ratio(self, value: float) -> None:
        """Set the gauge and wait until Prometheus has scraped the new value."""
        self.error_ratio.set(value)

        def scraped(result: list[Any]) -> bool:
            if len(result) != 1:
                return False
            seen = float(result[0]["value"][1])
            return seen == value or (math.isnan(seen) and math.isnan(value))

        await asyncio.to_thread(self.wait_until, "deployd_test_error_ratio", scraped)


@pytest.fixture(scope="session")
def prometheus() -> Iterator[PrometheusServer]:
    """A real Prometheus (Debian's binary) scraping a test target every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian package 'prometheus')")
    registry = CollectorRegistry()
    error_ratio = Gauge("deployd_test_error_ratio", "Test gauge.", registry=registry)
    requests = Gauge("deployd_test_requests", "Test gauge, two series.", ["path"],
                     registry=registry)
    requests.labels(path="/a").set(1)
    requests.labels(path="/b").set(2)
    target_port = free_port()
    target, _thread = start_http_server(target_port, addr="127.0.0.1", registry=registry)
    with tempfile.TemporaryDirectory(prefix="deployd-prometheus-") as tmp:
        server = _start_prometheus(binary, Path(tmp), target_port, registry, error_ratio,
                                   requests)
        try:
            yield server
        finally:
            server.process.terminate()
            try:
                server.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()
            target.shutdown()
            target.server_close()


def _start_prometheus(binary: str, workdir: Path, target_port: int,
                      registry: CollectorRegistry, error_ratio: Gauge, requests: Gauge
                      ) -> PrometheusServer:
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: app\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n"
    )
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=output, stderr=subprocess.STDOUT, cwd=workdir,
        )
    server = PrometheusServer(f"http://127.0.0.1:{port}", process, registry, error_ratio,
                              requests, log)
    try:
        _wait_ready(server)
        server.wait_until('up{job="app"}', lambda result: bool(result)
                          and result[0]["value"][1] == "1")
    except BaseException:
        process.kill()
        process.wait()
        raise
    return server


def _wait_ready(server: PrometheusServer, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"prometheus exited: {server.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"prometheus not ready after {timeout}s: {server.log.read_text()[-2000:]}")
