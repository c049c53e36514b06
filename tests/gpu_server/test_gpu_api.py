"""The GPU server's routes on Flask's test client, in front of the Ollama emulator process."""

from __future__ import annotations

import json
import logging
import types

import pynvml
import pytest

from gpu_bridge.config import GpuServerSettings
from gpu_bridge.errors import ConfigError
from gpu_bridge.gpu_server import create_app
from gpu_bridge.gpu_server.health import TtlCache
from gpu_server_helpers import AUTH, JOB_KEYS, TOKEN
from support.procs import emulator_control, free_port, wait_until


def assert_json_error(response, status, code):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["code"] == code and isinstance(body["error"], str) and body["error"]
    assert "<html" not in response.get_data(as_text=True).lower()
    return body


# --- startup -----------------------------------------------------------------------------------
def test_refuses_to_start_without_a_token():
    with pytest.raises(ConfigError) as info:
        create_app({"GPU_BRIDGE_OLLAMA_URL": "http://127.0.0.1:9"})
    assert "GPU_BRIDGE_API_TOKEN" in info.value.message


def test_development_flag_allows_no_token_and_warns(caplog, ollama):
    with caplog.at_level(logging.WARNING, logger="gpu_bridge"):
        app = create_app({"GPU_BRIDGE_OLLAMA_URL": ollama.url, "GPU_BRIDGE_ALLOW_NO_TOKEN": "true"})
    try:
        assert app.test_client().get("/api/models").status_code == 200
        assert any("without authentication" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    finally:
        app.extensions["gpu_bridge"].close()


def test_accepts_a_settings_object(ollama):
    app = create_app(GpuServerSettings(ollama_url=ollama.url, api_token="obj-token"))
    try:
        assert app.test_client().get("/api/ready", headers={"Authorization": "Bearer obj-token"}).status_code == 200
    finally:
        app.extensions["gpu_bridge"].close()


def test_malformed_setting_is_a_config_error():
    with pytest.raises(ConfigError):
        create_app({"GPU_BRIDGE_API_TOKEN": "t", "GPU_BRIDGE_MAX_CONCURRENT_PULLS": "lots"})


# --- auth --------------------------------------------------------------------------------------
@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic " + TOKEN, f"Bearer {TOKEN}x",
                                    f"Bearer {TOKEN[:-1]}", "Bearer tökén", f"Token {TOKEN}"])
def test_bad_or_missing_token_is_401(client, header):
    headers = {} if header is None else {"Authorization": header}
    response = client.get("/api/models", headers=headers)
    assert_json_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_non_ascii_raw_header_bytes_are_401_not_500(client):
    # What arrives over the wire as UTF-8 bytes reaches WSGI as latin-1 text.
    raw = "Bearer tök€n".encode().decode("latin-1")
    assert_json_error(client.get("/api/models", headers={"Authorization": raw}), 401, "unauthorized")


def test_scheme_is_case_insensitive(client):
    assert client.get("/api/models", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200


def test_health_is_open_and_everything_else_needs_the_token(client):
    assert client.get("/api/health").status_code == 200
    for path in ("/api/ready", "/api/models", "/api/jobs", "/api/jobs/x", "/metrics", "/api/openapi.json"):
        assert_json_error(client.get(path), 401, "unauthorized")
    assert_json_error(client.post("/api/models/llama3"), 401, "unauthorized")
    assert_json_error(client.delete("/api/models/llama3"), 401, "unauthorized")


def test_metrics_public_flag(make_app, ollama):
    client = make_app(ollama.url, GPU_BRIDGE_METRICS_PUBLIC="true").test_client()
    assert client.get("/metrics").status_code == 200
    assert client.get("/api/models").status_code == 401


# --- health and readiness -----------------------------------------------------------------------
def test_health_without_gpu_says_unavailable_and_never_fails(client, monkeypatch):
    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    body = client.get("/api/health").get_json()
    assert body["gpu"]["available"] is False and body["gpu"]["devices"] == []
    assert "NVML" in body["gpu"]["error"]
    assert body["ollama"]["reachable"] is True and body["ollama"]["version"]
    assert body["ollama"]["latency_ms"] >= 0
    assert body["status"] == "degraded"
    assert body["pulls"] == {"running": 0, "queued": 0}
    assert body["version"] and body["uptime_seconds"] >= 0
    assert TOKEN not in json.dumps(body)


def test_health_reads_each_gpu_metric_separately(client, monkeypatch):
    def unsupported(*_args):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    fake = {"nvmlInit": lambda: None, "nvmlDeviceGetCount": lambda: 1, "nvmlDeviceGetHandleByIndex": lambda i: i,
            "nvmlDeviceGetName": lambda h: b"NVIDIA H100 80GB HBM3",
            "nvmlDeviceGetMemoryInfo": lambda h, version=None: types.SimpleNamespace(total=80 * 2**30, used=2**30,
                                                                                     free=0),
            "nvmlDeviceGetUtilizationRates": unsupported, "nvmlDeviceGetTemperature": lambda h, s: 41}
    for name, value in fake.items():
        monkeypatch.setattr(pynvml, name, value)
    body = client.get("/api/health").get_json()
    assert body["status"] == "ok" and body["gpu"]["available"] is True
    (device,) = body["gpu"]["devices"]
    assert device["name"] == "NVIDIA H100 80GB HBM3"
    assert (device["memory_total_bytes"], device["memory_used_bytes"]) == (80 * 2**30, 2**30)
    assert device["utilization_percent"] is None and "utilization" in device["error"]
    assert device["temperature_c"] == 41


@pytest.mark.parametrize("v2_supported", [True, False])
def test_health_reports_used_memory_without_the_driver_reserve(client, monkeypatch, v2_supported):
    """v2 (when the driver has it) reports the driver's reserve apart; v1 counts it as used."""
    calls = []

    def memory_info(handle, version=None):
        calls.append(version)
        if version is None:
            return types.SimpleNamespace(total=80 * 2**30, used=2**30 + 615 * 2**20, free=0)
        if not v2_supported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return types.SimpleNamespace(total=80 * 2**30, reserved=615 * 2**20, used=2**30, free=0)

    fake = {"nvmlInit": lambda: None, "nvmlDeviceGetCount": lambda: 1, "nvmlDeviceGetHandleByIndex": lambda i: i,
            "nvmlDeviceGetName": lambda h: "NVIDIA H200", "nvmlDeviceGetMemoryInfo": memory_info,
            "nvmlDeviceGetUtilizationRates": lambda h: types.SimpleNamespace(gpu=3, memory=1),
            "nvmlDeviceGetTemperature": lambda h, s: 46}
    for name, value in fake.items():
        monkeypatch.setattr(pynvml, name, value)
    (device,) = client.get("/api/health").get_json()["gpu"]["devices"]
    assert "error" not in device
    if v2_supported:
        assert calls == [pynvml.nvmlMemory_v2] and device["memory_used_bytes"] == 2**30
    else:
        assert calls == [pynvml.nvmlMemory_v2, None] and device["memory_used_bytes"] == 2**30 + 615 * 2**20


def test_health_with_ollama_down_is_still_200(make_app):
    body = make_app(f"http://127.0.0.1:{free_port()}").test_client().get("/api/health")
    assert body.status_code == 200
    data = body.get_json()
    assert data["status"] == "degraded" and data["ollama"]["reachable"] is False and data["ollama"]["error"]


def test_ready_and_ollama_down(make_app, ollama):
    assert make_app(ollama.url).test_client().get("/api/ready", headers=AUTH).get_json() == {"ready": True}
    down = make_app(f"http://127.0.0.1:{free_port()}").test_client()
    assert_json_error(down.get("/api/ready", headers=AUTH), 503, "ollama_unavailable")
    assert_json_error(down.get("/api/models", headers=AUTH), 503, "ollama_unavailable")


def test_ollama_timeout_is_504(make_app, ollama):
    emulator_control(ollama, "config", {"latency_ms": 1500})
    client = make_app(ollama.url, GPU_BRIDGE_OLLAMA_READ_TIMEOUT="0.2").test_client()
    assert_json_error(client.get("/api/models", headers=AUTH), 504, "ollama_timeout")


# --- models -------------------------------------------------------------------------------------
def test_list_models(client):
    models = client.get("/api/models", headers=AUTH).get_json()["models"]
    assert "llama3.2:latest" in [m["name"] for m in models]
    assert all(set(m) == {"name", "size", "digest", "modified_at", "details"} for m in models)


def test_pull_returns_202_job_and_location_then_succeeds(client, ollama):
    response = client.post("/api/models/tinyllama", headers=AUTH)
    assert response.status_code == 202
    job = response.get_json()
    assert JOB_KEYS <= set(job) and job["joined"] is False and job["model"] == "tinyllama:latest"
    assert response.headers["Location"] == f"/api/jobs/{job['id']}"

    def finished():
        body = client.get(f"/api/jobs/{job['id']}", headers=AUTH).get_json()
        return body if body["state"] in ("succeeded", "failed") else None

    done = wait_until(finished, timeout=15, what="pull to finish")
    assert done["state"] == "succeeded" and done["percent"] == 100.0 and done["completed"] == done["total"] > 0
    assert "tinyllama:latest" in [m["name"] for m in client.get("/api/models", headers=AUTH).get_json()["models"]]
    jobs = client.get("/api/jobs", headers=AUTH).get_json()["jobs"]
    assert jobs[0]["id"] == job["id"]


def test_second_pull_of_the_same_model_joins(client, ollama):
    emulator_control(ollama, "config", {"stall": True})
    first = client.post("/api/models/smollm:135m", headers=AUTH).get_json()
    second = client.post("/api/models/library/smollm:135m", headers=AUTH)
    assert second.status_code == 202
    assert second.get_json()["id"] == first["id"] and second.get_json()["joined"] is True
    wait_until(lambda: emulator_control(ollama, "stats")["downloads_started"] == {"smollm:135m": 1},
               what="one download")


def test_pull_wait_success_is_200(client):
    response = client.post("/api/models/tinyllama:latest?wait=true", headers=AUTH)
    assert response.status_code == 200
    assert response.get_json()["state"] == "succeeded"


@pytest.mark.parametrize(("name", "knobs", "status", "code"), [
    ("does-not-exist", {}, 404, "model_not_found"),
    ("smollm:135m", {"fail_after_bytes": 1000}, 507, "insufficient_storage"),
])
def test_pull_wait_failure_carries_the_job(client, ollama, name, knobs, status, code):
    emulator_control(ollama, "config", knobs)
    body = assert_json_error(client.post(f"/api/models/{name}?wait=1", headers=AUTH), status, code)
    assert body["job"]["state"] == "failed" and body["job"]["error_code"] == code


def test_pull_wait_on_a_stall_is_504_pull_stalled(make_app, ollama):
    emulator_control(ollama, "config", {"stall": True})
    client = make_app(ollama.url, GPU_BRIDGE_PULL_STALL_TIMEOUT="0.3").test_client()
    body = assert_json_error(client.post("/api/models/smollm:135m?wait=true", headers=AUTH), 504, "pull_stalled")
    assert "no download progress for 0.3 s" in body["error"]
    wait_until(lambda: emulator_control(ollama, "stats")["cancelled_downloads"] == 1, what="Ollama stream closed")


def test_bad_wait_flag_is_400(client):
    assert_json_error(client.post("/api/models/tinyllama?wait=perhaps", headers=AUTH), 400, "invalid_request")


@pytest.mark.parametrize("path", [
    "/api/models/..%2F..%2Fetc%2Fpasswd", "/api/models/../../etc/passwd", "/api/models/a%00b", "/api/models/a%20b",
    "/api/models/a//b", "/api/models/a/b/c/d", "/api/models/%C3%BCml", "/api/models/llama:", "/api/models/-x",
    "/api/models/" + "a" * 700, "/api/models/.%2E", "/api/models/x:..",
])
def test_hostile_names_are_400_json(client, ollama, path):
    assert_json_error(client.post(path, headers=AUTH), 400, "invalid_model_name")
    assert_json_error(client.delete(path, headers=AUTH), 400, "invalid_model_name")
    assert emulator_control(ollama, "stats")["requests"] == 0  # nothing reached Ollama


def test_registry_allow_list(make_app, ollama):
    client = make_app(ollama.url, GPU_BRIDGE_ALLOWED_REGISTRIES="registry.ollama.ai,host:5000").test_client()
    assert_json_error(client.post("/api/models/hf.co/org/repo:Q4", headers=AUTH), 400, "registry_not_allowed")
    assert_json_error(client.post("/api/models/evil.example.com/ns/m:1", headers=AUTH), 400, "registry_not_allowed")
    assert client.post("/api/models/host:5000/ns/m", headers=AUTH).status_code == 202


def test_weird_paths_routed_elsewhere_are_json_4xx(client):
    assert_json_error(client.post("/api/models/", headers=AUTH), 404, "not_found")
    assert_json_error(client.post("/api/models", headers=AUTH), 405, "method_not_allowed")
    assert_json_error(client.get("/api/jobs/a/b", headers=AUTH), 404, "not_found")
    assert_json_error(client.get("/%2E%2E/%2E%2E/etc/passwd", headers=AUTH), 404, "not_found")


def test_delete_model(client):
    response = client.delete("/api/models/qwen2.5:0.5b", headers=AUTH)
    assert response.status_code == 200 and response.get_json() == {"deleted": "qwen2.5:0.5b"}
    assert_json_error(client.delete("/api/models/qwen2.5:0.5b", headers=AUTH), 404, "model_not_found")


def test_disk_space_check(make_app, ollama, tmp_path):
    full = make_app(ollama.url, GPU_BRIDGE_OLLAMA_MODELS_DIR=tmp_path / "models",
                    GPU_BRIDGE_MIN_FREE_GB="100000000").test_client()
    body = assert_json_error(full.post("/api/models/tinyllama", headers=AUTH), 507, "insufficient_storage")
    assert "GPU_BRIDGE_MIN_FREE_GB" in body["error"]
    ok = make_app(ollama.url, GPU_BRIDGE_OLLAMA_MODELS_DIR=tmp_path, GPU_BRIDGE_MIN_FREE_GB="0.001").test_client()
    assert ok.post("/api/models/tinyllama", headers=AUTH).status_code == 202


# --- jobs ---------------------------------------------------------------------------------------
def test_cancel_job(client, ollama):
    emulator_control(ollama, "config", {"stall": True})
    job = client.post("/api/models/smollm:135m", headers=AUTH).get_json()
    wait_until(lambda: emulator_control(ollama, "stats")["active_downloads"], what="download running")
    cancelled = client.delete(f"/api/jobs/{job['id']}", headers=AUTH)
    assert cancelled.status_code == 200 and cancelled.get_json()["state"] == "cancelled"
    wait_until(lambda: emulator_control(ollama, "stats")["cancelled_downloads"] == 1, what="download cancelled")
    assert_json_error(client.delete(f"/api/jobs/{job['id']}", headers=AUTH), 409, "conflict")
    assert_json_error(client.get("/api/jobs/nope", headers=AUTH), 404, "job_not_found")
    assert_json_error(client.delete("/api/jobs/nope", headers=AUTH), 404, "job_not_found")


def test_queue_full_is_429_with_retry_after(make_app, ollama):
    emulator_control(ollama, "config", {"stall": True})
    client = make_app(ollama.url, GPU_BRIDGE_MAX_CONCURRENT_PULLS=1, GPU_BRIDGE_MAX_QUEUED_PULLS=1,
                      GPU_BRIDGE_RATE_LIMIT_PER_MINUTE=0).test_client()
    assert client.post("/api/models/smollm:135m", headers=AUTH).get_json()["state"] in ("queued", "running")
    assert client.post("/api/models/phi3:mini", headers=AUTH).get_json()["state"] == "queued"
    response = client.post("/api/models/tinyllama", headers=AUTH)
    assert_json_error(response, 429, "queue_full")
    assert int(response.headers["Retry-After"]) >= 1


# --- limits and errors --------------------------------------------------------------------------
def test_rate_limit_on_state_changing_routes(make_app, ollama):
    client = make_app(ollama.url, GPU_BRIDGE_RATE_LIMIT_PER_MINUTE=3).test_client()
    for _ in range(3):
        assert client.delete("/api/models/not-installed", headers=AUTH).status_code == 404
    response = client.delete("/api/models/not-installed", headers=AUTH)
    assert_json_error(response, 429, "rate_limited")
    assert int(response.headers["Retry-After"]) >= 1
    assert_json_error(client.post("/api/models/tinyllama", headers=AUTH), 429, "rate_limited")
    assert client.get("/api/models", headers=AUTH).status_code == 200  # reads are not limited


def test_body_over_the_limit_is_413(make_app, ollama):
    client = make_app(ollama.url, GPU_BRIDGE_MAX_BODY_BYTES=1024).test_client()
    response = client.post("/api/models/tinyllama", headers=AUTH, data=b"x" * 2048)
    assert_json_error(response, 413, "payload_too_large")
    assert client.post("/api/models/tinyllama", headers=AUTH, data=b"{}").status_code == 202


def test_unknown_route_and_wrong_method_are_json(client):
    assert_json_error(client.get("/nope", headers=AUTH), 404, "not_found")
    assert_json_error(client.get("/", headers=AUTH), 404, "not_found")
    response = client.put("/api/jobs", headers=AUTH)
    assert_json_error(response, 405, "method_not_allowed")
    assert "GET" in response.headers["Allow"]


def test_unexpected_exception_is_500_json_without_details(client, caplog):
    state = client.application.extensions["gpu_bridge"]

    def boom():
        raise RuntimeError("secret internal detail")

    state.adapter.list_models = boom
    with caplog.at_level(logging.ERROR, logger="gpu_bridge"):
        response = client.get("/api/models", headers={**AUTH, "X-Request-ID": "req-500"})
    body = assert_json_error(response, 500, "internal_error")
    assert "secret internal detail" not in response.get_data(as_text=True) and "req-500" in body["error"]
    assert any(r.exc_info and "secret internal detail" in str(r.exc_info[1]) for r in caplog.records)


# --- request id and log -------------------------------------------------------------------------
@pytest.mark.parametrize(("given", "kept"), [("abc-123_X.y", True), ("a" * 128, True), ("a" * 129, False),
                                             ("bad id", False), ("ümlaut", False), ("", False)])
def test_request_id_is_validated_and_echoed(client, given, kept):
    response = client.get("/api/health", headers={"X-Request-ID": given})
    echoed = response.headers["X-Request-ID"]
    if kept:
        assert echoed == given
    else:
        assert echoed != given and len(echoed) == 32 and int(echoed, 16) >= 0


def test_request_log_is_one_json_line_without_the_token(client, caplog):
    with caplog.at_level(logging.INFO, logger="gpu_bridge.access"):
        client.get("/api/models?x=1", headers={**AUTH, "X-Request-ID": "log-check-1"})
        client.get("/api/models", headers={"Authorization": "Bearer wrong-token-value", "X-Request-ID": "log-2"})
    lines = [r.getMessage() for r in caplog.records if r.name == "gpu_bridge.access"]
    assert len(lines) == 2
    entry = json.loads(lines[0])
    assert {"method", "path", "status", "duration_ms", "request_id", "remote"} <= set(entry)
    assert (entry["method"], entry["path"], entry["status"], entry["request_id"]) == (
        "GET", "/api/models", 200, "log-check-1")
    assert json.loads(lines[1])["status"] == 401
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in everything and "wrong-token-value" not in everything


@pytest.mark.parametrize("log_health_checks", [False, True])
def test_health_checks_are_counted_but_logged_only_on_request(make_app, ollama, caplog, log_health_checks):
    client = make_app(ollama.url, GPU_BRIDGE_LOG_HEALTH_CHECKS=str(log_health_checks).lower()).test_client()
    with caplog.at_level(logging.INFO, logger="gpu_bridge.access"):
        for _ in range(3):
            assert client.get("/api/health").status_code == 200
        client.get("/api/models", headers=AUTH)
    routes = [json.loads(r.getMessage())["route"] for r in caplog.records if r.name == "gpu_bridge.access"]
    assert routes == (["/api/health"] * 3 if log_health_checks else []) + ["/api/models"]
    text = client.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert 'gpu_bridge_http_requests_total{method="GET",route="/api/health",status="200"} 3.0' in text


# --- metrics ------------------------------------------------------------------------------------
def test_metrics_use_the_url_rule_and_report_ollama_and_pulls(client):
    client.get("/api/jobs/abc", headers=AUTH)
    client.get("/api/jobs/def", headers=AUTH)
    text = client.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert 'gpu_bridge_http_requests_total{method="GET",route="/api/jobs/<job_id>",status="404"} 2.0' in text
    assert "/api/jobs/abc" not in text
    assert "gpu_bridge_http_request_duration_seconds_bucket" in text
    assert "gpu_bridge_ollama_up 1.0" in text
    assert "gpu_bridge_pulls_in_flight 0.0" in text


def test_two_apps_in_one_process_have_separate_metrics(make_app, ollama):
    first, second = make_app(ollama.url).test_client(), make_app(ollama.url).test_client()
    first.get("/api/jobs", headers=AUTH)
    assert 'route="/api/jobs"' in first.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert 'route="/api/jobs"' not in second.get("/metrics", headers=AUTH).get_data(as_text=True)


def test_metrics_count_finished_pulls_and_ollama_down(make_app, ollama):
    client = make_app(ollama.url).test_client()
    client.post("/api/models/tinyllama?wait=true", headers=AUTH)
    assert 'gpu_bridge_pulls_finished_total{state="succeeded"} 1.0' in client.get(
        "/metrics", headers=AUTH).get_data(as_text=True)
    down = make_app(f"http://127.0.0.1:{free_port()}").test_client()
    assert "gpu_bridge_ollama_up 0.0" in down.get("/metrics", headers=AUTH).get_data(as_text=True)


def test_metrics_export_each_gpu_and_leave_out_what_the_board_lacks(client, monkeypatch):
    def unsupported(*_args):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    fake = {"nvmlInit": lambda: None, "nvmlDeviceGetCount": lambda: 2, "nvmlDeviceGetHandleByIndex": lambda i: i,
            "nvmlDeviceGetName": lambda h: f"NVIDIA H100 #{h}",
            "nvmlDeviceGetMemoryInfo": lambda h, version=None: types.SimpleNamespace(
                total=80 * 2**30, used=(h + 1) * 2**30, free=0, reserved=0),
            "nvmlDeviceGetUtilizationRates": lambda h: types.SimpleNamespace(gpu=40 + h, memory=0),
            "nvmlDeviceGetTemperature": lambda h, s: 50 if h == 0 else unsupported()}
    for name, value in fake.items():
        monkeypatch.setattr(pynvml, name, value)
    samples = gpu_samples(client.get("/metrics", headers=AUTH).get_data(as_text=True))
    assert samples[("gpu_bridge_gpu_available", ())] == 1.0
    first, second = (("gpu", "0"), ("name", "NVIDIA H100 #0")), (("gpu", "1"), ("name", "NVIDIA H100 #1"))
    assert samples[("gpu_bridge_gpu_memory_total_bytes", first)] == 80 * 2**30
    assert samples[("gpu_bridge_gpu_memory_used_bytes", second)] == 2 * 2**30
    assert samples[("gpu_bridge_gpu_utilization_percent", second)] == 41
    assert samples[("gpu_bridge_gpu_temperature_celsius", first)] == 50
    assert ("gpu_bridge_gpu_temperature_celsius", second) not in samples, "left out, not exported as 0"


def gpu_samples(text: str) -> dict:
    """{(sample name, sorted labels): value} of the gpu_bridge_gpu_* series in a scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) if family.name.startswith("gpu_bridge_gpu_")
            for s in family.samples}


def test_metrics_without_nvml_say_no_gpu(client, monkeypatch):
    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    samples = gpu_samples(client.get("/metrics", headers=AUTH).get_data(as_text=True))
    assert samples == {("gpu_bridge_gpu_available", ()): 0.0}


@pytest.mark.parametrize(("ttl", "computed"), [(3600, 1), (0, 3)])
def test_health_probes_are_cached_for_their_ttl_and_hand_out_copies(ttl, computed):
    calls = []
    cache = TtlCache(lambda: calls.append(1) or {"devices": [{"name": "x"}]}, ttl)
    first = cache.get()
    first["devices"][0]["name"] = "changed by a caller"
    assert [cache.get(), cache.get()] == [{"devices": [{"name": "x"}]}] * 2
    assert len(calls) == computed
