"""What the backend's routes share, and who may change state.

Apart from app.py (the factory) so that routes.py and app.py both import it and neither imports
the other: no import circle.
"""

from __future__ import annotations

import time

from flask import current_app, request

from ..client.fleet import GpuFleet
from ..config import BackendSettings
from ..errors import Unauthorized
from ..request_guard import is_loopback_name, is_loopback_peer
from ..web import check_bearer
from .db import Database
from .listing_memo import ListingMemo
from .metrics import BackendMetrics

EXTENSION = "gpu_bridge_backend"


def is_loopback_bind(bind: str) -> bool:
    """``127.0.0.1:8000``, ``localhost:8000``, ``[::1]:8000`` and ``unix:/path`` stay on this machine."""
    bind = bind.strip()
    # host:port is parsed as in a Host header: one place knows what names this machine.
    return bind.startswith("unix:") or is_loopback_name(bind)


class BackendState:
    """What the routes share: settings, database, fleet, the short-lived listing memo."""

    def __init__(self, settings: BackendSettings, db: Database, fleet: GpuFleet,
                 metrics: BackendMetrics | None = None):
        self.settings = settings
        self.db = db
        self.fleet = fleet
        # /metrics; other modules register their collectors on metrics.registry (drift.py)
        self.metrics = metrics or BackendMetrics()
        self.started = time.monotonic()
        self.auth_required = not is_loopback_bind(settings.bind)
        # the last complete /config/models answer, checked against the database's change generation
        self.listing_memo = ListingMemo(db, settings.cache_max_age)
        self.admin_tokens = (settings.admin_token.encode("utf-8"),) if settings.admin_token else ()

    def invalidate_listing(self) -> None:
        """Drop this process's memo. Other instances learn of a change from the database's change
        generation, bumped by the write that records it (listing_memo.py, pulls.listing_changed)."""
        self.listing_memo.clear()


def current_state() -> BackendState:
    """The state of the app serving this request."""
    state: BackendState = current_app.extensions[EXTENSION]
    return state


def auth_required(state: BackendState) -> bool:
    """Whether this request needs the admin token: when the backend listens beyond loopback, and
    whenever the TCP peer is not this machine, whatever GPU_BRIDGE_BACKEND_BIND says (gunicorn's
    --bind or GUNICORN_CMD_ARGS can bind elsewhere than the setting)."""
    return state.auth_required or not is_loopback_peer(request)


def require_admin(state: BackendState) -> None:
    """State-changing routes: when the request may come from beyond loopback, an admin token is required."""
    if not auth_required(state):
        return
    if not state.admin_tokens:
        raise Unauthorized(f"this request comes from {request.remote_addr}, beyond this machine, and the backend "
                           "has no admin token: set GPU_BRIDGE_BACKEND_TOKEN_FILE on the backend, or call it on "
                           "loopback")
    wanted = ("admin token required: send 'Authorization: Bearer <token>' with the backend's "
              "GPU_BRIDGE_BACKEND_TOKEN")
    check_bearer(state.admin_tokens, missing=wanted, invalid=wanted)


__all__ = ["EXTENSION", "BackendState", "auth_required", "current_state", "is_loopback_bind", "require_admin"]
