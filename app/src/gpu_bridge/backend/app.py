"""The production backend's application factory: settings, database, fleet, the shared web layer.

Request ids, the request log and JSON errors come from ``gpu_bridge.web``, as on the GPU server;
the routes (routes.py) and what they share (state.py, admin auth included) import nothing from here.

``create_app(config=None)``: ``config`` is a ``BackendSettings``, a mapping of environment-style
names, or None (``os.environ``). The backend reaches GPU hosts only through ``GpuFleet`` (and so
through ``GpuTransport``): ``GPU_BRIDGE_TRANSPORT=http|nfs`` switches the channel with no other change.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import cast

from flask import Flask, Response
from flask.json.provider import DefaultJSONProvider
from flask.typing import ResponseReturnValue

from .. import __version__
from ..client import make_transport
from ..client.fleet import GpuFleet, TransportFactory
from ..client.http import current_request_id
from ..config import BackendSettings
from ..errors import ConfigError
from ..logs import Fields, configure_logging
from ..web import RequestLog, install_error_handlers, install_request_hooks
from .db import Database
from .metrics import BackendMetrics
from .routes import bp
from .state import EXTENSION, BackendState, current_state, is_loopback_bind, require_admin

log = logging.getLogger("gpu_bridge.backend")
PROCESS = "backend"


def check_settings(settings: BackendSettings) -> None:
    """Refuse unsafe or unusable settings before serving anything."""
    if not is_loopback_bind(settings.bind) and not settings.admin_token:
        raise ConfigError(f"GPU_BRIDGE_BACKEND_BIND={settings.bind} is not a loopback address, so the backend needs "
                          "an admin token: set GPU_BRIDGE_BACKEND_TOKEN_FILE (or GPU_BRIDGE_BACKEND_TOKEN, or the "
                          "backend-token credential)")
    if not settings.client.hosts:
        raise ConfigError("no GPU host configured: set GPU_INSTANCE_HOSTS (comma-separated host[:port]) or "
                          "GPU_INSTANCE_HOST")


def create_app(config: BackendSettings | Mapping[str, str] | None = None, *,
               transport_factory: TransportFactory | None = None) -> Flask:
    """The backend. ``transport_factory`` replaces ``client.make_transport`` (tests: fake GPU hosts).

    Raises ``ConfigError`` for a malformed or unsafe setting (see ``check_settings``)."""
    if isinstance(config, BackendSettings):
        settings = config
    else:
        settings = BackendSettings.from_env(config)
    check_settings(settings)
    configure_logging(PROCESS)

    db = Database(settings.database_url, settings.retention)
    version = db.migrate()
    metrics = BackendMetrics()
    fleet = GpuFleet(settings, transport_factory or make_transport, observer=metrics)
    metrics.watch(fleet, db)

    # No static route: this is a JSON API. No slash merging: Werkzeug would answer "//" with an HTML
    # redirect, bypassing our JSON errors, and could turn the id "%2Fabc" into another id.
    app = Flask("gpu_bridge.backend", static_folder=None)
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    # cast: app.json is typed as the base JSONProvider; Flask's default provider, the one in use, has sort_keys
    cast(DefaultJSONProvider, app.json).sort_keys = False
    app.extensions[EXTENSION] = BackendState(settings, db, fleet, metrics)
    log.info(Fields(message="backend ready", version=__version__, transport=fleet.transport_kind,
                    gpu_hosts=fleet.labels, database=db.dialect, schema_version=version,
                    auth_required=not is_loopback_bind(settings.bind)))

    # The request id also goes on to the GPU hosts (the HTTP transport sends current_request_id).
    # Metrics count every request by endpoint name (a bounded set, whatever paths callers send).
    install_request_hooks(app, RequestLog(observe=metrics.observe_request, by_endpoint=True),
                          forward_to=current_request_id)
    install_error_handlers(app, service="backend", log=log, docs_path="/api/openapi.json")
    app.register_blueprint(bp)
    app.add_url_rule("/metrics", "metrics", metrics_view, methods=["GET"])
    return app


def metrics_view() -> ResponseReturnValue:
    """``GET /metrics``: the GPU server's rule with the backend's token. Open when
    GPU_BRIDGE_METRICS_PUBLIC=true; otherwise like a state-changing route: the admin token is
    required when the request may come from beyond this machine (so a scraper on loopback needs none)."""
    st = current_state()
    if not st.settings.metrics_public:
        require_admin(st)
    body, content_type = st.metrics.render()
    return Response(body, content_type=content_type)
