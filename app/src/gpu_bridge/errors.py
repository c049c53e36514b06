"""The project's error types and their HTTP mapping.

Every failure that can reach a client is a ``GpuBridgeError`` subclass carrying a stable machine
``code`` and an HTTP ``status``. Flask apps render them as ``{"error": message, "code": code}``
(plus ``host`` when a GPU host is involved) so no traceback or HTML ever reaches a caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# An error's JSON body: "error", "code", maybe "host", plus whatever ``extra`` carries. The values are
# Any because ``extra`` holds JSON chosen by the raiser (a job snapshot, a response body): readers
# such as the CLI check the fields they take.
ErrorBody = dict[str, Any]


class GpuBridgeError(Exception):
    """Base class: a message for humans, a code for programs, an HTTP status for servers."""

    status = 500
    code = "internal_error"
    # Declared only (no value, so getattr(exc, "retried", False) is unchanged): the HTTP client sets it
    # when an earlier attempt reached the host.
    retried: bool

    def __init__(self, message: str, *, host: str | None = None, status: int | None = None,
                 code: str | None = None, extra: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.host = host
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.extra: ErrorBody = dict(extra or {})

    def to_dict(self) -> ErrorBody:
        body: ErrorBody = {"error": self.message, "code": self.code}
        if self.host is not None:
            body["host"] = self.host
        body.update(self.extra)
        return body


# --- input errors (4xx) -------------------------------------------------------------------------
class InvalidRequest(GpuBridgeError):
    status = 400
    code = "invalid_request"


class InvalidModelName(InvalidRequest):
    code = "invalid_model_name"


class RegistryNotAllowed(InvalidRequest):
    code = "registry_not_allowed"


class Unauthorized(GpuBridgeError):
    status = 401
    code = "unauthorized"


class Forbidden(GpuBridgeError):
    status = 403
    code = "forbidden"


class UnsupportedMediaType(GpuBridgeError):
    status = 415
    code = "unsupported_media_type"


class NotFound(GpuBridgeError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class Conflict(GpuBridgeError):
    status = 409
    code = "conflict"


class PayloadTooLarge(GpuBridgeError):
    status = 413
    code = "payload_too_large"


class RateLimited(GpuBridgeError):
    """429; ``retry_after`` (seconds) becomes a ``Retry-After`` header."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float = 1, host: str | None = None, status: int | None = None,
                 code: str | None = None, extra: Mapping[str, Any] | None = None):
        super().__init__(message, host=host, status=status, code=code, extra=extra)
        self.retry_after = max(1, int(retry_after))


class QueueFull(RateLimited):
    code = "queue_full"


class InsufficientStorage(GpuBridgeError):
    status = 507
    code = "insufficient_storage"


# --- Ollama (below the GPU server) --------------------------------------------------------------
class OllamaError(GpuBridgeError):
    """Ollama answered, but with an error we cannot map to a client mistake."""

    status = 502
    code = "ollama_error"


class OllamaUnavailable(OllamaError):
    status = 503
    code = "ollama_unavailable"


class OllamaTimeout(OllamaError):
    status = 504
    code = "ollama_timeout"


class PullStalled(OllamaError):
    status = 504
    code = "pull_stalled"


# --- GPU hosts, seen from production ------------------------------------------------------------
class GpuHostError(GpuBridgeError):
    """A GPU host failed; ``host`` names it."""

    status = 502
    code = "gpu_server_error"


class GpuHostUnreachable(GpuHostError):
    status = 503
    code = "gpu_unreachable"


class GpuHostTimeout(GpuHostError):
    status = 504
    code = "gpu_timeout"


class GpuHostUnauthorized(GpuHostError):
    # Our token was refused by the GPU host: a deployment problem, not the caller's, hence 502.
    status = 502
    code = "gpu_unauthorized"


class CircuitOpen(GpuHostUnreachable):
    code = "gpu_circuit_open"


class NoHealthyHost(GpuHostUnreachable):
    code = "no_healthy_gpu_host"


# --- NFS channel -------------------------------------------------------------------------------
class ChannelError(GpuBridgeError):
    status = 503
    code = "nfs_channel_error"


class ShareNotReady(ChannelError):
    code = "nfs_share_not_ready"


class CommandExpired(ChannelError):
    status = 504
    code = "command_expired"


class ConfigError(GpuBridgeError):
    """A setting is missing or malformed: the message says which variable to fix."""

    code = "config_error"
