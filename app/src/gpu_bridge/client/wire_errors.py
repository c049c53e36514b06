"""THE mapping from a GPU host's error answer to the project's error types, for every transport.

A GPU host reports a failure the same way on every channel: a JSON object
``{"error": message, "code": errors.py code, "job"?: Job}`` (the GPU server's HTTP error body, the
NFS worker's ``answer["error"]``), plus facts only the transport knows: an HTTP status (or the
``status`` the worker copied from the exception), a ``Retry-After``. ``error_from_wire`` turns that
into the exception production raises; ``job_error`` does the same for a job that ended failed or
cancelled. Transports do their own channel checks first (a refused token, a TLS proxy, a dead
heartbeat) and hand everything else here, so a code means the same on HTTP and NFS.

The rules:
- a code the GPU server sends for a caller's mistake or a pull's outcome keeps its ``errors.py``
  class (``WIRE_TYPES``): ``ModelNotFound``, ``QueueFull``, ``PullStalled``, ... These mean the host
  answered, so the circuit breaker counts them as successes;
- Ollama down or hung (``HOST_DOWN_CODES``) and a command that expired in the spool
  (``command_expired``) are failures *of the host*: ``GpuHostError`` / ``GpuHostTimeout``, which the
  breaker counts. A failed *job* is never a host failure (``job_error``): it is that pull's outcome;
- an unknown code falls back to the status: 5xx (or none) → ``GpuHostError``, a known 4xx → the
  class ``errors.py`` gives that status (``STATUS_TYPES``), another 4xx → ``GpuBridgeError`` with it;
- an answer without a code is not gpu-bridge's (a proxy, another service, a crashed worker):
  ``GpuHostError`` with the transport's hint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..config import GpuHost
from ..errors import (
    Conflict,
    GpuBridgeError,
    GpuHostError,
    GpuHostTimeout,
    InsufficientStorage,
    InvalidModelName,
    InvalidRequest,
    JobNotFound,
    ModelNotFound,
    NotFound,
    OllamaError,
    OllamaTimeout,
    OllamaUnavailable,
    PayloadTooLarge,
    PullStalled,
    QueueFull,
    RateLimited,
    RegistryNotAllowed,
)

# The errors.py classes a GPU host may answer with that keep their type on this side, keyed by the
# class's own ``code`` (errors.py stays the one place that names codes). "cancelled" is a job's
# error_code (a cancelled pull), not a class of its own. The Ollama codes keep their class only as a
# failed job's error_code: as a request's answer, HOST_DOWN_CODES turn them into host failures.
WIRE_TYPES: dict[str, type[GpuBridgeError]] = {
    cls.code: cls for cls in (
        InvalidRequest, InvalidModelName, RegistryNotAllowed, ModelNotFound, JobNotFound, Conflict,
        PayloadTooLarge, RateLimited, QueueFull, InsufficientStorage, OllamaError, OllamaUnavailable,
        OllamaTimeout, PullStalled,
    )
}
WIRE_TYPES["cancelled"] = Conflict
# For an unknown code with a 4xx status: the errors.py class of that status.
STATUS_TYPES: dict[int, type[GpuBridgeError]] = {
    cls.status: cls for cls in (InvalidRequest, NotFound, Conflict, PayloadTooLarge, RateLimited)
}
# "This host cannot serve model operations right now": a GpuHostError, counted by the breaker.
HOST_DOWN_CODES = frozenset({OllamaUnavailable.code, OllamaTimeout.code})
# The worker answers a command that waited in the spool past its deadline with this code: the host
# did not serve it in time, exactly like an HTTP read timeout.
HOST_TIMEOUT_CODES = frozenset({"command_expired"})


def error_from_wire(body: object, *, host: GpuHost, status: object = None, retry_after: object = None,
                    not_ours: str | None = None) -> GpuBridgeError:
    """A GPU host's error answer → the exception to raise (see the module docstring for the rules).

    ``body``: the decoded error object (anything else, such as None for a non-JSON body, counts as
    "not gpu-bridge's"). ``status``: the HTTP status or the worker's ``status`` field (ignored
    unless an integer 100-599). ``retry_after``: seconds, as a number or a header string. ``not_ours``:
    the message for an answer without a code (default: says so and names the host)."""
    label = host.label
    fields: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
    http_status = status if isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599 \
        else None
    code, message = fields.get("code"), fields.get("error")
    if not isinstance(code, str) or not code:
        if not_ours is None:
            said = f": {message}" if isinstance(message, str) and message else ""
            not_ours = f"{label} answered with an error that carries no gpu-bridge code{said}"
        return GpuHostError(not_ours, host=label)
    if not isinstance(message, str) or not message:
        message = f"error {code}" + (f" (HTTP {http_status})" if http_status is not None else "")
    extra = {"job": fields["job"]} if fields.get("job") is not None else {}
    detail = f"{label}: {message}"
    if code in HOST_TIMEOUT_CODES:
        return GpuHostTimeout(detail, host=label, code=code, extra=extra)
    if code in HOST_DOWN_CODES:
        return GpuHostError(f"{detail} (check ollama.service on {host.name})", host=label,
                            status=504 if code == OllamaTimeout.code else 503, code=code, extra=extra)
    cls = WIRE_TYPES.get(code)
    if cls is None:
        if http_status is None or http_status >= 500 or http_status < 400:
            # The host failed in a way we do not know: its fault. A bare 500 (a crash) reads as 502,
            # as a gateway reports an upstream's failure; 503/504 keep their meaning.
            return GpuHostError(detail, host=label, status=http_status if http_status and http_status > 500 else 502,
                                code=code, extra=extra)
        cls = STATUS_TYPES.get(http_status, GpuBridgeError)
    if issubclass(cls, RateLimited):
        return cls(detail, retry_after=retry_seconds(retry_after), host=label, status=http_status, code=code,
                   extra=extra)
    return cls(detail, host=label, status=http_status, code=code, extra=extra)


def job_error(job: Mapping[str, Any], *, host: GpuHost) -> GpuBridgeError:
    """A job that ended ``failed`` or ``cancelled`` → the error a waited pull raises (job in ``extra``).

    Its ``error_code`` picks the class (``PullStalled``, ``InsufficientStorage``, ``Conflict`` for a
    cancel, ``OllamaError`` when unknown); never a ``GpuHostError``: the host answered, the pull failed."""
    state = job.get("state")
    code = job.get("error_code")
    if not isinstance(code, str) or not code:
        code = "cancelled" if state == "cancelled" else OllamaError.code
    error = job.get("error")
    message = error if isinstance(error, str) and error else f"pull {state}"
    cls = WIRE_TYPES.get(code, OllamaError)
    return cls(f"{host.label}: {message}", host=host.label, code=code, extra={"job": dict(job)})


def retry_seconds(value: object) -> int:
    """A ``Retry-After`` (header string or number) as whole seconds; 1 when missing or unreadable."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return 1
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return max(1, int(value))
    return 1


__all__ = ["HOST_DOWN_CODES", "HOST_TIMEOUT_CODES", "STATUS_TYPES", "WIRE_TYPES", "error_from_wire", "job_error",
           "retry_seconds"]
