"""The state store: one SQLite file (WAL) holding everything deployd saw and did.

Every deploy, rollback, per-host result, event, quarantine and pause is written here before
it is acted on, so a crash at any point can be resumed or failed safely on restart, and the
REST API and metrics read the same facts. sqlite3 blocks, so all work runs on one dedicated
thread that owns the connection; coroutines await it and the event loop never touches disk.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from deployd.errors import NotFound, StoreError
from deployd.timefmt import iso_time
from deployd.vocabulary import (
    BakeState,
    DeployKind,
    DeployState,
    EventKind,
    JobState,
    JobStep,
    Trigger,
)

T = TypeVar("T")
events_log = logging.getLogger("deployd.events")



class Unset(enum.Enum):
    """The default of an update's fields: leave the column as it is (None sets NULL)."""

    UNSET = enum.auto()


UNSET: Final = Unset.UNSET

# Each entry migrates the schema from version N to N+1; never edit a shipped one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        app TEXT NOT NULL,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        actor TEXT NOT NULL,
        revision TEXT,
        message TEXT NOT NULL,
        data TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_app ON events(app, id);
    CREATE TABLE deploys (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        app TEXT NOT NULL,
        kind TEXT NOT NULL,
        revision TEXT NOT NULL,
        release TEXT,
        previous_release TEXT,
        previous_revision TEXT,
        state TEXT NOT NULL,
        trigger TEXT NOT NULL,
        actor TEXT NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        error TEXT,
        bake_state TEXT,
        bake_started_at REAL,
        bake_until REAL
    );
    CREATE INDEX deploys_app ON deploys(app, id);
    CREATE TABLE host_results (
        deploy_id INTEGER NOT NULL REFERENCES deploys(id),
        host TEXT NOT NULL,
        state TEXT NOT NULL,
        error TEXT,
        at REAL NOT NULL,
        PRIMARY KEY (deploy_id, host)
    );
    CREATE TABLE app_state (
        app TEXT PRIMARY KEY,
        last_good_revision TEXT,
        last_good_release TEXT,
        paused INTEGER NOT NULL DEFAULT 0,
        paused_by TEXT,
        paused_reason TEXT,
        paused_at REAL
    );
    CREATE TABLE quarantine (
        app TEXT NOT NULL,
        revision TEXT NOT NULL,
        reason TEXT NOT NULL,
        actor TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (app, revision)
    );
    """,
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        app TEXT NOT NULL,
        state TEXT NOT NULL,
        base TEXT NOT NULL,
        bad_head TEXT NOT NULL,
        candidates TEXT NOT NULL,
        selection TEXT NOT NULL,
        resolved_patch TEXT,
        preview TEXT NOT NULL DEFAULT '{}',
        plan TEXT,
        requester TEXT NOT NULL,
        reason TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        step TEXT,
        new_head TEXT,
        backup_ref TEXT,
        deploy_id INTEGER,
        error TEXT
    );
    CREATE INDEX jobs_app_state ON jobs(app, state);
    CREATE TABLE approvals (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        decision TEXT NOT NULL,
        actor TEXT NOT NULL,
        plan TEXT,
        comment TEXT NOT NULL,
        at REAL NOT NULL
    );
    """,
    # Who last changed what a job would land (its selection or resolved patch), and who
    # uploaded its resolved patch: with `distinct_approver`, neither may approve it.
    """
    ALTER TABLE jobs ADD COLUMN changed_by TEXT;
    ALTER TABLE jobs ADD COLUMN resolved_by TEXT;
    """,
    # What a deploy's `"force": true` overrode (quarantine, not on the branch); NULL if nothing.
    """
    ALTER TABLE deploys ADD COLUMN forced TEXT;
    """,
    # The notifications outbox: what each [[notify]] target is owed, and how far each target
    # has looked through the events.
    """
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        target TEXT NOT NULL,
        delivery TEXT NOT NULL UNIQUE,
        event_id INTEGER,
        job_id INTEGER,
        app TEXT NOT NULL,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at REAL NOT NULL,
        next_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL,
        last_error TEXT,
        done_at REAL
    );
    CREATE INDEX outbox_due ON outbox(target, state, next_at);
    CREATE INDEX outbox_job ON outbox(target, job_id);
    CREATE TABLE outbox_cursor (
        target TEXT PRIMARY KEY,
        event_id INTEGER NOT NULL
    );
    """,
    # Progressive rollouts: one row per deploy that goes out in steps (see rollout_store).
    """
    CREATE TABLE rollouts (
        deploy_id INTEGER PRIMARY KEY REFERENCES deploys(id),
        app TEXT NOT NULL,
        steps TEXT NOT NULL,
        step INTEGER NOT NULL,
        state TEXT NOT NULL,
        on_new TEXT NOT NULL,
        baseline_release TEXT,
        baseline_revision TEXT,
        reason TEXT,
        analysis TEXT NOT NULL DEFAULT '{}',
        started_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX rollouts_app ON rollouts(app, deploy_id);
    """,
)


@dataclass(frozen=True)
class Event:
    id: int
    app: str
    at: float
    kind: str  # an EventKind value when written; read back as the bare word it was stored as
    actor: str
    revision: str | None
    message: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "app": self.app, "at": iso_time(self.at), "kind": self.kind,
                "actor": self.actor, "revision": self.revision, "message": self.message,
                "data": self.data}


@dataclass(frozen=True)
class Deploy:
    id: int
    app: str
    kind: DeployKind
    revision: str
    release: str | None
    previous_release: str | None
    previous_revision: str | None
    state: DeployState
    trigger: Trigger
    actor: str
    started_at: float
    finished_at: float | None
    error: str | None
    bake_state: BakeState | None
    bake_started_at: float | None
    bake_until: float | None
    forced: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "revision": self.revision,
            "release": self.release, "previous_release": self.previous_release,
            "previous_revision": self.previous_revision, "state": self.state,
            "trigger": self.trigger, "actor": self.actor,
            "started_at": iso_time(self.started_at), "finished_at": iso_time(self.finished_at),
            "error": self.error, "bake_state": self.bake_state,
            "bake_until": iso_time(self.bake_until), "forced": self.forced,
        }


@dataclass(frozen=True)
class HostResult:
    deploy_id: int
    host: str
    state: str
    error: str | None
    at: float


@dataclass(frozen=True)
class AppState:
    app: str
    last_good_revision: str | None = None
    last_good_release: str | None = None
    paused: bool = False
    paused_by: str | None = None
    paused_reason: str | None = None
    paused_at: float | None = None


@dataclass(frozen=True)
class Quarantined:
    app: str
    revision: str
    reason: str
    actor: str
    at: float


class Store:
    """deployd's state in one SQLite file; every method runs on the store's own thread."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deployd-store")
        self._db: sqlite3.Connection | None = None
        # Called with each event once it is stored (e.g. to wake the notifications outbox).
        self.listeners: list[Callable[[Event], None]] = []

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Create or open the file, switch to WAL and bring the schema up to date."""
        await self._run(self._open)

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._close)
        self._executor.shutdown(wait=True)

    @property
    def is_open(self) -> bool:
        return self._db is not None

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
            self._migrate(db)
        except (sqlite3.Error, OSError) as exc:  # OSError: state_dir cannot be made
            raise StoreError(f"cannot open state store {self.path}: {exc}") from exc
        self._db = db

    def _close(self) -> None:
        assert self._db is not None
        self._db.close()
        self._db = None

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise StoreError(
                f"state store has schema version {version}, newer than this deployd "
                f"understands ({len(MIGRATIONS)}); upgrade deployd"
            )
        for number in range(version, len(MIGRATIONS)):
            # executescript commits anything pending first, so the transaction lives inside
            # the script: a crash mid-migration leaves the previous version intact.
            script = (f"BEGIN IMMEDIATE;\n{MIGRATIONS[number]}\n"
                      f"PRAGMA user_version = {number + 1};\nCOMMIT;")
            try:
                db.executescript(script)
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    async def schema_version(self) -> int:
        return int(await self._run(lambda: self._conn().execute("PRAGMA user_version")
                                   .fetchone()[0]))

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("state store is not open")
        return self._db

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: {exc}") from exc

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> Callable[[], T]:
        """Wrap `fn` in one transaction on the store thread."""
        def run() -> T:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result
        return run

    # -- events --------------------------------------------------------------------------

    async def add_event(self, app: str, kind: EventKind, message: str, *,
                        actor: str = "deployd", revision: str | None = None,
                        data: dict[str, Any] | None = None) -> Event:
        """Append one event to the app's timeline."""
        at = self.clock()
        payload = json.dumps(data or {}, sort_keys=True, default=str)

        def insert(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "INSERT INTO events (app, at, kind, actor, revision, message, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (app, at, kind, actor, revision, message, payload),
            )
            return int(cursor.lastrowid or 0)

        event_id = await self._run(self._write(insert))
        # One log line per event, after it is stored: the log never says more than the store.
        events_log.info("%s %s: %s", app, kind, message,
                        extra={"app": app, "kind": kind, "actor": actor, "revision": revision,
                               "event_id": event_id})
        event = Event(event_id, app, at, kind, actor, revision, message, data or {})
        for listener in self.listeners:
            listener(event)
        return event

    async def events(self, app: str, *, since_id: int = 0, since_time: float | None = None,
                     limit: int = 500) -> list[Event]:
        """The app's events after `since_id` (and at or after `since_time`), oldest first."""
        def query() -> list[Event]:
            rows = self._conn().execute(
                "SELECT * FROM events WHERE app = ? AND id > ? AND at >= ? ORDER BY id LIMIT ?",
                (app, since_id, since_time or 0.0, limit),
            ).fetchall()
            return [event_from_row(row) for row in rows]
        return await self._run(query)

    async def deploy_event(self, app: str, deploy_id: int, kind: str) -> Event | None:
        """The last event of `kind` about deploy (or rollback) `deploy_id`, if any."""
        def query() -> Event | None:
            row = self._conn().execute(
                "SELECT * FROM events WHERE app = ? AND kind = ? "
                "AND json_extract(data, '$.deploy') = ? ORDER BY id DESC LIMIT 1",
                (app, kind, deploy_id)).fetchone()
            return event_from_row(row) if row else None
        return await self._run(query)

    async def job_events(self, app: str, job_id: int, *, limit: int = 1000) -> list[Event]:
        """The events about one rescue job, oldest first."""
        def query() -> list[Event]:
            rows = self._conn().execute(
                "SELECT * FROM events WHERE app = ? AND json_extract(data, '$.job') = ? "
                "ORDER BY id LIMIT ?", (app, job_id, limit)).fetchall()
            return [event_from_row(row) for row in rows]
        return await self._run(query)

    # -- deploys and rollbacks -----------------------------------------------------------

    async def start_deploy(self, app: str, kind: DeployKind, revision: str, *,
                           trigger: Trigger, actor: str, release: str | None = None,
                           previous_release: str | None = None,
                           previous_revision: str | None = None,
                           state: DeployState = DeployState.RUNNING,
                           forced: str | None = None) -> Deploy:
        """Record a deploy or rollback about to start (or an observed one).

        `forced` says what a forced deploy overrode (see `deploys.forced`). The words are
        checked here too (ValueError), for callers that mypy does not see.
        """
        kind, state, trigger = DeployKind(kind), DeployState(state), Trigger(trigger)
        now = self.clock()

        def insert(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "INSERT INTO deploys (app, kind, revision, release, previous_release, "
                "previous_revision, state, trigger, actor, started_at, forced) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (app, kind, revision, release, previous_release, previous_revision, state,
                 trigger, actor, now, forced),
            )
            return int(cursor.lastrowid or 0)

        deploy_id = await self._run(self._write(insert))
        return await self.deploy(deploy_id)

    async def update_deploy(
        self, deploy_id: int, *,
        state: DeployState | Unset = UNSET,
        release: str | Unset | None = UNSET,
        error: str | Unset | None = UNSET,
        finished_at: float | Unset | None = UNSET,
        bake_state: BakeState | Unset | None = UNSET,
        bake_started_at: float | Unset | None = UNSET,
        bake_until: float | Unset | None = UNSET,
    ) -> Deploy:
        """Set the given columns of a deploy record; the others stay as they are.

        A final `state` sets `finished_at` to now unless it is given too.
        """
        if state is not UNSET:
            state = DeployState(state)
            if state.finished and finished_at is UNSET:
                finished_at = self.clock()
        if bake_state is not UNSET and bake_state is not None:
            bake_state = BakeState(bake_state)
        given = {"state": state, "release": release, "error": error, "finished_at": finished_at,
                 "bake_state": bake_state, "bake_started_at": bake_started_at,
                 "bake_until": bake_until}
        fields = {name: value for name, value in given.items() if value is not UNSET}
        if not fields:
            return await self.deploy(deploy_id)
        columns = ", ".join(f"{name} = ?" for name in fields)

        def update(db: sqlite3.Connection) -> None:
            db.execute(f"UPDATE deploys SET {columns} WHERE id = ?", (*fields.values(), deploy_id))

        await self._run(self._write(update))
        return await self.deploy(deploy_id)

    async def deploy(self, deploy_id: int) -> Deploy:
        row = await self._run(lambda: self._conn().execute(
            "SELECT * FROM deploys WHERE id = ?", (deploy_id,)).fetchone())
        if row is None:
            raise NotFound(f"no deploy {deploy_id}")
        return _deploy(row)

    async def deploys(self, app: str, *, limit: int = 50,
                      kind: DeployKind | None = None,
                      state: DeployState | None = None) -> list[Deploy]:
        """The app's deploys and rollbacks, newest first (a bare word that is none of ours:
        ValueError)."""
        sql, args = _newest_first("deploys", limit, app=app, state=state,
                                  kind=None if kind is None else DeployKind(kind))
        rows = await self._run(lambda: self._conn().execute(sql, args).fetchall())
        return [_deploy(row) for row in rows]

    async def last_live(self, app: str) -> Deploy | None:
        """The newest deploy, rollback or observation that left a release live."""
        rows = await self._run(lambda: self._conn().execute(
            "SELECT * FROM deploys WHERE app = ? AND state = ? "
            "AND release IS NOT NULL ORDER BY id DESC LIMIT 1",
            (app, DeployState.SUCCEEDED)).fetchall())
        return _deploy(rows[0]) if rows else None

    async def set_host_results(self, deploy_id: int, results: dict[str, tuple[str, str | None]]
                               ) -> None:
        """Record many hosts' results (host -> (state, error)) in one transaction."""
        now = self.clock()
        rows = [(deploy_id, host, state, error, now) for host, (state, error) in results.items()]

        def upsert(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO host_results (deploy_id, host, state, error, at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (deploy_id, host) DO UPDATE SET "
                "state = excluded.state, error = excluded.error, at = excluded.at", rows)

        if rows:
            await self._run(self._write(upsert))

    async def set_host_result(self, deploy_id: int, host: str, state: str,
                              error: str | None = None) -> None:
        await self.set_host_results(deploy_id, {host: (state, error)})

    async def host_results(self, deploy_id: int) -> list[HostResult]:
        rows = await self._run(lambda: self._conn().execute(
            "SELECT * FROM host_results WHERE deploy_id = ? ORDER BY host",
            (deploy_id,)).fetchall())
        return [HostResult(r["deploy_id"], r["host"], r["state"], r["error"], r["at"])
                for r in rows]

    # -- per-app state: last good, pause -------------------------------------------------

    async def app_state(self, app: str) -> AppState:
        row = await self._run(lambda: self._conn().execute(
            "SELECT * FROM app_state WHERE app = ?", (app,)).fetchone())
        if row is None:
            return AppState(app=app)
        return AppState(app=app, last_good_revision=row["last_good_revision"],
                        last_good_release=row["last_good_release"], paused=bool(row["paused"]),
                        paused_by=row["paused_by"], paused_reason=row["paused_reason"],
                        paused_at=row["paused_at"])

    async def set_last_good(self, app: str, revision: str, release: str | None) -> None:
        await self._upsert_app(app, last_good_revision=revision, last_good_release=release)

    async def set_paused(self, app: str, paused: bool, *, actor: str, reason: str) -> None:
        if paused:
            await self._upsert_app(app, paused=True, paused_by=actor, paused_reason=reason,
                                   paused_at=self.clock())
        else:
            await self._upsert_app(app, paused=False, paused_by=None, paused_reason=None,
                                   paused_at=None)

    async def _upsert_app(self, app: str, *, last_good_revision: str | Unset = UNSET,
                          last_good_release: str | Unset | None = UNSET,
                          paused: bool | Unset = UNSET, paused_by: str | Unset | None = UNSET,
                          paused_reason: str | Unset | None = UNSET,
                          paused_at: float | Unset | None = UNSET) -> None:
        """Create the app's row or set the given columns of it; the others stay."""
        given = {"last_good_revision": last_good_revision,
                 "last_good_release": last_good_release,
                 "paused": paused if isinstance(paused, Unset) else int(paused),
                 "paused_by": paused_by, "paused_reason": paused_reason, "paused_at": paused_at}
        fields = {name: value for name, value in given.items() if value is not UNSET}
        columns = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        updates = ", ".join(f"{name} = excluded.{name}" for name in fields)

        def upsert(db: sqlite3.Connection) -> None:
            db.execute(
                f"INSERT INTO app_state (app, {columns}) VALUES (?, {marks}) "
                f"ON CONFLICT (app) DO UPDATE SET {updates}",
                (app, *fields.values()),
            )

        await self._run(self._write(upsert))

    # -- quarantine ----------------------------------------------------------------------

    async def quarantine(self, app: str, revision: str, *, reason: str, actor: str) -> bool:
        """Quarantine a revision; False when it already was."""
        now = self.clock()

        def insert(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "INSERT OR IGNORE INTO quarantine (app, revision, reason, actor, at) "
                "VALUES (?, ?, ?, ?, ?)", (app, revision, reason, actor, now))
            return cursor.rowcount == 1

        return await self._run(self._write(insert))

    async def quarantined(self, app: str) -> list[Quarantined]:
        rows = await self._run(lambda: self._conn().execute(
            "SELECT * FROM quarantine WHERE app = ? ORDER BY at", (app,)).fetchall())
        return [Quarantined(r["app"], r["revision"], r["reason"], r["actor"], r["at"])
                for r in rows]

    async def is_quarantined(self, app: str, revision: str) -> bool:
        row = await self._run(lambda: self._conn().execute(
            "SELECT 1 FROM quarantine WHERE app = ? AND revision = ?",
            (app, revision)).fetchone())
        return row is not None


@dataclass(frozen=True)
class Job:
    """A rescue job as stored; `candidates` and `preview` are JSON documents."""

    id: int
    app: str
    state: JobState
    base: str
    bad_head: str
    candidates: list[dict[str, Any]]
    selection: list[str]
    resolved_patch: str | None
    preview: dict[str, Any]
    plan: str | None
    requester: str
    reason: str
    created_at: float
    updated_at: float
    expires_at: float
    step: JobStep | None
    new_head: str | None
    backup_ref: str | None
    deploy_id: int | None
    error: str | None
    changed_by: str | None = None
    resolved_by: str | None = None

    @property
    def last_changed_by(self) -> str:
        """Who last changed what the job would land (its requester until someone does)."""
        return self.changed_by or self.requester


@dataclass(frozen=True)
class Approval:
    id: int
    job_id: int
    decision: str
    actor: str
    plan: str | None
    comment: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {"decision": self.decision, "by": self.actor, "plan": self.plan,
                "comment": self.comment, "at": iso_time(self.at)}


class _Any:
    """`expect_plan` default: any plan (None is a real value: a job not ready has none)."""


_ANY = _Any()

class JobStore:
    """Rescue jobs and their approvals, on the same file and thread as the `Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def create(self, app: str, *, base: str, bad_head: str,
                     candidates: list[dict[str, Any]], selection: list[str], requester: str,
                     reason: str, expires_at: float, preview: dict[str, Any] | None = None,
                     plan: str | None = None) -> Job:
        """Insert a pending job, with its preview and plan so it is never seen without."""
        now = self.store.clock()

        def insert(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "INSERT INTO jobs (app, state, base, bad_head, candidates, selection, "
                "requester, reason, created_at, updated_at, expires_at, preview, plan) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (app, JobState.PENDING, base, bad_head, json.dumps(candidates),
                 json.dumps(selection), requester, reason, now, now, expires_at,
                 json.dumps(preview or {}), plan))
            return int(cursor.lastrowid or 0)

        return await self.get(await self.store._run(self.store._write(insert)))

    async def get(self, job_id: int) -> Job:
        row = await self.store._run(lambda: self.store._conn().execute(
            "SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
        if row is None:
            raise NotFound(f"no rescue job {job_id}")
        return _job(row)

    async def find(self, *, app: str | None = None, state: JobState | None = None,
                   limit: int = 200) -> list[Job]:
        """Jobs, newest first, optionally of one app and one state."""
        sql, args = _newest_first("jobs", limit, app=app, state=state)
        rows = await self.store._run(lambda: self.store._conn().execute(sql, args).fetchall())
        return [_job(row) for row in rows]

    async def update(
        self, job_id: int, *,
        expect: tuple[JobState, ...] | None = None,
        expect_plan: str | _Any | None = _ANY,
        expect_changed_by: str | _Any | None = _ANY,
        state: JobState | Unset = UNSET,
        selection: list[str] | Unset = UNSET,
        resolved_patch: str | Unset | None = UNSET,
        preview: dict[str, Any] | Unset = UNSET,
        plan: str | Unset | None = UNSET,
        step: JobStep | Unset = UNSET,
        new_head: str | Unset = UNSET,
        backup_ref: str | Unset = UNSET,
        deploy_id: int | Unset = UNSET,
        error: str | Unset | None = UNSET,
        changed_by: str | Unset = UNSET,
        resolved_by: str | Unset | None = UNSET,
    ) -> Job | None:
        """Set the given fields (the others stay); with `expect`, only if the job is in one
        of those states (else None).

        The conditional form is what makes two racing approvals safe: exactly one of them
        moves the job out of `pending`. `expect_plan` and `expect_changed_by` likewise
        require the plan and last changer the caller read.
        """
        given: dict[str, object] = {
            "state": state,
            "selection": selection if isinstance(selection, Unset) else json.dumps(selection),
            "resolved_patch": resolved_patch if isinstance(resolved_patch, Unset)
            else _patch_column(resolved_patch),
            "preview": preview if isinstance(preview, Unset) else json.dumps(preview),
            "plan": plan, "step": step, "new_head": new_head, "backup_ref": backup_ref,
            "deploy_id": deploy_id, "error": error, "changed_by": changed_by,
            "resolved_by": resolved_by,
        }
        fields = {name: value for name, value in given.items() if value is not UNSET}
        columns = "".join(f"{name} = ?, " for name in fields)
        sql = f"UPDATE jobs SET {columns}updated_at = ? WHERE id = ?"
        args: list[Any] = [*fields.values(), self.store.clock(), job_id]
        if expect is not None:
            sql += f" AND state IN ({', '.join('?' for _ in expect)})"
            args.extend(expect)
        if not isinstance(expect_plan, _Any):
            sql += " AND plan IS ?"
            args.append(expect_plan)
        if not isinstance(expect_changed_by, _Any):
            sql += " AND changed_by IS ?"
            args.append(expect_changed_by)

        def update(db: sqlite3.Connection) -> int:
            return db.execute(sql, args).rowcount

        changed = await self.store._run(self.store._write(update))
        return await self.get(job_id) if changed else None

    async def add_approval(self, job_id: int, *, decision: str, actor: str, plan: str | None,
                           comment: str) -> None:
        now = self.store.clock()

        def insert(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO approvals (job_id, decision, actor, plan, comment, at) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (job_id, decision, actor, plan, comment, now))

        await self.store._run(self.store._write(insert))

    async def approvals(self, job_id: int) -> list[Approval]:
        rows = await self.store._run(lambda: self.store._conn().execute(
            "SELECT * FROM approvals WHERE job_id = ? ORDER BY id", (job_id,)).fetchall())
        return [Approval(r["id"], r["job_id"], r["decision"], r["actor"], r["plan"],
                         r["comment"], r["at"]) for r in rows]

    async def counts(self, app: str) -> dict[JobState, int]:
        rows = await self.store._run(lambda: self.store._conn().execute(
            "SELECT state, COUNT(*) AS n FROM jobs WHERE app = ? GROUP BY state",
            (app,)).fetchall())
        return {JobState(row["state"]): int(row["n"]) for row in rows}

    async def oldest_pending(self, app: str) -> float | None:
        row = await self.store._run(lambda: self.store._conn().execute(
            "SELECT MIN(created_at) FROM jobs WHERE app = ? AND state = ?",
            (app, JobState.PENDING)).fetchone())
        return None if row is None or row[0] is None else float(row[0])


def make_private_dir(path: Path) -> None:
    """Create `path` (and parents) if needed; either way it ends up 0700, whatever the umask."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _private_files(db: Path) -> None:
    """The database file exists and is 0600 before SQLite opens it: SQLite gives its WAL and
    shared-memory files the database file's mode, and fixes theirs if they exist already."""
    os.close(os.open(db, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if path.exists():
            path.chmod(0o600)


def _newest_first(table: str, limit: int, **equal: object) -> tuple[str, list[Any]]:
    """A query for `table`'s rows whose columns equal the given values (None: any), newest
    first, and its arguments. The column names are the caller's keywords, never input."""
    given = {column: value for column, value in equal.items() if value is not None}
    where = " AND ".join(f"{column} = ?" for column in given) or "1 = 1"
    sql = f"SELECT * FROM {table} WHERE {where} ORDER BY id DESC LIMIT ?"
    return sql, [*given.values(), limit]


def _patch_column(patch: str | None) -> str | bytes | None:
    """A patch as SQLite can hold it: text, or its bytes when it is not UTF-8 (a diff of
    binary or Latin-1 files arrives with surrogate escapes, which SQLite text cannot hold)."""
    if patch is None:
        return None
    try:
        patch.encode()
    except UnicodeEncodeError:
        return patch.encode("utf-8", "surrogateescape")
    return patch


def _patch_text(value: str | bytes | None) -> str | None:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], app=row["app"], state=JobState(row["state"]), base=row["base"],
        bad_head=row["bad_head"], candidates=json.loads(row["candidates"]),
        selection=json.loads(row["selection"]),
        resolved_patch=_patch_text(row["resolved_patch"]),
        preview=json.loads(row["preview"]), plan=row["plan"], requester=row["requester"],
        reason=row["reason"], created_at=row["created_at"], updated_at=row["updated_at"],
        expires_at=row["expires_at"], step=_optional(JobStep, row["step"]),
        new_head=row["new_head"],
        backup_ref=row["backup_ref"], deploy_id=row["deploy_id"], error=row["error"],
        changed_by=row["changed_by"], resolved_by=row["resolved_by"],
    )


def event_from_row(row: sqlite3.Row) -> Event:
    """An `events` row as an Event."""
    return Event(row["id"], row["app"], row["at"], row["kind"], row["actor"], row["revision"],
                 row["message"], json.loads(row["data"]))


def _deploy(row: sqlite3.Row) -> Deploy:
    return Deploy(
        id=row["id"], app=row["app"], kind=DeployKind(row["kind"]), revision=row["revision"],
        release=row["release"], previous_release=row["previous_release"],
        previous_revision=row["previous_revision"], state=DeployState(row["state"]),
        trigger=Trigger(row["trigger"]), actor=row["actor"], started_at=row["started_at"],
        finished_at=row["finished_at"], error=row["error"],
        bake_state=_optional(BakeState, row["bake_state"]),
        bake_started_at=row["bake_started_at"], bake_until=row["bake_until"],
        forced=row["forced"],
    )


W = TypeVar("W", bound=enum.StrEnum)


def _optional(words: type[W], value: str | None) -> W | None:
    """A nullable column read as one of `words`."""
    return None if value is None else words(value)
