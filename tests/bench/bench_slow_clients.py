"""Benchmark: 300 trickling unauthenticated connections against a running `deployd run`.

    PYTHONPATH=daemon:. python3 tests/bench/bench_slow_clients.py [--connections 300] [--window 60]

The daemon runs as its own process with its default limits (client_timeout 15 s, 32
connections per client). This process opens the connections, sends `GET /api/v1/apps
HTTP/1.1` and then one header byte every 4 s, never finishing the head; meanwhile it times a
normal authenticated GET every 0.5 s from another address. Two runs: every attacker on one
address (127.0.0.3), and each attacker on an address of its own (127.0.1.x, 127.0.2.x), where
only the header deadline helps. Printed per run: connections closed at once, those still open
when the window ends, seconds until the last one closed, the daemon's peak open file
descriptors, normal request latency p50/max.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import resource
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from tests.support.daemonfixtures import DaemonProcess
from tests.support.gitrepo import OriginRepo

SECRET = "bench-read-secret-0123456789"


def write_config(root: Path) -> Path:
    origin = OriginRepo(root / "origin.git")
    origin.commit({"index.html": "v1\n"}, "first")
    config = root / "deployd.toml"
    config.write_text(f"""\
[daemon]
state_dir = "{root / 'state'}"
listen = "127.0.0.1:0"

[[tokens]]
name = "reader"
token_sha256 = "{hashlib.sha256(SECRET.encode()).hexdigest()}"
roles = ["read"]

[apps.shop]
repo = "{origin.path}"
branch = "production"
deploy_to = "{root / 'host'}"
mode = "observe"

[[apps.shop.hosts]]
address = "local"
""")
    return config


async def trickler(host: str, port: int, local: str, closed: list[float],
                   started: float) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port, local_addr=(local, 0))
    except OSError:
        closed.append(time.monotonic() - started)
        return
    writer.write(b"GET /api/v1/apps HTTP/1.1\r\nX-Slow: ")

    async def trickle() -> None:
        with contextlib.suppress(OSError):
            while True:
                await asyncio.sleep(4)
                writer.write(b"a")
                await writer.drain()

    task = asyncio.create_task(trickle())
    with contextlib.suppress(OSError):
        await reader.read()
    closed.append(time.monotonic() - started)
    task.cancel()
    writer.close()


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


async def scenario(daemon: DaemonProcess, addresses: list[str],
                   window: float) -> dict[str, float]:
    assert daemon.process is not None
    host, port = "127.0.0.1", daemon.port
    started = time.monotonic()
    closed: list[float] = []
    tasks = [asyncio.create_task(trickler(host, port, a, closed, started)) for a in addresses]
    latencies: list[float] = []
    peak = 0
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        while len(closed) < len(addresses) and time.monotonic() - started < window:
            peak = max(peak, open_fds(daemon.process.pid))
            begin = time.monotonic()
            async with session.get(f"{daemon.base}/api/v1/apps",
                                   headers={"Authorization": f"Bearer {SECRET}"}) as answer:
                await answer.read()
                assert answer.status == 200, answer.status
            latencies.append(time.monotonic() - begin)
            await asyncio.sleep(0.5)
    still_open = len(addresses) - len(closed)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"closed_at_once": sum(1 for t in closed if t < 1.0),
            "still_open_after_window": still_open,
            "last_closed_after_s": round(max(closed, default=0.0), 1),
            "daemon_peak_fds": peak,
            "normal_p50_ms": round(statistics.median(latencies) * 1000, 1),
            "normal_max_ms": round(max(latencies) * 1000, 1), "normal_requests": len(latencies)}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--window", type=float, default=60.0,
                        help="seconds to wait for the daemon to close them")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        daemon = DaemonProcess(write_config(root), root / "deployd.log")
        await daemon.start()
        try:
            assert daemon.process is not None
            print(f"daemon idle: {open_fds(daemon.process.pid)} open fds")
            n = args.connections
            one = await scenario(daemon, ["127.0.0.3"] * n, args.window)
            print(f"{n} from one address: {one}")
            many = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(n)]
            spread = await scenario(daemon, many, args.window)
            print(f"{n} from {n} addresses: {spread}")
        finally:
            await daemon.close()


if __name__ == "__main__":
    asyncio.run(main())
