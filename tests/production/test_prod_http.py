"""HttpTransport against a local stand-in HTTP server: error classification, safe retries, timeouts,
headers. (Connection reuse and the real GPU server: test_prod_integration.py; the stand-in, Werkzeug's
development server, closes every connection.)"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from flask import Flask, jsonify, request
from prod_helpers import StandIn
from urllib3.exceptions import NewConnectionError, ProtocolError, ReadTimeoutError

from gpu_bridge.client.http import HttpTransport, current_request_id
from gpu_bridge.client.http_session import retry_policy
from gpu_bridge.config import ClientSettings, GpuHost
from gpu_bridge.errors import (
    Conflict,
    GpuHostError,
    GpuHostTimeout,
    GpuHostUnauthorized,
    GpuHostUnreachable,
    InvalidModelName,
    JobNotFound,
    ModelNotFound,
    PullStalled,
    QueueFull,
    RegistryNotAllowed,
)
from support.procs import free_port

TOKEN = "s3cret-token"
JOB = {"id": "j1", "model": "tinyllama:latest", "state": "queued", "completed": 0, "total": 0, "percent": None,
       "status": "queued", "error": None, "error_code": None}


def make_app():
    app = Flask("standin")
    app.hits = []
    app.ports = []
    app.slow = threading.Event()
    app.flaky_deleted = False
    app.started = {}

    @app.before_request
    def record():
        app.hits.append((request.method, request.path, dict(request.headers)))
        app.ports.append(request.environ.get("REMOTE_PORT"))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}" and request.path != "/api/health":
            return jsonify(error="missing or invalid token", code="unauthorized"), 401
        if app.slow.is_set() and request.path != "/api/health":
            time.sleep(0.6)
        return None

    @app.get("/api/health")
    def health():
        return jsonify(status="ok", ollama={"reachable": True})

    @app.get("/api/models")
    def models():
        return jsonify(models=[{"name": "llama3.2:latest", "size": 1}])

    @app.post("/api/models/<path:name>")
    def pull(name):
        if name == "stalls:latest":
            return jsonify(error="no progress for 300 s", code="pull_stalled", job={**JOB, "state": "failed"}), 504
        if name == "busy:latest":
            resp = jsonify(error="too many queued pulls", code="queue_full")
            resp.headers["Retry-After"] = "7"
            return resp, 429
        if name == "evil.example/x/y:latest":
            return jsonify(error="registry not allowed", code="registry_not_allowed"), 400
        job_id = f"job-{len(app.started)}"
        app.started[job_id] = name
        return jsonify({**JOB, "id": job_id, "model": name}), 202

    @app.delete("/api/models/<path:name>")
    def delete(name):
        if name == "flaky:latest":  # deletes, but answers too late; the retry then finds nothing
            if app.flaky_deleted:
                return jsonify(error=f"model '{name}' not found", code="model_not_found"), 404
            app.flaky_deleted = True
            time.sleep(0.6)
            return jsonify(deleted=name)
        if name == "ghost:latest":
            return jsonify(error=f"model '{name}' not found", code="model_not_found"), 404
        if name == "sick:latest":
            return jsonify(error="cannot reach Ollama", code="ollama_unavailable"), 503
        return jsonify(deleted=name)

    @app.get("/api/jobs/<job_id>")
    def job(job_id):
        if job_id == "nope":
            return jsonify(error="job nope not found", code="job_not_found"), 404
        if job_id in app.started:  # a pull someone waits for: done at the first poll
            return jsonify({**JOB, "id": job_id, "model": app.started[job_id], "state": "succeeded"})
        return jsonify({**JOB, "id": job_id})

    @app.delete("/api/jobs/<job_id>")
    def cancel(job_id):
        return jsonify(error="job already finished", code="conflict"), 409

    @app.get("/html")
    def html():
        return "<html>oops</html>", 500

    return app


@pytest.fixture(scope="module")
def standin():
    app = make_app()
    server = StandIn(app)
    server.app = app
    yield server
    server.stop()


@pytest.fixture
def transport(standin):
    standin.app.hits.clear()
    standin.app.ports.clear()
    standin.app.slow.clear()
    host = GpuHost("127.0.0.1", standin.port)
    t = HttpTransport(host, ClientSettings(hosts=(host,), api_token=TOKEN, read_timeout=0.3, retries=2))
    yield t
    t.close()
    standin.app.slow.clear()


def test_happy_paths_return_server_shapes(transport):
    assert transport.list_models() == [{"name": "llama3.2:latest", "size": 1}]
    assert transport.start_pull("tinyllama")["model"] == "tinyllama:latest"
    assert transport.pull_and_wait("tinyllama:latest")["state"] == "succeeded"
    assert transport.get_job("abc")["id"] == "abc"
    assert transport.delete_model("llama3.2") == {"deleted": "llama3.2:latest"}
    assert transport.health()["status"] == "ok"


def test_names_with_slashes_and_tags_reach_the_path_route(transport, standin):
    transport.start_pull("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M")
    assert standin.app.hits[-1][1] == "/api/models/hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"


def test_invalid_name_is_refused_before_anything_is_sent(transport, standin):
    for bad in ("../../etc/passwd", "a b", "", "mödel"):
        with pytest.raises(InvalidModelName):
            transport.start_pull(bad)
    assert standin.app.hits == []


def test_token_and_request_id_are_sent(transport, standin):
    token = current_request_id.set("req-123")
    try:
        transport.list_models()
    finally:
        current_request_id.reset(token)
    headers = standin.app.hits[-1][2]
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["X-Request-Id"] == "req-123"


def test_refused_connection_names_host_and_service():
    port = free_port()
    host = GpuHost("127.0.0.1", port)
    t = HttpTransport(host, ClientSettings(hosts=(host,), retries=2))
    started = time.monotonic()
    with pytest.raises(GpuHostUnreachable) as info:
        t.start_pull("tinyllama")  # POST: refused is retried too (nothing was sent), then classified
    assert time.monotonic() - started < 2
    assert info.value.host == f"127.0.0.1:{port}"
    assert info.value.message == f"127.0.0.1:{port} refused the connection: is gpu-http-server.service running?"
    assert info.value.code == "gpu_unreachable" and info.value.status == 503


def test_retry_policy_only_retries_what_is_safe():
    policy = retry_policy(2)
    refused = NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused")
    # Refused: nothing was sent, so even a POST (a pull) is retried.
    assert policy.increment(method="POST", url="/api/models/x", error=refused).connect == 1
    read_timeout = ReadTimeoutError(None, "/api/models/x", "read timed out")
    with pytest.raises(ReadTimeoutError):
        policy.increment(method="POST", url="/api/models/x", error=read_timeout)  # never a blind pull retry
    # A read timeout is not retried either, on any method: the host did not answer in time and will
    # not answer the next try sooner (a retry tripled a hung host's cost to every listing).
    for method in ("GET", "DELETE"):
        with pytest.raises(ReadTimeoutError):
            policy.increment(method=method, url="/api/models", error=read_timeout)
    dropped = ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))
    assert policy.increment(method="GET", url="/api/models", error=dropped).read == 1


def test_read_timeout_on_get_is_classified_and_not_retried(transport, standin):
    standin.app.slow.set()
    started = time.monotonic()
    with pytest.raises(GpuHostTimeout) as info:
        transport.list_models()
    elapsed = time.monotonic() - started
    msg = info.value.message
    assert "did not answer GET /api/models within 0.3 s (read timeout, GPU_BRIDGE_READ_TIMEOUT)" in msg
    assert info.value.code == "gpu_timeout" and info.value.status == 504
    gets = [h for h in standin.app.hits if h[1] == "/api/models"]
    assert len(gets) == 1, "a read timeout is not retried"
    assert elapsed < 0.3 * 2, elapsed  # one timeout, not three


def test_read_timeout_on_pull_is_not_retried(transport, standin):
    standin.app.slow.set()
    with pytest.raises(GpuHostTimeout, match="read timeout"):
        transport.start_pull("tinyllama")
    posts = [h for h in standin.app.hits if h[0] == "POST"]
    assert len(posts) == 1, "a pull must never be retried blindly"


def test_connect_timeout_is_not_retried():
    # A listening socket whose accept queue is full drops further SYNs: connects time out.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
        time.sleep(0.1)
        host = GpuHost("127.0.0.1", port)
        t = HttpTransport(host, ClientSettings(hosts=(host,), connect_timeout=0.3, retries=2))
        started = time.monotonic()
        with pytest.raises(GpuHostUnreachable) as info:
            t.list_models()
        elapsed = time.monotonic() - started
    finally:
        for c in fillers:
            c.close()
        srv.close()
    assert "did not accept a connection within 0.3 s" in info.value.message
    assert elapsed < 0.9, f"connect timeouts must not be retried ({elapsed:.2f} s)"


def test_wrong_token_is_gpu_unauthorized(standin):
    host = GpuHost("127.0.0.1", standin.port)
    t = HttpTransport(host, ClientSettings(hosts=(host,), api_token="wrong"))
    with pytest.raises(GpuHostUnauthorized) as info:
        t.list_models()
    assert info.value.message == f"token rejected by 127.0.0.1:{standin.port}: GPU_BRIDGE_API_TOKEN must match the " \
                                 "GPU host's"
    assert info.value.code == "gpu_unauthorized"
    t2 = HttpTransport(host, ClientSettings(hosts=(host,), api_token=None))
    with pytest.raises(GpuHostUnauthorized, match="requires a token: set GPU_BRIDGE_API_TOKEN"):
        t2.list_models()


def test_host_error_answers_map_to_our_types(transport, standin):
    label = f"127.0.0.1:{standin.port}"
    with pytest.raises(ModelNotFound) as info:
        transport.delete_model("ghost")
    assert info.value.host == label and info.value.status == 404
    with pytest.raises(JobNotFound):
        transport.get_job("nope")
    with pytest.raises(Conflict):
        transport.cancel_job("j1")
    with pytest.raises(RegistryNotAllowed):
        transport.start_pull("evil.example/x/y")
    with pytest.raises(QueueFull) as qf:
        transport.start_pull("busy")
    assert qf.value.retry_after == 7
    with pytest.raises(GpuHostError) as sick:
        transport.delete_model("sick")
    assert sick.value.code == "ollama_unavailable" and sick.value.status == 503
    assert "check ollama.service" in sick.value.message


def test_failed_wait_pull_keeps_job_and_is_not_a_host_failure(transport):
    with pytest.raises(PullStalled) as info:
        transport.pull_and_wait("stalls")
    assert info.value.extra["job"]["state"] == "failed"
    assert not isinstance(info.value, GpuHostError)


def test_non_json_answer_is_a_host_error(transport, standin):
    with pytest.raises(GpuHostError, match="HTTP 500"):
        transport._request("GET", "/html")
    with pytest.raises(GpuHostError, match="pointing at a gpu-bridge GPU server"):
        transport._request("GET", "/no/such/route")


def test_a_delete_that_answers_too_late_is_a_timeout_and_is_not_retried(transport, standin):
    with pytest.raises(GpuHostTimeout):
        transport.delete_model("flaky")
    deletes = [h for h in standin.app.hits if h[0] == "DELETE"]
    assert len(deletes) == 1
    with pytest.raises(ModelNotFound):  # without a retry, a 404 stays a 404
        transport.delete_model("ghost")


def test_a_token_that_cannot_be_sent_is_a_config_error():
    from gpu_bridge.errors import ConfigError

    host = GpuHost("127.0.0.1", 1)
    with pytest.raises(ConfigError, match="printable ASCII"):
        HttpTransport(host, ClientSettings(hosts=(host,), api_token="t\u00f6ken"))
