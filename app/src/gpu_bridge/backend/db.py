"""The backend's database: the model-list cache, pull records and an audit log (SQLAlchemy Core).

SQLite by default (a file, WAL mode, busy timeout), PostgreSQL with ``postgresql+psycopg://``.
The schema and its migrations are in schema.py; ``migrate`` runs them on start.

Retention (retention.py): audit entries and finished pulls older than ``RetentionSettings`` allows
are deleted when the schema is migrated (every process start) and again at most once an hour, on
the next audit or pull write; the tables only grow by those writes, so no timer thread is needed.

Several backend instances (gunicorn workers on one host with SQLite, or hosts sharing PostgreSQL)
use one database. Every write runs in ``_writing``: one writer at a time, on both dialects (SQLite
takes its write lock at BEGIN IMMEDIATE; PostgreSQL takes one advisory lock per transaction). Writes
are few and short (a listing, a pull record, an audit entry), and serializing them keeps the
read-then-write steps (the migration's version check, merging a pull record, replacing a host's
cache) correct without reasoning about each statement's isolation. A change to the models bumps the
``models`` change generation in the same transaction (listing_memo.py reads it).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, overload

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from ..config import RetentionSettings
from ..errors import ConfigError, GpuBridgeError
from .retention import PRUNE_BACKLOG_INTERVAL, PRUNE_INTERVAL, is_backlog, prune
from .schema import (
    LATEST,
    MIGRATIONS,
    MODELS_SCOPE,
    audit_log,
    change_generation,
    host_listing,
    model_cache,
    pulls,
    schema_version,
)

log = logging.getLogger("gpu_bridge.backend")

_PG_LOCK_ID = 727_301_001  # advisory lock: one migrator at a time on PostgreSQL
_PG_WRITE_LOCK_ID = 727_301_003  # advisory lock: one writing transaction at a time on PostgreSQL

# A pull record's per-host entries, merged with the stored ones: (stored hosts) -> (state, hosts).
PullMerge = Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]


# --- helpers ------------------------------------------------------------------------------------
def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def as_utc(value: datetime) -> datetime: ...
@overload
def as_utc(value: None) -> None: ...
@overload
def as_utc(value: datetime | None) -> datetime | None: ...
def as_utc(value: datetime | None) -> datetime | None:
    """SQLite gives naive datetimes back: they were stored as UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def iso(value: datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat(timespec="seconds").replace("+00:00", "Z") if value else None


def redact(url: str) -> str:
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable GPU_BRIDGE_DATABASE_URL>"


def normalize_url(url: str) -> str:
    """``postgresql://`` / ``postgres://`` → the psycopg 3 driver we ship."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


class DatabaseUnavailable(GpuBridgeError):
    status = 503
    code = "database_unavailable"


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    try:
        parsed = sa.make_url(url)
    except ArgumentError:
        raise ConfigError(f"GPU_BRIDGE_DATABASE_URL={url!r} is not a database URL "
                          "(use sqlite:////path/backend.db or postgresql+psycopg://user@host/db)") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        path = parsed.database
        if path and path != ":memory:" and not path.startswith("file:"):
            parent = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"GPU_BRIDGE_DATABASE_URL: cannot create directory {parent}: {exc.strerror}") \
                    from None
        engine = sa.create_engine(parsed, connect_args={"timeout": 10})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:  # pragma: no cover - exercised by every SQLite test
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=10000")
            # Switching a new file to WAL needs it alone, and SQLite answers "database is locked" at
            # once rather than through the busy timeout while another process holds it (several
            # backends starting on one fresh file): retry for up to the same 10 s.
            deadline = time.monotonic() + 10.0
            while True:
                try:
                    cur.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    if backend == "postgresql":
        try:
            return sa.create_engine(parsed, pool_pre_ping=True, pool_size=5, max_overflow=5,
                                    connect_args={"connect_timeout": 5})
        except (ImportError, SQLAlchemyError) as exc:
            raise ConfigError(f"GPU_BRIDGE_DATABASE_URL: {exc}") from None
    raise ConfigError(f"GPU_BRIDGE_DATABASE_URL: unsupported database {backend!r} (use sqlite or postgresql+psycopg)")


class Database:
    def __init__(self, url: str, retention: RetentionSettings | None = None):
        self.url = normalize_url(url)
        self.engine = make_engine(self.url)
        self.dialect = self.engine.dialect.name
        self.retention = retention or RetentionSettings()
        self._prune_lock = threading.Lock()
        self._next_prune = 0.0  # time.monotonic() of the next retention run; 0: the first write runs one

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A transaction that is the only writer of the database until it ends (see the module doc).

        SQLite: BEGIN IMMEDIATE takes the write lock at once, waiting up to the busy timeout. (A
        default, deferred transaction that reads and then writes fails at once with "database is
        locked" when another process wrote in between, and Python's sqlite3 runs DDL outside any
        transaction: two processes migrating at once both created a table, one failed.)
        PostgreSQL: a transaction-level advisory lock, released at commit or rollback."""
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            elif self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_WRITE_LOCK_ID})
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    # --- schema --------------------------------------------------------------------------------
    def version(self) -> int:
        with self.engine.connect() as conn:
            return self._version(conn)

    @staticmethod
    def _version(conn: Connection) -> int:
        if not sa.inspect(conn).has_table("schema_version"):
            return 0
        return conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0

    def migrate(self, target: int | None = None) -> int:
        """Bring the schema to ``target`` (default: latest); return the version reached. Reaching the
        latest schema also applies the retention once: this is what every process start runs.

        Safe when several instances start at once: each migrates under the write lock (``_writing``;
        on PostgreSQL also the migration's own advisory lock), reads the version there, and the later
        ones find the work done."""
        try:
            with self._writing() as conn:
                if self.dialect == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
                schema_version.create(conn, checkfirst=True)
                current = self._version(conn)
                if current > LATEST:
                    raise ConfigError(f"the database {redact(self.url)} has schema version {current}, newer than "
                                      f"this gpu-bridge knows ({LATEST}): upgrade gpu-bridge")
                for number, step in MIGRATIONS:
                    if number <= current or (target is not None and number > target):
                        continue
                    log.info("database: migrating schema to version %d", number)
                    step(conn)
                    conn.execute(schema_version.delete())
                    conn.execute(schema_version.insert().values(version=number))
                    current = number
        except SQLAlchemyError as exc:
            raise ConfigError(f"cannot open the database {redact(self.url)}: {_short(exc)}") from None
        if current == LATEST:
            with self._prune_lock:
                self._scheduled_prune()
        return current

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()

    # --- model cache ---------------------------------------------------------------------------
    def store_host_models(self, host: str, models: list[dict[str, Any]], fetched_at: datetime | None = None) -> None:
        """Replace one host's cached list."""
        fetched_at = fetched_at or utcnow()
        rows, seen = [], set()
        for m in models:
            name = m.get("name") if isinstance(m, dict) else None
            if isinstance(name, str) and name not in seen:
                seen.add(name)
                rows.append({"host": host, "name": name, "data": m, "fetched_at": fetched_at})
        with self._writing() as conn:
            conn.execute(model_cache.delete().where(model_cache.c.host == host))
            if rows:
                conn.execute(model_cache.insert(), rows)
            conn.execute(host_listing.delete().where(host_listing.c.host == host))
            conn.execute(host_listing.insert().values(host=host, fetched_at=fetched_at, model_count=len(rows)))

    def forget_model(self, host: str, name: str) -> None:
        """A model deleted from a host: out of its cache, and every instance's listing memo is out of date."""
        with self._writing() as conn:
            conn.execute(model_cache.delete().where(model_cache.c.host == host, model_cache.c.name == name))
            _bump_models(conn)

    def cached_models(self, hosts: list[str]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, datetime]]:
        """({host: [model, ...]}, {host: fetched_at}) for the hosts that have a cached listing."""
        with self.engine.connect() as conn:
            listings = conn.execute(sa.select(host_listing).where(host_listing.c.host.in_(hosts))).all()
            fetched = {row.host: as_utc(row.fetched_at) for row in listings}
            per_host: dict[str, list[dict[str, Any]]] = {h: [] for h in hosts if h in fetched}
            rows = conn.execute(sa.select(model_cache.c.host, model_cache.c.data)
                                .where(model_cache.c.host.in_(list(fetched)))
                                .order_by(model_cache.c.host, model_cache.c.name)).all()
            for row in rows:
                per_host[row.host].append(row.data)
        return per_host, fetched

    # --- change generation ---------------------------------------------------------------------
    def models_generation(self) -> int:
        """How many changes to the models were recorded through any instance (one indexed read)."""
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(change_generation.c.generation)
                                 .where(change_generation.c.scope == MODELS_SCOPE)).scalar()
        return int(value or 0)

    def models_changed(self) -> None:
        """Record a change to the models on its own, when the write that should have carried it failed."""
        with self._writing() as conn:
            _bump_models(conn)

    # --- audit log -----------------------------------------------------------------------------
    def audit(self, action: str, model: str | None, hosts: list[str], outcome: str,
              detail: dict[str, Any] | None = None, request_id: str | None = None) -> None:
        with self._writing() as conn:
            conn.execute(audit_log.insert().values(at=utcnow(), action=action, model=model, hosts=hosts,
                                                   outcome=outcome, detail=detail, request_id=request_id))
        self._maybe_prune()

    def audit_entries(self, limit: int = 50) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)).all()
        return [{"id": r.id, "at": iso(r.at), "action": r.action, "model": r.model, "hosts": r.hosts,
                 "outcome": r.outcome, "detail": r.detail, "request_id": r.request_id} for r in rows]

    # --- pulls ---------------------------------------------------------------------------------
    def create_pull(self, pull_id: str, model: str, state: str, hosts: dict[str, Any], *,
                    models_changed: bool = False) -> None:
        """Record a pull; ``models_changed``: it already installed the model (a ``wait`` pull)."""
        now = utcnow()
        with self._writing() as conn:
            conn.execute(pulls.insert().values(id=pull_id, model=model, created_at=now, updated_at=now,
                                               state=state, hosts=hosts))
            if models_changed:
                _bump_models(conn)
        self._maybe_prune()

    def update_pull(self, pull_id: str, state: str, hosts: dict[str, Any]) -> None:
        """Replace a pull's state and per-host record."""
        self.merge_pull(pull_id, lambda _stored: (state, hosts))

    def merge_pull(self, pull_id: str, merge: PullMerge, *, models_changed: bool = False) -> dict[str, Any] | None:
        """Write a pull's record as ``merge(stored hosts)`` makes it, the stored record read under the write
        lock: another instance following or cancelling the same pull may have written since this one read
        it. Returns the record written, None when there is no such pull."""
        with self._writing() as conn:
            row = conn.execute(sa.select(pulls.c.hosts).where(pulls.c.id == pull_id)).first()
            if row is None:
                return None
            state, hosts = merge(dict(row.hosts or {}))
            conn.execute(pulls.update().where(pulls.c.id == pull_id)
                         .values(state=state, hosts=hosts, updated_at=utcnow()))
            if models_changed:
                _bump_models(conn)
        return hosts

    def get_pull(self, pull_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(pulls).where(pulls.c.id == pull_id)).first()
        return _pull_dict(row) if row else None

    def list_pulls(self, limit: int = 50) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(pulls).order_by(pulls.c.created_at.desc()).limit(limit)).all()
        return [_pull_dict(r) for r in rows]

    # --- retention -----------------------------------------------------------------------------
    def prune(self, now: datetime | None = None) -> dict[str, int]:
        """Delete what the retention no longer keeps now; the rows deleted per table (retention.py)."""
        return prune(self.engine, self.retention, now or utcnow())

    def _maybe_prune(self) -> None:
        """Run the retention if it is due; called after each audit or pull write. A writer never waits
        for another thread's run: it finds the lock taken and goes on."""
        if time.monotonic() < self._next_prune or not self._prune_lock.acquire(blocking=False):
            return
        try:
            if time.monotonic() >= self._next_prune:  # not just done by the thread that held the lock
                self._scheduled_prune()
        finally:
            self._prune_lock.release()

    def _scheduled_prune(self) -> None:
        """One retention run; its failure is logged, never raised (the write that triggered it is done)."""
        backlog = False
        try:
            deleted = self.prune()
        except SQLAlchemyError as exc:
            log.warning("database: retention run failed, next try in %.0f s: %s", PRUNE_INTERVAL, _short(exc))
        else:
            backlog = is_backlog(deleted)
            if any(deleted.values()):
                log.info("database: retention deleted %d audit entries and %d finished pulls%s", deleted["audit"],
                         deleted["pulls"], " (more remain)" if backlog else "")
        self._next_prune = time.monotonic() + (PRUNE_BACKLOG_INTERVAL if backlog else PRUNE_INTERVAL)


def _bump_models(conn: Connection) -> None:
    conn.execute(change_generation.update().where(change_generation.c.scope == MODELS_SCOPE)
                 .values(generation=change_generation.c.generation + 1))


def _pull_dict(row: Row[Any]) -> dict[str, Any]:
    return {"id": row.id, "model": row.model, "created_at": iso(row.created_at), "updated_at": iso(row.updated_at),
            "state": row.state, "hosts": dict(row.hosts or {})}


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


__all__ = ["LATEST", "MIGRATIONS", "Database", "DatabaseUnavailable", "redact"]
