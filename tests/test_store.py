"""store: the state store on both backends (a SQLite file in tmp_path, a database of the
session's PostgreSQL cluster), including kill -9 of a writer and two daemons migrating at once.

Tests taking `store` or `make_store` run once per backend; the PostgreSQL runs are `slow`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from deployd import store as store_module
from deployd import store_postgres
from deployd.errors import NotFound, StoreError
from deployd.outbox import OutboxStore
from deployd.store import MIGRATIONS, AppState, Event, JobStore, Store
from deployd.store_postgres import PostgresBackend
from deployd.vocabulary import DeployState, JobState, JobStep
from tests.support.postgres import BACKENDS, Database
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> float:
        self.now += seconds
        return self.now


def sql(path: Path, query: str) -> list[tuple[object, ...]]:
    """Run one query on the file with a separate plain sqlite3 connection."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [tuple(row) for row in db.execute(query).fetchall()]


@pytest.fixture
def clock() -> Clock:
    return Clock()


MakeStore = Callable[[Clock], Store]


@contextlib.asynccontextmanager
async def two_daemons(make_store: MakeStore, clock: Clock) -> AsyncIterator[list[Store]]:
    """Two open stores on one database, as two daemons have; closed afterwards."""
    stores = [make_store(clock), make_store(clock)]
    for store in stores:
        await store.open()
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


@pytest.fixture(params=BACKENDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> MakeStore:
    """Stores (not yet open) on one database: a SQLite file, or a fresh PostgreSQL one."""
    if request.param == "sqlite":
        path = tmp_path / "state" / "deployd.sqlite3"
        return lambda clock: Store(path, clock=clock)
    # A backend serves one Store: each gets its own, on the same database.
    database: Database = request.getfixturevalue("pg_database")
    return lambda clock: Store(database.backend(), clock=clock)


@pytest.fixture
async def store(make_store: MakeStore, clock: Clock) -> AsyncIterator[Store]:
    opened = make_store(clock)
    await opened.open()
    yield opened
    await opened.close()


# -- opening, schema, reopening ---------------------------------------------------------------

async def test_open_creates_a_wal_file_at_the_current_schema(tmp_path: Path) -> None:
    """open() makes the directory and file, in WAL mode, at schema version len(MIGRATIONS)."""
    path = tmp_path / "a" / "b" / "deployd.sqlite3"
    store = Store(path)
    assert not store.is_open
    await store.open()
    try:
        assert store.is_open
        assert path.is_file()
        assert await store.schema_version() == len(MIGRATIONS)
        assert sql(path, "PRAGMA journal_mode") == [("wal",)]
        assert sql(path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
        tables = {row[0] for row in sql(path, "SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"events", "deploys", "host_results", "app_state", "quarantine"} <= tables
    finally:
        await store.close()
    assert not store.is_open


async def test_reopen_keeps_everything(make_store: MakeStore, clock: Clock) -> None:
    """Events, deploys, host results, app state and quarantine survive close and reopen."""
    first = make_store(clock)
    await first.open()
    event = await first.add_event("shop", "deploy.started", "deploying abc", actor="alice",
                                  revision="abc", data={"hosts": 2})
    deploy = await first.start_deploy("shop", "deploy", "abc", trigger="branch", actor="deployd",
                                      previous_release="20240101000000",
                                      previous_revision="old")
    await first.set_host_result(deploy.id, "web1", "switched")
    await first.set_host_result(deploy.id, "web2", "failed", "exit 1: boom")
    clock.tick(5)
    deploy = await first.update_deploy(deploy.id, state="succeeded", release="20240102000000",
                                       bake_state="good")
    await first.set_last_good("shop", "abc", "20240102000000")
    await first.set_paused("shop", True, actor="bob", reason="maintenance")
    assert await first.quarantine("shop", "bad", reason="rolled back", actor="deployd")
    await first.close()

    second = make_store(clock)
    await second.open()
    try:
        assert await second.schema_version() == len(MIGRATIONS)
        assert await second.events("shop") == [event]
        assert await second.deploys("shop") == [deploy]
        assert await second.last_live("shop") == deploy
        results = await second.host_results(deploy.id)
        assert [(r.host, r.state, r.error) for r in results] == [
            ("web1", "switched", None), ("web2", "failed", "exit 1: boom")]
        assert await second.app_state("shop") == AppState(
            app="shop", last_good_revision="abc", last_good_release="20240102000000",
            paused=True, paused_by="bob", paused_reason="maintenance", paused_at=T0 + 5)
        assert await second.is_quarantined("shop", "bad")
        (entry,) = await second.quarantined("shop")
        assert (entry.revision, entry.reason, entry.actor, entry.at) == (
            "bad", "rolled back", "deployd", T0 + 5)
        # The ids go on from where they were.
        later = await second.add_event("shop", "note", "after restart")
        assert later.id == event.id + 1
    finally:
        await second.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A file written by a newer deployd (higher user_version) is refused, not touched."""
    path = tmp_path / "deployd.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    store = Store(path)
    with pytest.raises(StoreError, match="newer than this deployd understands"):
        await store.open()
    assert not store.is_open
    await store.close()
    assert sql(path, "PRAGMA user_version") == [(len(MIGRATIONS) + 1,)]
    assert sql(path, "SELECT name FROM sqlite_master") == []


async def test_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    """A file that is not SQLite is a StoreError naming it, not a sqlite3 exception."""
    path = tmp_path / "deployd.sqlite3"
    path.write_bytes(b"this is not a database at all, just some text " * 100)
    store = Store(path)
    with pytest.raises(StoreError, match=str(path)):
        await store.open()
    await store.close()


async def test_calls_before_open_are_store_errors(make_store: MakeStore, clock: Clock) -> None:
    """Using a store that is not open raises StoreError."""
    store = make_store(clock)
    with pytest.raises(StoreError, match="not open"):
        await store.events("shop")
    with pytest.raises(StoreError, match="not open"):
        await store.add_event("shop", "note", "hello")
    await store.close()


async def test_failed_migration_leaves_the_previous_version(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """A migration that fails half way is rolled back whole; a good one then applies on top."""
    path = tmp_path / "deployd.sqlite3"
    store = Store(path)
    await store.open()
    await store.add_event("shop", "note", "kept")
    await store.close()

    broken = "CREATE TABLE widgets (id INTEGER PRIMARY KEY);\nCREATE TABLE events (x INTEGER);"
    monkeypatch.setattr(store_module, "MIGRATIONS", (*MIGRATIONS, broken))
    store = Store(path)
    with pytest.raises(StoreError, match="already exists"):
        await store.open()
    await store.close()
    assert sql(path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert sql(path, "SELECT name FROM sqlite_master WHERE name = 'widgets'") == []

    fixed = "CREATE TABLE widgets (id INTEGER PRIMARY KEY);"
    monkeypatch.setattr(store_module, "MIGRATIONS", (*MIGRATIONS, fixed))
    store = Store(path)
    await store.open()
    try:
        assert await store.schema_version() == len(MIGRATIONS) + 1
        assert [e.message for e in await store.events("shop")] == ["kept"]
        assert sql(path, "SELECT name FROM sqlite_master WHERE name = 'widgets'") == [("widgets",)]
    finally:
        await store.close()


# -- PostgreSQL: schema, migrations, connecting -----------------------------------------------

def sqlite_columns(path: Path) -> dict[str, list[str]]:
    tables = [row[0] for row in sql(path, "SELECT name FROM sqlite_master WHERE type = 'table' "
                                          "AND name NOT LIKE 'sqlite_%'")]
    return {str(t): [str(c[1]) for c in sql(path, f"PRAGMA table_info({t})")] for t in tables}


def postgres_columns(database: Database) -> dict[str, list[str]]:
    rows = database.query("SELECT table_name, column_name FROM information_schema.columns "
                          "WHERE table_schema = 'public' AND table_name <> 'schema_version' "
                          "ORDER BY table_name, ordinal_position")
    columns: dict[str, list[str]] = {}
    for table, column in rows:
        columns.setdefault(str(table), []).append(str(column))
    return columns


async def test_postgres_schema_matches_sqlite(tmp_path: Path, pg_database: Database) -> None:
    """Both backends' migrations, run from nothing, give the same version, the same tables and
    the same columns in the same order."""
    assert len(store_postgres.MIGRATIONS) == len(MIGRATIONS)
    for backend in (tmp_path / "deployd.sqlite3", pg_database.backend()):
        store = Store(backend)
        await store.open()
        try:
            assert await store.schema_version() == len(MIGRATIONS)
        finally:
            await store.close()
    assert pg_database.query("SELECT version FROM schema_version") == [(len(MIGRATIONS),)]
    assert postgres_columns(pg_database) == sqlite_columns(tmp_path / "deployd.sqlite3")


async def test_postgres_newer_schema_is_refused(pg_database: Database) -> None:
    """A database migrated by a newer deployd is refused and left as it is."""
    pg_database.query("CREATE TABLE schema_version (version integer NOT NULL)")
    pg_database.query(f"INSERT INTO schema_version VALUES ({len(MIGRATIONS) + 1})")
    store = Store(pg_database.backend())
    with pytest.raises(StoreError, match="newer than this deployd understands"):
        await store.open()
    assert not store.is_open
    await store.close()
    assert pg_database.query("SELECT version FROM schema_version") == [(len(MIGRATIONS) + 1,)]
    assert postgres_columns(pg_database) == {}


async def test_postgres_failed_migration_leaves_the_previous_version(
        pg_database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL migration that fails half way is rolled back whole (its version too)."""
    store = Store(pg_database.backend())
    await store.open()
    await store.add_event("shop", "note", "kept")
    await store.close()

    broken = "CREATE TABLE widgets (id integer PRIMARY KEY);\nCREATE TABLE events (x integer);"
    monkeypatch.setattr(store_postgres, "MIGRATIONS", (*MIGRATIONS, broken))
    store = Store(pg_database.backend())
    with pytest.raises(StoreError, match="already exists") as raised:
        await store.open()
    assert pg_database.password not in str(raised.value)
    await store.close()
    assert pg_database.query("SELECT version FROM schema_version") == [(len(MIGRATIONS),)]
    assert "widgets" not in postgres_columns(pg_database)

    monkeypatch.setattr(store_postgres, "MIGRATIONS",
                        (*MIGRATIONS, "CREATE TABLE widgets (id integer PRIMARY KEY);"))
    store = Store(pg_database.backend())
    await store.open()
    try:
        assert await store.schema_version() == len(MIGRATIONS) + 1
        assert [e.message for e in await store.events("shop")] == ["kept"]
        assert "widgets" in postgres_columns(pg_database)
    finally:
        await store.close()


async def test_daemons_starting_together_migrate_once(pg_database: Database,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Five stores opening one new database at once: each migration runs once (the advisory
    lock makes the others wait, then find it done), and all five open at the same version.

    The slow extra migration keeps the first one inside its transaction long enough for the
    others to arrive: without the lock they would all create `widgets` and all but one fail.
    """
    slow = "SELECT pg_sleep(0.3); CREATE TABLE widgets (id integer PRIMARY KEY);"
    monkeypatch.setattr(store_postgres, "MIGRATIONS", (*store_postgres.MIGRATIONS, slow))
    stores = [Store(pg_database.backend()) for _ in range(5)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        assert [await store.schema_version() for store in stores] == [len(MIGRATIONS) + 1] * 5
        assert pg_database.query("SELECT version FROM schema_version") == [
            (len(MIGRATIONS) + 1,)]
        first = await stores[0].add_event("shop", "note", "one")
        assert await stores[4].events("shop") == [first]
    finally:
        await asyncio.gather(*(store.close() for store in stores))


async def test_wrong_password_is_a_store_error_naming_the_database(
        pg_database: Database) -> None:
    """A refused password is a StoreError that names the database and says why, and does not
    show the password."""
    wrong = "not-the-password-5f1c9a"
    store = Store(PostgresBackend(pg_database.url, password=wrong, connect_timeout=5))
    with pytest.raises(StoreError) as raised:
        await store.open()
    message = str(raised.value)
    assert f"cannot open state store {pg_database.url}" in message
    assert "password authentication failed" in message
    assert wrong not in message and pg_database.password not in message
    assert not store.is_open
    await store.close()


async def test_postgres_restart_is_survived_by_the_pool(pg_database: Database) -> None:
    """After the database server restarts, the pool's old connections are dead: the next
    calls get new ones instead of failing (a deploy's next write must not be lost to it)."""
    store = Store(PostgresBackend(pg_database.url, password=pg_database.password,
                                  pool_size=3))
    await store.open()
    try:
        # Several connections in the pool, all used once.
        await asyncio.gather(*(store.add_event("shop", "note", f"before {n}") for n in range(6)))
        await asyncio.to_thread(pg_database.server.restart)
        for n in range(6):
            await store.add_event("shop", "note", f"after {n}")
        assert len(await store.events("shop")) == 12
    finally:
        await store.close()


def test_a_password_in_the_url_is_never_shown() -> None:
    """describe() drops a password from a database URL (the config refuses one anyway)."""
    assert store_postgres.describe("postgresql://ann:s3cret@db:5432/deployd") == (
        "postgresql://ann@db:5432/deployd")
    assert store_postgres.describe("postgresql://:s3cret@db/deployd") == "postgresql://db/deployd"
    assert store_postgres.describe("postgresql://ann@db/deployd") == "postgresql://ann@db/deployd"


# -- events -----------------------------------------------------------------------------------

async def test_events_in_order_with_every_field(store: Store, clock: Clock) -> None:
    """Events come back oldest first, per app, with actor, revision and data round-tripped."""
    first = await store.add_event("shop", "deploy.started", "deploying", revision="abc",
                                  data={"hosts": ["web1", "web2"], "n": 2})
    clock.tick()
    await store.add_event("blog", "note", "other app")
    clock.tick()
    second = await store.add_event("shop", "paused", "paused by bob", actor="bob")
    events = await store.events("shop")
    assert events == [first, second]
    assert (first.app, first.kind, first.actor, first.revision, first.at) == (
        "shop", "deploy.started", "deployd", "abc", T0)
    assert events[0].data == {"hosts": ["web1", "web2"], "n": 2}
    assert (second.actor, second.revision, second.data, second.at) == ("bob", None, {}, T0 + 2)
    assert [e.message for e in await store.events("blog")] == ["other app"]
    assert await store.events("nothing") == []


async def test_event_to_json(store: Store, clock: Clock) -> None:
    """An event's JSON form carries an ISO UTC time with milliseconds."""
    clock.now = 1_700_000_000.25
    event = await store.add_event("shop", "note", "hi", revision="abc", data={"a": 1})
    assert event.to_json() == {
        "id": event.id, "app": "shop", "at": "2023-11-14T22:13:20.250Z", "kind": "note",
        "actor": "deployd", "revision": "abc", "message": "hi", "data": {"a": 1}}


async def test_events_since_id_since_time_and_limit(store: Store, clock: Clock) -> None:
    """since_id pages after an id, since_time keeps events at or after a time, limit caps."""
    added = []
    for n in range(25):
        added.append(await store.add_event("shop", "tick", f"tick {n}"))
        clock.tick(10)
    assert await store.events("shop", since_id=added[19].id) == added[20:]
    assert await store.events("shop", limit=3) == added[:3]
    assert await store.events("shop", since_id=added[4].id, limit=2) == added[5:7]
    assert await store.events("shop", since_time=T0 + 200) == added[20:]
    assert await store.events("shop", since_time=T0 + 195) == added[20:]
    assert await store.events("shop", since_time=T0 + 200, since_id=added[22].id) == added[23:]
    assert await store.events("shop", since_id=added[-1].id) == []

    pages: list[str] = []
    last = 0
    while page := await store.events("shop", since_id=last, limit=10):
        pages.extend(e.message for e in page)
        last = page[-1].id
    assert pages == [f"tick {n}" for n in range(25)]


async def test_event_data_that_is_not_json_is_stored_as_text(store: Store) -> None:
    """Values JSON cannot hold (paths, sets) are kept as their text, not an error."""
    event = await store.add_event("shop", "note", "x", data={"path": Path("/srv/shop")})
    assert (await store.events("shop"))[0].data == {"path": "/srv/shop"}
    assert event.id == 1


async def test_events_found_by_the_deploy_or_job_in_their_data(store: Store) -> None:
    """deploy_event is the newest event of a kind whose data names the deploy (a number: the
    string "3" is not deploy 3); job_events lists a job's events oldest first. Data holding a
    NUL character (hook output can) does not stop the search: SQLite keeps the NUL, PostgreSQL
    (whose JSON functions refuse one) keeps U+FFFD in its place."""
    await store.add_event("shop", "deploy.succeeded", "old", data={"deploy": 3})
    newest = await store.add_event("shop", "deploy.succeeded", "new",
                                   data={"deploy": 3, "output": "a\x00b"})
    await store.add_event("shop", "deploy.succeeded", "text id", data={"deploy": "3"})
    await store.add_event("shop", "deploy.succeeded", "other", data={"deploy": 4})
    await store.add_event("shop", "deploy.failed", "other kind", data={"deploy": 3})
    await store.add_event("blog", "deploy.succeeded", "other app", data={"deploy": 3})
    found = await store.deploy_event("shop", 3, "deploy.succeeded")
    assert found is not None and (found.id, found.message) == (newest.id, "new")
    assert found.data in ({"deploy": 3, "output": "a\x00b"}, {"deploy": 3, "output": "a\ufffdb"})
    assert await store.deploy_event("shop", 5, "deploy.succeeded") is None

    opened = await store.add_event("shop", "job.opened", "opened", data={"job": 3})
    await store.add_event("shop", "job.opened", "another", data={"job": 30})
    approved = await store.add_event("shop", "job.approved", "approved", data={"job": 3})
    assert await store.job_events("shop", 3) == [opened, approved]
    assert await store.job_events("blog", 3) == []


async def test_a_nul_in_a_message_does_not_lose_the_event(store: Store) -> None:
    """SQLite keeps a NUL in a text column; PostgreSQL text cannot hold one, so there it is
    stored as U+FFFD. Either way the event is stored and read back."""
    await store.add_event("shop", "note", "before\x00after")
    (event,) = await store.events("shop")
    assert event.message in ("before\x00after", "before\ufffdafter")


async def test_jobs_round_trip_on_every_backend(store: Store, clock: Clock) -> None:
    """A patch that is not UTF-8 comes back as it went in; `expect_plan` and
    `expect_changed_by` compare NULL as a value; approvals, counts and the oldest pending."""
    jobs = JobStore(store)
    job = await jobs.create("shop", base="b", bad_head="h", candidates=[{"sha": "p"}],
                            selection=["p"], requester="ann", reason="why", expires_at=T0 + 60)
    latin1 = "--- a/x\n+++ b/x\n+caf\udce9\n"  # a Latin-1 byte, as git's diff gives it
    patched = await jobs.update(job.id, resolved_patch=latin1, expect_plan=None,
                                expect_changed_by=None, changed_by="bob")
    assert patched is not None and patched.resolved_patch == latin1
    assert await jobs.update(job.id, plan="p1", expect_changed_by=None) is None
    moved = await jobs.update(job.id, plan="p1", expect_changed_by="bob", expect_plan=None)
    assert moved is not None and moved.plan == "p1"
    assert await jobs.update(job.id, state=JobState.APPROVED, expect_plan=None) is None

    await jobs.add_approval(job.id, decision="approve", actor="carol", plan="p1", comment="ok")
    (approval,) = await jobs.approvals(job.id)
    assert (approval.decision, approval.actor, approval.plan, approval.at) == (
        "approve", "carol", "p1", T0)
    clock.tick(5)
    await jobs.create("shop", base="b", bad_head="h2", candidates=[], selection=[],
                      requester="ann", reason="again", expires_at=T0 + 60)
    assert await jobs.counts("shop") == {JobState.PENDING: 2}
    assert await jobs.oldest_pending("shop") == T0
    assert await jobs.oldest_pending("blog") is None
    assert [j.bad_head for j in await jobs.find(app="shop")] == ["h2", "h"]


async def test_racing_approvals_from_two_daemons_move_a_job_once(make_store: MakeStore,
                                                                  clock: Clock) -> None:
    """Twenty approvals of one pending job at once, half through each of two stores on one
    database: exactly one moves it out of `pending`, the others get None."""
    async with two_daemons(make_store, clock) as stores:
        jobs = [JobStore(store) for store in stores]
        job = await jobs[0].create("shop", base="b", bad_head="h", candidates=[], selection=[],
                                   requester="ann", reason="why", expires_at=T0 + 60,
                                   plan="p1")
        results = await asyncio.gather(*(
            jobs[n % 2].update(job.id, expect=(JobState.PENDING,), expect_plan="p1",
                               state=JobState.APPROVED, error=f"approval {n}")
            for n in range(20)))
        winners = [result for result in results if result is not None]
        assert len(winners) == 1
        assert (await jobs[1].get(job.id)).error == winners[0].error


async def test_outbox_on_every_backend(store: Store, clock: Clock) -> None:
    """A target starts after the newest event, queues the events it wants once, keeps its
    cursor, and its deliveries go from queued to retried to sent."""
    outbox = OutboxStore(store)
    await store.add_event("shop", "deploy.succeeded", "before the target")
    await outbox.start_cursor("ops")
    await outbox.start_cursor("ops")  # again: the cursor stays where it is
    wanted = await store.add_event("shop", "deploy.failed", "bad", data={"deploy": 1})
    await store.add_event("shop", "note", "not wanted")
    job = await store.add_event("shop", "job.opened", "job", data={"job": 7})

    def wants(event: Event) -> bool:
        return event.kind != "note"

    assert await outbox.enqueue_events("ops", wants) == (3, 2)
    assert await outbox.enqueue_events("ops", wants) == (0, 0)
    assert await outbox.queued("ops") == 2
    first, second = await outbox.oldest("ops")
    assert (first.kind, first.payload["event"], first.job_id) == ("deploy.failed", wanted.id,
                                                                  None)
    assert first.payload["id"] == first.delivery
    assert (second.kind, second.job_id) == ("job.opened", 7)
    assert second.payload["event"] == job.id

    clock.tick(10)
    await outbox.enqueue("ops", "shop", "job.reminder", {"text": "still waiting"}, job_id=7)
    assert await outbox.last_about_job("ops", 7) == T0 + 10
    assert await outbox.last_about_job("ops", 8) is None
    await outbox.retry_at(first.id, T0 + 60, "HTTP 500")
    await outbox.finish(second.id, "sent")
    rows = {d.id: d for d in await outbox.deliveries("ops")}
    assert (rows[first.id].state, rows[first.id].attempts, rows[first.id].next_at,
            rows[first.id].last_error) == ("queued", 1, T0 + 60, "HTTP 500")
    assert (rows[second.id].state, rows[second.id].attempts) == ("sent", 1)
    assert await outbox.queued("ops") == 2  # the retried one and the reminder
    assert await outbox.deliveries("audit") == []


async def test_outbox_scans_from_two_daemons_queue_each_event_once(make_store: MakeStore,
                                                                    clock: Clock) -> None:
    """Two stores on one database scanning the same target at the same time (two daemons'
    notification loops): every event is queued once, not once per scanner."""
    async with two_daemons(make_store, clock) as stores:
        outboxes = [OutboxStore(store) for store in stores]
        await outboxes[0].start_cursor("ops")
        for n in range(300):
            await stores[n % 2].add_event("shop", "deploy.failed", f"bad {n}")
        results = await asyncio.gather(*(outbox.enqueue_events("ops", lambda _: True)
                                         for outbox in outboxes * 3))
        assert sum(queued for _, queued in results) == 300
        deliveries = await outboxes[1].deliveries("ops")
        assert sorted(d.payload["message"] for d in deliveries) == sorted(
            f"bad {n}" for n in range(300))


async def test_outbox_reminders_from_two_daemons_queue_one(make_store: MakeStore,
                                                           clock: Clock) -> None:
    """Two daemons' reminder rounds about one job at the same moment queue one reminder; one
    `remind` later, one more."""
    async with two_daemons(make_store, clock) as stores:
        outboxes = [OutboxStore(store) for store in stores]
        await outboxes[0].start_cursor("ops")

        async def remind_all() -> int:
            results = await asyncio.gather(*(
                outbox.enqueue_reminder("ops", "shop", 7, {"text": "still waiting"},
                                        quiet_since=clock() - 60)
                for outbox in outboxes * 4))
            return sum(results)

        assert await remind_all() == 1
        assert await remind_all() == 0
        clock.tick(61)
        assert await remind_all() == 1
        reminders = await outboxes[1].deliveries("ops")
        assert [(d.kind, d.job_id, d.created_at) for d in reminders] == [
            ("job.pending", 7, T0), ("job.pending", 7, T0 + 61)]


@pytest.mark.slow
async def test_outbox_claims_of_two_daemons_exclude_each_other(pg_database: Database,
                                                               clock: Clock) -> None:
    """On PostgreSQL one daemon at a time makes an attempt at a target (another target is
    free); an attempt cut short writes nothing, its delivery stays queued; daemons racing
    through a queue send each delivery once, oldest first."""
    stores = [Store(pg_database.backend(), clock=clock) for _ in range(2)]
    outboxes = [OutboxStore(store) for store in stores]
    for store in stores:
        await store.open()
    try:
        await outboxes[0].start_cursor("ops")
        for n in range(40):
            await stores[n % 2].add_event("shop", "deploy.failed", f"bad {n}")
        assert await outboxes[0].enqueue_events("ops", lambda _: True) == (40, 40)

        async with outboxes[0].claim("ops", hold=5) as first:
            assert first is not None
            async with outboxes[1].claim("ops", hold=5) as second:
                assert second is None
            async with outboxes[1].claim("audit", hold=5) as other:
                assert other is not None
            oldest = await first.oldest("ops")
            assert oldest is not None
            await first.finish(oldest.id, "sent")
        with pytest.raises(RuntimeError):
            async with outboxes[1].claim("ops", hold=5) as claim:
                assert claim is not None
                cut = await claim.oldest("ops")
                assert cut is not None
                await claim.finish(cut.id, "sent")
                raise RuntimeError("killed mid-send")
        states = [d.state for d in await outboxes[0].deliveries("ops")]
        assert states[:2] == ["sent", "queued"]

        sent: list[int] = []

        async def deliver(outbox: OutboxStore) -> None:
            while True:
                async with outbox.claim("ops", hold=5) as claim:
                    if claim is None:
                        await asyncio.sleep(0.001)
                        continue
                    delivery = await claim.oldest("ops")
                    if delivery is None:
                        return
                    sent.append(delivery.id)
                    await asyncio.sleep(0)  # the other daemons try meanwhile
                    await claim.finish(delivery.id, "sent")

        await asyncio.gather(*(deliver(outbox) for outbox in outboxes * 3))
        assert len(sent) == 39 and sent == sorted(set(sent))
        assert {d.state for d in await outboxes[1].deliveries("ops")} == {"sent"}
    finally:
        for outbox in outboxes:
            await outbox.close()
        for store in stores:
            await store.close()


# -- deploys ----------------------------------------------------------------------------------

async def test_deploy_lifecycle(store: Store, clock: Clock) -> None:
    """start_deploy records a running deploy; a terminal state sets finished_at."""
    deploy = await store.start_deploy("shop", "deploy", "abc", trigger="branch", actor="deployd",
                                      previous_release="r0", previous_revision="old")
    assert (deploy.app, deploy.kind, deploy.revision, deploy.state) == (
        "shop", "deploy", "abc", "running")
    assert (deploy.trigger, deploy.actor, deploy.started_at, deploy.finished_at) == (
        "branch", "deployd", T0, None)
    assert (deploy.release, deploy.previous_release, deploy.previous_revision) == (
        None, "r0", "old")
    assert (deploy.error, deploy.bake_state, deploy.bake_started_at, deploy.bake_until) == (
        None, None, None, None)

    clock.tick(3)
    deploy = await store.update_deploy(deploy.id, release="r1")
    assert (deploy.release, deploy.state, deploy.finished_at) == ("r1", "running", None)

    clock.tick(4)
    deploy = await store.update_deploy(deploy.id, state="succeeded", bake_state="grace",
                                       bake_started_at=clock.now, bake_until=clock.now + 600)
    assert (deploy.state, deploy.finished_at) == ("succeeded", T0 + 7)
    assert (deploy.bake_state, deploy.bake_started_at, deploy.bake_until) == (
        "grace", T0 + 7, T0 + 607)

    clock.tick(600)
    deploy = await store.update_deploy(deploy.id, bake_state="good")
    assert (deploy.bake_state, deploy.finished_at) == ("good", T0 + 7)
    assert await store.deploy(deploy.id) == deploy


@pytest.mark.parametrize("state", ["succeeded", "failed", "interrupted"])
async def test_every_terminal_state_sets_finished_at(store: Store, clock: Clock,
                                                     state: str) -> None:
    """succeeded, failed and interrupted all stamp finished_at; an explicit one is kept."""
    deploy = await store.start_deploy("shop", "rollback", "abc", trigger="manual", actor="alice")
    clock.tick(2)
    done = await store.update_deploy(deploy.id, state=state, error="why")
    assert (done.state, done.finished_at, done.error) == (state, T0 + 2, "why")
    other = await store.start_deploy("shop", "deploy", "def", trigger="manual", actor="alice")
    done = await store.update_deploy(other.id, state=state, finished_at=T0 - 1)
    assert done.finished_at == T0 - 1


async def test_update_deploy_rejects_unknown_fields(store: Store) -> None:
    """A column that is not an update's parameter is a TypeError and changes nothing (no SQL
    is built from a caller's names)."""
    deploy = await store.start_deploy("shop", "deploy", "abc", trigger="branch", actor="deployd")
    with pytest.raises(TypeError, match="revision"):
        await store.update_deploy(deploy.id, state="failed", revision="evil")
    assert await store.deploy(deploy.id) == deploy


async def test_update_deploy_rejects_unknown_words(store: Store) -> None:
    """A state, bake state, kind or trigger that is not one of deployd's words is a ValueError
    before anything is written (or a kind filter read)."""
    deploy = await store.start_deploy("shop", "deploy", "abc", trigger="branch", actor="deployd")
    with pytest.raises(ValueError, match="'done' is not a valid DeployState"):
        await store.update_deploy(deploy.id, state="done")
    with pytest.raises(ValueError, match="'fine' is not a valid BakeState"):
        await store.update_deploy(deploy.id, bake_state="fine")
    with pytest.raises(ValueError, match="'push' is not a valid Trigger"):
        await store.start_deploy("shop", "deploy", "abc", trigger="push", actor="deployd")
    with pytest.raises(ValueError, match="'deploys' is not a valid DeployKind"):
        await store.start_deploy("shop", "deploys", "abc",
                                 trigger="branch", actor="deployd")
    with pytest.raises(ValueError, match="'deploys' is not a valid DeployKind"):
        await store.deploys("shop", kind="deploys")
    assert await store.deploys("shop") == [deploy]


async def test_update_deploy_leaves_unset_columns_and_sets_null(store: Store) -> None:
    """Only the columns given change; None writes NULL (an error cleared), unlike leaving a
    column out."""
    deploy = await store.start_deploy("shop", "deploy", "abc", trigger="branch", actor="deployd")
    failed = await store.update_deploy(deploy.id, state="failed", error="boom", release="r1")
    same = await store.update_deploy(deploy.id)
    assert same == failed
    cleared = await store.update_deploy(deploy.id, error=None)
    assert (cleared.state, cleared.release, cleared.error) == ("failed", "r1", None)
    assert cleared.state is DeployState.FAILED


async def test_job_update_sets_only_what_it_is_given(store: Store) -> None:
    """JobStore.update changes the fields given (None writes NULL) and leaves the others; with
    `expect`, a job in another state is left alone (None); the states read back as JobState."""
    jobs = JobStore(store)
    job = await jobs.create("shop", base="b", bad_head="h", candidates=[{"sha": "p"}],
                            selection=["p"], requester="ann", reason="why", expires_at=T0 + 60,
                            preview={"ready": True}, plan="plan-1")
    assert job.state is JobState.PENDING and job.step is None
    stepped = await jobs.update(job.id, step=JobStep.COMMITTED, new_head="n")
    assert stepped is not None and stepped.step is JobStep.COMMITTED
    assert (stepped.new_head, stepped.plan, stepped.selection, stepped.preview) == (
        "n", "plan-1", ["p"], {"ready": True})
    assert await jobs.update(job.id, expect=(JobState.APPROVED,), state=JobState.RUNNING) \
        is None
    cleared = await jobs.update(job.id, expect=(JobState.PENDING,), plan=None, error="x")
    assert cleared is not None and (cleared.plan, cleared.error, cleared.state) == (
        None, "x", "pending")


async def test_unknown_deploy_is_not_found(store: Store) -> None:
    """Reading or updating a deploy id that does not exist is NotFound."""
    with pytest.raises(NotFound):
        await store.deploy(42)
    with pytest.raises(NotFound):
        await store.update_deploy(42, state="failed")


async def test_deploys_newest_first_with_filters(store: Store) -> None:
    """deploys() lists newest first and filters by kind, state and limit, per app."""
    a = await store.start_deploy("shop", "deploy", "a", trigger="branch", actor="deployd")
    b = await store.start_deploy("shop", "rollback", "b", trigger="health", actor="deployd")
    c = await store.start_deploy("shop", "deploy", "c", trigger="branch", actor="deployd",
                                 state="failed")
    await store.start_deploy("blog", "deploy", "x", trigger="branch", actor="deployd")
    assert [d.id for d in await store.deploys("shop")] == [c.id, b.id, a.id]
    assert [d.id for d in await store.deploys("shop", kind="deploy")] == [c.id, a.id]
    assert [d.id for d in await store.deploys("shop", state="running")] == [b.id, a.id]
    assert [d.id for d in await store.deploys("shop", kind="deploy", state="failed")] == [c.id]
    assert [d.id for d in await store.deploys("shop", limit=1)] == [c.id]


async def test_deploy_to_json(store: Store, clock: Clock) -> None:
    """A deploy's JSON form has ISO times and None where unset."""
    deploy = await store.start_deploy("shop", "observed", "abc", trigger="observed",
                                      actor="capistrano", release="r1", state="succeeded")
    assert deploy.to_json() == {
        "id": deploy.id, "kind": "observed", "revision": "abc", "release": "r1",
        "previous_release": None, "previous_revision": None, "state": "succeeded",
        "trigger": "observed", "actor": "capistrano", "started_at": "2023-11-14T22:13:20.000Z",
        "finished_at": None, "error": None, "bake_state": None, "bake_until": None,
        "forced": None}
    forced = await store.start_deploy("shop", "deploy", "abc", trigger="manual", actor="ann",
                                      forced="not on production")
    assert (await store.deploy(forced.id)).to_json()["forced"] == "not on production"


async def test_last_live_ignores_failed_running_and_release_less(store: Store) -> None:
    """last_live is the newest succeeded record that has a release, of that app only."""
    assert await store.last_live("shop") is None
    good = await store.start_deploy("shop", "deploy", "a", trigger="branch", actor="deployd",
                                    release="r1", state="succeeded")
    await store.start_deploy("shop", "deploy", "b", trigger="branch", actor="deployd",
                             release="r2", state="failed")
    await store.start_deploy("shop", "deploy", "c", trigger="branch", actor="deployd",
                             release="r3")
    await store.start_deploy("shop", "deploy", "d", trigger="branch", actor="deployd",
                             state="succeeded")
    await store.start_deploy("shop", "rollback", "e", trigger="health", actor="deployd",
                             release="r0", state="interrupted")
    await store.start_deploy("blog", "deploy", "x", trigger="branch", actor="deployd",
                             release="b1", state="succeeded")
    assert await store.last_live("shop") == good

    rollback = await store.start_deploy("shop", "rollback", "z", trigger="health",
                                        actor="deployd", release="r0")
    assert await store.last_live("shop") == good
    rollback = await store.update_deploy(rollback.id, state="succeeded")
    assert await store.last_live("shop") == rollback

    observed = await store.start_deploy("shop", "observed", "y", trigger="observed",
                                        actor="capistrano", release="r9", state="succeeded")
    assert await store.last_live("shop") == observed


async def test_host_results_upsert(store: Store, clock: Clock) -> None:
    """One row per deploy and host: a later result replaces state, error and time."""
    deploy = await store.start_deploy("shop", "deploy", "abc", trigger="branch", actor="deployd")
    other = await store.start_deploy("shop", "deploy", "def", trigger="branch", actor="deployd")
    await store.set_host_result(deploy.id, "web2", "preparing")
    await store.set_host_result(deploy.id, "web1", "failed", "connection refused")
    await store.set_host_result(other.id, "web1", "prepared")
    clock.tick(9)
    await store.set_host_result(deploy.id, "web1", "switched")
    results = await store.host_results(deploy.id)
    assert [(r.deploy_id, r.host, r.state, r.error, r.at) for r in results] == [
        (deploy.id, "web1", "switched", None, T0 + 9),
        (deploy.id, "web2", "preparing", None, T0),
    ]
    assert [(r.host, r.state) for r in await store.host_results(other.id)] == [
        ("web1", "prepared")]
    assert await store.host_results(999) == []


async def test_host_result_for_unknown_deploy_is_refused(store: Store) -> None:
    """A host result must belong to a recorded deploy (foreign key), else StoreError."""
    with pytest.raises(StoreError, match=r"(?i)FOREIGN KEY"):
        await store.set_host_result(999, "web1", "switched")


# -- app state and quarantine -----------------------------------------------------------------

async def test_app_state_defaults_for_an_unknown_app(store: Store) -> None:
    """An app never written has no last good and is not paused."""
    assert await store.app_state("shop") == AppState(app="shop")


async def test_pause_and_resume(store: Store, clock: Clock) -> None:
    """Pausing records who, why and when; resuming clears them; last good is untouched."""
    await store.set_last_good("shop", "abc", "r1")
    clock.tick(30)
    await store.set_paused("shop", True, actor="alice", reason="investigating")
    state = await store.app_state("shop")
    assert (state.paused, state.paused_by, state.paused_reason, state.paused_at) == (
        True, "alice", "investigating", T0 + 30)
    assert (state.last_good_revision, state.last_good_release) == ("abc", "r1")

    await store.set_last_good("shop", "def", "r2")
    state = await store.app_state("shop")
    assert (state.paused, state.paused_by, state.last_good_revision) == (True, "alice", "def")

    await store.set_paused("shop", False, actor="bob", reason="fixed")
    assert await store.app_state("shop") == AppState(
        app="shop", last_good_revision="def", last_good_release="r2")
    assert await store.app_state("blog") == AppState(app="blog")


async def test_pause_before_any_last_good(store: Store) -> None:
    """An app can be paused before it ever had a good deploy."""
    await store.set_paused("shop", True, actor="deployd", reason="still unhealthy")
    state = await store.app_state("shop")
    assert (state.paused, state.last_good_revision, state.last_good_release) == (True, None, None)


async def test_quarantine_is_idempotent(store: Store, clock: Clock) -> None:
    """Quarantining returns True once and False after; the first reason and time are kept."""
    assert await store.quarantine("shop", "bad1", reason="rolled back", actor="deployd")
    clock.tick(60)
    assert not await store.quarantine("shop", "bad1", reason="again", actor="alice")
    assert await store.quarantine("shop", "bad2", reason="by hand", actor="alice")
    assert await store.quarantine("blog", "bad1", reason="other app", actor="deployd")
    entries = await store.quarantined("shop")
    assert [(q.revision, q.reason, q.actor, q.at) for q in entries] == [
        ("bad1", "rolled back", "deployd", T0), ("bad2", "by hand", "alice", T0 + 60)]
    assert await store.is_quarantined("shop", "bad1")
    assert await store.is_quarantined("blog", "bad1")
    assert not await store.is_quarantined("blog", "bad2")
    assert not await store.is_quarantined("shop", "good")


# -- crashes and concurrency ------------------------------------------------------------------

WRITER = """
import asyncio, sys
from pathlib import Path
from deployd.store import Store

async def writer(store, name):
    n = 0
    while True:
        n += 1
        event = await store.add_event("shop", "tick", f"{name} {n}", data={"n": n})
        if n % 7 == 0:
            deploy = await store.start_deploy("shop", "deploy", f"{name}-{n}", trigger="branch",
                                              actor=name)
            await store.set_host_result(deploy.id, "web1", "switched")
        sys.stdout.write(f"{event.id} {name} {n}\\n")
        sys.stdout.flush()

async def main():
    store = Store(Path(sys.argv[1]))
    await store.open()
    sys.stdout.write("open\\n")
    sys.stdout.flush()
    await asyncio.gather(*(writer(store, f"w{i}") for i in range(4)))

asyncio.run(main())
"""


async def _write_until_killed(path: Path, lines_before_kill: int) -> dict[int, str]:
    """Run a writer process, SIGKILL it mid-stream; the events it saw committed, by id."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "daemon")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(path), env=env, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    committed: dict[int, str] = {}
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"open\n"
        while len(committed) < lines_before_kill:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, "writer died"
            event_id, name, n = line.decode().split()
            committed[int(event_id)] = f"{name} {n}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        rest = await proc.stdout.read()
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for text in rest.decode().splitlines(keepends=True):
        if text.endswith("\n"):  # a line cut by the kill was not reported whole
            event_id, name, n = text.split()
            committed[int(event_id)] = f"{name} {n}"
    return committed


async def test_kill_9_loses_no_committed_event(tmp_path: Path) -> None:
    """A writer killed with SIGKILL, twice, loses nothing it saw committed; the file is sound."""
    path = tmp_path / "deployd.sqlite3"
    seen: dict[int, str] = {}
    for round_ in range(2):
        seen.update(await _write_until_killed(path, 400 + 137 * round_))

        store = Store(path)
        await store.open()
        try:
            assert await store.schema_version() == len(MIGRATIONS)
            events = await store.events("shop", limit=1_000_000)
            stored = {e.id: e.message for e in events}
            missing = {i: m for i, m in seen.items() if stored.get(i) != m}
            assert missing == {}
            # Nothing half-written: ids have no holes, each message matches its data.
            assert [e.id for e in events] == list(range(1, len(events) + 1))
            assert all(e.message.endswith(f" {e.data['n']}") for e in events)
            # Each writer's newest deploy may have been cut before its host result; no other.
            newest: set[str] = set()
            for deploy in await store.deploys("shop", limit=1_000_000):
                results = [r.host for r in await store.host_results(deploy.id)]
                if deploy.actor in newest:
                    assert results == ["web1"], deploy
                newest.add(deploy.actor)
        finally:
            await store.close()
        assert sql(path, "PRAGMA integrity_check") == [("ok",)]
        assert sql(path, "PRAGMA foreign_key_check") == []
    assert len(seen) >= 400 + 537


async def test_concurrent_writers_all_land(store: Store) -> None:
    """Many coroutines writing at once: every write lands once, each writer's in its order."""
    writers, per_writer = 40, 50

    async def write(name: str) -> list[int]:
        ids = []
        for n in range(per_writer):
            event = await store.add_event("shop", "tick", f"{name} {n}")
            ids.append(event.id)
            if n % 10 == 0:
                deploy = await store.start_deploy("shop", "deploy", f"{name}-{n}",
                                                  trigger="branch", actor=name)
                await store.update_deploy(deploy.id, state="succeeded", release=f"r-{name}")
        return ids

    results = await asyncio.gather(*(write(f"w{i}") for i in range(writers)))
    all_ids = [i for ids in results for i in ids]
    assert len(set(all_ids)) == writers * per_writer
    assert all(ids == sorted(ids) for ids in results)
    events = await store.events("shop", limit=10_000)
    assert len(events) == writers * per_writer
    by_writer: dict[str, list[int]] = {}
    for event in events:
        name, n = event.message.split()
        by_writer.setdefault(name, []).append(int(n))
    assert by_writer == {f"w{i}": list(range(per_writer)) for i in range(writers)}
    deploys = await store.deploys("shop", limit=10_000)
    assert len(deploys) == writers * (per_writer // 10)
    assert all(d.state == "succeeded" for d in deploys)


async def test_a_reader_paging_by_id_misses_no_event(make_store: MakeStore,
                                                     clock: Clock) -> None:
    """Two stores on one database (two daemons) write events from many coroutines at once
    while a reader pages through them by id, as the notifications outbox and the REST API
    do: every event is seen, once. An event's id must not be lower than one already
    committed (on PostgreSQL ids come from a sequence and commits from many connections)."""
    first, second = make_store(clock), make_store(clock)
    await first.open()
    await second.open()
    writers, per_writer = 16, 40
    done = asyncio.Event()

    async def write(store: Store, name: str) -> None:
        for n in range(per_writer):
            await store.add_event("shop", "tick", f"{name} {n}")

    async def read() -> list[int]:
        seen: list[int] = []
        last = 0
        while True:
            finished = done.is_set()
            page = await first.events("shop", since_id=last, limit=50)
            seen.extend(event.id for event in page)
            last = page[-1].id if page else last
            if finished and not page:
                return seen
            await asyncio.sleep(0)

    try:
        reader = asyncio.create_task(read())
        await asyncio.gather(*(write(store, f"{store_name}{i}")
                               for store_name, store in (("a", first), ("b", second))
                               for i in range(writers)))
        done.set()
        seen = await reader
        stored = [event.id for event in await first.events("shop", limit=100_000)]
        assert len(stored) == 2 * writers * per_writer
        assert sorted(seen) == seen and set(seen) == set(stored), (
            f"{len(set(stored) - set(seen))} event(s) skipped by the reader")
    finally:
        await first.close()
        await second.close()


async def test_postgres_event_ids_follow_commit_order(pg_database: Database) -> None:
    """An event whose insert is slow to commit (here a trigger sleeps in it) holds back the
    next one: the next gets the higher id and commits after it, so a reader that saw the
    next event and pages on from its id still finds the slow one."""
    pg_database.query("""
        CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$""")
    store = Store(pg_database.backend())
    await store.open()
    pg_database.query("CREATE TRIGGER slow BEFORE INSERT ON events FOR EACH ROW "
                      "WHEN (NEW.message = 'slow') EXECUTE FUNCTION slow_insert()")
    try:
        slow = asyncio.create_task(store.add_event("shop", "note", "slow"))
        await wait_until(lambda: bool(pg_database.query(
            "SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep'")),
            within=10, what="the slow insert sleeping in its transaction")
        fast = await store.add_event("shop", "note", "fast")
        seen = await store.events("shop")
        later = await store.events("shop", since_id=max(e.id for e in seen))
        assert {e.message for e in [*seen, *later]} == {"slow", "fast"}
        assert (await slow).id < fast.id
    finally:
        await store.close()


async def test_store_calls_do_not_block_the_event_loop(store: Store) -> None:
    """A heartbeat coroutine keeps ticking while 2,000 inserts run (1,000 one after another)."""
    ticks: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.005)
            ticks.append(time.monotonic())

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.02)
    # One after another: if the work ran on the loop's thread, no tick could come in between.
    started = time.monotonic()
    for n in range(1000):
        await store.add_event("shop", "tick", f"s{n}")
    finished = time.monotonic()
    # All at once: a thousand calls queued on the store's thread.
    await asyncio.gather(*(store.add_event("shop", "tick", f"g{n}") for n in range(1000)))
    gathered = time.monotonic()
    stop.set()
    await beat

    assert len(await store.events("shop", limit=5000)) == 2000
    during = [at for at in ticks if started < at < finished]
    expected = (finished - started) / 0.005
    assert len(during) >= max(3.0, expected / 5), (len(during), expected)
    edges = [started, *during, finished]
    assert max(b - a for a, b in itertools.pairwise(edges)) < 0.5
    assert any(finished < at <= gathered + 0.01 for at in ticks)
