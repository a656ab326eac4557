"""The notifications outbox: what each target is owed, kept in the store until delivered.

Each target has a cursor, the last event it has looked at. `enqueue_events` moves the cursor
and writes the deliveries the target wants in one transaction, so an event stored before a
crash is delivered after it, and none twice. A delivery keeps its id (`X-Deployd-Delivery`) and
its payload through every retry; it ends `sent` or, past the target's patience, `failed`.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from deployd.store import Event, Store, event_from_row

DeliveryState = Literal["queued", "sent", "failed"]
SCAN_BATCH = 500


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
    """The outbox tables, on the store's own file and thread."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def start_cursor(self, target: str) -> None:
        """A new target starts at the newest event: it is owed nothing from before it existed."""
        def insert(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR IGNORE INTO outbox_cursor (target, event_id) "
                       "SELECT ?, COALESCE(MAX(id), 0) FROM events", (target,))
        await self.store._run(self.store._write(insert))

    async def enqueue_events(self, target: str, wants: Callable[[Event], bool]
                             ) -> tuple[int, int]:
        """Queue the events after the target's cursor that it wants: (scanned, queued)."""
        now = self.store.clock()

        def scan(db: sqlite3.Connection) -> tuple[int, int]:
            row = db.execute("SELECT event_id FROM outbox_cursor WHERE target = ?",
                             (target,)).fetchone()
            cursor = int(row[0]) if row else 0
            rows = db.execute("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?",
                              (cursor, SCAN_BATCH)).fetchall()
            queued = 0
            for event in map(event_from_row, rows):
                if wants(event):
                    _insert(db, target, event.app, event.kind, _payload(event), now,
                            event_id=event.id, job_id=_job_id(event))
                    queued += 1
            if rows:
                db.execute("INSERT INTO outbox_cursor (target, event_id) VALUES (?, ?) "
                           "ON CONFLICT(target) DO UPDATE SET event_id = excluded.event_id",
                           (target, int(rows[-1]["id"])))
            return len(rows), queued

        return await self.store._run(self.store._write(scan))

    async def enqueue(self, target: str, app: str, kind: str, payload: dict[str, Any], *,
                      job_id: int | None = None) -> None:
        """Queue one message that is not a stored event (a reminder)."""
        now = self.store.clock()

        def insert(db: sqlite3.Connection) -> None:
            _insert(db, target, app, kind, payload, now, event_id=None, job_id=job_id)

        await self.store._run(self.store._write(insert))

    async def oldest(self, target: str, *, limit: int = 50) -> list[Delivery]:
        """The target's queued deliveries, oldest first: they go out in this order."""
        rows = await self.store._run(lambda: self.store._conn().execute(
            "SELECT * FROM outbox WHERE target = ? AND state = 'queued' ORDER BY id LIMIT ?",
            (target, limit)).fetchall())
        return [_delivery(row) for row in rows]

    async def queued(self, target: str) -> int:
        row = await self.store._run(lambda: self.store._conn().execute(
            "SELECT COUNT(*) FROM outbox WHERE target = ? AND state = 'queued'",
            (target,)).fetchone())
        return int(row[0])

    async def finish(self, delivery_id: int, state: DeliveryState, *,
                     error: str | None = None) -> None:
        now = self.store.clock()

        def update(db: sqlite3.Connection) -> None:
            db.execute("UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ?, "
                       "done_at = ? WHERE id = ?", (state, error, now, delivery_id))

        await self.store._run(self.store._write(update))

    async def retry_at(self, delivery_id: int, when: float, error: str) -> None:
        def update(db: sqlite3.Connection) -> None:
            db.execute("UPDATE outbox SET attempts = attempts + 1, next_at = ?, last_error = ? "
                       "WHERE id = ?", (when, error, delivery_id))

        await self.store._run(self.store._write(update))

    async def last_about_job(self, target: str, job_id: int) -> float | None:
        """When the target was last given something about a job (for reminders)."""
        row = await self.store._run(lambda: self.store._conn().execute(
            "SELECT MAX(created_at) FROM outbox WHERE target = ? AND job_id = ?",
            (target, job_id)).fetchone())
        return None if row is None or row[0] is None else float(row[0])

    async def deliveries(self, target: str) -> list[Delivery]:
        """Every delivery of a target, oldest first (for tests and inspection)."""
        rows = await self.store._run(lambda: self.store._conn().execute(
            "SELECT * FROM outbox WHERE target = ? ORDER BY id", (target,)).fetchall())
        return [_delivery(row) for row in rows]


def _insert(db: sqlite3.Connection, target: str, app: str, kind: str, payload: dict[str, Any],
            now: float, *, event_id: int | None, job_id: int | None) -> None:
    delivery = uuid.uuid4().hex
    body = {**payload, "id": delivery}
    db.execute(
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


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(
        id=row["id"], target=row["target"], delivery=row["delivery"], app=row["app"],
        kind=row["kind"], job_id=row["job_id"], payload=json.loads(row["payload"]),
        created_at=row["created_at"], next_at=row["next_at"], attempts=row["attempts"],
        state=row["state"], last_error=row["last_error"],
    )
