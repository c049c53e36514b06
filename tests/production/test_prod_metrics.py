"""The backend's /metrics: names and values after scripted events (a breaker opening and closing, a
stale answer, a database error, requests per route, pulls, NFS heartbeats), and who may read it.

The app runs in process with fake GPU transports (prod_helpers.FakeTransport), so each event is
caused on purpose and each figure is exact."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import sqlalchemy as sa
from prod_helpers import FakeFactory, FakeTransport
from prometheus_client.parser import text_string_to_metric_families

from gpu_bridge.backend import create_app
from gpu_bridge.backend.state import EXTENSION
from gpu_bridge.spool import Liveness

A, B = "10.0.0.1:8001", "10.0.0.2:8001"


@pytest.fixture
def env(tmp_path):
    # Cool-down 0: an open breaker is half-open at once, so closing it needs no waiting.
    return {"GPU_INSTANCE_HOSTS": "10.0.0.1,10.0.0.2", "GPU_BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/b.db",
            "GPU_BRIDGE_BREAKER_THRESHOLD": "2", "GPU_BRIDGE_CACHE_MAX_AGE": "0"}


@pytest.fixture
def made(env):
    fakes = FakeFactory()
    app = create_app(env, transport_factory=fakes)
    return app.test_client(), fakes, app


def scrape(client, **kw) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of one scrape."""
    r = client.get("/metrics", **kw)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.content_type.startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.get_data(as_text=True)) for s in family.samples}


def value(samples, name, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def names(samples) -> set[str]:
    return {name for name, _ in samples}


# --- breakers and fan-outs -----------------------------------------------------------------------------
def test_a_breaker_opening_is_exported_counted_and_logged(made, caplog):
    client, fakes, _ = made
    fakes.made["10.0.0.2"].down = True
    logger = logging.getLogger("gpu_bridge.backend.breaker")  # the backend's loggers do not propagate
    logger.addHandler(caplog.handler)
    try:
        for _ in range(3):  # two failures open B's breaker (threshold 2); the third is refused at once
            assert client.get("/config/models").status_code == 200
    finally:
        logger.removeHandler(caplog.handler)
    m = scrape(client)
    assert value(m, "gpu_bridge_breaker_state", host=A) == 0
    assert value(m, "gpu_bridge_breaker_state", host=B) == 2
    assert value(m, "gpu_bridge_breaker_transitions_total", host=B, **{"from": "closed", "to": "open"}) == 1
    assert value(m, "gpu_bridge_breaker_transitions_total", host=A, **{"from": "closed", "to": "open"}) == 0
    results = "gpu_bridge_fanout_results_total"
    assert value(m, results, host=A, operation="list_models", outcome="ok") == 3
    assert value(m, results, host=B, operation="list_models", outcome="unreachable") == 2
    assert value(m, results, host=B, operation="list_models", outcome="circuit_open") == 1
    assert value(m, "gpu_bridge_fanout_duration_seconds_count", host=B, operation="list_models") == 3
    assert value(m, "gpu_bridge_fanout_duration_seconds_bucket", host=A, operation="list_models", le="+Inf") == 3

    # One transition (caplog may see a record twice: through our handler and pytest's own).
    opened = {r.getMessage() for r in caplog.records if "breaker_transition" in r.getMessage()}
    assert len(opened) == 1, opened
    opened = [json.loads(m) for m in opened]
    assert opened[0]["host"] == B and opened[0]["old_state"] == "closed" and opened[0]["new_state"] == "open"
    assert "2 consecutive failure(s)" in opened[0]["reason"] and "refused the connection" in opened[0]["reason"]


def test_a_breaker_closing_goes_through_half_open(env):
    fakes = FakeFactory()
    client = create_app({**env, "GPU_BRIDGE_BREAKER_COOLDOWN": "0"}, transport_factory=fakes).test_client()
    fakes.made["10.0.0.2"].down = True
    client.get("/config/models")
    client.get("/config/models")  # B opens
    fakes.made["10.0.0.2"].down = False
    client.get("/config/models")  # the cool-down (0 s) is over: the probe succeeds and B closes
    m = scrape(client)
    moved = {(dict(labels)["from"], dict(labels)["to"]): v for (name, labels), v in m.items()
             if name == "gpu_bridge_breaker_transitions_total" and dict(labels)["host"] == B}
    assert moved == {("closed", "open"): 1, ("open", "half_open"): 1, ("half_open", "closed"): 1,
                     ("half_open", "open"): 0}
    assert value(m, "gpu_bridge_breaker_state", host=B) == 0


# --- the cache and stale answers ---------------------------------------------------------------------
def test_stale_answers_and_cache_age(made):
    client, fakes, _ = made
    m = scrape(client)
    assert value(m, "gpu_bridge_stale_answers_total") == 0
    assert "gpu_bridge_model_cache_age_seconds" not in names(m)  # nothing cached yet: no made-up age
    client.get("/config/models")
    fakes.made["10.0.0.2"].down = True
    assert client.get("/config/models").get_json()["stale"] is True  # B's models from the cache
    fakes.made["10.0.0.1"].down = True
    body = client.get("/config/models").get_json()
    assert body["source"] == "cache" and body["stale"] is True  # every host from the cache
    m = scrape(client)
    assert value(m, "gpu_bridge_stale_answers_total") == 2
    for host in (A, B):
        age = value(m, "gpu_bridge_model_cache_age_seconds", host=host)
        assert age is not None and 0 <= age < 60


def test_a_fresh_answer_is_not_counted_stale(made):
    client, _, _ = made
    for _ in range(3):
        assert client.get("/config/models").get_json()["stale"] is False
    assert value(scrape(client), "gpu_bridge_stale_answers_total") == 0


# --- the database ---------------------------------------------------------------------------------------
def test_database_errors_are_counted_and_the_scrape_survives_them(made):
    client, _, app = made
    db = app.extensions[EXTENSION].db
    assert value(scrape(client), "gpu_bridge_database_errors_total") == 0
    with db.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE audit_log"))
    assert client.get("/config/audit").status_code == 503
    assert value(scrape(client), "gpu_bridge_database_errors_total") == 1
    with db.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE pulls"))
    m = scrape(client)  # the scrape-time query fails: its gauges are left out, not zeroed
    assert "gpu_bridge_backend_pulls" not in names(m) and "gpu_bridge_model_cache_age_seconds" not in names(m)
    assert value(m, "gpu_bridge_breaker_state", host=A) == 0  # what memory knows is still there
    # Counted: the counter is written out before the failing query runs, so the next scrape shows it
    # (and not yet its own failure).
    assert value(scrape(client), "gpu_bridge_database_errors_total") == 2


def test_pulls_by_state_come_from_the_database(made):
    client, _, _ = made
    assert client.post("/config/pull-model", json={"model": "qwen2:0.5b"}).status_code == 202
    assert client.post("/config/pull-model", json={"model": "tinyllama", "wait": True}).status_code == 200
    m = scrape(client)
    assert value(m, "gpu_bridge_backend_pulls", state="running") == 1
    assert value(m, "gpu_bridge_backend_pulls", state="succeeded") == 1


# --- requests ----------------------------------------------------------------------------------------------
def test_requests_are_counted_per_endpoint_never_per_path(made):
    client, _, _ = made
    client.get("/config/models")
    client.get("/config/models")
    assert client.get("/config/pull-status/no-such-pull-4711").status_code == 404
    assert client.get("/no/such/route/0815").status_code == 404
    assert client.post("/config/pull-model", data="{", content_type="application/json").status_code == 400
    r = client.get("/metrics")
    text = r.get_data(as_text=True)
    assert "4711" not in text and "0815" not in text
    m = scrape(client)
    count = "gpu_bridge_http_requests_total"
    assert value(m, count, method="GET", route="config.list_models", status="200") == 2
    assert value(m, count, method="GET", route="config.pull_status", status="404") == 1
    assert value(m, count, method="GET", route="<unmatched>", status="404") == 1
    assert value(m, count, method="POST", route="config.pull_model", status="400") == 1
    assert value(m, count, method="GET", route="metrics", status="200") == 1  # the scrape before this one
    assert value(m, "gpu_bridge_http_request_duration_seconds_count", method="GET", route="config.list_models") == 2


# --- NFS heartbeats --------------------------------------------------------------------------------------
class _NfsLike(FakeTransport):
    """A transport with a heartbeat, as NfsTransport has (``heartbeat()`` -> Liveness)."""

    live = Liveness(True, 1.5, 7, {"counter": 7})

    def heartbeat(self):
        return self.live


def test_nfs_heartbeat_age_and_worker_up_per_host(env):
    lives = {"10.0.0.1": Liveness(True, 1.5, 7, {"counter": 7}),
             "10.0.0.2": Liveness(False, None, None, None, "no heartbeat file")}

    def factory(host, settings):
        t = _NfsLike(host, settings)
        t.live = lives[host.name]
        return t

    client = create_app(env, transport_factory=factory).test_client()
    m = scrape(client)
    assert value(m, "gpu_bridge_nfs_heartbeat_age_seconds", host=A) == 1.5
    assert math.isinf(value(m, "gpu_bridge_nfs_heartbeat_age_seconds", host=B))
    assert value(m, "gpu_bridge_nfs_worker_up", host=A) == 1
    assert value(m, "gpu_bridge_nfs_worker_up", host=B) == 0


def test_http_transports_export_no_heartbeat(made):
    client, _, _ = made
    assert not {"gpu_bridge_nfs_heartbeat_age_seconds", "gpu_bridge_nfs_worker_up"} & names(scrape(client))


# --- who may read it ----------------------------------------------------------------------------------
BEYOND = {"REMOTE_ADDR": "10.9.9.9"}


def test_metrics_from_beyond_loopback_need_the_admin_token(env, tmp_path):
    token_file = tmp_path / "backend-token"
    token_file.write_text("admin-s3cret\n")
    client = create_app({**env, "GPU_BRIDGE_BACKEND_TOKEN_FILE": str(token_file)},
                        transport_factory=FakeFactory()).test_client()
    assert client.get("/metrics").status_code == 200  # loopback: like every route here
    r = client.get("/metrics", environ_base=BEYOND)
    assert r.status_code == 401 and r.get_json()["code"] == "unauthorized"
    r = client.get("/metrics", environ_base=BEYOND, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.get_json()["code"] == "unauthorized"
    scrape(client, environ_base=BEYOND, headers={"Authorization": "Bearer admin-s3cret"})


def test_metrics_public_opens_them(env):
    client = create_app({**env, "GPU_BRIDGE_METRICS_PUBLIC": "true", "GPU_BRIDGE_BACKEND_BIND": "127.0.0.1:8000"},
                        transport_factory=FakeFactory()).test_client()
    assert "gpu_bridge_breaker_state" in names(scrape(client, environ_base=BEYOND))


def test_without_a_token_metrics_beyond_loopback_are_refused_with_a_hint(made):
    client, _, _ = made
    r = client.get("/metrics", environ_base=BEYOND)
    assert r.status_code == 401 and "GPU_BRIDGE_BACKEND_TOKEN_FILE" in r.get_json()["error"]


def test_a_real_nfs_transport_reports_its_workers_heartbeat(env, tmp_path):
    app = create_app({**env, "GPU_INSTANCE_HOSTS": "gpu-1", "GPU_BRIDGE_TRANSPORT": "nfs",
                      "GPU_BRIDGE_NFS_ROOT": str(tmp_path / "share"), "GPU_BRIDGE_NFS_REQUIRE_MOUNT": "false"})
    client = app.test_client()
    label = "gpu-1:8001"
    m = scrape(client)  # no worker ever ran: no heartbeat file
    assert value(m, "gpu_bridge_nfs_worker_up", host=label) == 0
    assert math.isinf(value(m, "gpu_bridge_nfs_heartbeat_age_seconds", host=label))
    heartbeat = Path(app.extensions[EXTENSION].fleet.slots[label].transport.paths.heartbeat)
    heartbeat.parent.mkdir(parents=True)
    heartbeat.write_text(json.dumps({"counter": 1, "boot": "b1", "interval": 2, "state": "running"}))
    m = scrape(client)  # a fresh file (its mtime says so until the counter is seen to move)
    assert value(m, "gpu_bridge_nfs_worker_up", host=label) == 1
    assert 0 <= value(m, "gpu_bridge_nfs_heartbeat_age_seconds", host=label) < 10
