"""Real OpenSSH servers on loopback for the tests.

Each `SshdHost` is one `sshd -D` process with its own host key, port and home directory,
accepting the shared client key for the unprivileged test user. Tests act on hosts exactly
as deployd does in production: over SSH, with host keys verified.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.net import free_port
from tests.support.processes import stop_process
from tests.support.waiting import wait_until_blocking

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
TEST_USER = os.environ.get("DEPLOYD_TEST_USER", "deployd-test")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_user() -> pwd.struct_passwd:
    """The unprivileged login the test hosts accept (created by .ci/run)."""
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError as exc:  # pragma: no cover - environment problem
        raise RuntimeError(
            f"test user {TEST_USER!r} is missing; run .ci/run (it creates it)"
        ) from exc


def shared_dir(prefix: str) -> Path:
    """A fresh directory the test user owns, outside root's private pytest tmp."""
    user = test_user()
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("DEPLOYD_TEST_TMP", "/tmp")))
    path.chmod(0o755)
    os.chown(path, user.pw_uid, user.pw_gid)
    return path


def chown_tree(path: Path) -> None:
    """Give a tree to the test user (for repos and dirs the tests make as root)."""
    user = test_user()
    for root, dirs, files in os.walk(path):
        os.chown(root, user.pw_uid, user.pw_gid)
        for name in dirs + files:
            os.lchown(os.path.join(root, name), user.pw_uid, user.pw_gid)


@dataclass
class ClientKey:
    """The key pair the tests log in with."""

    private: Path
    public: Path

    @classmethod
    def create(cls, directory: Path) -> ClientKey:
        private = directory / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(private)], check=True
        )
        return cls(private=private, public=directory / "id_ed25519.pub")


@dataclass
class SshdHost:
    """One running sshd on 127.0.0.1:port; `home` is a directory the test user owns."""

    workdir: Path
    client_key: ClientKey
    port: int = 0
    home: Path = field(default_factory=Path)
    process: subprocess.Popen[bytes] | None = None
    host_key_line: str = ""

    @property
    def address(self) -> str:
        return "127.0.0.1"

    @property
    def user(self) -> str:
        return TEST_USER

    def known_hosts_line(self) -> str:
        """The `[127.0.0.1]:port keytype key` line for a known_hosts file."""
        return f"[{self.address}]:{self.port} {self.host_key_line}"

    def setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        host_key = self.workdir / "ssh_host_ed25519_key"
        if not host_key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True
            )
        pub = (self.workdir / "ssh_host_ed25519_key.pub").read_text().split()
        self.host_key_line = f"{pub[0]} {pub[1]}"
        authorized = self.workdir / "authorized_keys"
        authorized.write_text(self.client_key.public.read_text())
        if not self.port:
            self.port = free_port()
        if self.home == Path():
            self.home = shared_dir("deployd-host-")
        config = self.workdir / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {host_key}",
                    f"PidFile {self.workdir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized}",
                    f"AllowUsers {TEST_USER}",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "UsePAM no",
                    "StrictModes no",
                    "MaxSessions 200",
                    "MaxStartups 200:30:400",
                    "LogLevel ERROR",
                    "Subsystem sftp internal-sftp",
                    "",
                ]
            )
        )
        Path("/run/sshd").mkdir(exist_ok=True)

    def start(self) -> None:
        """Start (or restart) sshd and wait until it accepts TCP connections."""
        self.setup()
        log = open(self.workdir / "sshd.log", "ab")
        self.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.workdir / "sshd_config")],
            stdout=log,
            stderr=log,
        )
        log.close()
        wait_until_blocking(self._listening, within=10, every=0.02,
                            what=f"sshd on port {self.port} starting")

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"sshd exited: {(self.workdir / 'sshd.log').read_text(errors='replace')}")
        try:
            with socket.create_connection((self.address, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        """Kill sshd and every session it spawned (a host vanishing)."""
        if self.process is None:
            return
        # Per-login sshd processes and their commands outlive the listener; kill the whole
        # tree so open connections drop, as when a machine disappears.
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=5)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        # Path() is the unset default (the current directory): never delete that.
        if self.home != Path():
            shutil.rmtree(self.home, ignore_errors=True)


def write_known_hosts(path: Path, hosts: list[SshdHost]) -> Path:
    """A known_hosts file naming exactly these hosts' keys."""
    path.write_text("".join(host.known_hosts_line() + "\n" for host in hosts))
    return path


def start_hosts(count: int, client_key: ClientKey, prefix: str = "deployd-sshd-"
                ) -> list[SshdHost]:
    """`count` started sshd hosts. sshd reads authorized_keys as the login user, so each
    host's files sit in a `shared_dir`, out of root's private tmp."""
    hosts = []
    for _ in range(count):
        host = SshdHost(workdir=shared_dir(prefix), client_key=client_key)
        host.start()
        hosts.append(host)
    return hosts


def remove_hosts(hosts: list[SshdHost]) -> None:
    """Stop these hosts and delete their files."""
    for host in hosts:
        host.cleanup()
        shutil.rmtree(host.workdir, ignore_errors=True)
