"""Both services answer and log alike: they install the same web layer (gpu_bridge/web.py) and the
same log format (gpu_bridge/logs.py). Each case runs against the GPU server and the backend."""

from __future__ import annotations

import json
import logging

import pytest
from hostile_helpers import ADMIN_AUTH, GPU_AUTH, backend_config, gpu_config

from gpu_bridge.backend import create_app as create_backend
from gpu_bridge.gpu_server import create_app as create_gpu_server
from gpu_bridge.logs import CORE_FIELDS, Fields, JsonFormatter, configure_logging, current_request_id
from support.procs import free_port

ACCESS_FIELDS = {"event", "method", "path", "route", "status", "duration_ms", "request_id", "remote"}
SERVICE_NAMES = {"gpu-server": "GPU server", "backend": "backend"}
APP_LOGGERS = {"gpu-server": "gpu_bridge.gpu_server", "backend": "gpu_bridge.backend"}
FOREIGN_PEER = {"REMOTE_ADDR": "192.0.2.50"}  # TEST-NET-1: the backend's admin routes need the token


def _boom():
    logging.getLogger("gpu_bridge.test").info("about to fail")
    raise RuntimeError("secret internal detail")


@pytest.fixture(params=["gpu-server", "backend"])
def service(request, tmp_path):
    """(name, fresh app with a /boom route that logs a line and raises, auth headers, an admin POST path)."""
    closed = f"127.0.0.1:{free_port()}"
    if request.param == "gpu-server":
        app = create_gpu_server(gpu_config(f"http://{closed}"))
        auth, protected = GPU_AUTH, "/api/models/tinyllama"
    else:
        app = create_backend(backend_config(closed, tmp_path / "backend.db"))
        auth, protected = ADMIN_AUTH, "/config/pull-model"
    app.add_url_rule("/boom", "boom", _boom)
    yield request.param, app, auth, protected
    if request.param == "gpu-server":
        app.extensions["gpu_bridge"].close()


class Collect(logging.Handler):
    """Every record of the gpu_bridge loggers, formatted as the services write them."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter("under-test"))
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def logged():
    handler = Collect()
    logger = logging.getLogger("gpu_bridge")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def _assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status and response.mimetype == "application/json", response.data[:300]
    body = response.get_json()
    assert set(body) == {"error", "code"} and body["code"] == code and body["error"], body
    assert response.headers["Cache-Control"] == "no-store"
    return body


def test_request_id_is_echoed_or_generated_and_a_bad_one_is_a_json_400(service):
    _, app, auth, _ = service
    client = app.test_client()
    assert client.get("/boom-not-here", headers={"X-Request-ID": "web-1"}).headers["X-Request-ID"] == "web-1"
    generated = client.get("/nope").headers["X-Request-ID"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    r = client.get("/nope", headers={**auth, "X-Request-ID": "bad id"})
    _assert_error(r, 400, "invalid_request")
    assert r.headers["X-Request-ID"] != "bad id" and len(r.headers["X-Request-ID"]) == 32


def test_werkzeug_errors_have_the_same_json_shape_and_codes(service):
    _, app, auth, protected = service
    client = app.test_client()
    body = _assert_error(client.get("/no/such/route", headers=auth), 404, "not_found")
    assert body["error"] == "no route GET /no/such/route: see /api/openapi.json"
    r = client.put(protected, headers=auth)
    body = _assert_error(r, 405, "method_not_allowed")
    assert body["error"] == f"method PUT is not allowed on {protected}" and "POST" in r.headers["Allow"]
    r = client.post(protected, headers=auth, data=b"x" * (app.config["MAX_CONTENT_LENGTH"] + 1))
    _assert_error(r, 413, "payload_too_large")


def test_a_missing_token_is_the_same_401(service):
    _, app, _, protected = service
    r = app.test_client().post(protected, json={"model": "tinyllama"}, environ_base=FOREIGN_PEER)
    _assert_error(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="gpu-bridge"'


def test_an_unexpected_error_is_a_500_without_details_logged_with_its_request_id(service, logged):
    name, app, auth, _ = service
    r = app.test_client().get("/boom", headers={**auth, "X-Request-ID": "boom-1"})
    body = _assert_error(r, 500, "internal_error")
    assert "secret" not in r.get_data(as_text=True) and "Traceback" not in r.get_data(as_text=True)
    assert body["error"] == f"internal error (request id boom-1): see the {SERVICE_NAMES[name]} log"
    # Every line written while serving the request names it: the route's own, the error, the request line.
    during = [line for line in logged if line.get("request_id") == "boom-1"]
    assert [line["logger"] for line in during] == ["gpu_bridge.test", APP_LOGGERS[name], "gpu_bridge.access"]
    assert during[0]["message"] == "about to fail"
    assert during[1]["event"] == "unhandled_error" and "secret internal detail" in during[1]["traceback"]
    assert during[2]["status"] == 500
    assert current_request_id.get() is None  # reset when the request ended


def test_the_request_line_is_the_same_on_both_services(tmp_path, logged):
    closed = f"127.0.0.1:{free_port()}"
    gpu = create_gpu_server(gpu_config(f"http://{closed}"))
    backend = create_backend(backend_config(closed, tmp_path / "backend.db"))
    try:
        gpu.test_client().get("/api/jobs?token=x", headers={**GPU_AUTH, "X-Request-ID": "same-1"})
        backend.test_client().get("/config/pulls?token=x", headers={"X-Request-ID": "same-2"})
    finally:
        gpu.extensions["gpu_bridge"].close()
    (gpu_line,) = [line for line in logged if line.get("request_id") == "same-1"]
    (backend_line,) = [line for line in logged if line.get("request_id") == "same-2"]
    assert list(gpu_line) == list(backend_line)  # the same fields, in the same order
    assert list(gpu_line)[:len(CORE_FIELDS)] == list(CORE_FIELDS)
    assert set(gpu_line) == {*CORE_FIELDS, *ACCESS_FIELDS}
    assert gpu_line["logger"] == backend_line["logger"] == "gpu_bridge.access"
    assert (gpu_line["message"], backend_line["message"]) == ("GET /api/jobs 200", "GET /config/pulls 200")
    assert (gpu_line["route"], backend_line["route"]) == ("/api/jobs", "/config/pulls")
    assert "token=x" not in json.dumps(logged)  # never the query string


def test_formatter_fields_and_configure_logging(monkeypatch, capsys):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as under gunicorn: no root handler
    package = logging.getLogger("gpu_bridge")
    monkeypatch.setattr(package, "handlers", [])
    configure_logging("first")
    configure_logging("nfs-worker")  # a second call renames, adds nothing
    assert len(package.handlers) == 1
    log = logging.getLogger("gpu_bridge.nfs_worker")
    log.info("claimed %s", "cmd-1", extra={"command": "pull"})
    log.warning(Fields(message="clock skew", event="skew", seconds=31.5, level="not this", time="nor this"))
    token = current_request_id.set("rid-9")
    try:
        log.error("failed", exc_info=ValueError("why"))
    finally:
        current_request_id.reset(token)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [list(line)[:5] for line in lines] == [list(CORE_FIELDS)] * 3
    first, second, third = lines
    assert first["time"].endswith("Z") and first["process"] == "nfs-worker" and first["level"] == "info"
    assert (first["message"], first["command"]) == ("claimed cmd-1", "pull") and "request_id" not in first
    assert (second["message"], second["event"], second["seconds"], second["level"]) == (
        "clock skew", "skew", 31.5, "warning")
    assert second["time"] != "nor this"
    assert third["request_id"] == "rid-9" and "ValueError: why" in third["traceback"]


def test_a_fields_message_reads_as_json_to_any_handler():
    assert json.loads(str(Fields(event="request", status=200))) == {"event": "request", "status": 200}
