"""The backend's short-lived memo of its last complete ``/config/models`` answer, correct across instances.

A listing asks every GPU host; within ``GPU_BRIDGE_CACHE_MAX_AGE`` seconds the same answer is served
again from memory. The memo lives in each process, so on its own it would hide a change made through
another instance (another gunicorn worker on SQLite, another host on PostgreSQL): a ``wait`` pull
answered 200 through one, and the next listing, served by the other, lacked the model without
``stale: true``.

So each memo carries the database's ``models`` change generation (schema.py), read before the hosts
were asked, and is served only while the generation is still the same. Every instance bumps the
generation in the transaction that records a change to the models (db.py: ``create_pull`` with
``models_changed``, ``merge_pull``, ``forget_model``), and that transaction commits before the change
is answered, so the next listing through any instance asks the hosts again. Reading the generation
first means a change that lands while the hosts are being asked leaves a memo that is already out
of date, never one that looks current. The cost is one indexed single-row read per listing.

Why not keep the memo itself in the database: the model cache there already holds each host's last
list (for stale answers); the memo only saves the fan-out, and the generation is all it needs to
know that it may. When the generation cannot be read (database down), nothing is served from the
memo: the hosts are asked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .db import Database


@dataclass(frozen=True)
class _Entry:
    stored: float  # time.monotonic() when stored
    generation: int
    payload: dict[str, Any]


class ListingMemo:
    """One process's memo; ``max_age`` <= 0 turns it off (nothing stored, the generation never read)."""

    def __init__(self, db: Database, max_age: float):
        self.db = db
        self.max_age = max_age
        self._entry: _Entry | None = None  # replaced whole: threads read it without a lock

    @property
    def enabled(self) -> bool:
        return self.max_age > 0

    def generation(self) -> int | None:
        """The change generation to check the memo against and to store with the next answer; None when
        the memo is off. Raises SQLAlchemyError when the database cannot be read."""
        return self.db.models_generation() if self.enabled else None

    def lookup(self, generation: int | None) -> dict[str, Any] | None:
        """The memoised answer, if it is younger than ``max_age`` and no change was recorded since."""
        entry = self._entry
        if entry is None or generation is None or entry.generation != generation:
            return None
        if time.monotonic() - entry.stored >= self.max_age:
            return None
        return entry.payload

    def store(self, generation: int | None, payload: dict[str, Any]) -> None:
        """Keep ``payload``, fetched after ``generation`` was read (None: not kept)."""
        if generation is not None and self.enabled:
            self._entry = _Entry(time.monotonic(), generation, payload)

    def clear(self) -> None:
        self._entry = None


__all__ = ["ListingMemo"]
