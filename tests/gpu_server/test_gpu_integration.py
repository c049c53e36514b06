"""The GPU server as deployed: gunicorn (one gthread worker) and the Ollama emulator, as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest
import requests

from gpu_server_helpers import AUTH, TOKEN, check_schema
from support.procs import (
    VENV_BIN,
    ServerProcess,
    emulator_control,
    free_port,
    start_emulator,
    start_gunicorn,
    wait_until,
)

pytestmark = pytest.mark.integration
APP = "gpu_bridge.gpu_server:create_app()"


def server_env(ollama_url: str, **extra) -> dict:
    return {"GPU_BRIDGE_API_TOKEN": TOKEN, "GPU_BRIDGE_OLLAMA_URL": ollama_url,
            "GPU_BRIDGE_OLLAMA_CONNECT_TIMEOUT": "2", **{k: str(v) for k, v in extra.items()}}


@pytest.fixture(scope="module")
def stack(module_emulator):
    """Emulator + GPU server (stall timeout 1 s, rate limit off, room for 3 waiting callers)."""
    server = start_gunicorn(APP, server_env(module_emulator.url, GPU_BRIDGE_PULL_STALL_TIMEOUT=1,
                                            GPU_BRIDGE_RATE_LIMIT_PER_MINUTE=0, GPU_BRIDGE_MAX_BODY_BYTES=2048,
                                            GPU_BRIDGE_MAX_WAITING_PULLS=3),
                            probe="/api/health", name="gpu-server")
    yield module_emulator, server
    server.stop()


@pytest.fixture
def gpu(stack):
    emulator, server = stack
    emulator_control(emulator, "reset")
    session = requests.Session()
    session.headers.update(AUTH)
    yield emulator, server, session
    session.close()


def wait_for_job(session, server, job_id, timeout=15.0):
    def finished():
        job = session.get(f"{server.url}/api/jobs/{job_id}", timeout=5).json()
        return job if job["state"] not in ("queued", "running") else None

    return wait_until(finished, timeout=timeout, what=f"job {job_id}")


def test_concurrent_pulls_of_one_model_share_one_download(gpu):
    emulator, server, session = gpu
    emulator_control(emulator, "config", {"pull_speed": 60e6})  # about a second: the pulls overlap
    barrier, answers = threading.Barrier(4), []

    def pull():
        barrier.wait()
        answers.append(requests.post(f"{server.url}/api/models/tinyllama:latest", headers=AUTH, timeout=10))

    threads = [threading.Thread(target=pull) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert [r.status_code for r in answers] == [202] * 4
    ids = {r.json()["id"] for r in answers}
    assert len(ids) == 1
    assert sorted(r.json()["joined"] for r in answers) == [False, True, True, True]
    assert answers[0].headers["Location"] == f"/api/jobs/{ids.pop()}"
    job = wait_for_job(session, server, answers[0].json()["id"])
    assert job["state"] == "succeeded" and job["completed"] == job["total"] > 0
    assert emulator_control(emulator, "stats")["downloads_started"] == {"tinyllama:latest": 1}


def test_waiting_callers_all_get_the_result_of_one_download(gpu):
    emulator, server, session = gpu
    emulator_control(emulator, "config", {"pull_speed": 100e6})
    results = []

    def pull():
        results.append(requests.post(f"{server.url}/api/models/smollm:135m?wait=true", headers=AUTH, timeout=30))

    threads = [threading.Thread(target=pull) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200] * 3
    assert len({r.json()["id"] for r in results}) == 1
    assert emulator_control(emulator, "stats")["downloads_started"] == {"smollm:135m": 1}


def test_cancel_stops_the_download_in_ollama(gpu):
    emulator, server, session = gpu
    emulator_control(emulator, "config", {"pull_speed": 1e6})
    job = session.post(f"{server.url}/api/models/phi3:mini", timeout=5).json()
    wait_until(lambda: session.get(f"{server.url}/api/jobs/{job['id']}", timeout=5).json()["completed"] > 0,
               what="bytes moving")
    response = session.delete(f"{server.url}/api/jobs/{job['id']}", timeout=5)
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    stats = wait_until(lambda: (s := emulator_control(emulator, "stats"))["cancelled_downloads"] == 1 and s,
                       what="Ollama to cancel the download")
    assert stats["active_downloads"] == [] and "phi3:mini" not in stats["installed"]
    again = session.delete(f"{server.url}/api/jobs/{job['id']}", timeout=5)
    assert again.status_code == 409 and again.json()["code"] == "conflict"


def test_stalled_pull_fails_with_a_clear_error(gpu):
    emulator, server, session = gpu
    emulator_control(emulator, "config", {"stall": "smollm:135m"})
    started = time.monotonic()
    response = session.post(f"{server.url}/api/models/smollm:135m?wait=true", timeout=30)
    assert response.status_code == 504
    body = response.json()
    assert body["code"] == "pull_stalled" and "no download progress for 1 s" in body["error"]
    assert body["job"]["state"] == "failed" and body["job"]["error_code"] == "pull_stalled"
    assert time.monotonic() - started < 10
    wait_until(lambda: emulator_control(emulator, "stats")["active_downloads"] == [], what="stream closed")


def test_failed_pulls_map_ollama_errors(gpu):
    emulator, server, session = gpu
    missing = session.post(f"{server.url}/api/models/no-such-model:1?wait=true", timeout=30)
    assert missing.status_code == 404 and missing.json()["code"] == "model_not_found"
    emulator_control(emulator, "config", {"fail_after_bytes": 5000})
    full = session.post(f"{server.url}/api/models/nomic-embed-text?wait=true", timeout=30)
    assert full.status_code == 507 and full.json()["code"] == "insufficient_storage"


@pytest.mark.parametrize("path", ["/api/models/..%2F..%2Fetc%2Fpasswd", "/api/models/a%00b", "/api/models/a%20b",
                                  "/api/models/%C3%BCnic%C3%B6de", "/api/models/a%2F%2Fb", "/api/models/llama:",
                                  "/api/models/-leading", "/api/models/" + "x" * 1000])
def test_hostile_names_over_http(gpu, path):
    emulator, server, session = gpu
    for method in ("POST", "DELETE"):
        response = session.request(method, server.url + path, timeout=5)
        assert response.status_code == 400, response.text
        assert response.headers["Content-Type"] == "application/json"
        assert response.json()["code"] == "invalid_model_name"
    assert emulator_control(emulator, "stats")["requests"] == 0


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401), ({"Authorization": "Bearer nope"}, 401), ({"Authorization": "Bearer tök€n".encode()}, 401),
    ({"Authorization": b"Bearer \xff\xfe"}, 401), ({"Authorization": TOKEN}, 401), (AUTH, 200),
])
def test_auth_over_http(stack, headers, status):
    _, server = stack
    response = requests.get(f"{server.url}/api/models", headers=headers, timeout=5)
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    if status == 401:
        assert response.json()["code"] == "unauthorized"
    assert requests.get(f"{server.url}/api/health", timeout=5).status_code == 200


def test_health_over_http_reports_ollama_and_gpu(gpu):
    _, server, _ = gpu
    response = requests.get(f"{server.url}/api/health", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["ollama"]["reachable"] is True
    gpu_state = body["gpu"]
    assert isinstance(gpu_state["available"], bool)
    if gpu_state["available"]:  # a machine with a GPU and driver
        assert gpu_state["devices"] and all(d["memory_total_bytes"] for d in gpu_state["devices"])
    else:  # no GPU here: said plainly, still 200
        assert gpu_state["devices"] == [] and gpu_state["error"]
        assert body["status"] == "degraded"


def test_413_404_405_are_json(gpu):
    _, server, session = gpu
    big = session.post(f"{server.url}/api/models/tinyllama", data=b"x" * 4096, timeout=5)
    assert big.status_code == 413 and big.json()["code"] == "payload_too_large"
    for method, path, status, code in (("GET", "/nope", 404, "not_found"), ("GET", "/api/jobs/a/b", 404, "not_found"),
                                       ("POST", "/api/health", 405, "method_not_allowed"),
                                       ("GET", "/api/models/", 404, "not_found")):
        response = session.request(method, server.url + path, timeout=5)
        assert response.status_code == status
        assert response.headers["Content-Type"] == "application/json"
        assert response.json()["code"] == code


def test_openapi_matches_real_answers(gpu):
    _, server, session = gpu
    doc = session.get(f"{server.url}/api/openapi.json", timeout=5).json()
    schemas = doc["paths"]
    checks = [("/api/health", "get", requests.get(f"{server.url}/api/health", timeout=5)),
              ("/api/models", "get", session.get(f"{server.url}/api/models", timeout=5)),
              ("/api/models/{name}", "post", session.post(f"{server.url}/api/models/smollm:135m", timeout=5)),
              ("/api/jobs", "get", session.get(f"{server.url}/api/jobs", timeout=5)),
              ("/api/jobs/{job_id}", "get", session.get(f"{server.url}/api/jobs/nope", timeout=5)),
              ("/api/models/{name}", "delete", session.delete(f"{server.url}/api/models/llama3.2", timeout=5))]
    for path, method, response in checks:
        schema = schemas[path][method]["responses"][str(response.status_code)]["content"]["application/json"]
        problems = check_schema(response.json(), schema["schema"], doc)
        assert not problems, (path, method, response.status_code, problems)


def test_request_log_is_json_with_request_id_and_never_the_token(gpu):
    _, server, session = gpu
    response = session.get(f"{server.url}/api/jobs", headers={"X-Request-ID": "it-log-check-42"}, timeout=5)
    assert response.headers["X-Request-ID"] == "it-log-check-42"
    requests.get(f"{server.url}/api/jobs", headers={"Authorization": "Bearer leaked-if-logged"}, timeout=5)

    def logged():
        lines = [json.loads(line) for line in server.output().splitlines() if line.startswith('{"time"')]
        return [entry for entry in lines if entry.get("request_id") == "it-log-check-42"]

    (entry,) = wait_until(logged, what="the request log line")
    assert (entry["method"], entry["path"], entry["status"]) == ("GET", "/api/jobs", 200)
    assert entry["duration_ms"] >= 0 and entry["remote"] == "127.0.0.1"
    output = server.output()
    assert TOKEN not in output and "leaked-if-logged" not in output


def test_limits_queue_full_and_rate_limit():
    """A second server with tight limits: 1 pull running, 1 queued, 4 state-changing requests a minute."""
    emulator = start_emulator()
    try:
        emulator_control(emulator, "config", {"stall": True})
        server = start_gunicorn(APP, server_env(emulator.url, GPU_BRIDGE_MAX_CONCURRENT_PULLS=1,
                                                GPU_BRIDGE_MAX_QUEUED_PULLS=1, GPU_BRIDGE_RATE_LIMIT_PER_MINUTE=4),
                                probe="/api/health", name="gpu-server-limits")
        try:
            post = [requests.post(f"{server.url}/api/models/{m}", headers=AUTH, timeout=5)
                    for m in ("smollm:135m", "phi3:mini", "tinyllama")]
            assert [r.status_code for r in post] == [202, 202, 429]
            assert post[2].json()["code"] == "queue_full" and int(post[2].headers["Retry-After"]) >= 1
            assert post[1].json()["state"] == "queued"
            cancel = requests.delete(f"{server.url}/api/jobs/{post[1].json()['id']}", headers=AUTH, timeout=5)
            assert cancel.status_code == 200  # the 4th state-changing request
            limited = requests.post(f"{server.url}/api/models/tinyllama", headers=AUTH, timeout=5)
            assert limited.status_code == 429 and limited.json()["code"] == "rate_limited"
            assert int(limited.headers["Retry-After"]) >= 1
            assert requests.get(f"{server.url}/api/jobs", headers=AUTH, timeout=5).status_code == 200
        finally:
            server.stop()
    finally:
        emulator.stop()


def test_ollama_stopped_answers_503_fast():
    emulator = start_emulator()
    server = start_gunicorn(APP, server_env(emulator.url), probe="/api/health", name="gpu-server-down")
    try:
        assert requests.get(f"{server.url}/api/ready", headers=AUTH, timeout=5).status_code == 200
        emulator.stop()
        for path in ("/api/models", "/api/ready"):
            started = time.monotonic()
            response = requests.get(server.url + path, headers=AUTH, timeout=10)
            elapsed = time.monotonic() - started
            assert response.status_code == 503 and response.json()["code"] == "ollama_unavailable"
            assert elapsed < 2.0 + 1.0  # connect timeout + margin: never a hang
        # Health caches its Ollama probe for 1 s: it must say "unreachable" once that has passed.
        health = wait_until(lambda: (h := requests.get(f"{server.url}/api/health", timeout=10).json())
                            ["ollama"]["reachable"] is False and h, timeout=3, what="health to see Ollama down")
        assert health["status"] == "degraded"
        assert "gpu_bridge_ollama_up 0.0" in requests.get(f"{server.url}/metrics", headers=AUTH, timeout=10).text
    finally:
        server.stop()
        emulator.stop()


def test_serve_gpu_command_runs_the_server(module_emulator):
    port = free_port()
    argv = [str(VENV_BIN / "gpu-bridge"), "serve-gpu", "--bind", f"127.0.0.1:{port}", "--threads", "4"]
    server = ServerProcess(argv, port, env=server_env(module_emulator.url), probe="/api/health", name="serve-gpu")
    with server:
        body = requests.get(f"{server.url}/api/health", timeout=5).json()
        assert body["ollama"]["reachable"] is True
        assert requests.get(f"{server.url}/api/models", timeout=5).status_code == 401


@pytest.mark.parametrize(("args", "env", "fragment"), [
    (["--bind", "127.0.0.1:1"], {"GPU_BRIDGE_API_TOKEN": ""}, "no API token"),
    (["--bind", "nonsense"], {"GPU_BRIDGE_API_TOKEN": "t"}, "--bind"),
    (["--bind", "127.0.0.1:1"], {"GPU_BRIDGE_API_TOKEN": "t", "GPU_BRIDGE_PULL_STALL_TIMEOUT": "x"},
     "GPU_BRIDGE_PULL_STALL_TIMEOUT"),
])
def test_serve_gpu_refuses_bad_settings_with_one_line(args, env, fragment):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPU_BRIDGE_") and k != "CREDENTIALS_DIRECTORY"}
    result = subprocess.run([str(VENV_BIN / "gpu-bridge"), "serve-gpu", *args], env={**clean, **env},
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("gpu-bridge: error: ") and result.stderr.count("\n") == 1
    assert fragment in result.stderr
