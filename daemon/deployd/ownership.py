"""Which daemon runs which app, when several share one PostgreSQL database.

Each node holds, on one dedicated connection outside the store's pool, a session advisory
lock naming itself and one per app it owns (64-bit keys from a hash of the names, see
`lock_key`). PostgreSQL releases a session's locks when its connection ends, so a node killed
or cut off loses its apps without anyone's help. Every `failover / 3` a node:

- records that it is alive (`nodes.last_seen`, the database's clock, so nodes' clocks may
  differ) and counts the live nodes: those whose node lock is held and who were seen within
  `failover`. A node killed is no longer live at once (its connection ends with it); a node
  whose machine vanished is dropped by the server's TCP keepalives, which this connection sets
  to about `failover`; a node that hangs with its connection open (stopped, wedged) has its
  connection ended by the others once its `last_seen` is `failover` old;
- takes free apps up to its share, ceil(apps / live nodes): lock acquired, then the app's
  `app_owners.epoch` bumped and its `node` set. The epoch names this ownership: the on-host
  lock records it, so a later owner's work can be told from an earlier one's;
- gives back apps over its share, but only those with no operation running (a joining node
  takes its share between operations, never in the middle of a rollback).

So a killed node's apps move within one round (`failover / 3`), a vanished one's within about
`failover` plus a round. The node's own side of the fence: each round must finish within
`failover / 2` (the connection's keepalives and TCP user timeout are set to that too); a round
that fails or hangs means the locks may be gone, and every app it owned stops at once, before
another node could take one over.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg

from deployd.errors import StoreError
from deployd.metrics import Metrics
from deployd.storage import Args, Backend, Row, Tx
from deployd.store_postgres import Connection, PostgresBackend

log = logging.getLogger("deployd.ownership")

_NOW = "extract(epoch FROM clock_timestamp())"

# The advisory locks this connection's session holds, as pg_locks shows one-bigint keys: the
# key's high and low 32 bits (unsigned) in classid and objid, objsubid 1.
_HELD_LOCKS = (
    "SELECT pid, classid::bigint AS high, objid::bigint AS low FROM pg_locks "
    "WHERE locktype = 'advisory' AND objsubid = 1 AND granted "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")


def lock_key(kind: str, name: str) -> int:
    """The advisory lock key for an app's or a node's name: 64 bits of SHA-256, so two names
    never share a lock in practice (PostgreSQL's 32-bit hashtext would, among a few thousand)."""
    digest = hashlib.sha256(f"deployd {kind}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _halves(key: int) -> tuple[int, int]:
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


def _holders(rows: Sequence[Row]) -> dict[tuple[int, int], int]:
    """Rows of `_HELD_LOCKS` by key halves: the backend pid holding each."""
    return {(int(row["high"]), int(row["low"])): int(row["pid"]) for row in rows}


def _node_held(holders: dict[tuple[int, int], int], node: str) -> int | None:
    return holders.get(_halves(lock_key("node", node)))


@dataclass
class NodeOwnership:
    """This node's share of the apps, kept on its dedicated connection."""

    backend: PostgresBackend
    node: str
    advertise: str
    failover: float
    metrics: Metrics
    # The apps in the config (asked every round: a reload adds and removes apps).
    apps: Callable[[], Collection[str]]
    # Start running an app this node now owns, under that ownership's epoch.
    on_acquire: Callable[[str, int], Awaitable[None]]
    # Stop running an app this node gives back (called before its lock is released).
    on_release: Callable[[str], Awaitable[None]]
    # Stop every app at once: the connection, so every lock, may be gone.
    on_lost: Callable[[], Awaitable[None]]
    # Whether an owned app may be given back now (no operation in flight).
    idle: Callable[[str], bool]
    owned: dict[str, int] = field(default_factory=dict)
    _conn: Connection | None = None
    _named: bool = False  # this connection holds the node's own lock
    _down_logged: bool = False

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def interval(self) -> float:
        return self.failover / 3

    def owns(self, app: str) -> bool:
        return app in self.owned

    async def run(self) -> None:
        """Keep this node's share until cancelled (then `close`)."""
        while True:
            try:
                await self.round()
            except Exception:  # a bug must not end ownership: the next round retries
                log.exception("ownership: node %s: round failed", self.node)
            await asyncio.sleep(self.interval)

    async def round(self) -> None:
        """One heartbeat, and the apps taken or given back it calls for."""
        try:
            async with asyncio.timeout(self.failover / 2):
                if self._conn is None:
                    self._conn = await self._connect()
                    log.info("ownership: node %s connected to %s", self.node,
                             self.backend.description)
                if not self._named and not await self._claim_name():
                    return
                live = await self._heartbeat()
                share = math.ceil(len(self.apps()) / max(1, live))
            self.metrics.database_up.set(1)
            self._down_logged = False
            await self._rebalance(share)
        except (psycopg.Error, StoreError, TimeoutError, OSError) as exc:
            await self._lose(exc)

    async def _connect(self) -> Connection:
        half = max(1, math.floor(self.failover / 2))
        return await self.backend.connect(
            application_name=f"deployd node {self.node}", connect_timeout=half,
            keepalives=1, keepalives_idle=max(1, half // 2), keepalives_interval=1,
            keepalives_count=max(1, half // 2),
            tcp_user_timeout=int(self.failover / 2 * 1000),
            options=_server_keepalives(self.failover))

    async def _claim_name(self) -> bool:
        """Hold this node's own lock: what tells the others it is alive. Held elsewhere means
        another daemon runs with this node name, or this node's previous connection has not
        ended yet on the server: own nothing until it is free."""
        rows = await self._execute("SELECT pg_try_advisory_lock(%s) AS taken",
                                   (lock_key("node", self.node),))
        self._named = bool(rows[0]["taken"])
        if not self._named:
            self.metrics.database_up.set(1)
            if await self._end_if_hung(self.node):
                return False  # the next round takes the name
            log.error("ownership: node name %s is held by another connection to %s (another "
                      "daemon with the same [daemon] node, or this node's last connection not "
                      "yet ended): owning no app until it is free", self.node,
                      self.backend.description)
        return self._named

    async def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        assert self._conn is not None
        async with asyncio.timeout(self.failover / 2):
            cursor = await self._conn.execute(sql, args)
            return await cursor.fetchall() if cursor.description else []

    async def _heartbeat(self) -> int:
        """Record this node as alive; how many nodes are (this one included). A node seen
        too long ago whose lock is still held hangs with its connection open: end it."""
        await self._execute(
            f"INSERT INTO nodes (name, advertise, last_seen) VALUES (%s, %s, {_NOW}) "
            "ON CONFLICT (name) DO UPDATE SET advertise = excluded.advertise, "
            "last_seen = excluded.last_seen", (self.node, self.advertise))
        nodes = await self._execute(
            f"SELECT name, last_seen > {_NOW} - %s AS fresh FROM nodes", (self.failover,))
        holders = _holders(await self._execute(_HELD_LOCKS))
        live = 1  # this node
        for row in nodes:
            holder = _node_held(holders, row["name"])
            if holder is None or row["name"] == self.node:
                continue
            if row["fresh"]:
                live += 1
            else:
                await self._end_hung_node(row["name"], holder)
        return live

    async def _end_if_hung(self, node: str) -> bool:
        """End the connection holding `node`'s lock if that node was not seen for `failover`."""
        rows = await self._execute(
            f"SELECT last_seen <= {_NOW} - %s AS stale FROM nodes WHERE name = %s",
            (self.failover, node))
        if not rows or not rows[0]["stale"]:
            return False
        holders = _holders(await self._execute(_HELD_LOCKS))
        holder = _node_held(holders, node)
        return holder is not None and await self._end_hung_node(node, holder)

    async def _end_hung_node(self, node: str, pid: int) -> bool:
        log.warning("ownership: node %s has not been seen for over %ss but its connection "
                    "still holds its apps: ending that connection (backend pid %d)",
                    node, _seconds(self.failover), pid)
        try:
            rows = await self._execute("SELECT pg_terminate_backend(%s) AS ended", (pid,))
        except psycopg.errors.InsufficientPrivilege as exc:
            log.error("ownership: cannot end node %s's connection (%s): its apps stay with it "
                      "until the database server drops it", node, exc)
            return False
        return bool(rows[0]["ended"])

    async def _rebalance(self, share: int) -> None:
        configured = set(self.apps())
        for app in sorted(set(self.owned) - configured):  # left the config
            await self._release(app)
        extra = len(self.owned) - share
        for app in sorted(self.owned, reverse=True):
            if extra <= 0:
                break
            if self.idle(app):
                await self._release(app)
                extra -= 1
        for app in sorted(configured - set(self.owned)):
            if len(self.owned) >= share:
                break
            await self._try_take(app)
        # Every node shows every app (0 where another runs it): an app whose owner died is
        # still a series, and max by app of 0 says nobody owns it.
        for app in configured:
            self.metrics.app_owned.labels(app=app).set(1 if app in self.owned else 0)

    async def _try_take(self, app: str) -> None:
        rows = await self._execute("SELECT pg_try_advisory_lock(%s) AS taken",
                                   (lock_key("app", app),))
        if not rows[0]["taken"]:
            return
        rows = await self._execute(
            f"INSERT INTO app_owners (app, node, epoch, since) VALUES (%s, %s, 1, {_NOW}) "
            "ON CONFLICT (app) DO UPDATE SET node = excluded.node, "
            "epoch = app_owners.epoch + 1, since = excluded.since RETURNING epoch",
            (app, self.node))
        epoch = int(rows[0]["epoch"])
        self.owned[app] = epoch
        self.metrics.app_owned.labels(app=app).set(1)
        self.metrics.ownership_changes_total.labels(app=app).inc()
        log.info("ownership: node %s owns %s (epoch %d)", self.node, app, epoch)
        await self.on_acquire(app, epoch)

    async def _release(self, app: str) -> None:
        """Stop the app here first, then let the lock go: never two nodes running it."""
        self.owned.pop(app)
        await self.on_release(app)
        self.metrics.app_owned.labels(app=app).set(0)
        self.metrics.ownership_changes_total.labels(app=app).inc()
        await self._execute("UPDATE app_owners SET node = '' WHERE app = %s AND node = %s",
                            (app, self.node))
        await self._execute("SELECT pg_advisory_unlock(%s)", (lock_key("app", app),))
        log.info("ownership: node %s gave %s back", self.node, app)

    async def _lose(self, exc: BaseException) -> None:
        reason = str(exc) or type(exc).__name__
        self.metrics.database_up.set(0)
        if self._conn is None and not self.owned:
            if not self._down_logged:
                self._down_logged = True
                log.warning("ownership: node %s cannot reach %s: %s", self.node,
                            self.backend.description, reason)
            return
        log.error("ownership: node %s lost its connection to %s (%s): stopping its %d app(s)",
                  self.node, self.backend.description, reason, len(self.owned))
        lost = list(self.owned)
        self.owned.clear()
        await self.on_lost()
        for app in lost:
            self.metrics.app_owned.labels(app=app).set(0)
            self.metrics.ownership_changes_total.labels(app=app).inc()
        await self.close()

    async def close(self) -> None:
        """End the connection: PostgreSQL releases every lock it held."""
        conn, self._conn = self._conn, None
        self._named = False
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()


async def node_list(backend: Any, failover: float) -> list[dict[str, Any]]:
    """Every node on record: name, advertise URL, last seen, live, apps it owns."""
    nodes = await backend.fetch_all("SELECT name, advertise, last_seen FROM nodes ORDER BY name")
    owners = await backend.fetch_all("SELECT app, node, epoch FROM app_owners ORDER BY app")
    now_row = await backend.fetch_one(f"SELECT {_NOW} AS now")
    now = float(now_row["now"]) if now_row is not None else 0.0
    holders = _holders(await backend.fetch_all(_HELD_LOCKS))
    listed = []
    for node in nodes:
        live = (float(node["last_seen"]) > now - failover
                and _node_held(holders, node["name"]) is not None)
        apps = [row["app"] for row in owners if row["node"] == node["name"]] if live else []
        listed.append({"name": node["name"], "advertise": node["advertise"],
                       "last_seen": float(node["last_seen"]), "live": live, "apps": apps})
    return listed


def _server_keepalives(failover: float) -> str:
    """Session settings for the server's side of the dedicated connection: a node whose
    machine vanished (no FIN ever comes) is dropped, and its locks freed, about `failover`
    after its last heartbeat instead of the kernel's two hours."""
    idle = max(1, math.ceil(failover / 2))
    count = max(1, math.floor(failover - idle))
    return (f"-c tcp_keepalives_idle={idle} -c tcp_keepalives_interval=1 "
            f"-c tcp_keepalives_count={count} -c tcp_user_timeout={int(failover * 1000)}")


def _seconds(value: float) -> str:
    return f"{value:g}"


_WRITES = ("INSERT", "UPDATE", "DELETE")


class FencedBackend:
    """The store's backend as one app's owner writes through it: every write (and every
    transaction) first checks, in its own transaction, that `app_owners` still names this
    node and epoch, holding that row (FOR SHARE) until it commits. A takeover's epoch bump
    waits for a write in flight and fails every later one: a node that lost the app can no
    longer change its state, even while the store's pool still reaches the database."""

    def __init__(self, inner: Backend, *, app: str, node: str, epoch: int) -> None:
        self.inner = inner
        self.dialect = inner.dialect
        self.description = inner.description
        self.app, self.node, self.epoch = app, node, epoch

    @property
    def is_open(self) -> bool:
        return self.inner.is_open

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def schema_version(self) -> int:
        return await self.inner.schema_version()

    async def _check(self, tx: Tx) -> None:
        row = await tx.fetch_one("SELECT epoch FROM app_owners WHERE app = ? AND node = ? "
                                 "AND epoch = ? FOR SHARE", (self.app, self.node, self.epoch))
        if row is None:
            raise StoreError(f"{self.app}: node {self.node} no longer owns it (epoch "
                             f"{self.epoch} is over): its state is not written")

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Tx]:
        async with self.inner.transaction() as tx:
            await self._check(tx)
            yield tx

    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        return self._transaction()

    async def execute(self, sql: str, args: Args = ()) -> int:
        async with self.transaction() as tx:
            return await tx.execute(sql, args)

    async def executemany(self, sql: str, rows: Sequence[Args]) -> None:
        async with self.transaction() as tx:
            await tx.executemany(sql, rows)

    async def fetch_all(self, sql: str, args: Args = ()) -> list[Row]:
        if not sql.lstrip().upper().startswith(_WRITES):
            return await self.inner.fetch_all(sql, args)
        async with self.transaction() as tx:  # INSERT ... RETURNING
            return await tx.fetch_all(sql, args)

    async def fetch_one(self, sql: str, args: Args = ()) -> Row | None:
        rows = await self.fetch_all(sql, args)
        return rows[0] if rows else None
