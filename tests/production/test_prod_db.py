"""The backend database on SQLite and on a real PostgreSQL server: migrations keep data, cache, audit,
pull records, SQLite settings."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from prod_helpers import FakeFactory

from gpu_bridge.backend import create_app
from gpu_bridge.backend.db import LATEST, Database, normalize_url, redact
from gpu_bridge.errors import ConfigError


def test_fresh_database_gets_the_latest_schema(db_url):
    db = Database(db_url)
    assert db.version() == 0
    assert db.migrate() == LATEST
    assert db.migrate() == LATEST, "migrating twice is harmless"
    tables = set(sa.inspect(db.engine).get_table_names())
    assert {"schema_version", "model_cache", "host_listing", "audit_log", "pulls"} <= tables


def test_v1_database_with_data_is_upgraded_without_loss(db_url):
    old = Database(db_url)
    assert old.migrate(target=1) == 1
    assert "pulls" not in sa.inspect(old.engine).get_table_names()
    at = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    with old.engine.begin() as conn:  # rows as a v1 backend wrote them (no request_id column yet)
        conn.execute(sa.text("INSERT INTO audit_log (at, action, model, hosts, outcome, detail) "
                             "VALUES (:at, 'pull', 'llama3.2:latest', :hosts, 'ok', :detail)"),
                     {"at": at, "hosts": '["gpu-01:8001"]', "detail": '{"id": "old"}'})
        conn.execute(sa.text("INSERT INTO model_cache (host, name, data, fetched_at) VALUES "
                             "('10.0.0.1:8001', 'llama3.2:latest', :data, :at)"),
                     {"data": '{"name": "llama3.2:latest", "size": 42}', "at": at})
        conn.execute(sa.text("INSERT INTO host_listing (host, fetched_at, model_count) VALUES "
                             "('10.0.0.1:8001', :at, 1)"), {"at": at})
    old.dispose()

    # Start the app on it: the schema is upgraded on start, and the data is still there.
    fakes = FakeFactory()
    app = create_app({"GPU_INSTANCE_HOSTS": "10.0.0.1", "GPU_BRIDGE_DATABASE_URL": db_url,
                      "GPU_BRIDGE_CACHE_MAX_AGE": "0"}, transport_factory=fakes)
    client = app.test_client()
    fakes.made["10.0.0.1"].down = True
    body = client.get("/config/models").get_json()
    assert body["stale"] is True and body["source"] == "cache"
    assert body["models"] == [{"name": "llama3.2:latest", "size": 42, "digest": None, "modified_at": None,
                               "details": None, "hosts": ["10.0.0.1:8001"]}]
    assert body["fetched_at"] == "2025-01-02T03:04:05Z"
    entries = client.get("/config/audit").get_json()["entries"]
    assert entries[-1]["model"] == "llama3.2:latest" and entries[-1]["detail"] == {"id": "old"}
    assert entries[-1]["request_id"] is None
    assert Database(db_url).version() == LATEST


def test_newer_schema_than_the_code_is_refused(db_url):
    db = Database(db_url)
    db.migrate()
    with db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE schema_version SET version = 99"))
    with pytest.raises(ConfigError, match="schema version 99, newer than this gpu-bridge"):
        db.migrate()


def test_cache_audit_and_pulls_round_trip(db_url):
    db = Database(db_url)
    db.migrate()
    db.store_host_models("a:1", [{"name": "m1:latest", "size": 1}, {"name": "m2:latest", "details": {"x": None}}])
    db.store_host_models("a:1", [{"name": "m2:latest", "size": 2}])  # replaces the host's list
    db.store_host_models("b:1", [])
    per_host, fetched = db.cached_models(["a:1", "b:1", "c:1"])
    assert per_host == {"a:1": [{"name": "m2:latest", "size": 2}], "b:1": []}
    assert set(fetched) == {"a:1", "b:1"} and all(v.tzinfo for v in fetched.values())
    db.forget_model("a:1", "m2:latest")
    assert db.cached_models(["a:1"])[0] == {"a:1": []}

    db.audit("pull", "m:latest", ["a:1"], "ok", {"k": [1, 2]}, "rid")
    db.audit("delete", "m:latest", ["a:1", "b:1"], "partial", None)
    entries = db.audit_entries()
    assert [e["action"] for e in entries] == ["delete", "pull"]
    assert entries[1]["detail"] == {"k": [1, 2]} and entries[1]["request_id"] == "rid"

    db.create_pull("p1", "m:latest", "running", {"a:1": {"job_id": "j1", "job": {"state": "queued"}}})
    db.update_pull("p1", "succeeded", {"a:1": {"job_id": "j1", "job": {"state": "succeeded"}}})
    rec = db.get_pull("p1")
    assert rec["state"] == "succeeded" and rec["hosts"]["a:1"]["job"]["state"] == "succeeded"
    assert db.get_pull("nope") is None
    assert [p["id"] for p in db.list_pulls()] == ["p1"]


def test_sqlite_uses_wal_and_a_busy_timeout_and_creates_its_directory(tmp_path):
    url = f"sqlite:///{tmp_path}/deep/er/backend.db"
    db = Database(url)
    db.migrate()
    assert (tmp_path / "deep" / "er" / "backend.db").exists()
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(sa.text("PRAGMA busy_timeout")).scalar() == 10000


def test_unusable_urls_are_config_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot create directory"):
        Database(f"sqlite:///{blocker}/sub/backend.db")
    with pytest.raises(ConfigError, match="not a database URL"):
        Database("not a url")
    with pytest.raises(ConfigError, match="unsupported database"):
        Database("mysql://u@h/db")


def test_unreachable_postgres_fails_start_with_a_clear_line():
    from support.procs import free_port

    db = Database(f"postgresql://gb:secret@127.0.0.1:{free_port()}/x")
    with pytest.raises(ConfigError) as info:
        db.migrate()
    assert "cannot open the database postgresql+psycopg://gb:***@127.0.0.1" in info.value.message
    assert "secret" not in info.value.message


def test_url_helpers():
    assert normalize_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("sqlite:////x.db") == "sqlite:////x.db"
    assert redact("postgresql+psycopg://u:pw@h/d") == "postgresql+psycopg://u:***@h/d"
