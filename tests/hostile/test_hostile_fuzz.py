"""Property-based fuzzing of model names, ids, query strings, headers and JSON bodies on every route of
both services. Each input has one right answer, computed here from ``gpu_bridge.names`` and the
documented rules: no 5xx other than the intended 502/503/504 naming a GPU host, and no invalid name
ever accepted.

GPU server: Flask test client, a real Ollama emulator process behind it.
Backend: Flask test client, (a) the GPU host at a closed port (every valid request ends in a host
failure), (b) a real GPU server process behind it (valid names start pulls).
"""

from __future__ import annotations

import json
import re

import pytest
from hostile_helpers import (
    ADMIN_AUTH,
    GPU_AUTH,
    GPU_TOKEN,
    HOST_FAILURE_STATUSES,
    backend_config,
    gpu_config,
    gunicorn,
    json_values,
    latin1_text,
    name_verdict,
    names_strategy,
    path_of,
    route_miss_allowed,
    route_miss_certain,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_bridge import names
from gpu_bridge.backend import create_app as create_backend
from gpu_bridge.config import DEFAULT_ALLOWED_REGISTRIES
from gpu_bridge.errors import InvalidModelName, RegistryNotAllowed
from gpu_bridge.gpu_server import create_app as create_gpu_server
from support.procs import emulator_control, free_port

pytestmark = pytest.mark.integration

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                database=None, derandomize=False)
SMALL = settings(FUZZ, max_examples=60)
# One pattern for both services (the backend forwards its request ids to the GPU hosts).
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
BODY_LIMIT = 2048


def _json(response) -> dict:
    assert response.mimetype == "application/json", f"{response.status_code} not JSON: {response.data[:200]!r}"
    body = response.get_json()
    assert isinstance(body, dict)
    return body


def _no_unintended_5xx(response, label: str | None = None) -> dict:
    body = _json(response)
    assert response.status_code < 500 or response.status_code in HOST_FAILURE_STATUSES, \
        f"server error {response.status_code}: {body}"
    if response.status_code >= 500:
        assert label is not None, f"a 5xx where no GPU host is involved: {body}"
        hosts = body.get("hosts") or body.get("host")
        assert hosts and label in (hosts if isinstance(hosts, list | dict) else [hosts]), \
            f"a {response.status_code} that does not name the host {label}: {body}"
    return body


# ====================================== GPU server ==============================================================
@pytest.fixture(scope="module")
def gpu_client(module_emulator):
    emulator_control(module_emulator, "reset")
    emulator_control(module_emulator, "config", {"pull_speed": 5e9, "verify_seconds": 0})
    app = create_gpu_server(gpu_config(module_emulator.url, GPU_BRIDGE_MAX_BODY_BYTES=BODY_LIMIT))
    app.testing = True
    yield app.test_client()
    app.extensions["gpu_bridge"].close()
    emulator_control(module_emulator, "reset")


@FUZZ
@given(name=names_strategy)
def test_gpu_pull_accepts_exactly_the_valid_names(gpu_client, name):
    r = gpu_client.post(f"/api/models/{path_of(name)}", headers=GPU_AUTH)
    body = _no_unintended_5xx(r)
    verdict = name_verdict(name)
    if route_miss_certain(name) or (route_miss_allowed(name) and r.status_code == 404):
        assert (r.status_code, body["code"]) == (404, "not_found") and verdict is not None, (name, body)
    elif verdict is None:
        assert r.status_code == 202, (name, body)
        # A pull that joined the running pull of the same model (names are case-insensitive) shows its spelling.
        expected = names.parse(name).display
        assert body["model"] == expected or (body["joined"] and names.same_model(body["model"], expected)), body
        assert body["state"] in ("queued", "running", "failed", "succeeded")
        assert r.headers["Location"] == f"/api/jobs/{body['id']}"
    else:
        assert (r.status_code, body["code"]) == (400, verdict), (name, body)


@FUZZ
@given(name=names_strategy)
def test_gpu_delete_accepts_exactly_the_valid_names(gpu_client, name):
    r = gpu_client.delete(f"/api/models/{path_of(name)}", headers=GPU_AUTH)
    body = _no_unintended_5xx(r)
    missed = route_miss_allowed(name) and (r.status_code, body["code"]) == (404, "not_found")
    if route_miss_certain(name) or missed:
        assert (r.status_code, body["code"]) == (404, "not_found") and name_verdict(name) is not None, (name, body)
    elif name_verdict(name, None) is None:  # delete fetches nothing: no registry allow-list
        assert (r.status_code, body.get("code")) in ((200, None), (404, "model_not_found")), (name, body)
        if r.status_code == 200:
            assert body == {"deleted": names.parse(name).display}
    else:
        assert (r.status_code, body["code"]) == (400, "invalid_model_name"), (name, body)


@FUZZ
@given(job_id=st.one_of(st.text(max_size=40), st.from_regex(r"[0-9a-f]{32}", fullmatch=True)),
       method=st.sampled_from(["GET", "DELETE"]))
def test_gpu_unknown_job_ids(gpu_client, job_id, method):
    r = gpu_client.open(f"/api/jobs/{path_of(job_id)}", method=method, headers=GPU_AUTH)
    body = _no_unintended_5xx(r)
    if job_id == "" or "/" in job_id:
        assert (r.status_code, body["code"]) == (404, "not_found"), (job_id, body)
    else:
        assert (r.status_code, body["code"]) == (404, "job_not_found"), (job_id, body)


@SMALL
@given(wait=st.one_of(latin1_text, st.sampled_from(["true", "TRUE", "1", "yes", "on", "false", "0", "no", "off", ""])))
def test_gpu_pull_wait_flag(gpu_client, wait):
    # An unknown model: with wait=true the answer is the failed job's status (404 model_not_found).
    r = gpu_client.post("/api/models/no-such-model:v1", query_string={"wait": wait}, headers=GPU_AUTH)
    body = _no_unintended_5xx(r)
    flag = wait.strip().lower()
    if flag in ("1", "true", "yes", "on"):
        assert (r.status_code, body["code"]) == (404, "model_not_found") and body["job"]["state"] == "failed", body
    elif flag in ("", "0", "false", "no", "off"):
        assert r.status_code == 202, body
    else:
        assert (r.status_code, body["code"]) == (400, "invalid_request"), body


@FUZZ
@given(authorization=latin1_text, request_id=latin1_text,
       route=st.sampled_from(["/api/models", "/api/jobs", "/api/ready", "/metrics", "/api/openapi.json",
                              "/api/health"]))
def test_gpu_headers(gpu_client, authorization, request_id, route):
    r = gpu_client.get(route, headers={"Authorization": authorization, "X-Request-ID": request_id})
    assert r.status_code < 500, (authorization, r.data[:200])
    if not REQUEST_ID.fullmatch(request_id):  # what the document excludes is a 400, with an id of our own
        assert (r.status_code, _json(r)["code"]) == (400, "invalid_request"), (request_id, r.data[:200])
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"])
        return
    scheme, _, given_token = authorization.partition(" ")
    if route == "/api/health" or (scheme.lower() == "bearer" and given_token.strip() == GPU_TOKEN):
        assert r.status_code == 200
    else:
        assert r.status_code == 401 and _json(r)["code"] == "unauthorized"
    assert r.headers["X-Request-ID"] == request_id


@SMALL
@given(body=st.one_of(st.binary(max_size=3 * BODY_LIMIT), json_values.map(lambda v: json.dumps(v).encode())),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "multipart/form-data", "application/octet-stream"]),
       route=st.sampled_from(["/api/models/no-such-model:v1", "/api/models/../../etc", "/api/jobs/abc"]),
       method=st.sampled_from(["POST", "DELETE"]))
def test_gpu_ignores_or_limits_bodies(gpu_client, body, content_type, route, method):
    r = gpu_client.open(route, method=method, data=body, content_type=content_type, headers=GPU_AUTH)
    answer = _no_unintended_5xx(r)
    if len(body) > BODY_LIMIT:
        assert (r.status_code, answer["code"]) == (413, "payload_too_large"), answer
    else:  # the routes read no body: the same answer as without one
        bare = gpu_client.open(route, method=method, headers=GPU_AUTH)
        assert (r.status_code, answer.get("code")) == (bare.status_code, _json(bare).get("code")), answer


# ====================================== backend, GPU host down ==================================================
@pytest.fixture(scope="module")
def dead_backend(tmp_path_factory):
    """The GPU host is a closed port: a valid request always ends in a host failure (503 naming it)."""
    port = free_port()
    label = f"127.0.0.1:{port}"
    app = create_backend(backend_config(label, tmp_path_factory.mktemp("fuzz") / "backend.db",
                                        GPU_BRIDGE_BREAKER_THRESHOLD="1", GPU_BRIDGE_BREAKER_COOLDOWN="3600"))
    app.testing = True
    return app.test_client(), label


def _backend_verdict(body: object, *, label: str, with_wait: bool) -> str | None:
    """The first problem of a pull/delete body as the backend must report it (code), or None."""
    if not isinstance(body, dict):
        return "invalid_request"
    model = body.get("model", body.get("name"))
    if not isinstance(model, str):
        return "invalid_request"
    if name_verdict(model, None) is not None:
        return "invalid_model_name"
    if with_wait and names_verdict_for_pull(model) is not None:
        return "registry_not_allowed"
    hosts = body.get("hosts")  # JSON only now: absent, null or an array, as the document says
    if hosts is not None and hosts != []:
        if not isinstance(hosts, list) or not all(isinstance(h, str) and h.strip() for h in hosts):
            return "invalid_request"
        if any(h.strip() not in (label, label.split(":")[0]) for h in hosts):
            return "invalid_request"
    if with_wait and not isinstance(body.get("wait", False), bool):
        return "invalid_request"
    return None


def names_verdict_for_pull(model: str) -> str | None:
    """A pull also meets the registry allow-list (the backend applies the GPU hosts' default)."""
    try:
        names.validate(model, DEFAULT_ALLOWED_REGISTRIES)
    except RegistryNotAllowed:
        return "registry_not_allowed"
    return None


_hosts_values = st.one_of(st.none(), st.just([]), st.just(""), st.text(max_size=12),
                          st.lists(st.one_of(st.sampled_from(["127.0.0.1", "", " ", "gpu-9", "127.0.0.1:1"]),
                                             st.text(max_size=10)), max_size=3), json_values)
_model_bodies = st.fixed_dictionaries({}, optional={
    "model": st.one_of(names_strategy, json_values), "name": names_strategy, "hosts": _hosts_values,
    "wait": st.one_of(st.booleans(), st.sampled_from(["true", "false", "1", "0", "yes", "no", "", "TRUE", "maybe"]),
                      json_values),
    "extra": json_values})


@FUZZ
@given(body=st.one_of(_model_bodies, json_values), route=st.sampled_from(["pull-model", "delete-model"]))
def test_backend_model_bodies(dead_backend, body, route):
    client, label = dead_backend
    r = client.post(f"/config/{route}", json=body, headers=ADMIN_AUTH)
    answer = _no_unintended_5xx(r, label)
    verdict = _backend_verdict(body, label=label, with_wait=route == "pull-model")
    if verdict is not None:
        assert (r.status_code, answer["code"]) == (400, verdict), (body, answer)
    else:
        # Valid: the request reached the (dead) host, so the name passed the grammar.
        assert r.status_code in HOST_FAILURE_STATUSES and answer["hosts"] == [label], (body, answer)
        model = body.get("model", body.get("name"))
        assert answer["model"] == names.parse(model).display


@SMALL
@given(data=st.binary(max_size=300), content_type=st.sampled_from(
    ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""]),
       route=st.sampled_from(["pull-model", "delete-model", "cancel-pull"]))
def test_backend_raw_bodies(dead_backend, data, content_type, route):
    client, label = dead_backend
    r = client.post(f"/config/{route}", data=data, content_type=content_type or None, headers=ADMIN_AUTH)
    answer = _no_unintended_5xx(r, label)
    if content_type != "application/json" and (data.strip() or r.status_code == 415):
        # JSON only (no form a browser could send); an empty multipart body still carries its boundary.
        assert (r.status_code, answer["code"]) == (415, "unsupported_media_type"), answer
        return
    assert r.status_code in (400, 404, *HOST_FAILURE_STATUSES), answer
    if r.status_code >= 500:  # it got to the host: a model name that parses must have been in the body
        assert names.parse(answer["model"]).display == answer["model"]


@FUZZ
@given(body=st.one_of(json_values, st.fixed_dictionaries({"id": st.one_of(st.text(max_size=80), json_values)})))
def test_backend_cancel_unknown_pull(dead_backend, body):
    client, label = dead_backend
    r = client.post("/config/cancel-pull", json=body, headers=ADMIN_AUTH)
    answer = _no_unintended_5xx(r, label)
    pull_id = body.get("id") if isinstance(body, dict) else None
    if not isinstance(pull_id, str) or not pull_id:
        assert (r.status_code, answer["code"]) == (400, "invalid_request"), (body, answer)
    else:
        assert (r.status_code, answer["code"]) == (404, "pull_not_found"), (body, answer)


@FUZZ
@given(pull_id=st.text(max_size=80))
def test_backend_unknown_pull_status(dead_backend, pull_id):
    client, label = dead_backend
    r = client.get(f"/config/pull-status/{path_of(pull_id)}")
    if r.status_code == 308 and pull_id.startswith("/"):
        # Known: the backend merges '//' with an HTML redirect (test_backend_double_slash_is_a_json_404).
        assert r.headers.get("Location"), r.headers
        return
    answer = _no_unintended_5xx(r, label)
    if pull_id == "" or "/" in pull_id:
        assert (r.status_code, answer["code"]) == (404, "not_found"), (pull_id, answer)
    else:
        assert (r.status_code, answer["code"]) == (404, "pull_not_found"), (pull_id, answer)


@FUZZ
@given(limit=latin1_text, route=st.sampled_from(["/config/pulls", "/config/audit"]), request_id=latin1_text)
def test_backend_limits_and_request_ids(dead_backend, limit, route, request_id):
    client, label = dead_backend
    r = client.get(route, query_string={"limit": limit}, headers={"X-Request-ID": request_id})
    answer = _no_unintended_5xx(r, label)
    if not REQUEST_ID.fullmatch(request_id):
        assert (r.status_code, answer["code"]) == (400, "invalid_request"), (request_id, answer)
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"])
        return
    try:
        int(limit)
    except ValueError:
        assert (r.status_code, answer["code"]) == (400, "invalid_request"), (limit, answer)
    else:
        assert r.status_code == 200 and isinstance(answer.get("pulls", answer.get("entries")), list)
    assert r.headers["X-Request-ID"] == request_id


@FUZZ
@given(authorization=st.one_of(latin1_text, latin1_text.map(lambda t: f"Bearer {t}")), request_id=latin1_text,
       route=st.sampled_from(["/health", "/api/openapi.json", "/config/pulls", "/config/audit",
                              "POST /config/delete-model", "POST /config/cancel-pull"]))
def test_backend_headers(dead_backend, authorization, request_id, route):
    client, label = dead_backend
    method, _, path = route.rpartition(" ")
    r = client.open(path, method=method or "GET", json={"model": "llama3.2", "id": "x"} if method else None,
                    headers={"Authorization": authorization, "X-Request-ID": request_id})
    answer = _no_unintended_5xx(r, label)
    if not REQUEST_ID.fullmatch(request_id):  # what the document excludes is a 400, with an id of our own
        assert (r.status_code, answer["code"]) == (400, "invalid_request"), (request_id, answer)
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"])
        return
    scheme, _, given_token = authorization.partition(" ")
    if not method:
        assert r.status_code == 200, answer  # reads are open
    elif scheme.lower() == "bearer" and given_token.strip() == ADMIN_AUTH["Authorization"].split(" ", 1)[1]:
        assert r.status_code != 401, answer
    else:
        assert (r.status_code, answer["code"]) == (401, "unauthorized"), (authorization, answer)
    assert r.headers["X-Request-ID"] == request_id


@SMALL
@given(refresh=latin1_text)
def test_backend_listing_with_dead_host(dead_backend, refresh):
    client, label = dead_backend
    r = client.get("/config/models", query_string={"refresh": refresh})
    answer = _no_unintended_5xx(r, label)
    if refresh not in ("true", "false"):  # the document types it boolean: anything else is a 400
        assert (r.status_code, answer["code"]) == (400, "invalid_request"), (refresh, answer)
        return
    # Nothing was ever cached: 503 with every host's status, naming the dead host.
    assert r.status_code == 503 and answer["code"] in ("gpu_unreachable", "gpu_circuit_open"), answer
    assert answer["hosts"][label]["ok"] is False


# ====================================== backend in front of a real GPU server ===================================
@pytest.fixture(scope="module")
def live_backend(module_emulator, tmp_path_factory):
    emulator_control(module_emulator, "reset")
    emulator_control(module_emulator, "config", {"pull_speed": 5e9, "verify_seconds": 0})
    gpu = gunicorn("gpu_bridge.gpu_server:create_app()", gpu_config(module_emulator.url), probe="/api/health",
                   name="gpu-server", access_log=False)
    label = f"127.0.0.1:{gpu.port}"
    app = create_backend(backend_config(label, tmp_path_factory.mktemp("fuzz-live") / "backend.db"))
    app.testing = True
    yield app.test_client(), label
    gpu.stop()
    emulator_control(module_emulator, "reset")


@SMALL
@given(name=names_strategy)
def test_backend_and_gpu_server_agree_on_names(live_backend, name):
    client, label = live_backend
    r = client.post("/config/pull-model", json={"model": name}, headers=ADMIN_AUTH)
    answer = _no_unintended_5xx(r, label)
    if name_verdict(name, None) is not None:
        assert (r.status_code, answer["code"]) == (400, "invalid_model_name"), (name, answer)
        return
    registry = name_verdict(name)  # the GPU host's registry allow-list, which the backend applies first
    if registry is not None:
        assert (r.status_code, answer["code"]) == (400, registry), (name, answer)
        assert "results" not in answer, answer  # refused before any GPU host was asked
    else:
        result = answer["results"][label]
        assert r.status_code == 202 and result["ok"] is True, (name, answer)
        assert names.same_model(result["job"]["model"], names.parse(name).display), (name, answer)


def test_backend_double_slash_is_a_json_404(dead_backend):
    """Werkzeug's slash merging would answer an HTML redirect and could turn id %2Fabc into abc."""
    client, _ = dead_backend
    for path in ("/config//models", "/config/pull-status//abc", "/config/pull-status/%2Fabc"):
        r = client.get(path)
        assert r.status_code == 404 and r.mimetype == "application/json", (path, r.status_code, r.data[:80])


@settings(FUZZ, max_examples=1000)
@given(name=names_strategy)
def test_names_we_accept_ollama_accepts(name):
    """An independent check of the grammar: whatever gpu_bridge.names accepts, Ollama's parser (as the
    emulator implements it from Ollama's source) accepts too, with the same parts."""
    import ollama_emulator

    try:
        ours = names.parse(name)
    except InvalidModelName:
        return
    theirs = ollama_emulator.parse_name(name)
    assert theirs is not None, f"{name!r} accepted by gpu_bridge.names but not by Ollama's grammar"
    assert (ours.host, ours.namespace, ours.model, ours.tag) == (theirs.host, theirs.namespace, theirs.model,
                                                                 theirs.tag)
