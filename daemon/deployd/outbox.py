"""The notifications outbox: what each target is owed, kept in the store until delivered.

Each target has a cursor, the last event it has looked at. `enqueue_events` moves the cursor
and writes the deliveries the target wants in one transaction, so an event stored before a
crash is delivered after it, and none twice. A delivery keeps its id (`X-Deployd-Delivery`) and
its payload through every retry; it ends `sent` or, past the target's patience, `failed`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from deployd.storage import Row, Tx
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
    """The outbox tables, in the store's database."""

    def __init__(self, store: Store) -> None:
        self.store = store

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
        row = await self.store.backend.fetch_one(
            "SELECT MAX(created_at) AS last FROM outbox WHERE target = ? AND job_id = ?",
            (target, job_id))
        return None if row is None or row["last"] is None else float(row["last"])

    async def deliveries(self, target: str) -> list[Delivery]:
        """Every delivery of a target, oldest first (for tests and inspection)."""
        rows = await self.store.backend.fetch_all(
            "SELECT * FROM outbox WHERE target = ? ORDER BY id", (target,))
        return [_delivery(row) for row in rows]


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
