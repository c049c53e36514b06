"""The production backend: Flask application factory, request log, auth, JSON errors.

``create_app(config=None)``: ``config`` is a ``BackendSettings``, a mapping of environment-style
names, or None (``os.environ``). The backend reaches GPU hosts only through ``GpuFleet`` (and so
through ``GpuTransport``): ``GPU_BRIDGE_TRANSPORT=http|nfs`` switches the channel with no other change.
"""

from __future__ import annotations

import hmac
import json
import logging
import sys
import time
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import cast

from flask import Flask, Response, g, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from .. import __version__
from ..client import make_transport
from ..client.fleet import GpuFleet
from ..client.http import current_request_id
from ..config import BackendSettings
from ..errors import ConfigError, GpuBridgeError, InvalidRequest, RateLimited, Unauthorized
from ..request_guard import is_loopback_name, is_loopback_peer, request_id
from .db import Database

log = logging.getLogger("gpu_bridge.backend")
EXTENSION = "gpu_bridge_backend"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a dict message is merged in as fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
                 .replace("+00:00", "Z"), "level": record.levelname.lower(), "logger": record.name}
        if isinstance(record.msg, dict):
            entry.update(record.msg)
        else:
            entry["msg"] = record.getMessage()
        if record.exc_info:
            entry["exc"] = "".join(traceback.format_exception(*record.exc_info)).strip()
        return json.dumps(entry, default=str)


def _setup_logging() -> None:
    if not any(getattr(h, "_gpu_bridge", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._gpu_bridge = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def is_loopback_bind(bind: str) -> bool:
    """``127.0.0.1:8000``, ``localhost:8000``, ``[::1]:8000`` and ``unix:/path`` stay on this machine."""
    bind = bind.strip()
    # host:port is parsed as in a Host header: one place knows what names this machine.
    return bind.startswith("unix:") or is_loopback_name(bind)


def check_settings(settings: BackendSettings) -> None:
    """Refuse unsafe or unusable settings before serving anything."""
    if not is_loopback_bind(settings.bind) and not settings.admin_token:
        raise ConfigError(f"GPU_BRIDGE_BACKEND_BIND={settings.bind} is not a loopback address, so the backend needs "
                          "an admin token: set GPU_BRIDGE_BACKEND_TOKEN_FILE (or GPU_BRIDGE_BACKEND_TOKEN, or the "
                          "backend-token credential)")
    if not settings.client.hosts:
        raise ConfigError("no GPU host configured: set GPU_INSTANCE_HOSTS (comma-separated host[:port]) or "
                          "GPU_INSTANCE_HOST")


class BackendState:
    """What the routes share: settings, database, fleet, the short-lived listing memo."""

    def __init__(self, settings: BackendSettings, db: Database, fleet: GpuFleet):
        self.settings = settings
        self.db = db
        self.fleet = fleet
        self.started = time.monotonic()
        self.auth_required = not is_loopback_bind(settings.bind)
        self.listing_memo: tuple[float, dict] | None = None

    def invalidate_listing(self) -> None:
        self.listing_memo = None


def create_app(config: BackendSettings | Mapping[str, str] | None = None, *, transport_factory=None) -> Flask:
    if isinstance(config, BackendSettings):
        settings = config
    else:
        settings = BackendSettings.from_env(config)
    check_settings(settings)
    _setup_logging()

    db = Database(settings.database_url)
    version = db.migrate()
    fleet = GpuFleet(settings, transport_factory or make_transport)

    # No static route: this is a JSON API. No slash merging: Werkzeug would answer "//" with an HTML
    # redirect, bypassing our JSON errors, and could turn the id "%2Fabc" into another id.
    app = Flask("gpu_bridge.backend", static_folder=None)
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    # cast: app.json is typed as the base JSONProvider; Flask's default provider, the one in use, has sort_keys
    cast(DefaultJSONProvider, app.json).sort_keys = False
    app.extensions[EXTENSION] = BackendState(settings, db, fleet)
    log.info({"msg": "backend ready", "version": __version__, "transport": fleet.transport_kind,
              "gpu_hosts": fleet.labels, "database": db.dialect, "schema_version": version,
              "auth_required": not is_loopback_bind(settings.bind)})

    @app.before_request
    def _begin():
        g.started = time.monotonic()
        g.request_id, problem = request_id(request)
        g.rid_token = current_request_id.set(g.request_id)
        if problem:
            raise InvalidRequest(problem)

    @app.after_request
    def _finish(resp: Response):
        resp.headers["X-Request-ID"] = g.get("request_id", "")
        resp.headers.setdefault("Cache-Control", "no-store")
        log.info({"event": "request", "request_id": g.get("request_id"), "method": request.method,
                  "path": request.path, "status": resp.status_code,
                  "duration_ms": round((time.monotonic() - g.get("started", time.monotonic())) * 1000, 1),
                  "remote_addr": request.remote_addr})
        return resp

    @app.teardown_request
    def _teardown(_exc):
        token = g.pop("rid_token", None)
        if token is not None:
            current_request_id.reset(token)

    @app.errorhandler(GpuBridgeError)
    def _our_error(exc: GpuBridgeError):
        resp = app.json.response(exc.to_dict())
        resp.status_code = exc.status
        if isinstance(exc, RateLimited):
            resp.headers["Retry-After"] = str(exc.retry_after)
        if exc.status == 401:
            resp.headers["WWW-Authenticate"] = "Bearer"
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.code or 500, (exc.name or "error").lower().replace(" ", "_"))
        if exc.code == 404:
            message = f"no route {request.method} {request.path}: see /api/openapi.json"
        elif exc.code == 405:
            message = f"{request.method} is not allowed on {request.path}"
        elif exc.code == 413:
            message = f"request body is larger than {settings.max_body_bytes} bytes (GPU_BRIDGE_MAX_BODY_BYTES)"
        else:
            message = exc.description or exc.name
        resp = app.json.response({"error": message, "code": code})
        resp.status_code = exc.code or 500
        # Keep what RFC 9110 asks for: Allow on a 405 (the methods the route has).
        for name, value in exc.get_headers():
            if name in ("Allow", "Retry-After"):
                resp.headers[name] = value
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.error({"event": "unhandled_error", "request_id": g.get("request_id"), "path": request.path,
                   "error": f"{type(exc).__name__}: {exc}"}, exc_info=exc)
        resp = app.json.response({"error": f"internal error (request id {g.get('request_id')}): see the backend "
                                           "log", "code": "internal_error"})
        resp.status_code = 500
        return resp

    from .routes import bp

    app.register_blueprint(bp)
    return app


def auth_required(state: BackendState) -> bool:
    """Whether this request needs the admin token: when the backend listens beyond loopback, and
    whenever the TCP peer is not this machine, whatever GPU_BRIDGE_BACKEND_BIND says (gunicorn's
    --bind or GUNICORN_CMD_ARGS can bind elsewhere than the setting)."""
    return state.auth_required or not is_loopback_peer(request)


def require_admin(state: BackendState) -> None:
    """State-changing routes: when the request may come from beyond loopback, an admin token is required."""
    if not auth_required(state):
        return
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    expected = (state.settings.admin_token or "").encode("utf-8")
    if not expected:
        raise Unauthorized(f"this request comes from {request.remote_addr}, beyond this machine, and the backend "
                           "has no admin token: set GPU_BRIDGE_BACKEND_TOKEN_FILE on the backend, or call it on "
                           "loopback")
    if scheme.lower() != "bearer" or not presented or not hmac.compare_digest(
            presented.strip().encode("utf-8", "surrogateescape"), expected):
        raise Unauthorized("admin token required: send 'Authorization: Bearer <token>' with the backend's "
                           "GPU_BRIDGE_BACKEND_TOKEN")
