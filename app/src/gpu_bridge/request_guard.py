"""What both Flask apps check in a request before a route sees it: every part of it is hostile.

- ``method_label``: the HTTP method as a metrics label from a fixed set. A client chooses the
  method; a label it chooses would let it grow ``/metrics`` without bound (one series per made-up
  method: 20,000 requests once took a scrape to 40 MB and 10 s).
- ``read_body``: the request body, at most ``limit`` bytes, whether the client sent a
  ``Content-Length`` or a chunked body (413 either way; never a silently truncated body).
- ``json_object``: a JSON object within a nesting limit. Python's parser recurses, so 2 KB of
  ``[[[[...`` raised RecursionError (a 500); the depth is counted before parsing instead.
- ``refuse_browser_requests``: state-changing routes take JSON only and refuse what a browser sends
  on behalf of another site: a form or text body (no CORS preflight), an ``Origin`` header (every
  browser sends one on a cross-site POST; no client of this API does), or a ``Host`` that does not
  name this machine when the backend trusts loopback (DNS rebinding points a foreign name at it).
- ``is_loopback_peer``: whether the TCP peer (not a setting) is this machine.
"""

from __future__ import annotations

import ipaddress
import json
import re
import uuid
from typing import Any

from flask import Request

from .errors import Forbidden, InvalidRequest, PayloadTooLarge, UnsupportedMediaType

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REQUEST_ID_HEADER = "X-Request-ID"
# The same on both services (the backend forwards its request id to the GPU hosts); the end anchor
# means end of input in ECMA-262 and in Python alike ("$" admits a final newline in Python).
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}(?![\s\S])"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
MAX_JSON_DEPTH = 32
_LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def request_id(request: Request) -> tuple[str, str | None]:
    """(the request id to use and echo, the problem with the caller's when it broke the pattern).

    A missing header gets a generated id; a present one must match ``REQUEST_ID_PATTERN`` (the
    document says so): the caller then gets a 400, which still carries a generated id."""
    given = request.headers.get(REQUEST_ID_HEADER)
    if given is None:
        return uuid.uuid4().hex, None
    if _REQUEST_ID.match(given):
        return given, None
    return uuid.uuid4().hex, (f"{REQUEST_ID_HEADER} must be 1 to 128 of A-Z a-z 0-9 . _ : - (or left out: one is "
                              "generated)")


def method_label(method: str) -> str:
    """``method`` when it is a standard method, else ``other``."""
    return method if method in KNOWN_METHODS else "other"


def read_body(request: Request, limit: int, setting: str = "GPU_BRIDGE_MAX_BODY_BYTES") -> bytes:
    """The body, or ``PayloadTooLarge`` when it is over ``limit`` bytes, sized or chunked."""
    too_large = f"request body is larger than {limit} bytes ({setting})"
    length = request.content_length
    if length is not None:
        if length > limit:
            raise PayloadTooLarge(too_large)
        return request.get_data(cache=True)
    # No Content-Length: a chunked body (or none). Read the server's own stream, which decodes the
    # chunks, one byte past the limit: Werkzeug's limited stream would stop at the limit silently.
    stream = request.environ.get("wsgi.input")
    if stream is None or (request.method in ("GET", "HEAD", "OPTIONS", "DELETE")
                          and "chunked" not in request.headers.get("Transfer-Encoding", "").lower()):
        return b""
    data: bytes = stream.read(limit + 1)  # PEP 3333: wsgi.input.read() returns bytes (environ is untyped)
    if len(data) > limit:
        raise PayloadTooLarge(too_large)
    return data


def json_depth(raw: bytes | str) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings skipped), without recursion."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def json_object(raw: bytes, example: str = '{"model": "llama3.2:latest"}',
                max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """Parse a request body that must be one JSON object (values Any: the route checks each field it reads)."""
    if not raw.strip():
        raise InvalidRequest(f"request body must be a JSON object, e.g. {example}")
    if json_depth(raw) > max_depth:
        raise InvalidRequest(f"request body nests arrays or objects more than {max_depth} deep")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"request body must be a JSON object, e.g. {example}")
    return body


def _host_part(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def is_loopback_name(host_header: str) -> bool:
    """A ``Host`` header (with or without port) that names this machine."""
    host = _host_part(host_header)
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_peer(request: Request) -> bool:
    """The TCP peer is this machine (a unix socket has no address: also this machine)."""
    addr = request.remote_addr
    if not addr:
        return True
    try:
        return ipaddress.ip_address(addr.partition("%")[0]).is_loopback
    except ValueError:
        return False


def refuse_browser_requests(request: Request, *, trusts_loopback: bool, body: bytes = b"") -> None:
    """For state-changing routes: JSON only, no cross-site browser request, no rebound host name.
    (An empty body goes on to the JSON check, whose message shows what to send.)"""
    if request.headers.get("Origin") is not None:
        raise Forbidden("requests with an Origin header are refused: this API is not for browsers "
                        "(cross-site request forgery)")
    if trusts_loopback and not is_loopback_name(request.host or ""):
        raise Forbidden(f"Host {request.host!r} does not name this machine: call the backend as 127.0.0.1 or "
                        "localhost (a foreign name pointing here is DNS rebinding)")
    if body.strip() and request.mimetype != "application/json":
        raise UnsupportedMediaType(f"send the body as JSON with 'Content-Type: application/json' (got "
                                   f"{request.mimetype or 'no content type'!r})")


__all__ = ["KNOWN_METHODS", "MAX_JSON_DEPTH", "REQUEST_ID_HEADER", "REQUEST_ID_PATTERN", "is_loopback_name",
           "is_loopback_peer", "json_depth", "json_object", "method_label", "read_body", "refuse_browser_requests",
           "request_id"]
