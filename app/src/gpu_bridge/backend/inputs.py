"""What the backend's routes read from a request: bodies, fields and query parameters, each checked
exactly as the OpenAPI document (openapi.py) types it; anything else is a 400 naming the field."""

from __future__ import annotations

from typing import Any

from flask import request

from .. import names
from ..errors import InvalidRequest
from ..request_guard import json_object, read_body, refuse_browser_requests
from .state import auth_required, current_state

MAX_LIMIT = 500


def json_body() -> dict[str, Any]:
    """The body of a state-changing route: JSON from a non-browser client, bounded in size and depth."""
    state = current_state()
    raw = read_body(request, state.settings.max_body_bytes)
    refuse_browser_requests(request, trusts_loopback=not auth_required(state), body=raw)
    return json_object(raw)


def model_field(body: dict[str, Any], *, pulling: bool = False) -> str:
    """The model name (``model``, or ``name`` as older callers send it), in its display form."""
    model = body.get("model", body.get("name"))
    if model is None:
        raise InvalidRequest("missing field 'model' (the model name, e.g. 'llama3.2:latest')")
    if not isinstance(model, str):
        raise InvalidRequest("'model' must be a string")
    if pulling:  # a pull fetches: the registry allow-list applies, as on the GPU hosts
        return names.validate(model, current_state().settings.allowed_registries).display
    return names.parse(model).display


def hosts_field(body: dict[str, Any]) -> list[str] | None:
    """The GPU hosts asked for, as labels; None: every host."""
    # Exactly what the document says: absent, null or a JSON array of known host names or labels.
    hosts = body.get("hosts")
    if hosts is None or hosts == []:
        return None
    fleet = current_state().fleet
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h.strip() for h in hosts):
        raise InvalidRequest("'hosts' must be a JSON array of GPU host names or labels (name:port), e.g. "
                             f'["{fleet.labels[0]}"]')
    return fleet.select(hosts)


def bool_field(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if isinstance(value, bool):
        return value
    raise InvalidRequest(f"'{name}' must be true or false (a JSON boolean)")


def bool_query(name: str) -> bool:
    """A boolean query parameter as the document types it: true or false (absent: false)."""
    raw = request.args.get(name)
    if raw is None:
        return False
    if raw in ("true", "false"):
        return raw == "true"
    raise InvalidRequest(f"query parameter {name}={names.shorten(raw)} must be true or false")


def limit_query() -> int:
    """``?limit=N`` of the listings: 50 when absent, clamped to 1..500."""
    raw = request.args.get("limit", "50")
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest("'limit' must be an integer") from None
    return max(1, min(value, MAX_LIMIT))
