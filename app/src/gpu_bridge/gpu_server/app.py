"""The GPU server's application factory: settings, shared state, auth, request log, JSON errors.

Jobs, the rate-limit bucket and the metrics live in this process's memory. That is correct because
the server runs as ONE gunicorn worker process with threads (docs/architecture.md, "Why one gunicorn
process with threads"): every request thread sees the same job table and counters. More worker
processes would each keep their own, duplicating downloads and multiplying limits.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import cast

from flask import Flask, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from .. import __version__
from ..config import GpuServerSettings, token_lines
from ..errors import ConfigError, GpuBridgeError, InvalidRequest, RateLimited, Unauthorized
from ..gpu_service import GpuService
from ..request_guard import REQUEST_ID_HEADER, method_label, read_body, request_id
from .metrics import Metrics
from .ratelimit import TokenBucket
from .state import EXTENSION, ServerState

log = logging.getLogger("gpu_bridge.gpu_server")
access_log = logging.getLogger("gpu_bridge.access")

# Endpoints reachable without a token (metrics only when GPU_BRIDGE_METRICS_PUBLIC=true).
OPEN_ENDPOINTS = frozenset({"api.health"})
HEALTH_ROUTE = "/api/health"

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 408: "request_timeout", 409: "conflict",
               411: "length_required", 413: "payload_too_large", 414: "uri_too_long",
               415: "unsupported_media_type", 429: "rate_limited", 431: "headers_too_large",
               500: "internal_error", 501: "not_implemented"}


def check_settings(settings: GpuServerSettings) -> None:
    """Refuse to run without authentication unless the development flag says so."""
    if not settings.api_token and not settings.allow_no_token:
        raise ConfigError("no API token: set GPU_BRIDGE_API_TOKEN_FILE (or GPU_BRIDGE_API_TOKEN, or the systemd "
                          "credential api-token); GPU_BRIDGE_ALLOW_NO_TOKEN=true disables auth for development only")


def _settings_from(config: GpuServerSettings | Mapping[str, str] | None) -> GpuServerSettings:
    if isinstance(config, GpuServerSettings):
        return config
    if config is None or isinstance(config, Mapping):
        return GpuServerSettings.from_env(config)
    raise TypeError(f"config must be GpuServerSettings, a mapping of GPU_BRIDGE_* names or None, not {config!r}")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line. Access-log records already carry their JSON as the message."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == access_log.name:
            return record.getMessage()
        entry = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _configure_logging() -> None:
    """JSON lines on stderr for our loggers, unless the host process (e.g. pytest) configured logging."""
    package_log = logging.getLogger("gpu_bridge")
    if package_log.level == logging.NOTSET:
        package_log.setLevel(logging.INFO)
    if logging.getLogger().handlers or any(getattr(h, "_gpu_bridge", False) for h in package_log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    handler._gpu_bridge = True  # type: ignore[attr-defined]
    package_log.addHandler(handler)


def create_app(config: GpuServerSettings | Mapping[str, str] | None = None) -> Flask:
    """The GPU server. ``config``: settings, a mapping of ``GPU_BRIDGE_*`` names, or None for ``os.environ``.

    Raises ``ConfigError`` for a malformed setting or a missing API token (unless
    ``GPU_BRIDGE_ALLOW_NO_TOKEN=true``).
    """
    settings = _settings_from(config)
    check_settings(settings)
    _configure_logging()
    if not settings.api_token:
        log.warning("!!! GPU_BRIDGE_ALLOW_NO_TOKEN=true and no API token: the GPU server accepts EVERY request "
                    "without authentication. Never run like this outside development. !!!")

    app = Flask(__name__, static_folder=None)  # a JSON API: no static route
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    # cast: app.json is typed as the base JSONProvider; Flask's default provider, the one in use, has sort_keys
    cast(DefaultJSONProvider, app.json).sort_keys = False
    # Model names contain "/": "a//b" must reach the name check (400), not a merge-slashes redirect.
    app.url_map.merge_slashes = False

    services: list[GpuService] = []  # the metrics' callbacks run at scrape time, after it is built
    metrics = Metrics(pull_counts=lambda: services[0].pull_counts(),
                      ollama_up=lambda: bool(services[0].ollama_status()["reachable"]),
                      gpu_snapshot=lambda: services[0].gpu_snapshot())
    # persist_jobs: a reload's new worker process takes the pulls over from the job state file.
    service = GpuService(settings, on_job_change=metrics.job_changed, persist_jobs=True)
    services.append(service)
    state = ServerState(settings=settings, service=service, metrics=metrics,
                        limiter=TokenBucket(settings.rate_limit_per_minute),
                        tokens=tuple(t.encode("utf-8") for t in token_lines(settings.api_token)))
    app.extensions[EXTENSION] = state

    _install_hooks(app, state)
    _install_error_handlers(app)
    from .routes import api

    app.register_blueprint(api)
    log.info("GPU server %s ready: Ollama at %s, %d concurrent pulls, stall timeout %gs", __version__,
             settings.ollama_url, settings.max_concurrent_pulls, settings.pull_stall_timeout)
    return app


def _install_hooks(app: Flask, state: ServerState) -> None:
    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        g.request_id, problem = request_id(request)
        if problem:
            raise InvalidRequest(problem)
        # No route reads a body, but a body is still read off the socket: sized or chunked, it must
        # stay under the limit (413), never be swallowed whatever its size.
        read_body(request, state.settings.max_body_bytes)

    @app.before_request
    def _authenticate() -> None:
        if not state.tokens:  # GPU_BRIDGE_ALLOW_NO_TOKEN=true, warned about at start
            return
        if request.endpoint in OPEN_ENDPOINTS or (request.endpoint == "api.metrics" and state.settings.metrics_public):
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            raise Unauthorized("authentication required: send 'Authorization: Bearer <token>'")
        # Compare bytes: compare_digest on a non-ASCII str raises TypeError (a 500, and a timing leak).
        # Every accepted token is compared (no early exit): the time does not say which one matched.
        presented = given.encode("utf-8", "surrogatepass")
        matched = False
        for token in state.tokens:
            matched |= hmac.compare_digest(presented, token)
        if not matched:
            raise Unauthorized("invalid bearer token")

    @app.after_request
    def _finish(response):
        started = g.get("started") or time.perf_counter()
        rid = g.get("request_id") or uuid.uuid4().hex
        seconds = time.perf_counter() - started
        response.headers[REQUEST_ID_HEADER] = rid
        response.headers.setdefault("Cache-Control", "no-store")
        if response.status_code == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="gpu-bridge"'
        route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        state.metrics.observe_request(method_label(request.method), route, response.status_code, seconds)
        if route == HEALTH_ROUTE and response.status_code == 200 and not state.settings.log_health_checks:
            # Load balancers poll health every few seconds: one log line each would drown the log and
            # cost a fifth of the endpoint's throughput. /metrics still counts them.
            return response
        # Never the Authorization header, the token or the query string: method, path and outcome only.
        access_log.info(json.dumps({
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": "request",
            "method": request.method, "path": request.path, "route": route, "status": response.status_code,
            "duration_ms": round(seconds * 1000, 2), "request_id": rid, "remote": request.remote_addr,
        }))
        return response


def error_response(error: GpuBridgeError, extra: dict | None = None):
    body = error.to_dict()
    if extra:
        body.update(extra)
    response = jsonify(body)
    response.status_code = error.status
    if isinstance(error, RateLimited):
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(GpuBridgeError)
    def _project_error(error: GpuBridgeError):
        return error_response(error)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        status = error.code or 500
        code = _HTTP_CODES.get(status) or re.sub(r"[^a-z0-9]+", "_", (error.name or "error").lower()).strip("_")
        if status == 404:
            message = f"no such route: {request.method} {request.path}"
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        elif status == 413:
            message = f"request body is over the limit of {app.config['MAX_CONTENT_LENGTH']} bytes"
        else:
            message = error.description or error.name or "HTTP error"
        response = jsonify({"error": message, "code": code})
        response.status_code = status
        # Keep meaningful headers (Allow on 405, Location on a redirect), never the HTML body.
        for name in ("Allow", "Location", "Retry-After"):
            value = error.get_headers() and dict(error.get_headers()).get(name)
            if value:
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        request_id = g.get("request_id", "-")
        log.exception("unhandled error in %s %s (request_id=%s)", request.method, request.path, request_id)
        return jsonify({"error": f"internal server error (request id {request_id})", "code": "internal_error"}), 500
