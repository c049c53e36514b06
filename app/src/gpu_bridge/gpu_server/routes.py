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
from ..jobs import Job
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
    if wait:
        _take_wait_slot(state, "pull")
    try:
        job, joined = state.service.pull(name)
        return _job_answer(state.service, job, joined, wait)
    finally:
        if wait:
            state.wait_slots.release()


def _take_wait_slot(state: ServerState, what: str) -> None:
    """One of the GPU_BRIDGE_MAX_WAITING_PULLS ``?wait=true`` slots (pulls and loads share them)."""
    if not (state.settings.max_waiting_pulls and state.wait_slots.acquire(blocking=False)):
        raise RateLimited(f"{state.settings.max_waiting_pulls} requests already wait for jobs to finish "
                          f"(GPU_BRIDGE_MAX_WAITING_PULLS): start the {what} without ?wait=true and poll "
                          "GET /api/jobs/<id>", retry_after=WAIT_RETRY_AFTER, code="too_many_waits")


def _job_answer(service: GpuService, job: Job, joined: bool, wait: bool) -> ResponseReturnValue:
    """202 + the job at once; with wait, 200 + the job once it succeeded, else the job's error status."""
    headers = {"Location": f"/api/jobs/{job.id}"}
    if not wait:
        return jsonify({**job.to_dict(), "joined": joined}), 202, headers
    job = service.wait(job.id)
    body = {**job.to_dict(), "joined": joined}
    if job.state == "succeeded":
        return jsonify(body), 200, headers
    response = jsonify({"error": job.error or f"{job.kind} {job.state}", "code": job.error_code or "ollama_error",
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


# --- GPU memory: loaded models, load, unload ----------------------------------------------------
# GET /api/models/loaded cannot be mistaken for a model: no GET route takes a name. The POST routes'
# names always carry a tag when our clients send them (llama3.2:latest/load), so a pull of a model
# named .../load is still reachable as .../load:latest.
def _exact_methods(rule: str, allow: str) -> None:
    """OPTIONS and every other method answered with exactly this route's methods (200, else 405).
    /api/models/<path:name> (pull, delete) matches these URLs too: without this, a DELETE of
    .../load would delete a model named "<name>/load", and Werkzeug's Allow would list the pull's
    POST and DELETE where they mean something else."""
    own = {m.strip() for m in allow.split(",")}
    others = [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS") if m == "OPTIONS" or m not in own]

    def answer(**_: str) -> ResponseReturnValue:
        if request.method == "OPTIONS":
            return Response(status=200, headers={"Allow": allow})
        return jsonify({"error": f"{request.method} is not allowed here: use {allow}", "code": "method_not_allowed"}), \
            405, {"Allow": allow}

    api.add_url_rule(rule, f"methods{rule.replace('/', '_')}", answer, methods=others, provide_automatic_options=False)


_exact_methods("/api/models/loaded", "GET, HEAD, OPTIONS")
_exact_methods("/api/models/<path:name>/load", "POST, OPTIONS")
_exact_methods("/api/models/<path:name>/unload", "POST, OPTIONS")


@api.get("/api/models/loaded", provide_automatic_options=False)
def loaded_models() -> ResponseReturnValue:
    return jsonify({"models": _service().loaded()})


@api.post("/api/models/<path:name>/load", provide_automatic_options=False)
@rate_limited
def load_model(name: str) -> ResponseReturnValue:
    """Optional body ``{"keep_alive": "1h" | 3600 | "forever"}``; ``?wait=true`` as for pulls."""
    state = _state()
    raw = read_body(request, state.settings.max_body_bytes)
    # Bearer-authenticated, so no browser can send it with a user's credentials; still JSON only.
    refuse_browser_requests(request, trusts_loopback=False, body=raw)
    body = json_object(raw, example='{"keep_alive": "1h"}') if raw.strip() else {}
    unknown = sorted(set(body) - {"keep_alive"})
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(map(repr, unknown))}: the body may only hold keep_alive")
    if "keep_alive" in body and body["keep_alive"] is None:
        raise InvalidRequest("keep_alive is null: leave it out for Ollama's default")
    wait = _flag("wait")
    if wait:
        _take_wait_slot(state, "load")
    try:
        job, joined = state.service.load(name, body.get("keep_alive"))
        return _job_answer(state.service, job, joined, wait)
    finally:
        if wait:
            state.wait_slots.release()


@api.post("/api/models/<path:name>/unload", provide_automatic_options=False)
@rate_limited
def unload_model(name: str) -> ResponseReturnValue:
    return jsonify(_service().unload(name))


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
