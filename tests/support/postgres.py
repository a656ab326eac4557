"""A throwaway PostgreSQL cluster for the test session, and a fresh database per test.

The cluster is made with Debian's initdb in a directory of its own, run by the unprivileged
test user (PostgreSQL refuses to run as root), on a free loopback port with its unix socket
in that directory. Tests connect over TCP as the role `deployd` with a password (as the
daemon would); the fixtures administer it as the cluster's superuser over the socket. It is
stopped and removed when the session ends.
"""

from __future__ import annotations

import itertools
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from deployd.store_postgres import PostgresBackend
from tests.support.net import free_port
from tests.support.sshd import TEST_USER, shared_dir

ROLE = "deployd"


def postgres_bin() -> Path:
    """The newest Debian PostgreSQL's bin directory (tests/run.sh installs `postgresql`)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    if not found:
        pytest.fail("no /usr/lib/postgresql/*/bin/initdb: install Debian's postgresql "
                    "package (tests/run.sh does)")
    return found[-1].parent


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path  # owned by the test user: data/, the socket, the log
    port: int
    password: str  # the `deployd` role's

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def as_test_user(self, *args: str) -> None:
        """Run one of PostgreSQL's programs as the test user; fail with its output."""
        command = ["runuser", "-u", TEST_USER, "--", str(self.bin_dir / args[0]), *args[1:]]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                              cwd=self.root, check=False)
        if done.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise AssertionError(f"{args[0]} failed: {done.stdout}{done.stderr}{log}")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c full_page_writes=off -c max_connections=200")
        self.as_test_user("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                          "-w", "-t", "60", "start")

    def stop(self) -> None:
        self.as_test_user("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        """Stop the server (its clients' connections die) and start it again, same port."""
        self.stop()
        self.start()

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        """A superuser connection over the unix socket (trusted: the socket's directory is
        the test user's)."""
        return psycopg.connect(host=str(self.root), port=self.port, user=TEST_USER,
                               dbname="postgres", autocommit=True)

    def url(self, database: str) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"


def start_postgres() -> PostgresServer:
    root = shared_dir("deployd-pg-")
    root.chmod(0o700)  # the superuser's socket is trusted: only its owner (and root) reach it
    server = PostgresServer(postgres_bin(), root, free_port(), secrets.token_hex(16))
    try:
        server.as_test_user("initdb", "-D", str(server.data), "-U", TEST_USER, "-E", "UTF8",
                            "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256",
                            "--no-sync")
        server.start()
        with server.admin() as admin:
            admin.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{server.password}'")
    except BaseException:
        remove_postgres(server)
        raise
    return server


def remove_postgres(server: PostgresServer) -> None:
    try:
        if (server.data / "postmaster.pid").exists():
            server.stop()
    finally:
        shutil.rmtree(server.root, ignore_errors=True)


@dataclass(frozen=True)
class Database:
    """One fresh database, owned by the `deployd` role."""

    server: PostgresServer
    name: str

    @property
    def url(self) -> str:
        return self.server.url(self.name)

    @property
    def password(self) -> str:
        return self.server.password

    def backend(self) -> PostgresBackend:
        return PostgresBackend(self.url, password=self.password)

    def query(self, sql: str) -> list[tuple[object, ...]]:
        """Run one statement as the owner, outside the daemon's store."""
        with psycopg.connect(self.url, password=self.password, autocommit=True) as conn:
            cursor = conn.execute(sql.encode())
            return cursor.fetchall() if cursor.description else []


# Parametrize a store fixture with these to run its tests on both backends; the PostgreSQL
# runs need the cluster (root), so they are `slow`.
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)]


def store_backend(request: pytest.FixtureRequest, sqlite_file: Path) -> Path | PostgresBackend:
    """What to build a `Store` on for the fixture's BACKENDS parameter: the SQLite file, or a
    fresh database of the session's cluster (a new one at each call)."""
    if request.param == "sqlite":
        return sqlite_file
    make: Callable[[], Database] = request.getfixturevalue("make_pg_database")
    return make().backend()


_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL cluster (root only: it runs as the test user)."""
    server = start_postgres()
    yield server
    remove_postgres(server)


@pytest.fixture
def make_pg_database(postgres_server: PostgresServer) -> Iterator[Callable[[], Database]]:
    """Fresh databases for one test, as many as it asks for; all dropped after it."""
    made: list[Database] = []

    def make() -> Database:
        name = f"deployd_test_{next(_numbers)}"
        with postgres_server.admin() as admin:
            admin.execute(f"CREATE DATABASE {name} OWNER {ROLE}".encode())
        made.append(Database(postgres_server, name))
        return made[-1]

    yield make
    with postgres_server.admin() as admin:
        for database in made:
            admin.execute(f"DROP DATABASE {database.name} WITH (FORCE)".encode())


@pytest.fixture
def pg_database(make_pg_database: Callable[[], Database]) -> Database:
    """A database of its own for one test, dropped after it."""
    return make_pg_database()
