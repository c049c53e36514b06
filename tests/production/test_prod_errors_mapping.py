"""The one mapping from a GPU host's error answer to our error types (client/wire_errors.py), and that
both transports go through it: the same body gives the same exception over HTTP and over NFS."""

from __future__ import annotations

import json

import pytest
import requests

from gpu_bridge import errors
from gpu_bridge.client.http_errors import answer_error
from gpu_bridge.client.nfs import NfsTransport
from gpu_bridge.client.wire_errors import (
    HOST_DOWN_CODES,
    STATUS_TYPES,
    WIRE_TYPES,
    error_from_wire,
    job_error,
    retry_seconds,
)
from gpu_bridge.config import BackendSettings, ClientSettings, GpuHost, NfsSettings

HOST = GpuHost("gpu-01", 8001)
LABEL = "gpu-01:8001"


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


@pytest.mark.parametrize("code", sorted(set(WIRE_TYPES) - HOST_DOWN_CODES))
def test_each_wire_code_keeps_its_errors_py_class(code):
    cls = WIRE_TYPES[code]
    exc = error_from_wire({"error": "it went wrong", "code": code}, host=HOST, status=cls.status)
    assert type(exc) is cls
    assert (exc.code, exc.status, exc.host) == (code, cls.status, LABEL)
    assert exc.message == f"{LABEL}: it went wrong"
    assert not isinstance(exc, errors.GpuHostError), "an answer about the request is not a sick host"


def test_every_errors_py_class_is_either_on_the_wire_or_deliberately_not():
    """A new class in errors.py (the next issues add some) must be placed: answered by GPU hosts and
    kept as its type here (WIRE_TYPES), or not. This fails until someone decides."""
    ours = {cls for cls in _subclasses(errors.GpuBridgeError) if cls.__module__ == "gpu_bridge.errors"}
    production_side = {cls for cls in ours if issubclass(cls, errors.GpuHostError | errors.ChannelError
                                                         | errors.ConfigError)}
    # Refusals the HTTP layer maps itself (401) or the status fallback covers (403, 404, 415).
    by_status = {errors.Unauthorized, errors.Forbidden, errors.NotFound, errors.UnsupportedMediaType}
    assert ours - production_side - by_status == set(WIRE_TYPES.values())
    assert WIRE_TYPES["cancelled"] is errors.Conflict  # a job's error_code, not a class
    assert all(WIRE_TYPES[cls.code] is cls for cls in WIRE_TYPES.values())
    assert {s: cls.status for s, cls in STATUS_TYPES.items()} == {s: s for s in STATUS_TYPES}


@pytest.mark.parametrize(("code", "status"), [("ollama_unavailable", 503), ("ollama_timeout", 504)])
def test_ollama_down_is_a_host_failure_with_a_hint(code, status):
    exc = error_from_wire({"error": "cannot reach Ollama", "code": code}, host=HOST, status=503)
    assert type(exc) is errors.GpuHostError
    assert (exc.code, exc.status) == (code, status)
    assert exc.message == f"{LABEL}: cannot reach Ollama (check ollama.service on gpu-01)"
    assert code in HOST_DOWN_CODES


def test_an_expired_command_is_a_host_timeout():
    exc = error_from_wire({"error": "expired", "code": "command_expired", "status": 504}, host=HOST, status=504)
    assert isinstance(exc, errors.GpuHostTimeout) and exc.code == "command_expired" and exc.status == 504


@pytest.mark.parametrize(("status", "cls", "answered"), [
    (500, errors.GpuHostError, 502),   # a crash reads as a bad gateway
    (503, errors.GpuHostError, 503),
    (None, errors.GpuHostError, 502),  # an NFS answer without a status
    (200, errors.GpuHostError, 502),   # an error cannot be a success
    (302, errors.GpuHostError, 502),
    (400, errors.InvalidRequest, 400),
    (404, errors.NotFound, 404),
    (409, errors.Conflict, 409),
    (413, errors.PayloadTooLarge, 413),
    (429, errors.RateLimited, 429),
    (418, errors.GpuBridgeError, 418),
])
def test_an_unknown_code_falls_back_to_the_status(status, cls, answered):
    exc = error_from_wire({"error": "new kind of trouble", "code": "something_new"}, host=HOST, status=status)
    assert type(exc) is cls
    assert (exc.code, exc.status, exc.host) == ("something_new", answered, LABEL)


@pytest.mark.parametrize("status", [True, "404", 99, 600, 4.04e2])
def test_a_status_that_is_not_an_http_status_is_ignored(status):
    exc = error_from_wire({"error": "x", "code": "something_new"}, host=HOST, status=status)
    assert type(exc) is errors.GpuHostError and exc.status == 502
    known = error_from_wire({"error": "x", "code": "model_not_found"}, host=HOST, status=status)
    assert type(known) is errors.ModelNotFound and known.status == 404  # the class's own


@pytest.mark.parametrize("body", [None, "Internal Server Error", ["error"], 42, {}, {"error": "no code"},
                                  {"code": ""}, {"code": 7, "error": "x"}, {"code": None}])
def test_an_answer_without_a_code_is_not_ours_and_blames_the_host(body):
    exc = error_from_wire(body, host=HOST, status=404)
    assert type(exc) is errors.GpuHostError
    assert (exc.code, exc.status, exc.host) == ("gpu_server_error", 502, LABEL)
    assert exc.message.startswith(f"{LABEL} answered with an error that carries no gpu-bridge code")
    said = error_from_wire(body, host=HOST, not_ours="is it our GPU server?")
    assert said.message == "is it our GPU server?"


def test_a_code_without_a_message_still_says_what_happened():
    assert error_from_wire({"code": "model_not_found"}, host=HOST, status=404).message == \
        f"{LABEL}: error model_not_found (HTTP 404)"
    assert error_from_wire({"code": "model_not_found", "error": 5}, host=HOST).message == \
        f"{LABEL}: error model_not_found"


def test_the_job_travels_in_extra():
    job = {"id": "j1", "state": "failed"}
    exc = error_from_wire({"error": "stalled", "code": "pull_stalled", "job": job}, host=HOST, status=504)
    assert isinstance(exc, errors.PullStalled) and exc.extra == {"job": job}
    assert exc.to_dict()["job"] == job
    assert error_from_wire({"error": "x", "code": "conflict", "job": None}, host=HOST).extra == {}


@pytest.mark.parametrize(("value", "seconds"), [("7", 7), (7, 7), (2.9, 2), ("0.5", 1), (0, 1), (-5, 1),
                                                ("soon", 1), ("inf", 1), (float("nan"), 1), (None, 1),
                                                (True, 1), ({"s": 3}, 1)])
def test_retry_after_from_a_header_or_a_field(value, seconds):
    assert retry_seconds(value) == seconds
    exc = error_from_wire({"error": "full", "code": "queue_full"}, host=HOST, status=429, retry_after=value)
    assert isinstance(exc, errors.QueueFull) and exc.retry_after == seconds


@pytest.mark.parametrize(("job", "cls", "code", "message"), [
    ({"state": "failed", "error": "no progress", "error_code": "pull_stalled"}, errors.PullStalled,
     "pull_stalled", "no progress"),
    ({"state": "failed", "error": "disk full", "error_code": "insufficient_storage"}, errors.InsufficientStorage,
     "insufficient_storage", "disk full"),
    ({"state": "cancelled", "error": None, "error_code": None}, errors.Conflict, "cancelled", "pull cancelled"),
    ({"state": "failed"}, errors.OllamaError, "ollama_error", "pull failed"),
    ({"state": "failed", "error": "?", "error_code": "brand_new"}, errors.OllamaError, "brand_new", "?"),
    ({"state": "failed", "error": "down", "error_code": "ollama_unavailable"}, errors.OllamaUnavailable,
     "ollama_unavailable", "down"),
    ({"state": "failed", "error_code": ["junk"]}, errors.OllamaError, "ollama_error", "pull failed"),
])
def test_a_failed_job_keeps_its_own_type_and_is_never_a_host_failure(job, cls, code, message):
    exc = job_error({"id": "j1", **job}, host=HOST)
    assert type(exc) is cls
    assert (exc.code, exc.host, exc.message) == (code, LABEL, f"{LABEL}: {message}")
    assert exc.extra["job"]["id"] == "j1"
    assert not isinstance(exc, errors.GpuHostError)


# --- both transports use it ------------------------------------------------------------------------

def _http_answer(status: int, body: object, headers: dict | None = None) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp._content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp.headers.update(headers or {})
    return resp


def _over_http(status: int, body: object, headers: dict | None = None) -> errors.GpuBridgeError:
    resp = _http_answer(status, body, headers)
    try:
        decoded = resp.json()
    except ValueError:
        decoded = None
    return answer_error(resp, decoded, "GET", "/api/x", host=HOST, settings=ClientSettings(hosts=(HOST,)), tokens=1)


def _over_nfs(tmp_path, body: dict) -> errors.GpuBridgeError:
    settings = BackendSettings(client=ClientSettings(transport="nfs"), nfs=NfsSettings(root=str(tmp_path)))
    return NfsTransport(HOST, settings)._error(body)


@pytest.mark.parametrize(("status", "body"), [
    (404, {"error": "model 'x' not found", "code": "model_not_found"}),
    (503, {"error": "down", "code": "ollama_unavailable"}),
    (429, {"error": "full", "code": "queue_full"}),
    (504, {"error": "stalled", "code": "pull_stalled", "job": {"id": "j1", "state": "failed"}}),
    (500, {"error": "?", "code": "something_new"}),
    (409, {"error": "?", "code": "something_new"}),
])
def test_the_same_answer_is_the_same_error_on_both_channels(tmp_path, status, body):
    http = _over_http(status, body, {"Retry-After": "9"})
    nfs = _over_nfs(tmp_path, {**body, "status": status, "retry_after": 9})
    assert type(http) is type(nfs)
    assert http.to_dict() == nfs.to_dict()
    assert (http.status, http.message) == (nfs.status, nfs.message)
    assert getattr(http, "retry_after", None) == getattr(nfs, "retry_after", None)


def test_http_only_answers_are_mapped_before_the_shared_mapping():
    assert isinstance(_over_http(401, {"error": "bad token", "code": "unauthorized"}), errors.GpuHostUnauthorized)
    assert isinstance(_over_http(400, {"error": "x", "code": "client_certificate_required"}),
                      errors.GpuHostUnauthorized)
    tls = _over_http(400, {"error": "x", "code": "tls_required"})
    assert type(tls) is errors.GpuHostError and "GPU_BRIDGE_GPU_SCHEME=https" in tls.message
    html = _over_http(500, b"<html>oops</html>")
    assert type(html) is errors.GpuHostError
    assert html.message == f"{LABEL} answered GET /api/x with HTTP 500: check gpu-http-server.service's log on " \
                           "that host"
    assert "pointing at a gpu-bridge GPU server" in _over_http(404, b"Not Found").message
