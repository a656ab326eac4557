"""Fixtures shared by the whole suite: real sshd hosts, a client key, labs and daemons; the
fixtures of tests/support/ modules are plugged in here too (pytest_plugins).

Tests that need root and the `deployd-test` login (sshd hosts, files handed to that user), and
modules that run the daemon end to end for seconds a test, are marked `slow`, so that
`pytest -m "not slow"` is a fast tier that runs anywhere (no root, no sshd).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

# Before the support modules are first imported: their asserts explain themselves too.
pytest.register_assert_rewrite("tests.support")

from tests.support.judging import (  # noqa: E402
    DaemonProcess,
    Daemons,
    Lab,
    MakeLab,
    daemon_starter,
    lab_maker,
    process_starter,
)
from tests.support.sshd import ClientKey, SshdHost, remove_hosts, start_hosts  # noqa: E402

# Fixtures defined next to the labs and servers they make, usable by name in every test.
pytest_plugins = [
    "tests.support.daemonlab",
    "tests.support.healthservers",
    "tests.support.hostfixtures",
    "tests.support.postgres",
    "tests.support.rescuelab",
]


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> ClientKey:
    """One client key pair for the whole run."""
    return ClientKey.create(tmp_path_factory.mktemp("client-key"))


@pytest.fixture
def sshd_factory(client_key: ClientKey) -> Iterator[Callable[[], SshdHost]]:
    """Start any number of real sshd hosts on loopback; all are stopped after the test."""
    started: list[SshdHost] = []

    def start() -> SshdHost:
        started.extend(start_hosts(1, client_key))
        return started[-1]

    yield start
    remove_hosts(started)


@pytest.fixture
def sshd_host(sshd_factory: Callable[[], SshdHost]) -> SshdHost:
    """One real sshd host."""
    return sshd_factory()


@pytest.fixture
async def make_lab(tmp_path: Path) -> AsyncIterator[MakeLab]:
    """Labs of N local hosts, each with its own health server (tests/support/judging.py)."""
    async with lab_maker(tmp_path) as make:
        yield make


@pytest.fixture
async def daemons() -> AsyncIterator[Daemons]:
    """In-process daemons, stopped after the test."""
    async with daemon_starter() as start:
        yield start


@pytest.fixture
async def processes() -> AsyncIterator[Callable[[Lab], DaemonProcess]]:
    """`deployd run` subprocesses, stopped after the test."""
    async with process_starter() as make:
        yield make


# Fixtures that start sshd hosts or hand files to the `deployd-test` login (root only), a
# real Prometheus server (seconds to start) or a PostgreSQL cluster (run as that login).
SLOW_FIXTURES = frozenset({"sshd_factory", "lab_factory", "rescue_lab", "ssh_origin",
                           "user_dir", "prometheus", "postgres_server", "make_pg_database",
                           "pg_database"})
# Modules whose tests each run the daemon (or a tool against it) for seconds.
SLOW_MODULES = frozenset({
    "tests.test_autorollback", "tests.test_notifications", "tests.test_demo",
    "tests.test_metrics", "tests.test_slow_clients", "tests.test_fuzz_api",
    "tests.test_systemd_daemon", "tests.test_ops_live", "tests.test_reload",
    "tests.test_manual_ops",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or (
                module is not None and module.__name__ in SLOW_MODULES):
            item.add_marker(pytest.mark.slow)
