"""The backend's Flask app with fake GPU transports (test_client): routes, shapes, input errors,
auth, cache fallback, pull tracking. Real processes: test_prod_integration.py."""

from __future__ import annotations

import json
import logging
import time

import pytest
from prod_helpers import FakeFactory

from gpu_bridge.backend import create_app
from gpu_bridge.backend.state import is_loopback_bind
from gpu_bridge.errors import ConfigError
from gpu_bridge.logs import JsonFormatter

A, B = "10.0.0.1:8001", "10.0.0.2:8001"


@pytest.fixture
def env(tmp_path):
    return {"GPU_INSTANCE_HOSTS": "10.0.0.1,10.0.0.2", "GPU_BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/b.db",
            "GPU_BRIDGE_BREAKER_THRESHOLD": "2", "GPU_BRIDGE_CACHE_MAX_AGE": "0"}


@pytest.fixture
def made(env):
    fakes = FakeFactory()
    app = create_app(env, transport_factory=fakes)
    return app.test_client(), fakes, app


def test_models_shape(made):
    client, _, _ = made
    r = client.get("/config/models")
    assert r.status_code == 200
    body = r.get_json()
    assert set(body) == {"models", "hosts", "source", "stale", "fetched_at"}
    assert body["source"] == "gpu" and body["stale"] is False
    assert body["models"][0]["hosts"] == [A, B]
    assert set(body["models"][0]) >= {"name", "size", "digest", "modified_at", "details", "hosts"}
    assert body["hosts"][A]["ok"] is True


def test_one_host_down_still_answers_and_names_it(made):
    client, fakes, _ = made
    fakes.made["10.0.0.2"].down = True
    body = client.get("/config/models").get_json()
    assert body["source"] == "gpu"
    assert body["hosts"][B]["ok"] is False and B in body["hosts"][B]["error"]
    assert body["models"][0]["hosts"] == [A]


def test_all_down_serves_the_cache_marked_stale(made):
    client, fakes, _ = made
    fresh = client.get("/config/models").get_json()
    for t in fakes.made.values():
        t.down = True
    started = time.monotonic()
    r = client.get("/config/models")
    assert time.monotonic() - started < 1
    body = r.get_json()
    assert r.status_code == 200
    assert body["source"] == "cache" and body["stale"] is True
    assert [m["name"] for m in body["models"]] == [m["name"] for m in fresh["models"]]
    assert body["models"][0]["hosts"] == [A, B]
    assert body["hosts"][A]["code"] == "gpu_unreachable"


def test_all_down_without_cache_is_503_naming_hosts(made):
    client, fakes, _ = made
    for t in fakes.made.values():
        t.down = True
    r = client.get("/config/models")
    assert r.status_code == 503
    body = r.get_json()
    assert body["code"] == "gpu_unreachable"
    assert A in body["error"] and B in body["error"]
    assert set(body["hosts"]) == {A, B}


def test_fresh_cache_shortcut(env):
    fakes = FakeFactory()
    client = create_app({**env, "GPU_BRIDGE_CACHE_MAX_AGE": "30"}, transport_factory=fakes).test_client()
    assert client.get("/config/models").get_json()["source"] == "gpu"
    second = client.get("/config/models").get_json()
    assert second["source"] == "cache" and second["stale"] is False
    assert len(fakes.made["10.0.0.1"].calls) == 1
    assert client.get("/config/models?refresh=true").get_json()["source"] == "gpu"
    client.post("/config/delete-model", json={"model": "llama3.2"})
    assert client.get("/config/models").get_json()["source"] == "gpu", "a delete invalidates the shortcut"


def test_pull_then_follow_status_to_completion(made):
    client, fakes, _ = made
    r = client.post("/config/pull-model", json={"model": "tinyllama"})
    assert r.status_code == 202
    body = r.get_json()
    assert body["model"] == "tinyllama:latest"
    assert r.headers["Location"] == f"/config/pull-status/{body['id']}"
    assert set(body["results"]) == {A, B} and all(x["ok"] for x in body["results"].values())
    s1 = client.get(f"/config/pull-status/{body['id']}").get_json()
    assert s1["state"] == "running" and s1["percent"] == 50.0 and s1["done"] is False
    assert s1["completed"] == 1000 and s1["total"] == 2000
    s2 = client.get(f"/config/pull-status/{body['id']}").get_json()
    assert s2["state"] == "succeeded" and s2["percent"] == 100.0 and s2["done"] is True
    polls = len(fakes.made["10.0.0.1"].calls)
    s3 = client.get(f"/config/pull-status/{body['id']}").get_json()
    assert s3["state"] == "succeeded"
    assert len(fakes.made["10.0.0.1"].calls) == polls, "finished jobs are answered from the database"
    assert [p["id"] for p in client.get("/config/pulls").get_json()["pulls"]] == [body["id"]]


def test_pull_with_wait_blocks_and_answers_200(made):
    client, fakes, _ = made
    r = client.post("/config/pull-model", json={"model": "tinyllama", "wait": True, "hosts": ["10.0.0.1"]})
    assert r.status_code == 200
    assert list(r.get_json()["results"]) == [A]
    assert fakes.made["10.0.0.1"].calls[-1] == ("pull_and_wait", "tinyllama:latest")


def test_partial_pull_says_partial(made):
    client, fakes, _ = made
    fakes.made["10.0.0.2"].down = True
    r = client.post("/config/pull-model", json={"model": "tinyllama"})
    assert r.status_code == 202
    body = r.get_json()
    assert body["partial"] is True
    assert body["results"][B]["code"] == "gpu_unreachable"
    status = client.get(f"/config/pull-status/{body['id']}").get_json()
    assert status["results"][B]["ok"] is False
    status = client.get(f"/config/pull-status/{body['id']}").get_json()
    assert status["state"] == "partial" and status["done"] is True


def test_pull_failing_everywhere_answers_the_failure_status(made):
    client, fakes, _ = made
    for t in fakes.made.values():
        t.down = True
    r = client.post("/config/pull-model", json={"model": "tinyllama"})
    assert r.status_code == 503
    body = r.get_json()
    assert body["code"] == "gpu_unreachable"
    assert body["hosts"] == [A, B]
    assert "failed on every GPU host" in body["error"]
    for label in (A, B):  # each host named once, although the transport's messages start with it
        assert body["error"].count(label) == 1, body["error"]


def test_cancel_pull(made):
    client, fakes, _ = made
    pid = client.post("/config/pull-model", json={"model": "tinyllama"}).get_json()["id"]
    r = client.post("/config/cancel-pull", json={"id": pid})
    assert r.status_code == 200
    assert r.get_json()["state"] == "cancelled"
    assert client.get(f"/config/pull-status/{pid}").get_json()["state"] == "cancelled"


def test_delete_model_results_and_all_missing_is_404(made):
    client, _, _ = made
    r = client.post("/config/delete-model", json={"model": "llama3.2:latest"})
    assert r.status_code == 200
    assert r.get_json()["results"][A] == {"ok": True, "deleted": "llama3.2:latest"}
    r = client.post("/config/delete-model", json={"model": "llama3.2:latest"})
    assert r.status_code == 404
    assert r.get_json()["code"] == "model_not_found"


def test_audit_log_records_pulls_and_deletes(made):
    client, _, _ = made
    client.post("/config/pull-model", json={"model": "tinyllama"}, headers={"X-Request-ID": "audit-1"})
    client.post("/config/delete-model", json={"model": "ghost"})
    entries = client.get("/config/audit").get_json()["entries"]
    assert [(e["action"], e["model"], e["outcome"]) for e in entries] == [
        ("delete", "ghost:latest", "failed"), ("pull", "tinyllama:latest", "ok")]
    assert entries[1]["request_id"] == "audit-1"
    assert entries[1]["hosts"] == [A, B]


@pytest.mark.parametrize(("path", "payload", "code"), [
    ("/config/pull-model", b"{not json", "invalid_request"),
    ("/config/pull-model", b"", "invalid_request"),
    ("/config/pull-model", b"[1, 2]", "invalid_request"),
    ("/config/pull-model", b'{"hosts": []}', "invalid_request"),
    ("/config/pull-model", b'{"model": 5}', "invalid_request"),
    ("/config/pull-model", b'{"model": "../../etc/passwd"}', "invalid_model_name"),
    ("/config/pull-model", b'{"model": "a b"}', "invalid_model_name"),
    ("/config/pull-model", b'{"model": "x", "wait": "maybe"}', "invalid_request"),
    ("/config/pull-model", b'{"model": "x", "hosts": "gpu-99"}', "invalid_request"),
    ("/config/pull-model", b'{"model": "x", "hosts": [1]}', "invalid_request"),
    ("/config/delete-model", b'{"model": ""}', "invalid_model_name"),
    ("/config/delete-model", b'\xff\xfe', "invalid_request"),
    ("/config/cancel-pull", b'{}', "invalid_request"),
])
def test_bad_input_is_400_json(made, path, payload, code):
    client, fakes, _ = made
    r = client.post(path, data=payload, content_type="application/json")
    assert r.status_code == 400, r.get_data(as_text=True)
    assert r.is_json and r.get_json()["code"] == code
    assert all(not t.calls for t in fakes.made.values())


def test_form_encoded_body_is_refused_json_only(made):
    # A browser may send a form to any site without asking (no CORS preflight): JSON only.
    client, _, _ = made
    r = client.post("/config/pull-model", data={"model": "tinyllama", "hosts": "10.0.0.1"})
    assert r.status_code == 415 and r.get_json()["code"] == "unsupported_media_type"
    assert "Content-Type: application/json" in r.get_json()["error"]


def test_oversized_body_is_413_json(made):
    client, _, _ = made
    r = client.post("/config/pull-model", data=b'{"model": "' + b"a" * 70_000 + b'"}', content_type="application/json")
    assert r.status_code == 413
    assert r.get_json()["code"] == "payload_too_large"


def test_unknown_route_and_method_are_json(made):
    client, _, _ = made
    r = client.get("/nope")
    assert r.status_code == 404 and r.get_json()["code"] == "not_found"
    r = client.get("/config/pull-model")
    assert r.status_code == 405 and r.get_json()["code"] == "method_not_allowed"
    r = client.get("/config/pull-status/unknown")
    assert r.status_code == 404 and r.get_json()["code"] == "pull_not_found"


def test_unexpected_error_is_500_json_without_traceback(made):
    client, fakes, _ = made

    def bug():
        raise RuntimeError("boom")

    fakes.made["10.0.0.1"].list_models = bug
    fakes.made["10.0.0.2"].list_models = bug
    r = client.get("/config/models")
    assert r.status_code == 500
    assert r.get_json()["code"] == "internal_error"
    assert "Traceback" not in r.get_data(as_text=True)


def test_request_id_accepted_generated_and_forwarded(made):
    client, fakes, _ = made
    r = client.get("/config/models", headers={"X-Request-ID": "abc-123"})
    assert r.headers["X-Request-ID"] == "abc-123"
    assert fakes.made["10.0.0.1"].request_ids[-1] == "abc-123"
    r = client.get("/config/models", headers={"X-Request-ID": "bad id\u00e9" * 30})
    generated = r.headers["X-Request-ID"]
    assert len(generated) == 32 and generated != "abc-123"


def test_health_shape(made):
    client, fakes, _ = made
    fakes.made["10.0.0.2"].down = True
    body = client.get("/health").get_json()
    assert body["status"] == "degraded"
    assert body["transport"] == "fake"
    assert body["db"]["ok"] is True and body["db"]["dialect"] == "sqlite" and body["db"]["schema_version"] >= 2
    assert body["gpu_hosts"][A]["ok"] is True and body["gpu_hosts"][A]["breaker"]["state"] == "closed"
    assert body["gpu_hosts"][B]["ok"] is False and body["gpu_hosts"][B]["code"] == "gpu_unreachable"


def test_openapi_documents_every_route(made):
    client, _, app = made
    doc = client.get("/api/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    routes = {rule.rule.replace("<pull_id>", "{id}") for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    assert routes == set(doc["paths"])
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<pull_id>", "{id}")
        assert {m.lower() for m in rule.methods - {"HEAD", "OPTIONS"}} == set(doc["paths"][path])


# --- admin token ------------------------------------------------------------------------------------------------
def test_non_loopback_bind_without_token_refuses_to_start(env):
    with pytest.raises(ConfigError, match="GPU_BRIDGE_BACKEND_TOKEN_FILE"):
        create_app({**env, "GPU_BRIDGE_BACKEND_BIND": "0.0.0.0:8000"}, transport_factory=FakeFactory())


def test_non_loopback_bind_protects_state_changing_routes(env, tmp_path):
    token_file = tmp_path / "backend-token"
    token_file.write_text("admin-s3cret\n")
    client = create_app({**env, "GPU_BRIDGE_BACKEND_BIND": "10.1.2.3:8000",
                         "GPU_BRIDGE_BACKEND_TOKEN_FILE": str(token_file)},
                        transport_factory=FakeFactory()).test_client()
    assert client.get("/config/models").status_code == 200  # reads stay open
    r = client.post("/config/pull-model", json={"model": "tinyllama"})
    assert r.status_code == 401 and r.get_json()["code"] == "unauthorized"
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="gpu-bridge"'
    r = client.post("/config/delete-model", json={"model": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = client.post("/config/delete-model", json={"model": "x"}, headers={"Authorization": "Bearer \u00e9\u00e9"})
    assert r.status_code == 401, "a non-ASCII token must not crash the comparison"
    r = client.post("/config/pull-model", json={"model": "tinyllama"},
                    headers={"Authorization": "Bearer admin-s3cret"})
    assert r.status_code == 202


def test_loopback_detection():
    for bind in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "127.0.0.5:1", "unix:/run/gb.sock"):
        assert is_loopback_bind(bind), bind
    for bind in ("0.0.0.0:8000", "10.0.0.5:8000", "[::]:8000", "prod-01:8000"):
        assert not is_loopback_bind(bind), bind


def test_request_log_is_one_json_line_without_tokens(env, tmp_path):
    token_file = tmp_path / "t"
    token_file.write_text("admin-s3cret")
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(JsonFormatter().format(record))

    handler = Collect()
    logger = logging.getLogger("gpu_bridge")
    logger.addHandler(handler)
    try:
        client = create_app({**env, "GPU_BRIDGE_API_TOKEN": "gpu-s3cret", "GPU_BRIDGE_BACKEND_BIND": "10.1.2.3:8000",
                             "GPU_BRIDGE_BACKEND_TOKEN_FILE": str(token_file)},
                            transport_factory=FakeFactory()).test_client()
        client.post("/config/pull-model?x=1", json={"model": "tinyllama"},
                    headers={"Authorization": "Bearer admin-s3cret", "X-Request-ID": "log-1"})
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(r) for r in records]
    requests_logged = [x for x in lines if x.get("event") == "request"]
    assert len(requests_logged) == 1
    entry = requests_logged[0]
    assert entry["request_id"] == "log-1" and entry["path"] == "/config/pull-model" and entry["status"] == 202
    assert entry["method"] == "POST" and isinstance(entry["duration_ms"], float)
    assert not any("s3cret" in r for r in records)


def test_the_retention_settings_reach_the_database(env):
    """GPU_BRIDGE_*_RETENTION_DAYS from the environment are what the backend's database prunes by."""
    from gpu_bridge.backend.state import EXTENSION

    app = create_app({**env, "GPU_BRIDGE_AUDIT_RETENTION_DAYS": "0", "GPU_BRIDGE_PULL_RETENTION_DAYS": "7"},
                     transport_factory=FakeFactory())
    retention = app.extensions[EXTENSION].db.retention
    assert (retention.audit_days, retention.pull_days) == (0, 7)
