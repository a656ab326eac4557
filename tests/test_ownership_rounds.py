"""Ownership rounds, one at a time: several `NodeOwnership`s on one real database, each round
driven by the test, so who is live and who owns what is decided by the database alone (no
daemon, no clock racing the assertions). Faults are real: a node's connection ended by the
server, a node that stops running rounds with its connection open."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager

import pytest

from deployd.metrics import Metrics
from deployd.ownership import NodeOwnership
from deployd.store_postgres import PostgresBackend
from tests.support.postgres import Database
from tests.support.waiting import eventually

APPS = ["alpha", "bravo", "charlie", "delta"]
# Two names PostgreSQL's 32-bit hashtext maps to one value (found by a search over app-N).
HASHTEXT_TWINS = ["app-554", "app-154125"]


class Node:
    """One node's ownership with what it was told to start and stop."""

    def __init__(self, backend: PostgresBackend, name: str, apps: Collection[str],
                 failover: float) -> None:
        self.started: list[tuple[str, int]] = []
        self.stopped: list[str] = []
        self.lost = 0
        self.ownership = NodeOwnership(
            backend, node=name, advertise=f"http://127.0.0.1:9/{name}", failover=failover,
            metrics=Metrics(), apps=lambda: apps, on_acquire=self._acquire,
            on_release=self._release, on_lost=self._lose, idle=lambda app: True)

    async def _acquire(self, app: str, epoch: int) -> None:
        self.started.append((app, epoch))

    async def _release(self, app: str) -> None:
        self.stopped.append(app)

    async def _lose(self) -> None:
        self.lost += 1

    @property
    def owned(self) -> set[str]:
        return set(self.ownership.owned)

    async def round(self) -> set[str]:
        await self.ownership.round()
        return self.owned


@asynccontextmanager
async def nodes(database: Database, *names: str, apps: Collection[str] = APPS,
                failover: float = 60.0) -> AsyncIterator[list[Node]]:
    backend = database.backend()
    await backend.open()
    made = [Node(backend, name, apps, failover) for name in names]
    try:
        yield made
    finally:
        for node in made:
            await node.ownership.close()
        await backend.close()


async def settle(*members: Node, rounds: int = 3) -> None:
    for _ in range(rounds):
        for node in members:
            await node.round()


def end_connections_of(database: Database, node: str) -> None:
    """What the server sees when a node is killed: its connection ends, its locks go."""
    database.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   f"WHERE application_name = 'deployd node {node}'")


async def test_two_nodes_split_the_apps_and_every_app_has_one_owner(
        pg_database: Database) -> None:
    async with nodes(pg_database, "a", "b") as (a, b):
        await settle(a, b)
        assert len(a.owned) == len(b.owned) == 2
        assert a.owned | b.owned == set(APPS)
        assert a.owned.isdisjoint(b.owned)
        rows = pg_database.query("SELECT app, node FROM app_owners ORDER BY app")
        assert {str(app): str(node) for app, node in rows} == {
            **{app: "a" for app in a.owned}, **{app: "b" for app in b.owned}}


async def test_a_killed_nodes_apps_are_taken_at_the_next_round_not_after_failover(
        pg_database: Database) -> None:
    # failover is a minute: the dead node's last_seen stays fresh all test long, so only its
    # ended connection (its node lock gone) can tell the survivor it is dead.
    async with nodes(pg_database, "a", "b") as (a, b):
        await settle(a, b)
        taken_from_a = a.owned
        epochs_before = dict(b.ownership.owned)

        end_connections_of(pg_database, "a")

        async def b_owns_every_app() -> bool:
            return await b.round() == set(APPS)

        await eventually(b_owns_every_app, within=30, what="b owning a's apps")
        assert dict(b.ownership.owned).items() >= epochs_before.items()
        assert {app for app, _ in b.started} >= taken_from_a
        live = pg_database.query("SELECT node FROM app_owners WHERE node = 'a'")
        assert live == []


async def test_a_node_that_hangs_with_its_connection_open_is_ended_and_fenced(
        pg_database: Database) -> None:
    async with nodes(pg_database, "a", "b", failover=1.5) as (a, b):
        await settle(a, b)
        held_by_a = a.owned
        assert held_by_a

        # a stops running rounds (stopped process, wedged loop): its connection stays open
        # and still holds its locks; once its last_seen is failover old, b ends it.
        async def b_owns_every_app() -> bool:
            await asyncio.sleep(0.2)
            return await b.round() == set(APPS)

        await eventually(b_owns_every_app, within=30, what="b taking the hung node's apps")

        # a wakes up: its first round finds its connection gone and stops everything.
        assert await a.round() == set()
        assert a.lost == 1


async def test_a_second_daemon_with_the_same_node_name_owns_nothing(
        pg_database: Database, caplog: pytest.LogCaptureFixture) -> None:
    async with nodes(pg_database, "a", "a") as (first, second):
        await settle(first)
        assert first.owned == set(APPS)
        with caplog.at_level(logging.ERROR, logger="deployd.ownership"):
            assert await second.round() == set()
        assert "node name a is held by another connection" in caplog.text
        assert second.started == []

        await first.ownership.close()  # the first one stops: its name is free

        async def second_owns_every_app() -> bool:
            return await second.round() == set(APPS)

        await eventually(second_owns_every_app, within=30, what="the second taking over")


async def test_apps_whose_names_collide_in_hashtext_are_owned_by_different_nodes(
        pg_database: Database) -> None:
    (same,) = pg_database.query(
        f"SELECT hashtext('{HASHTEXT_TWINS[0]}') = hashtext('{HASHTEXT_TWINS[1]}')")
    assert same == (True,)
    async with nodes(pg_database, "a", "b", apps=HASHTEXT_TWINS) as (a, b):
        await settle(a)
        assert a.owned == set(HASHTEXT_TWINS)

        async def spread() -> bool:
            await a.round()
            return len(await b.round()) == 1

        await eventually(spread, within=30, what="one twin on each node")
        assert a.owned.isdisjoint(b.owned)


async def test_the_dedicated_connection_asks_the_server_to_drop_it_about_failover_after_silence(
        pg_database: Database) -> None:
    async with nodes(pg_database, "a", failover=5.0) as (a,):
        await a.round()
        rows = pg_database.query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'deployd node a'")
        assert rows == [(1,)]
        settings = {name: await show(a.ownership, name) for name in (
            "tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count",
            "tcp_user_timeout")}
        assert settings == {"tcp_keepalives_idle": "3", "tcp_keepalives_interval": "1",
                            "tcp_keepalives_count": "2", "tcp_user_timeout": "5000"}


async def show(ownership: NodeOwnership, name: str) -> str:
    rows = await ownership._execute(f"SHOW {name}")  # the node's own session
    return str(next(iter(rows[0].values())))

