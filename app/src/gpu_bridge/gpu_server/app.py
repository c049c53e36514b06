"""The GPU server's application factory: settings, shared state, and the web layer (web.py) installed.

Jobs, the rate-limit bucket and the metrics live in this process's memory. That is correct because
the server runs as ONE gunicorn worker process with threads (docs/architecture.md, "Why one gunicorn
process with threads"): every request thread sees the same job table and counters. More worker
processes would each keep their own, duplicating downloads and multiplying limits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import cast

from flask import Flask, request
from flask.json.provider import DefaultJSONProvider

from .. import __version__
from ..config import GpuServerSettings, token_lines
from ..errors import ConfigError
from ..gpu_service import GpuService
from ..logs import configure_logging
from ..request_guard import read_body
from ..web import RequestLog, install_bearer_auth, install_error_handlers, install_request_hooks
from .metrics import Metrics
from .ratelimit import TokenBucket
from .state import EXTENSION, ServerState

log = logging.getLogger("gpu_bridge.gpu_server")
PROCESS = "gpu-server"

# Endpoints reachable without a token (metrics only when GPU_BRIDGE_METRICS_PUBLIC=true).
OPEN_ENDPOINTS = frozenset({"api.health"})
HEALTH_ROUTE = "/api/health"


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


def create_app(config: GpuServerSettings | Mapping[str, str] | None = None) -> Flask:
    """The GPU server. ``config``: settings, a mapping of ``GPU_BRIDGE_*`` names, or None for ``os.environ``.

    Raises ``ConfigError`` for a malformed setting or a missing API token (unless
    ``GPU_BRIDGE_ALLOW_NO_TOKEN=true``).
    """
    settings = _settings_from(config)
    check_settings(settings)
    configure_logging(PROCESS)
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
                      gpu_snapshot=lambda: services[0].gpu_snapshot(),
                      loaded_models=lambda: services[0].loaded_snapshot())
    # persist_jobs: a reload's new worker process takes the pulls over from the job state file.
    service = GpuService(settings, on_job_change=metrics.job_changed, persist_jobs=True)
    services.append(service)
    state = ServerState(settings=settings, service=service, metrics=metrics,
                        limiter=TokenBucket(settings.rate_limit_per_minute),
                        tokens=tuple(t.encode("utf-8") for t in token_lines(settings.api_token)))
    app.extensions[EXTENSION] = state

    _install_web_layer(app, state)
    from .routes import api

    app.register_blueprint(api)
    log.info("GPU server %s ready: Ollama at %s, %d concurrent pulls, stall timeout %gs", __version__,
             settings.ollama_url, settings.max_concurrent_pulls, settings.pull_stall_timeout)
    return app


def _install_web_layer(app: Flask, state: ServerState) -> None:
    """web.py's request ids, request log, JSON errors and bearer auth, with this server's differences:
    metrics count every request; successful health checks are not logged unless
    GPU_BRIDGE_LOG_HEALTH_CHECKS (monitors poll them every few seconds: a line each drowned the log
    and cost a fifth of the endpoint's throughput); health (and metrics when public) need no token."""

    def quiet(route: str, status: int) -> bool:
        return route == HEALTH_ROUTE and status == 200 and not state.settings.log_health_checks

    install_request_hooks(app, RequestLog(quiet=quiet, observe=state.metrics.observe_request))

    @app.before_request
    def _bounded_body() -> None:
        # No route reads a body, but a body is still read off the socket: sized or chunked, it must
        # stay under the limit (413), never be swallowed whatever its size.
        read_body(request, state.settings.max_body_bytes)

    def is_open(endpoint: str | None) -> bool:
        return endpoint in OPEN_ENDPOINTS or (endpoint == "api.metrics" and state.settings.metrics_public)

    # No token at all: GPU_BRIDGE_ALLOW_NO_TOKEN=true, warned about at start; every endpoint is open.
    install_bearer_auth(app, state.tokens, is_open=is_open)
    install_error_handlers(app, service="GPU server", log=log, docs_path="/api/openapi.json")
