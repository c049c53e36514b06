"""The backend database on SQLite and on a real PostgreSQL server: migrations keep data, cache, audit,
pull records, retention, SQLite settings."""

from __future__ import annotations

import logging
import types
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from prod_helpers import FakeFactory

from gpu_bridge.backend import create_app, retention
from gpu_bridge.backend import db as db_module
from gpu_bridge.backend.db import LATEST, Database, normalize_url, redact
from gpu_bridge.backend.schema import audit_log, pulls
from gpu_bridge.config import BackendSettings, RetentionSettings
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
    # Yesterday: within the retention, which the start applies too.
    at = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0)
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
                               "details": None, "hosts": ["10.0.0.1:8001"], "digests": {"10.0.0.1:8001": None},
                               "diverged": False, "snapshot": False}]
    assert body["fetched_at"] == at.isoformat().replace("+00:00", "Z")
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


# --- retention -------------------------------------------------------------------------------------
NOW = datetime.now(UTC).replace(microsecond=0)


def _days_ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def _old_audit(db: Database, *ages: float) -> None:
    with db.engine.begin() as conn:
        conn.execute(audit_log.insert(), [{"at": _days_ago(a), "action": "pull", "model": f"m{a}", "hosts": [],
                                           "outcome": "ok"} for a in ages])


def _old_pull(db: Database, pull_id: str, state: str, age: float) -> None:
    with db.engine.begin() as conn:
        conn.execute(pulls.insert().values(id=pull_id, model="m:latest", created_at=_days_ago(age + 1),
                                           updated_at=_days_ago(age), state=state, hosts={}))


def _audit_models(db: Database) -> list[str]:
    return sorted(e["model"] for e in db.audit_entries(limit=1000))


def test_retention_removes_old_rows_keeps_newer_ones_and_active_pulls(db_url):
    db = Database(db_url, RetentionSettings(audit_days=90, pull_days=30))
    db.migrate()
    _old_audit(db, 120, 91, 89, 1)
    for state in retention.FINISHED_PULL_STATES:
        _old_pull(db, f"old-{state}", state, 31)
        _old_pull(db, f"new-{state}", state, 29)
    _old_pull(db, "old-running", "running", 400)  # a pull still running is never removed, however old

    assert db.prune() == {"audit": 2, "pulls": 4}
    assert _audit_models(db) == ["m1", "m89"]
    assert sorted(p["id"] for p in db.list_pulls(limit=100)) == sorted(
        ["old-running"] + [f"new-{s}" for s in retention.FINISHED_PULL_STATES])
    assert db.prune() == {"audit": 0, "pulls": 0}, "a second run finds nothing"


def test_zero_days_keeps_everything(db_url):
    db = Database(db_url, RetentionSettings(audit_days=0, pull_days=0))
    db.migrate()
    _old_audit(db, 5000)
    _old_pull(db, "ancient", "succeeded", 5000)
    assert db.prune() == {"audit": 0, "pulls": 0}
    assert _audit_models(db) == ["m5000"] and [p["id"] for p in db.list_pulls()] == ["ancient"]


def test_a_run_is_bounded_and_deletes_the_oldest_first(db_url, monkeypatch):
    monkeypatch.setattr(retention, "PRUNE_BATCH", 3)
    monkeypatch.setattr(retention, "PRUNE_MAX_BATCHES", 2)
    db = Database(db_url, RetentionSettings(audit_days=10, pull_days=10))
    db.migrate()
    _old_audit(db, *range(11, 21))  # ten expired entries, m11 (newest) .. m20 (oldest)
    first = db.prune()
    assert first["audit"] == 6 and retention.is_backlog(first)
    assert _audit_models(db) == ["m11", "m12", "m13", "m14"]
    second = db.prune()
    assert second["audit"] == 4 and not retention.is_backlog(second)
    assert _audit_models(db) == []


def test_retention_runs_at_start_then_at_most_hourly_on_writes(db_url, monkeypatch):
    clock = types.SimpleNamespace(monotonic=lambda: 1000.0)
    monkeypatch.setattr(db_module, "time", clock)
    db = Database(db_url, RetentionSettings(audit_days=90, pull_days=30))
    db.migrate(target=1)  # an older schema is no start: nothing pruned yet
    db.migrate()
    _old_audit(db, 100)
    db.dispose()

    db = Database(db_url, RetentionSettings(audit_days=90, pull_days=30))
    db.migrate()  # a start: the expired entry goes
    assert _audit_models(db) == []

    _old_audit(db, 100)
    db.audit("pull", "fresh", [], "ok")  # 0 s after the start's run: not due
    db.create_pull("p", "m:latest", "running", {})
    assert _audit_models(db) == ["fresh", "m100"]

    clock.monotonic = lambda: 1000.0 + retention.PRUNE_INTERVAL
    _old_pull(db, "done", "failed", 40)
    db.audit("pull", "later", [], "ok")  # an hour on: this write runs the retention
    assert _audit_models(db) == ["fresh", "later"]
    assert [p["id"] for p in db.list_pulls()] == ["p"]


def test_a_failed_retention_run_only_logs(db_url, monkeypatch, caplog):
    db = Database(db_url)
    db.migrate()

    def broken(*_args):
        raise sa.exc.OperationalError("DELETE", {}, Exception("database is locked"))

    monkeypatch.setattr(db_module, "prune", broken)
    monkeypatch.setattr(db_module, "time", types.SimpleNamespace(monotonic=lambda: float("inf")))
    with caplog.at_level(logging.WARNING, logger="gpu_bridge.backend"):
        db.audit("pull", "m", [], "ok")  # the write succeeds although the run after it failed
    assert _audit_models(db) == ["m"]
    assert "retention run failed" in caplog.text and "database is locked" in caplog.text


def test_backend_settings_carry_the_retention():
    assert BackendSettings.from_env({}).retention == RetentionSettings(audit_days=90, pull_days=30)
    settings = BackendSettings.from_env({"GPU_BRIDGE_AUDIT_RETENTION_DAYS": "0",
                                         "GPU_BRIDGE_PULL_RETENTION_DAYS": "7"})
    assert settings.retention == RetentionSettings(audit_days=0, pull_days=7)
