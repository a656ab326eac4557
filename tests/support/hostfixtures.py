"""Helpers and fixtures for the host, release and fleet tests: real sshd hosts as apps see them."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deployd.config import AppConfig, Hooks, HostConfig, SSHConfig
from deployd.hosts import HostPool
from deployd.retry import instant_retries
from tests.support.sshd import ClientKey, SshdHost, descendants, shared_dir, write_known_hosts


def vanish(host: SshdHost) -> None:
    """Kill an sshd with every session and command under it, as when a machine disappears."""
    host.kill()


def processes_matching(text: str) -> list[str]:
    """Command lines of live processes that contain `text`."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if text in line and "ps -eo" not in line]


def command_lines_holding(*needles: str) -> list[str]:
    """Every process's command line (all of /proc, any user) that holds one of `needles`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                line = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(needle in line for needle in needles):
            found.append(f"{entry}: {line[:200]}")
    return found


def make_tarball(files: Mapping[str, str | bytes], *, symlinks: Mapping[str, str] | None = None,
                 executable: tuple[str, ...] = ()) -> bytes:
    """A small release tarball: path -> content, plus symlinks and executable files."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o755 if path in executable else 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
        for path, target in (symlinks or {}).items():
            info = tarfile.TarInfo(path)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def sha(n: int) -> str:
    """A fake 40-hex revision numbered n."""
    return f"{n:040x}"


@dataclass
class Lab:
    """Sshd hosts plus what an app needs to reach them."""

    client_key: ClientKey
    workdir: Path
    hosts: list[SshdHost] = field(default_factory=list)

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "known_hosts"

    def ssh(self, **overrides: float) -> SSHConfig:
        write_known_hosts(self.known_hosts, self.hosts)
        settings: dict[str, float] = {"connect_timeout": 5.0, "command_timeout": 30.0,
                                      "keepalive_interval": 15.0, **overrides}
        return SSHConfig(user=self.hosts[0].user if self.hosts else None,
                         key=self.client_key.private, known_hosts=self.known_hosts,
                         connect_timeout=settings["connect_timeout"],
                         command_timeout=settings["command_timeout"],
                         keepalive_interval=settings["keepalive_interval"])

    def host_config(self, host: SshdHost, **vars: str) -> HostConfig:
        return HostConfig(address=host.address, port=host.port,
                          deploy_to=str(host.home / "app"), vars=dict(vars))

    def app(self, *, name: str = "shop", hooks: Hooks | None = None,
            linked_dirs: tuple[str, ...] = (), linked_files: tuple[str, ...] = (),
            keep_releases: int = 5, parallel: int = 50, lock_stale_after: float = 3600.0,
            hook_timeout: float = 30.0, ssh: SSHConfig | None = None,
            hosts: list[HostConfig] | None = None) -> AppConfig:
        configs = hosts if hosts is not None else [self.host_config(h) for h in self.hosts]
        return AppConfig(
            name=name, repo="/nonexistent", branch="production",
            deploy_to=configs[0].deploy_to if configs else "/srv/app",
            hosts=tuple(configs), keep_releases=keep_releases, linked_dirs=linked_dirs,
            linked_files=linked_files, parallel=parallel, lock_stale_after=lock_stale_after,
            ssh=ssh or self.ssh(), hooks=hooks or Hooks(), hook_timeout=hook_timeout,
        )


@pytest.fixture
def lab_factory(client_key: ClientKey,
                sshd_factory: Callable[[], SshdHost]) -> Iterator[Callable[[int], Lab]]:
    """Make a Lab with n fresh sshd hosts."""
    made: list[Lab] = []

    def make(n: int) -> Lab:
        lab = Lab(client_key=client_key, workdir=shared_dir("deployd-lab-"))
        lab.hosts = [sshd_factory() for _ in range(n)]
        made.append(lab)
        return lab

    yield make
    for lab in made:
        for host in lab.hosts:
            if host.process is not None:
                for pid in descendants(host.process.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        subprocess.run(["rm", "-rf", str(lab.workdir)], check=False)


@pytest.fixture
async def pool() -> AsyncIterator[HostPool]:
    """A HostPool whose connect retries do not sleep; closed after the test."""
    with instant_retries():
        made = HostPool()
        yield made
        await made.close()
