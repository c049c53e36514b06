"""Every route that changes state requires the token, found by walking each app's ``url_map`` so a new
route cannot slip through; the GPU server also guards every read except ``/api/health``."""

from __future__ import annotations

import pytest
from hostile_helpers import (
    ADMIN_AUTH,
    ADMIN_TOKEN,
    GPU_AUTH,
    GPU_TOKEN,
    STATE_CHANGING,
    backend_config,
)

from gpu_bridge.backend import create_app as create_backend
from support.procs import free_port

SAMPLE_VALUES = {"name": "llama3.2:latest", "job_id": "0123456789abcdef0123456789abcdef",
                 "pull_id": "0123456789abcdef0123456789abcdef", "filename": "index.html"}
# Ways to present no valid token. Header values travel as latin-1, so 'ö' is a non-ASCII byte.
BAD_AUTH = {
    "none": {},
    "empty bearer": {"Authorization": "Bearer "},
    "wrong token": {"Authorization": "Bearer not-the-token"},
    "basic scheme": {"Authorization": "Basic dXNlcjpwYXNz"},
    "token without scheme": {"Authorization": "TOKEN"},
    "non-ascii token": {"Authorization": "Bearer t\u00f6ken\u00ff"},
    "prefix of token": {"Authorization": "Bearer TOKEN_PREFIX"},
}


def _bad_auth(token: str) -> dict[str, dict]:
    out = {}
    for label, headers in BAD_AUTH.items():
        value = headers.get("Authorization")
        if value == "TOKEN":
            value = token
        elif value == "Bearer TOKEN_PREFIX":
            value = f"Bearer {token[:-1]}"
        out[label] = {"Authorization": value} if value is not None else {}
    return out


def _calls(app):
    """(method, path, endpoint) for every rule and method of ``app`` (HEAD and OPTIONS aside)."""
    adapter = app.url_map.bind("localhost")
    for rule in app.url_map.iter_rules():
        values = {arg: SAMPLE_VALUES.get(arg, "x") for arg in rule.arguments}
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            path = adapter.build(rule.endpoint, values, method=method)
            yield method, path, rule.endpoint


@pytest.fixture(scope="module")
def backend_app(tmp_path_factory):
    db = tmp_path_factory.mktemp("auth") / "backend.db"
    app = create_backend(backend_config(f"127.0.0.1:{free_port()}", db, GPU_BRIDGE_BREAKER_THRESHOLD="1",
                                        GPU_BRIDGE_BREAKER_COOLDOWN="3600"))
    app.testing = True
    return app


def _send(client, method: str, path: str, headers: dict, body: dict | None = None):
    return client.open(path, method=method, headers=headers, json=body)


def test_gpu_server_every_route_but_health_requires_the_token(gpu_app):
    client = gpu_app.test_client()
    calls = list(_calls(gpu_app))
    guarded = [(m, p, e) for m, p, e in calls if e != "api.health"]
    state_changing = {(m, e) for m, _, e in calls if m in STATE_CHANGING}
    # The walk found the routes we know of (if this fails, the walk broke, not the auth).
    assert {("POST", "api.pull_model"), ("DELETE", "api.delete_model"), ("DELETE", "api.cancel_job")} <= state_changing
    assert len(guarded) >= 9  # models, pull, delete, jobs, job, cancel, ready, metrics, openapi

    failures = []
    for method, path, _ in guarded:
        for label, headers in _bad_auth(GPU_TOKEN).items():
            r = _send(client, method, path, headers)
            if r.status_code != 401 or r.get_json().get("code") != "unauthorized" \
                    or not r.headers.get("WWW-Authenticate", "").startswith("Bearer"):
                failures.append(f"{method} {path} with {label}: {r.status_code} {r.get_data(as_text=True)[:120]}")
    assert not failures, "\n".join(failures)

    # With the token every state-changing call gets past authentication (so the walk reached real routes).
    for method, path, _ in calls:
        if method in STATE_CHANGING:
            r = _send(client, method, path, GPU_AUTH)
            assert r.status_code != 401, f"{method} {path}: {r.status_code} with the right token"

    r = client.get("/api/health")
    assert r.status_code == 200, "health must stay open (load balancers probe it)"


def test_backend_state_changing_routes_require_the_admin_token(backend_app):
    client = backend_app.test_client()
    calls = [(m, p, e) for m, p, e in _calls(backend_app) if m in STATE_CHANGING]
    endpoints = {e for _, _, e in calls}
    assert {"config.pull_model", "config.delete_model", "config.cancel_pull"} <= endpoints, endpoints

    failures = []
    bodies = [None, {"model": "llama3.2:latest", "id": "x"}, {"model": "not a name!"}]
    for method, path, _ in calls:
        for label, headers in _bad_auth(ADMIN_TOKEN).items():
            for body in bodies:  # authentication comes before reading the body: always 401, never 400
                r = _send(client, method, path, headers, body)
                if r.status_code != 401 or r.get_json().get("code") != "unauthorized":
                    failures.append(f"{method} {path} with {label}, body {body}: {r.status_code} "
                                    f"{r.get_data(as_text=True)[:120]}")
        # The GPU hosts' token is not the admin token.
        r = _send(client, method, path, GPU_AUTH, bodies[1])
        if r.status_code != 401:
            failures.append(f"{method} {path} accepted the GPU token: {r.status_code}")
    assert not failures, "\n".join(failures)

    for method, path, _ in calls:
        r = _send(client, method, path, ADMIN_AUTH, {"model": "llama3.2:latest", "id": "x" * 32})
        assert r.status_code != 401, f"{method} {path}: {r.status_code} with the admin token"


def test_backend_on_loopback_needs_no_admin_token(tmp_path):
    """The documented contract: the admin token is required only when the backend is bound beyond loopback."""
    app = create_backend(backend_config(f"127.0.0.1:{free_port()}", tmp_path / "b.db", bind="127.0.0.1:8000",
                                        GPU_BRIDGE_BREAKER_THRESHOLD="1"))
    r = app.test_client().post("/config/delete-model", json={"model": "llama3.2:latest"})
    assert r.status_code != 401 and r.status_code in (502, 503, 504), r.get_data(as_text=True)
