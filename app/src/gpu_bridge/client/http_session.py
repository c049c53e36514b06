"""How the HTTP transport's ``requests.Session`` is set up: retry policy, TLS, headers, tokens.

Robustness rules (docs/architecture.md, shared conventions):
- one session per host, so connections are reused (``pool_maxsize`` 16 for the fleet's threads);
- retries only where safe: GET and DELETE after a dropped connection, any method when the connection
  was refused (nothing was sent). Timeouts are never retried: a host that did not answer a SYN, or a
  request, within its timeout will not answer the next try either, and the breaker counts it. A pull
  (a POST whose request may have reached the host) is never retried blindly;
- GPU hosts are on the private network: no proxy and no CA bundle from the environment.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Self

import requests
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import ConnectionPool
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError, ReadTimeoutError
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

from .. import __version__
from ..config import ClientSettings, token_lines
from ..errors import ConfigError


class SafeRetry(Retry):
    """urllib3 Retry that never retries a timeout (refused and dropped connections still retry)."""

    def increment(self, method: str | None = None, url: str | None = None,
                  response: BaseHTTPResponse | None = None, error: Exception | None = None,
                  _pool: ConnectionPool | None = None, _stacktrace: TracebackType | None = None) -> Self:
        # Neither timeout is retried: a host that did not answer within the timeout will not answer
        # the next try either, and a retry would triple the wait (3 x 30 s for one listing).
        if isinstance(error, ReadTimeoutError):
            raise error  # as urllib3 does for a method it may not retry: requests.ReadTimeout
        if isinstance(error, ConnectTimeoutError) and not isinstance(error, NewConnectionError):
            # MaxRetryError keeps requests' mapping: it surfaces as requests.ConnectTimeout.
            raise MaxRetryError(_pool, url or "", error) from error  # type: ignore[arg-type] # urllib3 allows no pool
        return super().increment(method=method, url=url, response=response, error=error, _pool=_pool,
                                 _stacktrace=_stacktrace)


def retry_policy(retries: int) -> Retry:
    return SafeRetry(
        total=None,
        connect=retries,          # refused / DNS failures: nothing was sent, any method
        read=retries,             # read timeouts and dropped connections: GET and DELETE only
        other=0,
        status=0,                 # an HTTP error answer is an answer: never retried
        redirect=0,
        allowed_methods=frozenset({"GET", "DELETE", "HEAD"}),
        backoff_factor=0.1,       # 0.1 s, 0.2 s, ...
        backoff_max=2.0,
        raise_on_status=False,
        respect_retry_after_header=False,
    )


def sendable_tokens(settings: ClientSettings) -> tuple[str, ...]:
    """The lines of GPU_BRIDGE_API_TOKEN(_FILE); ``ConfigError`` for one that cannot be a header.

    Several tokens (one per line) during a rotation: the first is sent; when the host refuses it,
    the transport tries the others and keeps the one it accepts."""
    tokens = token_lines(settings.api_token)
    for token in tokens:
        if not token.isascii() or not token.isprintable():
            raise ConfigError("GPU_BRIDGE_API_TOKEN holds characters that cannot travel in an HTTP header: use "
                              "printable ASCII")
    return tokens


def new_session(settings: ClientSettings, tokens: Sequence[str]) -> requests.Session:
    """A session with the retry policy, our TLS files, our headers and the first token."""
    session = requests.Session()
    session.trust_env = False  # GPU hosts are on the private network: no proxy from the environment
    adapter = HTTPAdapter(max_retries=retry_policy(settings.retries), pool_connections=1, pool_maxsize=16)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # TLS (GPU_BRIDGE_GPU_SCHEME=https): verify the host against our CA bundle, never the
    # environment's (trust_env is off), and present our certificate for mutual TLS.
    if settings.ca_file:
        session.verify = settings.ca_file
    if settings.client_cert_file:
        session.cert = ((settings.client_cert_file, settings.client_key_file) if settings.client_key_file
                        else settings.client_cert_file)
    session.headers["User-Agent"] = f"gpu-bridge-client/{__version__}"
    session.headers["Accept"] = "application/json"
    if tokens:
        session.headers["Authorization"] = f"Bearer {tokens[0]}"
    return session


__all__ = ["SafeRetry", "new_session", "retry_policy", "sendable_tokens"]
