"""Rows 1, 7, 8, 9 and 10 of the hostile-client table (issue 14), each as the attack it names.

1  made-up HTTP methods, no token          -> /metrics labels stay a fixed set (method "other")
7  a peer beyond loopback, whatever the bind setting says -> the admin token is required
8  form/text bodies, a foreign Origin or Host to the loopback backend -> refused, nothing started
9  deeply nested JSON to the backend        -> 400 with a JSON body, never a 500
10 a chunked body over the limit            -> 413 on both services (sized bodies already were)
"""

from __future__ import annotations

import socket

import pytest
import requests
from hostile_helpers import ADMIN_AUTH, GPU_AUTH, backend_config, gpu_config, gunicorn

from gpu_bridge.backend import create_app as create_backend
from gpu_bridge.request_guard import json_depth
from support.procs import VENV_BIN, QuickStopProcess, free_port

FOREIGN_PEER = "192.0.2.50"  # TEST-NET-1: never this machine


def _loopback_backend(tmp_path, **extra):
    """A backend bound to loopback (as the role deploys it) whose GPU host is a closed port."""
    config = backend_config(f"127.0.0.1:{free_port()}", tmp_path / "backend.db", bind="127.0.0.1:8000",
                            GPU_BRIDGE_BREAKER_THRESHOLD="1", GPU_BRIDGE_BREAKER_COOLDOWN="3600", **extra)
    if "GPU_BRIDGE_BACKEND_TOKEN" in extra and extra["GPU_BRIDGE_BACKEND_TOKEN"] is None:
        config.pop("GPU_BRIDGE_BACKEND_TOKEN")
    app = create_backend(config)
    app.testing = True
    return app


def _pulls(client) -> list:
    r = client.get("/config/pulls")
    assert r.status_code == 200, r.get_json()
    return r.get_json()["pulls"]


# --- row 1 -----------------------------------------------------------------------------------------
def test_made_up_methods_do_not_grow_the_metrics(gpu_app):
    client = gpu_app.test_client()
    for i in range(300):
        r = client.open("/api/models", method=f"BREW{i}")
        assert r.status_code in (401, 405) and r.is_json
    text = client.get("/metrics", headers=GPU_AUTH).get_data(as_text=True)
    assert "BREW" not in text
    other = [line for line in text.splitlines()
             if line.startswith("gpu_bridge_http_requests_total{") and 'method="other"' in line]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in other) == 300
    methods = {line.split('method="', 1)[1].split('"', 1)[0] for line in text.splitlines()
               if line.startswith("gpu_bridge_http_requests_total{")}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}


# --- row 7 -----------------------------------------------------------------------------------------
def test_a_foreign_peer_needs_the_admin_token_although_the_bind_setting_says_loopback(tmp_path):
    app = _loopback_backend(tmp_path)
    client = app.test_client()
    body = {"model": "tinyllama"}
    r = client.post("/config/pull-model", json=body, environ_base={"REMOTE_ADDR": FOREIGN_PEER})
    assert r.status_code == 401 and r.get_json()["code"] == "unauthorized"
    r = client.post("/config/pull-model", json=body, headers=ADMIN_AUTH, environ_base={"REMOTE_ADDR": FOREIGN_PEER})
    assert r.status_code != 401  # the token admits it (the closed GPU port then answers 5xx)
    r = client.post("/config/pull-model", json=body, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert r.status_code != 401  # loopback, as before: no token needed


def test_a_foreign_peer_without_any_admin_token_configured_is_refused_with_what_to_set(tmp_path):
    app = _loopback_backend(tmp_path, GPU_BRIDGE_BACKEND_TOKEN=None)
    r = app.test_client().post("/config/delete-model", json={"model": "tinyllama"},
                               environ_base={"REMOTE_ADDR": FOREIGN_PEER})
    assert r.status_code == 401
    assert "GPU_BRIDGE_BACKEND_TOKEN_FILE" in r.get_json()["error"] and FOREIGN_PEER in r.get_json()["error"]


def _own_address() -> str | None:
    """This machine's own non-loopback address (where the OS routes outwards), if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the source address
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


@pytest.mark.integration
def test_gunicorn_bound_everywhere_by_its_own_flags_still_requires_the_token(tmp_path):
    """gunicorn's own --bind (or GUNICORN_CMD_ARGS) listens on 0.0.0.0 while GPU_BRIDGE_BACKEND_BIND
    still says loopback: the peer address decides."""
    own = _own_address()
    if own is None:
        pytest.skip("this machine has no non-loopback IPv4 address to come from")
    env = backend_config(f"127.0.0.1:{free_port()}", tmp_path / "b.db", bind="127.0.0.1:8000")
    port = free_port()
    argv = [str(VENV_BIN / "gunicorn"), "--bind", f"0.0.0.0:{port}", "--workers", "1", "--worker-class",
            "gthread", "--threads", "4", "--no-control-socket", "gpu_bridge.backend:create_app()"]
    proc = QuickStopProcess(argv, port, env=env, probe="/health", name="backend").start()
    try:
        r = requests.post(f"http://{own}:{port}/config/pull-model", json={"model": "tinyllama"}, timeout=10)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized", r.text
        r = requests.post(f"http://{own}:{port}/config/pull-model", json={"model": "tinyllama"}, timeout=10,
                          headers=ADMIN_AUTH)
        assert r.status_code != 401, r.text
        r = requests.post(f"{proc.url}/config/pull-model", json={"model": "tinyllama"}, timeout=10)
        assert r.status_code != 401, r.text  # from loopback, as before
    finally:
        proc.stop()


# --- row 8 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("headers", "data", "status", "code"), [
    ({"Content-Type": "text/plain"}, '{"model": "tinyllama"}', 415, "unsupported_media_type"),
    ({"Content-Type": "application/x-www-form-urlencoded"}, "model=tinyllama", 415, "unsupported_media_type"),
    ({"Content-Type": "multipart/form-data; boundary=x"},
     '--x\r\nContent-Disposition: form-data; name="model"\r\n\r\ntinyllama\r\n--x--\r\n', 415,
     "unsupported_media_type"),
    ({"Content-Type": "application/json", "Origin": "http://evil.example"}, '{"model": "tinyllama"}', 403,
     "forbidden"),
    ({"Content-Type": "text/plain", "Origin": "null"}, '{"model": "tinyllama"}', 403, "forbidden"),
    ({"Content-Type": "application/json", "Host": "rebound.evil.example:8000"}, '{"model": "tinyllama"}', 403,
     "forbidden"),
], ids=["text-plain", "form", "multipart", "foreign-origin", "null-origin", "dns-rebinding-host"])
def test_browser_shaped_requests_to_the_loopback_backend_start_nothing(tmp_path, headers, data, status, code):
    app = _loopback_backend(tmp_path)
    client = app.test_client()
    for route in ("/config/pull-model", "/config/delete-model", "/config/cancel-pull"):
        r = client.post(route, data=data, headers=headers)
        assert (r.status_code, r.get_json()["code"]) == (status, code), (route, r.get_json())
    assert _pulls(client) == []


def test_the_cli_shape_still_works_on_loopback(tmp_path):
    app = _loopback_backend(tmp_path)
    client = app.test_client()
    r = client.post("/config/pull-model", json={"model": "tinyllama"}, headers={"Host": "127.0.0.1:8000"})
    assert r.status_code not in (401, 403, 415), r.get_json()
    r = client.post("/config/pull-model", json={"model": "tinyllama"}, headers={"Host": "localhost"})
    assert r.status_code not in (401, 403, 415), r.get_json()


def test_a_token_holder_may_use_any_host_name(tmp_path):
    # With the admin token required (a non-loopback bind), the Host header is not what protects it.
    config = backend_config(f"127.0.0.1:{free_port()}", tmp_path / "b.db", GPU_BRIDGE_BREAKER_THRESHOLD="1")
    app = create_backend(config)
    r = app.test_client().post("/config/pull-model", json={"model": "tinyllama"},
                               headers={**ADMIN_AUTH, "Host": "backend.example.internal"})
    assert r.status_code not in (401, 403, 415), r.get_json()


# --- row 9 -----------------------------------------------------------------------------------------
def _nested(kind: str, depth: int) -> str:
    if kind == "arrays":
        return "[" * depth + "]" * depth
    if kind == "objects":
        return '{"a":' * depth + "1" + "}" * depth
    return '{"model": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize("kind", ["arrays", "objects", "inside-model"])
def test_deeply_nested_json_is_a_400_never_a_500(tmp_path, kind):
    app = _loopback_backend(tmp_path)
    client = app.test_client()
    for depth in (33, 100, 1000, 5000, 20000):
        r = client.post("/config/pull-model", data=_nested(kind, depth), content_type="application/json")
        if len(_nested(kind, depth)) > 64 * 1024:
            assert r.status_code == 413, depth
            continue
        assert r.status_code == 400, (depth, r.get_json())
        assert "nests arrays or objects more than 32 deep" in r.get_json()["error"]


def test_json_depth_counts_structure_not_brackets_inside_strings():
    assert json_depth(b'{"model": "[[[[[[[[[[[["}') == 1
    assert json_depth(b'{"a": "\\"[[[", "b": [[1]]}') == 3
    assert json_depth(b"[]") == 1 and json_depth(b'"x"') == 0


# --- row 10 ----------------------------------------------------------------------------------------
def _chunks(total: int, size: int = 64 * 1024):
    """A JSON object followed by spaces, ``total`` bytes in ``size`` chunks (no Content-Length)."""
    yield b'{"model": "tinyllama"}'
    sent = 22
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b" " * n


@pytest.mark.integration
def test_chunked_bodies_obey_the_limit_on_both_services(module_emulator, tmp_path):
    gpu = gunicorn("gpu_bridge.gpu_server:create_app()", gpu_config(module_emulator.url), probe="/api/health",
                   name="gpu-server")
    backend = gunicorn("gpu_bridge.backend:create_app()",
                       backend_config(f"127.0.0.1:{gpu.port}", tmp_path / "b.db", bind="127.0.0.1:8000"),
                       probe="/health", name="backend")
    try:
        for url, headers in ((gpu.url + "/api/models/tinyllama", GPU_AUTH),
                             (backend.url + "/config/pull-model", {})):
            r = requests.post(url, data=_chunks(8 * 1024 * 1024), timeout=30,
                              headers={**headers, "Content-Type": "application/json"})
            assert r.status_code == 413 and r.json()["code"] == "payload_too_large", (url, r.text[:200])
            assert r.request.headers.get("Transfer-Encoding") == "chunked"  # really sent without a length
        # A small chunked body is read whole and served as usual.
        r = requests.post(backend.url + "/config/pull-model", timeout=30, headers={"Content-Type": "application/json"},
                          data=iter([b'{"model": ', b'"tinyllama"}']))
        assert r.status_code in (200, 202), r.text
        assert requests.get(gpu.url + "/api/health", timeout=10).status_code == 200
    finally:
        backend.stop()
        gpu.stop()

