"""The GPU server's routes (``/api/*`` and ``/metrics``); shapes in docs/architecture.md."""

from __future__ import annotations

import functools
import logging
import time

from flask import Blueprint, Response, current_app, jsonify, request

from .. import __version__, names
from ..errors import InvalidRequest, OllamaError, OllamaUnavailable, RateLimited
from ..jobs import check_free_space
from .app import EXTENSION, ServerState
from .openapi import build_document

log = logging.getLogger("gpu_bridge.gpu_server")
api = Blueprint("api", __name__)

_TRUE = ("1", "true", "yes", "on")
WAIT_RETRY_AFTER = 5  # seconds; a pull that someone waits for rarely ends sooner
_FALSE = ("", "0", "false", "no", "off")


def _state() -> ServerState:
    return current_app.extensions[EXTENSION]


def rate_limited(view):
    """Routes that change state take a token from the process-wide bucket (429 + Retry-After when empty)."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        state = _state()
        wait = state.limiter.acquire()
        if wait:
            raise RateLimited(f"too many requests that change state: the limit is {state.limiter.per_minute} a "
                              f"minute (GPU_BRIDGE_RATE_LIMIT_PER_MINUTE); retry in {wait} s", retry_after=wait)
        return view(*args, **kwargs)

    return wrapper


def _flag(name: str) -> bool:
    raw = request.args.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise InvalidRequest(f"query parameter {name}={raw!r} must be true or false")


# --- health -------------------------------------------------------------------------------------
@api.get("/api/health")
def health():
    state = _state()
    ollama = state.ollama_probe.status()
    gpu = state.gpu.snapshot()
    return jsonify({
        "status": "ok" if ollama["reachable"] and gpu["available"] else "degraded",
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - state.started, 1),
        "ollama": ollama,
        "gpu": gpu,
        "pulls": state.jobs.counts(),
    })


@api.get("/api/ready")
def ready():
    state = _state()
    try:
        state.adapter.version(read_timeout=state.probe_read_timeout())
    except OllamaError as exc:
        raise OllamaUnavailable(f"not ready: {exc.message}") from None
    return jsonify({"ready": True})


# --- models -------------------------------------------------------------------------------------
@api.get("/api/models")
def list_models():
    return jsonify({"models": _state().adapter.list_models()})


@api.post("/api/models/<path:name>")
@rate_limited
def pull_model(name: str):
    state = _state()
    # Werkzeug decoded %2F before routing: the decoded name is what the grammar checks.
    parsed = names.validate(name, state.settings.allowed_registries)
    wait = _flag("wait")
    # A wait slot is taken before anything starts: a refused wait starts no pull.
    if wait and not (state.settings.max_waiting_pulls and state.wait_slots.acquire(blocking=False)):
        raise RateLimited(f"{state.settings.max_waiting_pulls} requests already wait for pulls to finish "
                          "(GPU_BRIDGE_MAX_WAITING_PULLS): start the pull without ?wait=true and poll "
                          "GET /api/jobs/<id>", retry_after=WAIT_RETRY_AFTER, code="too_many_waits")
    try:
        return _start_pull(state, parsed.display, wait)
    finally:
        if wait:
            state.wait_slots.release()


def _start_pull(state: ServerState, name: str, wait: bool):
    if state.jobs.find_active(name) is None:
        check_free_space(state.settings.ollama_models_dir, state.settings.min_free_bytes)  # joining needs none
    job, joined = state.jobs.submit(name)
    headers = {"Location": f"/api/jobs/{job.id}"}
    if not wait:
        return jsonify({**job.to_dict(), "joined": joined}), 202, headers
    # Bounded by stall detection (a pull without progress fails), not by a fixed total deadline.
    job = state.jobs.wait(job.id)
    body = {**job.to_dict(), "joined": joined}
    if job.state == "succeeded":
        return jsonify(body), 200, headers
    response = jsonify({"error": job.error or f"pull {job.state}", "code": job.error_code or "ollama_error",
                        "job": body})
    response.status_code = job.error_status or 502
    response.headers.update(headers)
    return response


@api.delete("/api/models/<path:name>")
@rate_limited
def delete_model(name: str):
    # Deleting fetches nothing, so the registry allow-list does not apply; the grammar does.
    parsed = names.parse(name)
    _state().adapter.delete(parsed.display)
    return jsonify({"deleted": parsed.display})


# --- jobs ---------------------------------------------------------------------------------------
@api.get("/api/jobs")
def list_jobs():
    return jsonify({"jobs": [job.to_dict() for job in _state().jobs.list()]})


@api.get("/api/jobs/<job_id>")
def get_job(job_id: str):
    return jsonify(_state().jobs.get(job_id).to_dict())


@api.delete("/api/jobs/<job_id>")
@rate_limited
def cancel_job(job_id: str):
    return jsonify(_state().jobs.cancel(job_id).to_dict())


# --- metrics and description --------------------------------------------------------------------
@api.get("/metrics")
def metrics():
    body, content_type = _state().metrics.render()
    return Response(body, content_type=content_type)


@api.get("/api/openapi.json")
def openapi():
    return jsonify(build_document(__version__, _state().settings.allowed_registries))


__all__ = ["api"]
