"""The GPU server's routes (``/api/*`` and ``/metrics``); shapes in docs/architecture.md.

Each route is HTTP's translation of one ``GpuService`` operation (gpu_service.py, where the rules
live): query flags, the ``?wait=true`` slots, status codes and headers stay here; what a name, a pull
or a delete means is decided there, the same for the NFS channel.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar, cast

from flask import Blueprint, Response, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from .. import __version__
from ..errors import InvalidRequest, RateLimited
from ..gpu_service import GpuService
from ..request_guard import json_object, read_body, refuse_browser_requests
from .openapi import build_document
from .state import EXTENSION, ServerState

log = logging.getLogger("gpu_bridge.gpu_server")
api = Blueprint("api", __name__)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
WAIT_RETRY_AFTER = 5  # seconds; a pull that someone waits for rarely ends sooner

P = ParamSpec("P")
R = TypeVar("R")


def _state() -> ServerState:
    return cast(ServerState, current_app.extensions[EXTENSION])


def _service() -> GpuService:
    return _state().service


def rate_limited(view: Callable[P, R]) -> Callable[P, R]:
    """Routes that change state take a token from the process-wide bucket (429 + Retry-After when empty)."""

    @functools.wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
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
def health() -> ResponseReturnValue:
    return jsonify(_service().health())


@api.get("/api/ready")
def ready() -> ResponseReturnValue:
    return jsonify(_service().ready())


# --- models -------------------------------------------------------------------------------------
@api.get("/api/models")
def list_models() -> ResponseReturnValue:
    return jsonify({"models": _service().list_models()})


@api.post("/api/models/<path:name>")
@rate_limited
def pull_model(name: str) -> ResponseReturnValue:
    state = _state()
    # Werkzeug decoded %2F before routing: the decoded name is what the grammar checks. A refused
    # name is answered before the wait flag is read or a wait slot taken.
    state.service.model_to_pull(name)
    wait = _flag("wait")
    # A wait slot is taken before anything starts: a refused wait starts no pull.
    if wait and not (state.settings.max_waiting_pulls and state.wait_slots.acquire(blocking=False)):
        raise RateLimited(f"{state.settings.max_waiting_pulls} requests already wait for pulls to finish "
                          "(GPU_BRIDGE_MAX_WAITING_PULLS): start the pull without ?wait=true and poll "
                          "GET /api/jobs/<id>", retry_after=WAIT_RETRY_AFTER, code="too_many_waits")
    try:
        return _start_pull(state.service, name, wait)
    finally:
        if wait:
            state.wait_slots.release()


def _start_pull(service: GpuService, name: str, wait: bool) -> ResponseReturnValue:
    job, joined = service.pull(name)
    headers = {"Location": f"/api/jobs/{job.id}"}
    if not wait:
        return jsonify({**job.to_dict(), "joined": joined}), 202, headers
    job = service.wait(job.id)
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
def delete_model(name: str) -> ResponseReturnValue:
    return jsonify(_service().delete(name))


@api.post("/api/copy")
@rate_limited
def copy_model() -> ResponseReturnValue:
    """``{"source", "destination"}`` -> ``{"source", "destination", "digest"}`` (models as code keeps the
    build an update replaces, and rolls it back, with copies: no download)."""
    raw = read_body(request, _state().settings.max_body_bytes)
    # Bearer-authenticated, so no browser can send it with a user's credentials; still JSON only.
    refuse_browser_requests(request, trusts_loopback=False, body=raw)
    body = json_object(raw, example='{"source": "llama3.2:latest", "destination": "llama3.2:backup"}')
    for field in ("source", "destination"):
        if not isinstance(body.get(field), str):
            raise InvalidRequest(f"missing field {field!r} (a model name such as 'llama3.2:latest')")
    return jsonify(_service().copy(body["source"], body["destination"]))


# --- jobs ---------------------------------------------------------------------------------------
@api.get("/api/jobs")
def list_jobs() -> ResponseReturnValue:
    return jsonify({"jobs": [job.to_dict() for job in _service().list_jobs()]})


@api.get("/api/jobs/<job_id>")
def get_job(job_id: str) -> ResponseReturnValue:
    return jsonify(_service().job(job_id).to_dict())


@api.delete("/api/jobs/<job_id>")
@rate_limited
def cancel_job(job_id: str) -> ResponseReturnValue:
    return jsonify(_service().cancel(job_id).to_dict())


# --- metrics and description --------------------------------------------------------------------
@api.get("/metrics")
def metrics() -> ResponseReturnValue:
    body, content_type = _state().metrics.render()
    return Response(body, content_type=content_type)


@api.get("/api/openapi.json")
def openapi() -> ResponseReturnValue:
    return jsonify(build_document(__version__, _state().settings.allowed_registries))


__all__ = ["api"]
