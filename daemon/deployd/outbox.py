"""The notifications outbox: what each target is owed, kept in the store until delivered.

Each target has a cursor, the last event it has looked at. `enqueue_events` moves the cursor
and writes the deliveries the target wants in one transaction, so an event stored before a
crash is delivered after it, and none twice. A delivery keeps its id (`X-Deployd-Delivery`) and
its payload through every retry; it ends `sent` or, past the target's patience, `failed`.

Several daemons on one PostgreSQL database share the outbox. One delivery attempt is one
transaction holding the target's advisory lock (`claim`): the daemon that holds it sends the
oldest queued delivery and records the outcome before it lets go; the others skip the target
until then. So each delivery is sent once, in order, and one cut short (a daemon killed or
stopped mid-send) is rolled back to `queued` and sent again by whoever claims the target next.
A reminder is queued under the target's cursor lock, after looking again at what was queued
about the job, so two daemons' reminder rounds queue it once.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from deployd.storage import Row, Tx
from deployd.store import Event, Store, event_from_row
from deployd.vocabulary import EventKind

DeliveryState = Literal["queued", "sent", "failed"]
SCAN_BATCH = 500
# The first key of the two-int advisory locks that mean "this daemon is delivering to that
# target" ("dpnt"): ownership.py's app locks are "dpow", the store's one-bigint locks are
# another key space. Two target names with the same hashtext share a lock: they take turns.
DELIVERY_LOCK_CLASS = 0x64706E74


@dataclass(frozen=True)
class Delivery:
    id: int
    target: str
    delivery: str
    app: str
    kind: str
    job_id: int | None
    payload: dict[str, Any]
    created_at: float
    next_at: float
    attempts: int
    state: DeliveryState
    last_error: str | None


class OutboxStore:
    """The outbox tables, in the store's database."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # PostgreSQL: each target's claims on a connection of their own (outside the pool).
        self._dedicated: dict[str, Any] = {}

    async def close(self) -> None:
        """Close the claims' own connections."""
        dedicated, self._dedicated = self._dedicated, {}
        for conn in dedicated.values():
            await conn.close()

    async def start_cursor(self, target: str) -> None:
        """A new target starts at the newest event: it is owed nothing from before it existed."""
        # WHERE true: SQLite would read ON CONFLICT after a bare FROM as a join's ON.
        await self.store.backend.execute(
            "INSERT INTO outbox_cursor (target, event_id) "
            "SELECT ?, COALESCE(MAX(id), 0) FROM events WHERE true ON CONFLICT DO NOTHING",
            (target,))

    async def enqueue_events(self, target: str, wants: Callable[[Event], bool]
                             ) -> tuple[int, int]:
        """Queue the events after the target's cursor that it wants: (scanned, queued)."""
        now = self.store.clock()

        # The cursor row stays locked until the deliveries are in: a second scan of the same
        # target (another daemon's) waits, then starts where this one ended.
        lock = self.store.backend.dialect.for_update
        async with self.store.backend.transaction() as tx:
            row = await tx.fetch_one(
                f"SELECT event_id FROM outbox_cursor WHERE target = ?{lock}", (target,))
            cursor = int(row["event_id"]) if row else 0
            rows = await tx.fetch_all("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?",
                                      (cursor, SCAN_BATCH))
            queued = 0
            for event in map(event_from_row, rows):
                if wants(event):
                    await _insert(tx, target, event.app, event.kind, _payload(event), now,
                                  event_id=event.id, job_id=_job_id(event))
                    queued += 1
            if rows:
                await tx.execute(
                    "INSERT INTO outbox_cursor (target, event_id) VALUES (?, ?) "
                    "ON CONFLICT(target) DO UPDATE SET event_id = excluded.event_id",
                    (target, int(rows[-1]["id"])))
            return len(rows), queued

    async def enqueue(self, target: str, app: str, kind: str, payload: dict[str, Any], *,
                      job_id: int | None = None) -> None:
        """Queue one message that is not a stored event (a reminder)."""
        now = self.store.clock()

        await _insert(self.store.backend, target, app, kind, payload, now, event_id=None,
                      job_id=job_id)

    async def enqueue_reminder(self, target: str, app: str, job_id: int,
                               payload: dict[str, Any], *, quiet_since: float) -> bool:
        """Queue a reminder about a job unless the target was given something about it after
        `quiet_since`; False when it was. The check and the insert hold the target's cursor
        row, so of two daemons reminding at once the second sees the first's reminder."""
        now = self.store.clock()

        lock = self.store.backend.dialect.for_update
        async with self.store.backend.transaction() as tx:
            await tx.fetch_one(f"SELECT event_id FROM outbox_cursor WHERE target = ?{lock}",
                               (target,))
            last = await _last_about_job(tx, target, job_id)
            if last is not None and last > quiet_since:
                return False
            await _insert(tx, target, app, EventKind.JOB_PENDING, payload, now, event_id=None,
                          job_id=job_id)
            return True

    def claim(self, target: str, *, hold: float) -> AbstractAsyncContextManager[Claim | None]:
        """One delivery attempt to `target`, alone: None while another daemon makes one.

        On PostgreSQL a transaction holding the target's lock until the block ends, on a
        connection of the target's own: what the claim writes commits then, and nothing of it
        if the block raises or is cancelled (the delivery stays queued). Should the daemon be
        cut off, the server ends the session after `hold` seconds idle, so the lock does not
        outlive it. On SQLite (one daemon, one attempt per target at a time) statements on
        their own.
        """
        return self._claim(target, hold)

    @asynccontextmanager
    async def _claim(self, target: str, hold: float) -> AsyncIterator[Claim | None]:
        backend = self.store.backend
        lock, idle_limit = backend.dialect.try_xact_lock, backend.dialect.idle_limit
        if lock is None:
            yield Claim(backend, self.store.clock)
            return
        transaction = backend.transaction
        dedicated = getattr(backend, "dedicated", None)  # PostgresBackend's, not a fenced one
        if dedicated is not None:
            conn = self._dedicated.get(target)
            if conn is None:
                conn = self._dedicated[target] = dedicated("deployd notifications")
            transaction = conn.transaction
        async with transaction() as tx:
            row = await tx.fetch_one(lock, (DELIVERY_LOCK_CLASS, target))
            if row is None or not row["taken"]:
                yield None
                return
            if idle_limit is not None:
                await tx.fetch_one(idle_limit, (str(max(1, round(hold * 1000))),))
            yield Claim(tx, self.store.clock)

    async def oldest(self, target: str, *, limit: int = 50) -> list[Delivery]:
        """The target's queued deliveries, oldest first: they go out in this order."""
        rows = await self.store.backend.fetch_all(
            "SELECT * FROM outbox WHERE target = ? AND state = 'queued' ORDER BY id LIMIT ?",
            (target, limit))
        return [_delivery(row) for row in rows]

    async def queued(self, target: str) -> int:
        row = await self.store.backend.fetch_one(
            "SELECT COUNT(*) AS n FROM outbox WHERE target = ? AND state = 'queued'", (target,))
        return 0 if row is None else int(row["n"])

    async def finish(self, delivery_id: int, state: DeliveryState, *,
                     error: str | None = None) -> None:
        now = self.store.clock()

        await self.store.backend.execute(
            "UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ?, "
            "done_at = ? WHERE id = ?", (state, error, now, delivery_id))

    async def retry_at(self, delivery_id: int, when: float, error: str) -> None:
        await self.store.backend.execute(
            "UPDATE outbox SET attempts = attempts + 1, next_at = ?, last_error = ? "
            "WHERE id = ?", (when, error, delivery_id))

    async def last_about_job(self, target: str, job_id: int) -> float | None:
        """When the target was last given something about a job (for reminders)."""
        return await _last_about_job(self.store.backend, target, job_id)

    async def deliveries(self, target: str) -> list[Delivery]:
        """Every delivery of a target, oldest first (for tests and inspection)."""
        rows = await self.store.backend.fetch_all(
            "SELECT * FROM outbox WHERE target = ? ORDER BY id", (target,))
        return [_delivery(row) for row in rows]


class Claim:
    """The target's deliveries as one claimed attempt reads and writes them."""

    def __init__(self, db: Tx, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock

    async def oldest(self, target: str) -> Delivery | None:
        """The target's oldest queued delivery: the only one that may go now."""
        row = await self._db.fetch_one(
            "SELECT * FROM outbox WHERE target = ? AND state = 'queued' ORDER BY id LIMIT 1",
            (target,))
        return None if row is None else _delivery(row)

    async def finish(self, delivery_id: int, state: DeliveryState, *,
                     error: str | None = None) -> None:
        await self._db.execute(
            "UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ?, "
            "done_at = ? WHERE id = ?", (state, error, self._clock(), delivery_id))

    async def retry_at(self, delivery_id: int, when: float, error: str) -> None:
        await self._db.execute(
            "UPDATE outbox SET attempts = attempts + 1, next_at = ?, last_error = ? "
            "WHERE id = ?", (when, error, delivery_id))

    async def last_finished(self, target: str) -> DeliveryState | None:
        """How the target's latest finished delivery ended (sent or failed), if any did."""
        row = await self._db.fetch_one(
            "SELECT state FROM outbox WHERE target = ? AND state <> 'queued' "
            "ORDER BY done_at DESC, id DESC LIMIT 1", (target,))
        return None if row is None else row["state"]


async def _last_about_job(db: Tx, target: str, job_id: int) -> float | None:
    row = await db.fetch_one(
        "SELECT MAX(created_at) AS last FROM outbox WHERE target = ? AND job_id = ?",
        (target, job_id))
    return None if row is None or row["last"] is None else float(row["last"])


async def _insert(db: Tx, target: str, app: str, kind: str, payload: dict[str, Any],
                  now: float, *, event_id: int | None, job_id: int | None) -> None:
    delivery = uuid.uuid4().hex
    body = {**payload, "id": delivery}
    await db.execute(
        "INSERT INTO outbox (target, delivery, event_id, job_id, app, kind, payload, "
        "created_at, next_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
        (target, delivery, event_id, job_id, app, kind, json.dumps(body, sort_keys=True),
         now, now))


def _payload(event: Event) -> dict[str, Any]:
    """What a target is told of an event; `id` becomes the delivery's own id."""
    return {**event.to_json(), "event": event.id}


def _job_id(event: Event) -> int | None:
    job = event.data.get("job")
    return job if isinstance(job, int) and event.kind.startswith("job.") else None


def _delivery(row: Row) -> Delivery:
    return Delivery(
        id=row["id"], target=row["target"], delivery=row["delivery"], app=row["app"],
        kind=row["kind"], job_id=row["job_id"], payload=json.loads(row["payload"]),
        created_at=row["created_at"], next_at=row["next_at"], attempts=row["attempts"],
        state=row["state"], last_error=row["last_error"],
    )
