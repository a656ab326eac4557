"""Real health endpoints and a real Prometheus server for tests, all on 127.0.0.1.

`HealthServer` is an aiohttp app whose answer a test switches at runtime: ok, a status like
500, slow (sleeps past the check's timeout), a wrong body, a JSON document, a connection reset,
or refusing (the server is shut, so its port refuses) and back. After `follow(deploy_to)` it
answers like the app `<deploy_to>/current` points at: that release's `health.txt` is a
`Behaviour` (status, delay, fail after / for N seconds live), timed from the moment `current`
was switched; `override` gives one host its own behaviour (for one release or all).
`health_servers` starts any number of them; `prometheus` starts Debian's `prometheus` binary
scraping a small target whose gauges the test sets. A test module imports the fixtures it uses
by name.
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

from tests.support.net import answers_200, free_port
from tests.support.processes import stop_process
from tests.support.waiting import wait_until_blocking

GOOD = "ok\n"
BAD = "broken: cannot reach the database\n"


# health.txt words -> Behaviour fields
_WORDS = {"status": "status", "delay": "delay", "fail-after": "fail_after",
          "fail-for": "fail_for"}


@dataclass(frozen=True)
class Behaviour:
    """How a release answers its health checks, timed from the moment it went live.

    As `health.txt` text: `ok`, optionally followed by `status N`, `delay SECONDS`,
    `fail-after SECONDS` (500 once live that long), `fail-for SECONDS` (500 until live that
    long: an app warming up). Any other text is a broken app: 500 with the text as body.
    """

    status: int = 200
    delay: float = 0.0
    fail_after: float | None = None
    fail_for: float | None = None
    body: str = "ok"

    @classmethod
    def parse(cls, text: str) -> Behaviour:
        words = text.split()
        if words[:1] == ["ok"]:
            words = words[1:]
        pairs = dict(zip(words[::2], words[1::2], strict=False))
        if len(words) % 2 or not set(pairs) <= set(_WORDS):
            return cls(status=500, body=text.strip())
        values: dict[str, Any] = {_WORDS[word]: float(value) for word, value in pairs.items()}
        if "status" in values:
            values["status"] = int(values["status"])
        return cls(**values)

    def render(self) -> str:
        """This behaviour as `health.txt` text."""
        if self.status >= 500 and self.body != "ok":
            return self.body + "\n"
        words = [f"{word} {getattr(self, name):g}" for word, name in _WORDS.items()
                 if getattr(self, name) not in (None, getattr(Behaviour, name))]
        return (" ".join(words) or "ok") + "\n"

    def answer(self, live_for: float) -> tuple[int, str]:
        """(status, body) after the release has been live for `live_for` seconds."""
        if self.fail_after is not None and live_for >= self.fail_after:
            return 500, f"failing after {self.fail_after:g}s live"
        if self.fail_for is not None and live_for < self.fail_for:
            return 500, f"warming up for {self.fail_for:g}s"
        return self.status, self.body


def fail_after(seconds: float) -> str:
    """health.txt content for an app that goes bad `seconds` after it went live."""
    return Behaviour(fail_after=seconds).render()


def fail_for(seconds: float) -> str:
    """health.txt content for an app that fails for `seconds` after it went live, then is ok."""
    return Behaviour(fail_for=seconds).render()


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
        self.deploy_to: Path | None = None
        # Per host: revision (None: every release) -> how this host answers instead.
        self.overrides: dict[str | None, Behaviour] = {}
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
        """Listen again on the same port: keep following if we were, else answer 200 ok."""
        if self.mode != "follow":
            self.ok()
        if self._runner is None:
            await self.start()

    def follow(self, deploy_to: Path) -> None:
        """Answer as the release `<deploy_to>/current` points at says, from now on."""
        self.deploy_to = deploy_to
        self.mode = "follow"

    def resume_following(self) -> None:
        """Go back to answering as the live release says (after `fail`, `ok`...)."""
        assert self.deploy_to is not None
        self.mode = "follow"

    def override(self, behaviour: Behaviour | str, revision: str | None = None) -> None:
        """While following: this host answers as `behaviour` says (a Behaviour or health.txt
        text) when `revision` is live (any release when None), whatever the release says."""
        if isinstance(behaviour, str):
            behaviour = Behaviour.parse(behaviour)
        self.overrides[revision] = behaviour

    def live_behaviour(self) -> tuple[Behaviour, float] | None:
        """How the live release answers on this host, and how long it has been live."""
        assert self.deploy_to is not None
        current = self.deploy_to / "current"
        try:
            # The symlink's own mtime is the moment `current` was switched: the app's clock
            # starts then, whether or not anyone asked it anything since.
            went_live = current.lstat().st_mtime
            text = (current / "health.txt").read_text()
        except OSError:
            return None
        try:
            revision: str | None = (current / "REVISION").read_text().strip()
        except OSError:
            revision = None
        behaviour = (self.overrides.get(revision) or self.overrides.get(None)
                     or Behaviour.parse(text))
        return behaviour, time.time() - went_live

    async def _follow(self) -> web.Response:
        live = self.live_behaviour()
        if live is None:
            return web.Response(status=503, text="no release live")
        behaviour, live_for = live
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        status, body = behaviour.answer(live_for)
        return web.Response(status=status, text=body)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(Request(time.monotonic(), request.method, request.path,
                                     dict(request.headers)))
        if self.mode == "follow":
            return await self._follow()
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


async def start_servers(count: int) -> list[HealthServer]:
    """`count` started health servers, each on its own free port."""
    servers = [HealthServer() for _ in range(count)]
    for server in servers:
        await server.start()
    return servers


@pytest.fixture
async def health_servers() -> AsyncIterator[StartServers]:
    """Start N real health servers (`await health_servers(3)`); all stop after the test."""
    started: list[HealthServer] = []

    async def start(count: int = 1) -> list[HealthServer]:
        servers = await start_servers(count)
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
        result: list[Any] = []

        def accepted() -> bool:
            nonlocal result
            answer = self.query(promql)
            result = answer.get("data", {}).get("result", [])
            return answer.get("status") == "success" and accept(result)

        wait_until_blocking(accepted, within=timeout, every=0.2,
                            what=f"prometheus: {promql!r} satisfying the test",
                            explain=lambda: f"last result {result!r}")

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
            stop_process(server.process, timeout=10)
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
    def ready() -> bool:
        if server.process.poll() is not None:
            raise RuntimeError(f"prometheus exited: {server.log.read_text()[-2000:]}")
        return answers_200(f"{server.url}/-/ready")

    wait_until_blocking(ready, within=timeout, every=0.1, what="prometheus ready",
                        explain=lambda: server.log.read_text()[-2000:])
