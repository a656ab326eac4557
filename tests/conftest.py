"""Fixtures shared by the whole suite: real sshd hosts, a client key, known_hosts."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.sshd import ClientKey, SshdHost, shared_dir


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> ClientKey:
    """One client key pair for the whole run."""
    return ClientKey.create(tmp_path_factory.mktemp("client-key"))


@pytest.fixture
def sshd_factory(client_key: ClientKey) -> Iterator[Callable[[], SshdHost]]:
    """Start any number of real sshd hosts on loopback; all are stopped after the test."""
    started: list[SshdHost] = []

    def start() -> SshdHost:
        # sshd reads authorized_keys as the login user: keep it out of root's private tmp.
        host = SshdHost(workdir=shared_dir("deployd-sshd-"), client_key=client_key)
        host.start()
        started.append(host)
        return host

    yield start
    for host in started:
        host.cleanup()
        shutil.rmtree(host.workdir, ignore_errors=True)


@pytest.fixture
def sshd_host(sshd_factory: Callable[[], SshdHost]) -> SshdHost:
    """One real sshd host."""
    return sshd_factory()


def write_known_hosts(path: Path, hosts: list[SshdHost]) -> Path:
    """A known_hosts file naming exactly these hosts' keys."""
    path.write_text("".join(host.known_hosts_line() + "\n" for host in hosts))
    return path
