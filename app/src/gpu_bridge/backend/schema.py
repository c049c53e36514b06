"""The backend database's schema: the tables as the queries use them, and the migrations to them.

``schema_version`` holds one row, and ``MIGRATIONS`` lists ordered steps that ``Database.migrate``
runs on start; each step is written so that running it again is harmless, and no step drops data.
Add a step to change the schema; never edit a released one.

``change_generation`` (v3) holds one counter per scope (``models``): every backend instance bumps it
in the transaction that records a change to the GPU hosts' models (a ``wait`` pull, a pull seen
finishing, a delete), and reads it before serving its in-process listing memo (listing_memo.py), so
a change made through one instance is seen at once through every other.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

metadata = sa.MetaData()

schema_version = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))

# The latest schema, as the queries below use it. Migrations build it step by step.
model_cache = sa.Table(
    "model_cache", metadata,
    sa.Column("host", sa.String(300), primary_key=True),
    sa.Column("name", sa.String(600), primary_key=True),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
)
host_listing = sa.Table(
    "host_listing", metadata,
    sa.Column("host", sa.String(300), primary_key=True),
    sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model_count", sa.Integer, nullable=False),
)
audit_log = sa.Table(
    "audit_log", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("model", sa.String(600)),
    sa.Column("hosts", sa.JSON, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("detail", sa.JSON),
    sa.Column("request_id", sa.String(128)),  # added in v2
)
pulls = sa.Table(
    "pulls", metadata,  # added in v2
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(600), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("hosts", sa.JSON, nullable=False),
)
change_generation = sa.Table(
    "change_generation", metadata,  # added in v3
    sa.Column("scope", sa.String(32), primary_key=True),
    sa.Column("generation", sa.BigInteger, nullable=False),
)
MODELS_SCOPE = "models"


# --- migrations -----------------------------------------------------------------------------------
def _v1(conn: Connection) -> None:
    """Model cache, per-host listing times, audit log."""
    m = sa.MetaData()
    sa.Table("model_cache", m,
             sa.Column("host", sa.String(300), primary_key=True),
             sa.Column("name", sa.String(600), primary_key=True),
             sa.Column("data", sa.JSON, nullable=False),
             sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False))
    sa.Table("host_listing", m,
             sa.Column("host", sa.String(300), primary_key=True),
             sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
             sa.Column("model_count", sa.Integer, nullable=False))
    sa.Table("audit_log", m,
             sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
             sa.Column("at", sa.DateTime(timezone=True), nullable=False),
             sa.Column("action", sa.String(32), nullable=False),
             sa.Column("model", sa.String(600)),
             sa.Column("hosts", sa.JSON, nullable=False),
             sa.Column("outcome", sa.String(16), nullable=False),
             sa.Column("detail", sa.JSON))
    m.create_all(conn, checkfirst=True)


def _v2(conn: Connection) -> None:
    """Pull records (backend pull id → job per host); request id in the audit log."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("audit_log")}
    if "request_id" not in columns:
        conn.execute(sa.text("ALTER TABLE audit_log ADD COLUMN request_id VARCHAR(128)"))
    m = sa.MetaData()
    sa.Table("pulls", m,
             sa.Column("id", sa.String(64), primary_key=True),
             sa.Column("model", sa.String(600), nullable=False),
             sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
             sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
             sa.Column("state", sa.String(16), nullable=False),
             sa.Column("hosts", sa.JSON, nullable=False))
    m.create_all(conn, checkfirst=True)
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_pulls_created_at ON pulls (created_at)"))
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_audit_log_at ON audit_log (at)"))


def _v3(conn: Connection) -> None:
    """The change generation the listing memos of all backend instances check (starts at 0)."""
    m = sa.MetaData()
    table = sa.Table("change_generation", m,
                     sa.Column("scope", sa.String(32), primary_key=True),
                     sa.Column("generation", sa.BigInteger, nullable=False))
    m.create_all(conn, checkfirst=True)
    if conn.execute(sa.select(table.c.scope).where(table.c.scope == MODELS_SCOPE)).first() is None:
        conn.execute(table.insert().values(scope=MODELS_SCOPE, generation=0))


MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [(1, _v1), (2, _v2), (3, _v3)]
LATEST = MIGRATIONS[-1][0]
