"""The web layer both Flask apps share (GPU server and backend), so both answer and log alike.

- ``install_request_hooks``: every request gets an id (``X-Request-ID``, validated by
  ``request_guard.request_id``; a bad one is a 400 that still carries a generated id), echoed on the
  response and set in ``logs.current_request_id`` so every log line written while serving it names
  it. ``Cache-Control: no-store`` on every answer; ``WWW-Authenticate`` on every 401. One access-log
  line per request on ``gpu_bridge.access`` (``ACCESS_LOG_FIELDS``): method, path, route, status,
  duration, request id and peer address, never a header, a token or the query string.
- ``install_error_handlers``: every error is JSON ``{"error": message, "code": code}``. Project errors
  (``errors.GpuBridgeError``) keep their status and code; Werkzeug's (404, 405, 413...) get the code
  names of ``HTTP_CODES``; anything unexpected is a 500 ``internal_error`` naming the request id and
  logged with its traceback, which never reaches the caller.
- ``check_bearer`` / ``install_bearer_auth``: ``Authorization: Bearer <token>`` compared in constant
  time on bytes, against every accepted token.

What differs between the apps is a parameter: which endpoints are open, which routes are quiet in
the access log, whether request durations feed metrics, which context variable carries the request
id on to GPU hosts.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from .errors import GpuBridgeError, InvalidRequest, RateLimited, Unauthorized
from .logs import Fields, current_request_id
from .request_guard import REQUEST_ID_HEADER, method_label, request_id

access_log = logging.getLogger("gpu_bridge.access")

ACCESS_LOG_FIELDS = ("event", "method", "path", "route", "status", "duration_ms", "request_id", "remote")
WWW_AUTHENTICATE = 'Bearer realm="gpu-bridge"'
UNMATCHED_ROUTE = "<unmatched>"
# Werkzeug's errors as machine codes (the same names errors.py uses where both exist).
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 406: "not_acceptable", 408: "request_timeout", 409: "conflict",
              411: "length_required", 413: "payload_too_large", 414: "uri_too_long",
              415: "unsupported_media_type", 429: "rate_limited", 431: "headers_too_large",
              500: "internal_error", 501: "not_implemented"}
# Headers of a Werkzeug error worth keeping (Allow on a 405, as RFC 9110 asks); never its HTML body.
_KEPT_HEADERS = ("Allow", "Location", "Retry-After")


@dataclass(frozen=True)
class RequestLog:
    """How one app's requests are logged and counted.

    ``quiet(route, status)``: True leaves the access-log line out (the GPU server's successful
    health checks: monitors poll them every few seconds). ``observe(method, route, status,
    seconds)``: called for every request, logged or not (both apps' metrics); ``method`` is
    ``request_guard.method_label``'s, so a made-up method cannot grow the label set. ``route`` is the
    URL rule (``/api/models/<path:name>``), or with ``by_endpoint`` the Flask endpoint name
    (``config.list_models``); either way never the raw path, whose values the caller chooses."""

    quiet: Callable[[str, int], bool] | None = None
    observe: Callable[[str, str, int, float], None] | None = None
    by_endpoint: bool = False


def json_error(error: GpuBridgeError, extra: dict[str, object] | None = None) -> Response:
    """A project error as its JSON answer (``Retry-After`` on a 429)."""
    body = error.to_dict()
    if extra:
        body.update(extra)
    response = _json(body, error.status)
    if isinstance(error, RateLimited):
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def _json(body: dict[str, object], status: int) -> Response:
    response = jsonify(body)
    response.status_code = status
    return response


def install_request_hooks(app: Flask, log: RequestLog | None = None, *,
                          forward_to: contextvars.ContextVar[str | None] | None = None) -> None:
    """Request ids, response headers and the access log. Install before any other ``before_request``
    hook: a request refused by a later hook still has its id. ``forward_to``: a context variable that
    also carries the id (the backend's HTTP transport sends it on to the GPU hosts)."""
    log = log or RequestLog()

    @app.before_request
    def _begin() -> None:
        g.started = time.perf_counter()
        g.request_id, problem = request_id(request)
        g.request_id_tokens = [(var, var.set(g.request_id))
                               for var in (current_request_id, forward_to) if var is not None]
        if problem:
            raise InvalidRequest(problem)

    @app.after_request
    def _finish(response: Response) -> Response:
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        rid = g.get("request_id") or uuid.uuid4().hex
        response.headers[REQUEST_ID_HEADER] = rid
        response.headers.setdefault("Cache-Control", "no-store")
        if response.status_code == 401:
            response.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
        route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
        if log.observe is not None:
            label = (request.endpoint or UNMATCHED_ROUTE) if log.by_endpoint else route
            log.observe(method_label(request.method), label, response.status_code, seconds)
        if log.quiet is None or not log.quiet(route, response.status_code):
            access_log.info(Fields(
                message=f"{request.method} {request.path} {response.status_code}", event="request",
                method=request.method, path=request.path, route=route, status=response.status_code,
                duration_ms=round(seconds * 1000, 2), request_id=rid, remote=request.remote_addr))
        return response

    @app.teardown_request
    def _end(_error: BaseException | None) -> None:
        # Reset in reverse order: this thread serves its next request without the old id.
        for var, token in reversed(g.pop("request_id_tokens", [])):
            var.reset(token)


def install_error_handlers(app: Flask, *, service: str, log: logging.Logger, docs_path: str) -> None:
    """Every error as JSON. ``service`` is named in the 500 message ("see the backend log"); ``log``
    takes unexpected errors with their traceback; ``docs_path`` is pointed to by the 404 message."""

    @app.errorhandler(GpuBridgeError)
    def _project_error(error: GpuBridgeError) -> Response:
        return json_error(error)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = HTTP_CODES.get(status) or re.sub(r"[^a-z0-9]+", "_", (error.name or "error").lower()).strip("_")
        if status == 404:
            message = f"no route {request.method} {request.path}: see {docs_path}"
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        elif status == 413:
            message = (f"request body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes "
                       "(GPU_BRIDGE_MAX_BODY_BYTES)")
        else:
            message = error.description or error.name or "HTTP error"
        response = _json({"error": message, "code": code}, status)
        headers = dict(error.get_headers())
        for name in _KEPT_HEADERS:
            if headers.get(name):
                response.headers[name] = headers[name]
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        rid = g.get("request_id", "-")
        log.error(Fields(message=f"unhandled error in {request.method} {request.path}", event="unhandled_error",
                         method=request.method, path=request.path, request_id=rid,
                         error=f"{type(error).__name__}: {error}"), exc_info=error)
        return _json({"error": f"internal error (request id {rid}): see the {service} log",
                      "code": "internal_error"}, 500)


# --- bearer tokens ------------------------------------------------------------------------------------
def presented_token(header: str) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), or None."""
    scheme, _, given = header.partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        return None
    # Bytes: compare_digest on a non-ASCII str raises TypeError (a 500, and a timing leak).
    return given.encode("utf-8", "surrogateescape")


def token_matches(presented: bytes, accepted: Collection[bytes]) -> bool:
    """Whether ``presented`` is one of ``accepted``. Every token is compared (no early exit), so the
    time taken does not say which one matched."""
    matched = False
    for token in accepted:
        matched |= hmac.compare_digest(presented, token)
    return matched


def check_bearer(accepted: Collection[bytes], *, missing: str, invalid: str) -> None:
    """``Unauthorized`` (401) unless this request carries one of ``accepted``: ``missing`` when it has
    no bearer token, ``invalid`` when its token is not accepted."""
    presented = presented_token(request.headers.get("Authorization", ""))
    if presented is None:
        raise Unauthorized(missing)
    if not token_matches(presented, accepted):
        raise Unauthorized(invalid)


def install_bearer_auth(app: Flask, accepted: Collection[bytes], *, is_open: Callable[[str | None], bool]) -> None:
    """Every endpoint but the open ones (``is_open(request.endpoint)``) needs one of ``accepted``;
    none accepted (development without a token, warned about at start): everything is open."""

    @app.before_request
    def _authenticate() -> None:
        if not accepted or is_open(request.endpoint):
            return
        check_bearer(accepted, missing="authentication required: send 'Authorization: Bearer <token>'",
                     invalid="invalid bearer token")


__all__ = ["ACCESS_LOG_FIELDS", "HTTP_CODES", "WWW_AUTHENTICATE", "RequestLog", "access_log", "check_bearer",
           "install_bearer_auth", "install_error_handlers", "install_request_hooks", "json_error",
           "presented_token", "token_matches"]
