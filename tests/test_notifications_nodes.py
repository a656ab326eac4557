"""`[[notify]]` with two daemons on one PostgreSQL database: both run the notifications part
over the one outbox, and each notification still reaches the receiver once, in order; a node
killed while delivering leaves the rest to the other, and reminders are not doubled.

Real daemons (in process, or `deployd run` for kill -9) on a throwaway PostgreSQL database; the
receiver is a real aiohttp server that counts what it is sent.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from deployd.store import JobStore, Store
from tests.support.daemonfixtures import RunningDaemon, start_daemon
from tests.support.gitrepo import OriginRepo
from tests.support.metrics import sample, scrape
from tests.support.net import free_port
from tests.support.nodespecs import local_apps, node_process, node_spec, wait_owners
from tests.support.postgres import Database
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

FLIPS = ["app.paused", "app.resumed"]


@dataclass
class Got:
    at: float
    delivery: str
    body: dict[str, Any]


@dataclass
class Receiver:
    """Records every notification as it arrives, then answers 200 after `delay` seconds."""

    delay: float = 0.0
    port: int = field(default_factory=free_port)
    got: list[Got] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.got.append(Got(time.monotonic(), request.headers["X-Deployd-Delivery"],
                            await request.json()))
        await asyncio.sleep(self.delay)
        return web.Response(text="ok")

    def events(self) -> list[int]:
        """The event ids in the order they first arrived."""
        return list(dict.fromkeys(got.body["event"] for got in self.got
                                  if got.body["event"] is not None))

    async def wait_for_events(self, count: int, *, within: float = 30.0) -> None:
        await wait_until(lambda: len(self.events()) >= count, within=within,
                         what=f"{count} notifications",
                         explain=lambda: f"got {len(self.events())} events, "
                                         f"{len(self.got)} requests")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    made = Receiver()
    await made.start()
    yield made
    await made.stop()


def hook(tmp_path: Path, receiver: Receiver, **settings: Any) -> dict[str, Any]:
    url_file = tmp_path / "hook.url"
    url_file.write_text(receiver.url + "\n")
    return {"name": "hook", "url_file": str(url_file), **settings}


async def flip(daemon: Any, app: str, rounds: int) -> None:
    """Pause and resume the app `rounds` times through the daemon's REST API."""
    for n in range(rounds):
        status, body = await daemon.api.call("POST", f"/api/v1/apps/{app}/pause",
                                             json_body={"reason": f"{app} {n}"})
        assert status == 200, body
        status, body = await daemon.api.call("POST", f"/api/v1/apps/{app}/resume")
        assert status == 200, body


def sent(daemon: RunningDaemon) -> float:
    value = daemon.daemon.metrics.registry.get_sample_value(
        "deployd_notifications_total", {"target": "hook", "result": "sent"})
    return value or 0.0


async def test_two_nodes_deliver_each_notification_once_in_order(
        tmp_path: Path, pg_database: Database, receiver: Receiver) -> None:
    """Two nodes, each pausing and resuming its own app: 40 events, 40 deliveries (one per
    event, one id each, in the order of the events), however the two nodes share the work."""
    receiver.delay = 0.02
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "first")
    apps = local_apps(tmp_path, origin, ["alpha", "bravo"])
    notify = [hook(tmp_path, receiver, events=FLIPS, remind="0")]
    nodes: list[RunningDaemon] = []
    try:
        nodes.append(await start_daemon(node_spec(tmp_path, "node-a", pg_database, apps,
                                                  notify=notify).write(tmp_path / "a.toml")))
        await wait_owners(nodes[0].api, {"node-a": ["alpha", "bravo"]}, within=10)
        nodes.append(await start_daemon(node_spec(tmp_path, "node-b", pg_database, apps,
                                                  notify=notify).write(tmp_path / "b.toml")))
        await wait_owners(nodes[0].api, {"node-a": ["alpha"], "node-b": ["bravo"]}, within=15)

        await asyncio.gather(flip(nodes[0], "alpha", 10), flip(nodes[1], "bravo", 10))
        await receiver.wait_for_events(40)
        stopped = list(nodes)
        while nodes:  # a stop lets a send in flight finish: after it, nothing more comes
            await nodes.pop().stop()
        totals = [sent(node) for node in stopped]
    finally:
        for node in nodes:
            await node.stop()

    assert len(receiver.got) == 40, [(g.body["event"], g.delivery) for g in receiver.got]
    assert len({got.delivery for got in receiver.got}) == 40
    assert receiver.events() == sorted(receiver.events())
    assert sum(totals) == 40, totals
    queued = pg_database.query("SELECT count(*) FROM outbox WHERE state <> 'sent'")
    assert queued == [(0,)]
    print(f"sent by node-a / node-b: {totals[0]:.0f} / {totals[1]:.0f}")


async def test_kill9_of_the_delivering_node_the_other_delivers_the_rest(
        tmp_path: Path, pg_database: Database, receiver: Receiver) -> None:
    """node-a runs the app and is delivering its 24 notifications to a slow receiver when it
    is killed -9: node-b delivers the rest, in order. Nothing is lost; the send cut short may
    come twice (same delivery id), nothing else does."""
    receiver.delay = 0.15
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "first")
    apps = local_apps(tmp_path, origin, ["alpha"])
    notify = [hook(tmp_path, receiver, events=FLIPS, remind="0")]
    nodes = {name: node_process(node_spec(tmp_path, name, pg_database, apps, notify=notify),
                                tmp_path / f"{name}.toml", tmp_path / f"{name}.log")
             for name in ("node-a", "node-b")}
    try:
        await nodes["node-a"].start()
        await wait_owners(nodes["node-a"].api, {"node-a": ["alpha"]}, within=10)
        await nodes["node-b"].start()
        await flip(nodes["node-a"], "alpha", 12)
        await receiver.wait_for_events(5)
        assert sample(await scrape(nodes["node-a"]), "deployd_notifications_total",
                      target="hook", result="sent")
        nodes["node-a"].kill9()
        before = len(receiver.events())
        assert before < 24, "every notification was delivered before the kill"

        await receiver.wait_for_events(24, within=40)
        delivered_by_b = sample(await scrape(nodes["node-b"]), "deployd_notifications_total",
                                target="hook", result="sent")
    finally:
        for node in nodes.values():
            await node.close()

    events = receiver.events()
    assert events == sorted(events)
    ids: dict[int, set[str]] = {}
    for got in receiver.got:
        ids.setdefault(got.body["event"], set()).add(got.delivery)
    assert all(len(one) == 1 for one in ids.values()), ids
    assert len(receiver.got) - 24 <= 1, [g.body["event"] for g in receiver.got]
    assert delivered_by_b is not None and delivered_by_b >= 24 - before - 1
    print(f"killed after {before} of 24; node-b delivered {delivered_by_b:.0f}; "
          f"re-sent: {len(receiver.got) - 24}")


async def test_two_nodes_remind_of_a_pending_job_once_per_remind(
        tmp_path: Path, pg_database: Database, receiver: Receiver) -> None:
    """A pending rescue job, two nodes each looking for jobs owed a reminder twice a
    `remind` (1s): the reminders come one `remind` apart, never two at once."""
    origin = OriginRepo(tmp_path / "origin.git")
    head = origin.commit({"index.html": "v1\n"}, "first")
    apps = local_apps(tmp_path, origin, ["alpha"])
    notify = [hook(tmp_path, receiver, events=["job.*"], remind="1s")]
    nodes: list[RunningDaemon] = []
    store = Store(pg_database.backend())
    try:
        nodes.append(await start_daemon(node_spec(tmp_path, "node-a", pg_database, apps,
                                                  notify=notify).write(tmp_path / "a.toml")))
        nodes.append(await start_daemon(node_spec(tmp_path, "node-b", pg_database, apps,
                                                  notify=notify).write(tmp_path / "b.toml")))
        await nodes[0].wait_for_event("alpha", "deploy.succeeded")
        await store.open()
        # The branch's head as the job's bad head: housekeeping leaves it pending.
        await JobStore(store).create("alpha", base=head, bad_head=head, candidates=[],
                                     selection=[], requester="test", reason="test",
                                     expires_at=time.time() + 3600)

        def reminders() -> list[Got]:
            return [got for got in receiver.got if got.body["kind"] == "job.pending"]

        await wait_until(lambda: len(reminders()) >= 5, within=30, what="5 reminders")
    finally:
        for node in nodes:
            await node.stop()
        await store.close()

    found = reminders()
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(found)]
    assert min(gaps) >= 0.5, gaps  # a second reminder at once would be ~0
    queued = pg_database.query("SELECT created_at FROM outbox WHERE kind = 'job.pending' "
                               "ORDER BY id")
    stamps = [float(str(row[0])) for row in queued]
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(stamps)), stamps
    assert len({got.delivery for got in found}) == len(found)


async def test_a_stopping_node_finishes_its_send_or_hands_it_back(
        tmp_path: Path, pg_database: Database, receiver: Receiver) -> None:
    """A node stopped mid-send lets a send that answers within a few seconds finish (sent,
    once). One that hangs (its attempt idle in a transaction on a connection of its own) is
    handed back: still queued, no attempt counted, and the other node sends it, with the
    same delivery id."""
    origin = OriginRepo(tmp_path / "origin.git")
    origin.commit({"index.html": "v1\n"}, "first")
    apps = local_apps(tmp_path, origin, ["alpha"])
    notify = [hook(tmp_path, receiver, events=FLIPS, remind="0", timeout="20s")]
    config_a = node_spec(tmp_path, "node-a", pg_database, apps,
                         notify=notify).write(tmp_path / "a.toml")
    nodes: list[RunningDaemon] = []

    def outbox() -> list[tuple[object, ...]]:
        return pg_database.query("SELECT state, attempts, delivery FROM outbox ORDER BY id")

    try:
        receiver.delay = 1.0
        nodes.append(await start_daemon(config_a))
        await wait_owners(nodes[0].api, {"node-a": ["alpha"]}, within=10)
        status, _ = await nodes[0].api.call("POST", "/api/v1/apps/alpha/pause",
                                            json_body={"reason": "one"})
        assert status == 200
        await wait_until(lambda: len(receiver.got) == 1, what="the first send in flight")
        started = time.monotonic()
        await nodes.pop().stop()
        finished_in = time.monotonic() - started
        assert outbox() == [("sent", 1, receiver.got[0].delivery)]
        assert len(receiver.got) == 1

        receiver.delay = 60.0  # hangs past the stop's grace
        nodes.append(await start_daemon(config_a))
        await wait_owners(nodes[0].api, {"node-a": ["alpha"]}, within=10)
        status, _ = await nodes[0].api.call("POST", "/api/v1/apps/alpha/resume")
        assert status == 200
        await wait_until(lambda: len(receiver.got) == 2, what="the second send in flight")
        # The attempt holds its lock on a connection of its own, not one of the pool's.
        holding = pg_database.query("SELECT state FROM pg_stat_activity WHERE "
                                    "application_name = 'deployd notifications'")
        assert ("idle in transaction",) in holding, holding
        nodes.append(await start_daemon(node_spec(tmp_path, "node-b", pg_database, apps,
                                                  notify=notify).write(tmp_path / "b.toml")))
        started = time.monotonic()
        await nodes.pop(0).stop()
        handed_back_in = time.monotonic() - started
        handed = outbox()[1]
        assert handed[:2] == ("queued", 0), handed
        receiver.delay = 0.0
        await wait_until(lambda: len(receiver.got) == 3, within=20, what="node-b's send")
        await wait_until(lambda: outbox()[1][0] == "sent", what="the second delivery sent")
    finally:
        for node in nodes:
            await node.stop()

    assert receiver.got[1].delivery == receiver.got[2].delivery == handed[2]
    assert [got.body["kind"] for got in receiver.got] == ["app.paused", "app.resumed",
                                                         "app.resumed"]
    print(f"stop with a 1s send in flight: {finished_in:.2f}s; with a hanging one: "
          f"{handed_back_in:.2f}s (handed back)")
