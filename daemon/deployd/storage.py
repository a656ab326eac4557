"""How the store reaches its database: one small interface, an engine behind it.

The store (store.py, outbox.py, rollout_store.py) writes its SQL once, with `?` placeholders
and only SQL both engines understand (`INSERT ... RETURNING id`, `ON CONFLICT DO NOTHING`,
`IS NOT DISTINCT FROM`); the few things that differ are asked of the backend's `Dialect`.
Rows come back as plain dicts of column name to value.

Two backends: `SQLiteBackend` here (one file in WAL mode, on one dedicated thread, the
default) and `PostgresBackend` in store_postgres.py (psycopg's async pool, for several
daemons on one database).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from deployd.errors import StoreError

T = TypeVar("T")
Row = dict[str, Any]
Args = Sequence[Any]


class Tx(Protocol):
    """Statements on the database: each in its own transaction, or all in one (`transaction`)."""

    async def execute(self, sql: str, args: Args = ()) -> int:
        """Run one statement; the number of rows it changed."""

    async def executemany(self, sql: str, rows: Sequence[Args]) -> None:
        """Run one statement once per row of arguments, all in one transaction."""

    async def fetch_all(self, sql: str, args: Args = ()) -> list[Row]:
        """Run one statement and return every row it yields."""

    async def fetch_one(self, sql: str, args: Args = ()) -> Row | None:
        """Run one statement and return its first row (None when there is none)."""


@dataclass(frozen=True)
class Dialect:
    """The SQL that differs between the engines, in one place."""

    name: str
    # An SQL condition "the integer at data.`key` equals the one `?` argument".
    json_int_template: str
    # Whether a text column can hold the bytes of a patch that is not UTF-8 (SQLite can,
    # PostgreSQL text cannot: its patch column is bytea).
    patch_as_bytes: bool
    # Whether the engine's JSON functions read a document holding a \u0000 escape
    # (PostgreSQL's refuse the whole document, so there a NUL is stored as U+FFFD).
    json_nul_ok: bool
    # Run first in the transaction of an insert whose ids readers page through (events), so
    # ids are handed out in commit order: a reader that has seen id N never later finds a
    # lower one committed. None where writes are one at a time anyway (SQLite's one thread).
    id_order_lock: str | None
    # Appended to a SELECT in a transaction to lock the rows it read until it commits (on
    # SQLite a write transaction, BEGIN IMMEDIATE, already excludes every other writer).
    for_update: str
    # In a transaction: try to take the lock named by two `?` arguments (an integer class and
    # a text name) until it ends, without waiting; one row, `taken`. None where one daemon
    # alone uses the database (SQLite), so there is nobody to exclude.
    try_xact_lock: str | None = None
    # In a transaction: end the session if it stays idle in it longer than the `?` argument
    # (milliseconds, as text), so a lock held by a daemon cut off mid-way does not outlive it.
    idle_limit: str | None = None

    def json_int_equals(self, column: str, key: str) -> str:
        return self.json_int_template.format(column=column, key=key)

    def json_document(self, value: Any) -> str:
        """`value` as the JSON text of a column the engine searches (events.data)."""
        text = json.dumps(value, sort_keys=True, default=str)
        return text if self.json_nul_ok else _JSON_NUL.sub(r"\1\\ufffd", text)

    def patch_value(self, patch: str | None) -> str | bytes | None:
        """A patch as the engine's column holds it (text with surrogate escapes is bytes)."""
        if patch is None:
            return None
        try:
            encoded = patch.encode()
        except UnicodeEncodeError:
            return patch.encode("utf-8", "surrogateescape")
        return encoded if self.patch_as_bytes else patch


SQLITE = Dialect(name="sqlite", json_int_template="json_extract({column}, '$.{key}') = ?",
                 patch_as_bytes=False, json_nul_ok=True, id_order_lock=None, for_update="")
# pg_advisory_xact_lock key every node's event insert holds until it commits ("deployd\0\2"
# as a number; store_postgres.MIGRATION_LOCK is "deployd\0\1").
EVENT_ORDER_LOCK = 0x6465706C6F796402
# `json`, not `jsonb`: parsed in place, not converted. The integer is compared as the JSON
# text of the number, as json_extract compares it as a number: a string "5" matches neither.
POSTGRES = Dialect(name="postgresql",
                   json_int_template="({column}::json -> '{key}')::text = ?::bigint::text",
                   patch_as_bytes=True, json_nul_ok=False,
                   id_order_lock=f"SELECT pg_advisory_xact_lock({EVENT_ORDER_LOCK})",
                   for_update=" FOR UPDATE",
                   try_xact_lock="SELECT pg_try_advisory_xact_lock(?, hashtext(?)) AS taken",
                   idle_limit="SELECT set_config('idle_in_transaction_session_timeout', ?, "
                              "true) AS ms")
# A \u0000 escape in JSON text: one not itself escaped (after an even run of backslashes).
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


class Backend(Tx, Protocol):
    """A database the store can open, migrate, read and write."""

    dialect: Dialect
    # Names the database in errors and logs; never holds a password.
    description: str

    @property
    def is_open(self) -> bool: ...

    async def open(self) -> None:
        """Connect and bring the schema up to date; StoreError naming the database if not."""

    async def close(self) -> None:
        """Disconnect (also after a failed `open`)."""

    async def schema_version(self) -> int: ...

    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """Statements run in one transaction: committed when the block ends, rolled back if it
        raises."""


class SQLiteBackend:
    """One SQLite file in WAL mode. sqlite3 blocks, so all work runs on one dedicated thread
    that owns the connection; coroutines await it and the event loop never touches disk.

    A statement on its own commits by itself (the connection is in autocommit mode). A
    `transaction` holds `_lock` from BEGIN to COMMIT, so no other coroutine's statement can
    land inside it, or read what it has not committed yet, on the shared connection.
    """

    dialect = SQLITE

    def __init__(self, path: Path, migrations: Callable[[], Sequence[str]]) -> None:
        self.path = path
        self.description = str(path)
        self._migrations = migrations
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deployd-store")
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._db is not None

    async def open(self) -> None:
        """Create or open the file, switch to WAL and bring the schema up to date."""
        await self._call(self._open)

    async def close(self) -> None:
        if self._db is not None:
            await self._call(self._close)
        self._executor.shutdown(wait=True)

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _private_files(self.path)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
            self._migrate(db, self._migrations())
        except (sqlite3.Error, OSError) as exc:  # OSError: state_dir cannot be made
            raise StoreError(f"cannot open state store {self.path}: {exc}") from exc
        self._db = db

    def _close(self) -> None:
        assert self._db is not None
        self._db.close()
        self._db = None

    @staticmethod
    def _migrate(db: sqlite3.Connection, migrations: Sequence[str]) -> None:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > len(migrations):
            raise StoreError(
                f"state store has schema version {version}, newer than this deployd "
                f"understands ({len(migrations)}); upgrade deployd"
            )
        for number in range(version, len(migrations)):
            # executescript commits anything pending first, so the transaction lives inside
            # the script: a crash mid-migration leaves the previous version intact.
            script = (f"BEGIN IMMEDIATE;\n{migrations[number]}\n"
                      f"PRAGMA user_version = {number + 1};\nCOMMIT;")
            try:
                db.executescript(script)
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    async def schema_version(self) -> int:
        row = await self.fetch_one("PRAGMA user_version")
        assert row is not None
        return int(row["user_version"])

    # -- statements ----------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("state store is not open")
        return self._db

    async def _call(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: {exc}") from exc

    async def execute(self, sql: str, args: Args = ()) -> int:
        async with self._lock:
            return await self._call(lambda: _execute(self._conn(), sql, args))

    async def executemany(self, sql: str, rows: Sequence[Args]) -> None:
        async with self.transaction() as tx:
            await tx.executemany(sql, rows)

    async def fetch_all(self, sql: str, args: Args = ()) -> list[Row]:
        async with self._lock:
            return await self._call(lambda: _fetch_all(self._conn(), sql, args))

    async def fetch_one(self, sql: str, args: Args = ()) -> Row | None:
        rows = await self.fetch_all(sql, args)
        return rows[0] if rows else None

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Tx]:
        async with self._lock:
            await self._call(lambda: self._conn().execute("BEGIN IMMEDIATE"))
            try:
                yield _SQLiteTx(self)
            except BaseException:
                await self._call(lambda: self._conn().execute("ROLLBACK"))
                raise
            await self._call(lambda: self._conn().execute("COMMIT"))

    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        return self._transaction()


class _SQLiteTx:
    """Statements inside a transaction whose lock is already held."""

    def __init__(self, backend: SQLiteBackend) -> None:
        self._backend = backend

    async def execute(self, sql: str, args: Args = ()) -> int:
        return await self._backend._call(lambda: _execute(self._backend._conn(), sql, args))

    async def executemany(self, sql: str, rows: Sequence[Args]) -> None:
        await self._backend._call(lambda: self._backend._conn().executemany(sql, rows))

    async def fetch_all(self, sql: str, args: Args = ()) -> list[Row]:
        return await self._backend._call(
            lambda: _fetch_all(self._backend._conn(), sql, args))

    async def fetch_one(self, sql: str, args: Args = ()) -> Row | None:
        rows = await self.fetch_all(sql, args)
        return rows[0] if rows else None


def _execute(db: sqlite3.Connection, sql: str, args: Args) -> int:
    return db.execute(sql, args).rowcount


def _fetch_all(db: sqlite3.Connection, sql: str, args: Args) -> list[Row]:
    # Every row is read before returning: an INSERT ... RETURNING commits only once done.
    return [dict(zip(row.keys(), tuple(row), strict=True))
            for row in db.execute(sql, args).fetchall()]


def _private_files(db: Path) -> None:
    """The database file exists and is 0600 before SQLite opens it: SQLite gives its WAL and
    shared-memory files the database file's mode, and fixes theirs if they exist already."""
    os.close(os.open(db, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if path.exists():
            path.chmod(0o600)
