"""Retention of the backend's audit log and finished pulls: bounded deletes of rows past their age.

``prune`` deletes audit entries older than ``RetentionSettings.audit_days`` and finished pulls last
updated more than ``pull_days`` ago (0 days keeps a table whole). ``Database`` calls it when the
schema is migrated (every process start) and at most once every ``PRUNE_INTERVAL`` on the next
audit or pull write.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..config import RetentionSettings
from .schema import audit_log, pulls

_PG_PRUNE_LOCK_ID = 727_301_002  # advisory lock: one backend prunes at a time; the others skip the round

# Each run deletes at most PRUNE_BATCH rows per transaction (short locks, a small WAL) and at most
# PRUNE_MAX_BATCHES batches per table, so the write that triggers a run waits a bounded time. A run
# that stops at that bound leaves the rest to a run PRUNE_BACKLOG_INTERVAL later, not an hour later.
PRUNE_INTERVAL = 3600.0
PRUNE_BACKLOG_INTERVAL = 60.0
PRUNE_BATCH = 500
PRUNE_MAX_BATCHES = 20
# Only pulls in one of these states are deleted: a running one (or one in a state added later) is kept.
FINISHED_PULL_STATES = ("succeeded", "partial", "failed", "cancelled")


def prune(engine: Engine, retention: RetentionSettings, now: datetime) -> dict[str, int]:
    """Delete what ``retention`` no longer keeps at ``now``; returns the rows deleted per table.

    The oldest rows go first, so a run stopped at its bound has still removed the oldest ones."""
    deleted = {"audit": 0, "pulls": 0}
    if retention.audit_days:
        cutoff = now - timedelta(days=retention.audit_days)
        deleted["audit"] = _delete_in_batches(engine, audit_log, audit_log.c.at < cutoff, audit_log.c.at)
    if retention.pull_days:
        cutoff = now - timedelta(days=retention.pull_days)
        # created_at (indexed) narrows the scan: a pull last updated before the cutoff began before it.
        finished_before = sa.and_(pulls.c.created_at < cutoff, pulls.c.updated_at < cutoff,
                                  pulls.c.state.in_(FINISHED_PULL_STATES))
        deleted["pulls"] = _delete_in_batches(engine, pulls, finished_before, pulls.c.updated_at)
    return deleted


def is_backlog(deleted: dict[str, int]) -> bool:
    """Whether a run stopped at its bound on some table (rows may remain)."""
    return any(n >= PRUNE_BATCH * PRUNE_MAX_BATCHES for n in deleted.values())


def _delete_in_batches(engine: Engine, table: sa.Table, condition: sa.ColumnElement[bool],
                       oldest_first: sa.Column[Any]) -> int:
    key = table.c.id
    batch = sa.select(key).where(condition).order_by(oldest_first).limit(PRUNE_BATCH)
    total = 0
    for _ in range(PRUNE_MAX_BATCHES):
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql" and not conn.execute(
                    sa.text("SELECT pg_try_advisory_xact_lock(:id)"), {"id": _PG_PRUNE_LOCK_ID}).scalar():
                break  # another backend on this database is pruning now
            # A subquery with LIMIT: SQLite and PostgreSQL both take it (DELETE ... LIMIT they do not).
            count = conn.execute(table.delete().where(key.in_(batch))).rowcount
        total += count
        if count < PRUNE_BATCH:
            break
    return total
