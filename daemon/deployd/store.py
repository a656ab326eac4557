"""The state store: everything deployd saw and did, in one database.

Every deploy, rollback, per-host result, event, quarantine and pause is written here before
it is acted on, so a crash at any point can be resumed or failed safely on restart, and the
REST API and metrics read the same facts. The database is a SQLite file (WAL) under
state_dir by default, or PostgreSQL (`[daemon] database`); the SQL goes through a `Backend`
(storage.py), which keeps what differs between the two in one place.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from deployd.errors import NotFound
from deployd.storage import Backend, Row, SQLiteBackend
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
    # Several daemons on one database (ownership.py): the nodes and which one owns each app.
    # Only PostgreSQL fills them; SQLite has them so both schemas stay the same.
    """
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        advertise TEXT,
        last_seen REAL NOT NULL
    );
    CREATE TABLE app_owners (
        app TEXT PRIMARY KEY,
        node TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        since REAL NOT NULL
    );
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
    """deployd's state, on the SQLite file at `where` or on the given backend."""

    def __init__(self, where: Path | Backend, *, clock: Callable[[], float] = time.time
                 ) -> None:
        # MIGRATIONS is looked up when the file is opened (tests add one to it).
        self.backend: Backend = (SQLiteBackend(where, lambda: MIGRATIONS)
                                 if isinstance(where, Path) else where)
        self.clock = clock
        # Called with each event once it is stored (e.g. to wake the notifications outbox).
        self.listeners: list[Callable[[Event], None]] = []

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (create the file) and bring the schema up to date."""
        await self.backend.open()

    async def close(self) -> None:
        await self.backend.close()

    @property
    def is_open(self) -> bool:
        return self.backend.is_open

    async def schema_version(self) -> int:
        return await self.backend.schema_version()

    # -- events --------------------------------------------------------------------------

    async def add_event(self, app: str, kind: EventKind, message: str, *,
                        actor: str = "deployd", revision: str | None = None,
                        data: dict[str, Any] | None = None) -> Event:
        """Append one event to the app's timeline."""
        at = self.clock()
        payload = self.backend.dialect.json_document(data or {})

        event_id = await self._insert(
            "INSERT INTO events (app, at, kind, actor, revision, message, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (app, at, kind, actor, revision, message, payload), in_id_order=True)
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
        rows = await self.backend.fetch_all(
            "SELECT * FROM events WHERE app = ? AND id > ? AND at >= ? ORDER BY id LIMIT ?",
            (app, since_id, since_time or 0.0, limit))
        return [event_from_row(row) for row in rows]

    async def deploy_event(self, app: str, deploy_id: int, kind: str) -> Event | None:
        """The last event of `kind` about deploy (or rollback) `deploy_id`, if any."""
        about = self.backend.dialect.json_int_equals("data", "deploy")
        row = await self.backend.fetch_one(
            f"SELECT * FROM events WHERE app = ? AND kind = ? AND {about} "
            "ORDER BY id DESC LIMIT 1", (app, kind, deploy_id))
        return event_from_row(row) if row else None

    async def job_events(self, app: str, job_id: int, *, limit: int = 1000) -> list[Event]:
        """The events about one rescue job, oldest first."""
        about = self.backend.dialect.json_int_equals("data", "job")
        rows = await self.backend.fetch_all(
            f"SELECT * FROM events WHERE app = ? AND {about} ORDER BY id LIMIT ?",
            (app, job_id, limit))
        return [event_from_row(row) for row in rows]

    async def _insert(self, sql: str, args: tuple[Any, ...], *, in_id_order: bool = False
                      ) -> int:
        """Run an `INSERT ... RETURNING id`; the new row's id. `in_id_order`: for a table read
        by paging through ids (see `Dialect.id_order_lock`)."""
        lock = self.backend.dialect.id_order_lock if in_id_order else None
        if lock is None:
            row = await self.backend.fetch_one(sql, args)
        else:
            async with self.backend.transaction() as tx:
                await tx.execute(lock)
                row = await tx.fetch_one(sql, args)
        assert row is not None
        return int(row["id"])

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

        deploy_id = await self._insert(
            "INSERT INTO deploys (app, kind, revision, release, previous_release, "
            "previous_revision, state, trigger, actor, started_at, forced) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (app, kind, revision, release, previous_release, previous_revision, state,
             trigger, actor, now, forced))
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

        await self.backend.execute(f"UPDATE deploys SET {columns} WHERE id = ?",
                                   (*fields.values(), deploy_id))
        return await self.deploy(deploy_id)

    async def deploy(self, deploy_id: int) -> Deploy:
        row = await self.backend.fetch_one("SELECT * FROM deploys WHERE id = ?", (deploy_id,))
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
        rows = await self.backend.fetch_all(sql, args)
        return [_deploy(row) for row in rows]

    async def last_live(self, app: str) -> Deploy | None:
        """The newest deploy, rollback or observation that left a release live."""
        row = await self.backend.fetch_one(
            "SELECT * FROM deploys WHERE app = ? AND state = ? "
            "AND release IS NOT NULL ORDER BY id DESC LIMIT 1",
            (app, DeployState.SUCCEEDED))
        return _deploy(row) if row else None

    async def set_host_results(self, deploy_id: int, results: dict[str, tuple[str, str | None]]
                               ) -> None:
        """Record many hosts' results (host -> (state, error)) in one transaction."""
        now = self.clock()
        rows = [(deploy_id, host, state, error, now) for host, (state, error) in results.items()]

        if rows:
            await self.backend.executemany(
                "INSERT INTO host_results (deploy_id, host, state, error, at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (deploy_id, host) DO UPDATE SET "
                "state = excluded.state, error = excluded.error, at = excluded.at", rows)

    async def set_host_result(self, deploy_id: int, host: str, state: str,
                              error: str | None = None) -> None:
        await self.set_host_results(deploy_id, {host: (state, error)})

    async def host_results(self, deploy_id: int) -> list[HostResult]:
        rows = await self.backend.fetch_all(
            "SELECT * FROM host_results WHERE deploy_id = ? ORDER BY host", (deploy_id,))
        return [HostResult(r["deploy_id"], r["host"], r["state"], r["error"], r["at"])
                for r in rows]

    # -- per-app state: last good, pause -------------------------------------------------

    async def app_state(self, app: str) -> AppState:
        row = await self.backend.fetch_one("SELECT * FROM app_state WHERE app = ?", (app,))
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
                 "paused": paused,
                 "paused_by": paused_by, "paused_reason": paused_reason, "paused_at": paused_at}
        fields = {name: value for name, value in given.items() if value is not UNSET}
        columns = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        updates = ", ".join(f"{name} = excluded.{name}" for name in fields)

        await self.backend.execute(
            f"INSERT INTO app_state (app, {columns}) VALUES (?, {marks}) "
            f"ON CONFLICT (app) DO UPDATE SET {updates}",
            (app, *fields.values()))

    # -- quarantine ----------------------------------------------------------------------

    async def quarantine(self, app: str, revision: str, *, reason: str, actor: str) -> bool:
        """Quarantine a revision; False when it already was."""
        now = self.clock()

        inserted = await self.backend.execute(
            "INSERT INTO quarantine (app, revision, reason, actor, at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", (app, revision, reason, actor, now))
        return inserted == 1

    async def quarantined(self, app: str) -> list[Quarantined]:
        rows = await self.backend.fetch_all(
            "SELECT * FROM quarantine WHERE app = ? ORDER BY at", (app,))
        return [Quarantined(r["app"], r["revision"], r["reason"], r["actor"], r["at"])
                for r in rows]

    async def is_quarantined(self, app: str, revision: str) -> bool:
        row = await self.backend.fetch_one(
            "SELECT 1 AS one FROM quarantine WHERE app = ? AND revision = ?", (app, revision))
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
    """Rescue jobs and their approvals, in the same database as the `Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def create(self, app: str, *, base: str, bad_head: str,
                     candidates: list[dict[str, Any]], selection: list[str], requester: str,
                     reason: str, expires_at: float, preview: dict[str, Any] | None = None,
                     plan: str | None = None) -> Job:
        """Insert a pending job, with its preview and plan so it is never seen without."""
        now = self.store.clock()

        job_id = await self.store._insert(
            "INSERT INTO jobs (app, state, base, bad_head, candidates, selection, "
            "requester, reason, created_at, updated_at, expires_at, preview, plan) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (app, JobState.PENDING, base, bad_head, json.dumps(candidates),
             json.dumps(selection), requester, reason, now, now, expires_at,
             json.dumps(preview or {}), plan))
        return await self.get(job_id)

    async def get(self, job_id: int) -> Job:
        row = await self.store.backend.fetch_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            raise NotFound(f"no rescue job {job_id}")
        return _job(row)

    async def find(self, *, app: str | None = None, state: JobState | None = None,
                   limit: int = 200) -> list[Job]:
        """Jobs, newest first, optionally of one app and one state."""
        sql, args = _newest_first("jobs", limit, app=app, state=state)
        rows = await self.store.backend.fetch_all(sql, args)
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
            else self.store.backend.dialect.patch_value(resolved_patch),
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
            sql += " AND plan IS NOT DISTINCT FROM ?"
            args.append(expect_plan)
        if not isinstance(expect_changed_by, _Any):
            sql += " AND changed_by IS NOT DISTINCT FROM ?"
            args.append(expect_changed_by)

        changed = await self.store.backend.execute(sql, args)
        return await self.get(job_id) if changed else None

    async def add_approval(self, job_id: int, *, decision: str, actor: str, plan: str | None,
                           comment: str) -> None:
        now = self.store.clock()

        await self.store.backend.execute(
            "INSERT INTO approvals (job_id, decision, actor, plan, comment, at) "
            "VALUES (?, ?, ?, ?, ?, ?)", (job_id, decision, actor, plan, comment, now))

    async def approvals(self, job_id: int) -> list[Approval]:
        rows = await self.store.backend.fetch_all(
            "SELECT * FROM approvals WHERE job_id = ? ORDER BY id", (job_id,))
        return [Approval(r["id"], r["job_id"], r["decision"], r["actor"], r["plan"],
                         r["comment"], r["at"]) for r in rows]

    async def counts(self, app: str) -> dict[JobState, int]:
        rows = await self.store.backend.fetch_all(
            "SELECT state, COUNT(*) AS n FROM jobs WHERE app = ? GROUP BY state", (app,))
        return {JobState(row["state"]): int(row["n"]) for row in rows}

    async def oldest_pending(self, app: str) -> float | None:
        row = await self.store.backend.fetch_one(
            "SELECT MIN(created_at) AS oldest FROM jobs WHERE app = ? AND state = ?",
            (app, JobState.PENDING))
        return None if row is None or row["oldest"] is None else float(row["oldest"])


def make_private_dir(path: Path) -> None:
    """Create `path` (and parents) if needed; either way it ends up 0700, whatever the umask."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _newest_first(table: str, limit: int, **equal: object) -> tuple[str, list[Any]]:
    """A query for `table`'s rows whose columns equal the given values (None: any), newest
    first, and its arguments. The column names are the caller's keywords, never input."""
    given = {column: value for column, value in equal.items() if value is not None}
    where = " AND ".join(f"{column} = ?" for column in given) or "1 = 1"
    sql = f"SELECT * FROM {table} WHERE {where} ORDER BY id DESC LIMIT ?"
    return sql, [*given.values(), limit]


def _patch_text(value: str | bytes | None) -> str | None:
    """A patch column read back (bytes: see `Dialect.patch_value`)."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def _job(row: Row) -> Job:
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


def event_from_row(row: Row) -> Event:
    """An `events` row as an Event."""
    return Event(row["id"], row["app"], row["at"], row["kind"], row["actor"], row["revision"],
                 row["message"], json.loads(row["data"]))


def _deploy(row: Row) -> Deploy:
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
