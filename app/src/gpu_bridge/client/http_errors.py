"""What only the HTTP channel can fail with, as the project's error types.

Two halves, both with messages that name the host and say what to check:
- ``classify``: a ``requests`` exception (refused, timed out, reset, TLS) → a ``GpuHostError``;
  THE place where transport exceptions become our types (exhausted read retries surface as
  ``requests.ConnectionError``, not ``ReadTimeout``, so the cause chain is read, not just the type);
- ``answer_error``: an HTTP error answer → our type. It handles what only HTTP has (a refused token,
  the TLS proxy's refusals, a body that is not JSON) and hands every gpu-bridge error body to the
  shared ``wire_errors.error_from_wire``, which the NFS transport uses too.
"""

from __future__ import annotations

import errno
import ssl

import requests
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from ..config import ClientSettings, GpuHost
from ..errors import GpuBridgeError, GpuHostError, GpuHostTimeout, GpuHostUnauthorized, GpuHostUnreachable
from .wire_errors import error_from_wire

# Codes the GPU host's TLS proxy answers with (roles/gpu_http_server/templates/nginx-gpu-bridge.conf.j2).
TLS_CLIENT_CODES = frozenset({"client_certificate_required", "client_certificate_invalid"})
_MUTUAL_TLS_FIX = ("GPU_BRIDGE_CLIENT_CERT_FILE and GPU_BRIDGE_CLIENT_KEY_FILE to a certificate signed by the CA "
                   "the GPU host trusts")


def answer_error(resp: requests.Response, body: object, method: str, path: str, *, host: GpuHost,
                 settings: ClientSettings, tokens: int) -> GpuBridgeError:
    """An HTTP error answer (status >= 300) → our error type. ``tokens``: how many we may send."""
    label, status = host.label, resp.status_code
    code = body.get("code") if isinstance(body, dict) else None
    if code in TLS_CLIENT_CODES:
        # The GPU host's TLS proxy (nginx) refused our client certificate: configuration, not a
        # sick host, so it never counts against the breaker (like a refused token).
        have = "presented no client certificate" if not settings.client_cert_file else \
            "presented a client certificate it does not accept"
        return GpuHostUnauthorized(f"{label} requires mutual TLS and this client {have}: set {_MUTUAL_TLS_FIX} "
                                   "(gpu_http_server_tls_client_ca)", host=label)
    if code == "tls_required":
        return GpuHostError(f"{label} speaks TLS on port {host.port}: set GPU_BRIDGE_GPU_SCHEME=https", host=label)
    if status == 401:
        # Answered before the route ran: the caller's fault is our configuration, not the host's health.
        if tokens > 1:
            return GpuHostUnauthorized(f"all {tokens} tokens rejected by {label}: one line of "
                                       "GPU_BRIDGE_API_TOKEN(_FILE) must match a token of the GPU host's", host=label)
        if tokens:
            return GpuHostUnauthorized(f"token rejected by {label}: GPU_BRIDGE_API_TOKEN must match the GPU host's",
                                       host=label)
        return GpuHostUnauthorized(f"{label} requires a token: set GPU_BRIDGE_API_TOKEN or "
                                   "GPU_BRIDGE_API_TOKEN_FILE to the GPU host's token", host=label)
    # Said when the answer is not our GPU server's JSON error: a proxy, another service, a crashed worker.
    hint = "is GPU_INSTANCE_HOSTS pointing at a gpu-bridge GPU server?" if status in (404, 405) else \
        "check gpu-http-server.service's log on that host"
    return error_from_wire(body, host=host, status=status, retry_after=resp.headers.get("Retry-After"),
                           not_ours=f"{label} answered {method} {path} with HTTP {status}: {hint}")


def _causes(exc: BaseException) -> list[BaseException]:
    """The chain requests -> MaxRetryError -> urllib3 error -> OS error, outermost first."""
    chain: list[BaseException] = [exc]
    cur: BaseException = exc
    for _ in range(6):
        if isinstance(cur, MaxRetryError) and cur.reason is not None:
            cur = cur.reason
        elif isinstance(cur, requests.RequestException) and cur.args and isinstance(cur.args[0], BaseException):
            cur = cur.args[0]
        elif isinstance(cur, ProtocolError) and len(cur.args) > 1 and isinstance(cur.args[1], BaseException):
            cur = cur.args[1]
        else:
            break
        chain.append(cur)
    return chain


def _is_refused(cause: BaseException) -> bool:
    if isinstance(cause, ConnectionRefusedError) or isinstance(cause.__cause__, ConnectionRefusedError):
        return True
    text = str(cause)
    return "Connection refused" in text or f"[Errno {errno.ECONNREFUSED}]" in text


def classify(exc: requests.RequestException, method: str, path: str, timeout: tuple[float, float], *,
             host: GpuHost, settings: ClientSettings) -> GpuHostError:
    """A request that got no HTTP answer → the ``GpuHostError`` that says why."""
    label = host.label
    connect_s, read_s = timeout
    chain = _causes(exc)
    cause = chain[-1]

    def seen(*types: type[BaseException]) -> bool:
        return any(isinstance(c, types) for c in chain)

    if isinstance(exc, requests.ConnectTimeout) or any(
            isinstance(c, ConnectTimeoutError) and not isinstance(c, NewConnectionError) for c in chain):
        return GpuHostUnreachable(f"{label} did not accept a connection within {connect_s:g} s: is the host up "
                                  f"and port {host.port} open (firewall)?", host=label)
    if isinstance(exc, requests.ReadTimeout) or seen(ReadTimeoutError) or isinstance(cause, TimeoutError):
        # Also reached as requests.ConnectionError(MaxRetryError(ReadTimeoutError)) once GET/DELETE
        # read retries are exhausted.
        setting = "GPU_BRIDGE_PULL_TIMEOUT" if read_s == settings.pull_timeout and \
            read_s != settings.read_timeout else "GPU_BRIDGE_READ_TIMEOUT"
        return GpuHostTimeout(f"{label} did not answer {method} {path} within {read_s:g} s (read timeout, "
                              f"{setting}): the host or its Ollama is overloaded or hung", host=label)
    if seen(NameResolutionError):
        return GpuHostUnreachable(f"cannot resolve {host.name!r}: check GPU_INSTANCE_HOSTS and DNS", host=label)
    if seen(NewConnectionError) and _is_refused(cause):
        return GpuHostUnreachable(f"{label} refused the connection: is gpu-http-server.service running?", host=label)
    if isinstance(exc, requests.exceptions.SSLError) or seen(ssl.SSLError):
        return _tls_error(chain, host=host, settings=settings)
    if seen(NewConnectionError):
        return GpuHostUnreachable(f"cannot connect to {label}: {cause}", host=label)
    if isinstance(exc, requests.exceptions.ChunkedEncodingError | requests.ConnectionError):
        # The request may have reached the host (ProtocolError: connection reset or closed).
        return GpuHostError(f"{label} closed the connection during {method} {path}: check "
                            "gpu-http-server.service's log on that host", host=label)
    return GpuHostError(f"request to {label} failed: {type(exc).__name__}: {exc}", host=label)


def _tls_error(chain: list[BaseException], *, host: GpuHost, settings: ClientSettings) -> GpuHostError:
    label = host.label
    text = " ".join(str(c) for c in chain)
    if "CERTIFICATE_VERIFY_FAILED" in text or "doesn't match" in text or "Hostname mismatch" in text:
        where = f"the CA bundle {settings.ca_file}" if settings.ca_file else "the system's CA bundle"
        reason = next((v for c in chain if (v := getattr(c, "verify_message", None))), None)
        return GpuHostUnreachable(f"cannot verify {label}'s TLS certificate against {where}"
                                  f"{f' ({reason})' if reason else ''}: GPU_BRIDGE_GPU_CA_FILE must name the CA "
                                  f"that signed it, and the certificate must name {host.name!r}", host=label)
    if "CERTIFICATE_REQUIRED" in text or "certificate required" in text or "UNKNOWN_CA" in text \
            or "BAD_CERTIFICATE" in text or "bad certificate" in text:
        return GpuHostUnauthorized(f"{label} refused this client's TLS certificate: set {_MUTUAL_TLS_FIX}",
                                   host=label)
    if not settings.client_cert_file and ("EOF occurred in violation of protocol" in text
                                          or "UNEXPECTED_EOF" in text or "Connection reset" in text):
        # With TLS 1.3 a server that wants a client certificate often just closes the connection
        # (the alert races the EOF): without a certificate of ours, that is the likely reason.
        return GpuHostUnauthorized(f"{label} refused this client's TLS certificate (none was sent: the host "
                                   f"closed the connection during the handshake): set {_MUTUAL_TLS_FIX}",
                                   host=label)
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text or "record layer failure" in text:
        return GpuHostUnreachable(f"{label} does not speak TLS on port {host.port}: check "
                                  "GPU_BRIDGE_GPU_SCHEME (https needs the TLS proxy on the GPU host)", host=label)
    return GpuHostUnreachable(f"TLS with {label} failed ({type(chain[-1]).__name__}: {chain[-1]}): check "
                              "GPU_BRIDGE_GPU_SCHEME, GPU_BRIDGE_GPU_CA_FILE and the client certificate",
                              host=label)


__all__ = ["TLS_CLIENT_CODES", "answer_error", "classify"]
