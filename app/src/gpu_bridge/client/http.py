"""HTTP transport: one GPU host's ``/api/*`` reached with one ``requests.Session``.

Robustness rules (docs/architecture.md, shared conventions):
- one session per host, so connections are reused; every call has ``timeout=(connect, read)``;
- retries only where safe: GET and DELETE after a dropped connection, any method when the connection
  was refused (nothing was sent). Timeouts are never retried: a host that did not answer a SYN, or a
  request, within its timeout will not answer the next try either, and the breaker counts it;
- a pull is never retried blindly (a POST whose request may have reached the host);
- every failure is classified into the project's error types in ONE place, ``_classify``, with a
  message that names the host and says what to check.
"""

from __future__ import annotations

import contextvars
import errno
import ssl
import threading
import time
from typing import Any
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.util.retry import Retry

from .. import __version__, names
from ..config import ClientSettings, GpuHost, token_lines
from ..errors import (
    ConfigError,
    Conflict,
    GpuBridgeError,
    GpuHostError,
    GpuHostTimeout,
    GpuHostUnauthorized,
    GpuHostUnreachable,
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
from .base import GpuTransport

# The X-Request-ID of the request being served; forwarded to GPU hosts. The backend sets it per
# request; GpuFleet copies the context into its worker threads.
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("gpu_bridge_request_id",
                                                                                default=None)

# Error codes the GPU server sends (docs/architecture.md) -> our types. Anything else falls back to
# the HTTP status.
_CODE_TYPES: dict[str, type[GpuBridgeError]] = {
    "invalid_request": InvalidRequest,
    "invalid_model_name": InvalidModelName,
    "registry_not_allowed": RegistryNotAllowed,
    "model_not_found": ModelNotFound,
    "job_not_found": JobNotFound,
    "conflict": Conflict,
    "cancelled": Conflict,
    "payload_too_large": PayloadTooLarge,
    "rate_limited": RateLimited,
    "queue_full": QueueFull,
    "insufficient_storage": InsufficientStorage,
    "ollama_error": OllamaError,
    "ollama_unavailable": OllamaUnavailable,
    "ollama_timeout": OllamaTimeout,
    "pull_stalled": PullStalled,
}
# Codes that mean "this host cannot serve model operations right now": they become GpuHostError
# (and count against the host's circuit breaker). A failed *job* (stall, Ollama error while pulling)
# is an outcome of that pull, not a sick host, and keeps its own type.
_HOST_DOWN_CODES = {"ollama_unavailable", "ollama_timeout"}
# Codes the GPU host's TLS proxy answers with (roles/gpu_http_server/templates/nginx-gpu-bridge.conf.j2).
_TLS_CLIENT_CODES = {"client_certificate_required", "client_certificate_invalid"}
PROBE_READ_TIMEOUT = 2.0
PULL_POLL_INTERVAL = 0.25  # seconds between polls of a job someone waits for


class _SafeRetry(Retry):
    """urllib3 Retry that never retries a timeout (refused and dropped connections still retry)."""

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        # Neither timeout is retried: a host that did not answer within the timeout will not answer
        # the next try either, and a retry would triple the wait (3 x 30 s for one listing).
        if isinstance(error, ReadTimeoutError):
            raise error  # as urllib3 does for a method it may not retry: requests.ReadTimeout
        if isinstance(error, ConnectTimeoutError) and not isinstance(error, NewConnectionError):
            # MaxRetryError keeps requests' mapping: it surfaces as requests.ConnectTimeout.
            raise MaxRetryError(_pool, url, error) from error
        return super().increment(method=method, url=url, response=response, error=error, _pool=_pool,
                                 _stacktrace=_stacktrace)


def _retry_policy(retries: int) -> Retry:
    return _SafeRetry(
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


class HttpTransport(GpuTransport):
    """The GPU server's HTTP API for one host (``GpuHost``), per ``ClientSettings``."""

    kind = "http"

    def __init__(self, host: GpuHost, settings: ClientSettings | None = None):
        super().__init__(host)
        self.settings = settings or ClientSettings()
        self.base_url = host.base_url
        self.session = requests.Session()
        self.session.trust_env = False  # GPU hosts are on the private network: no proxy from the environment
        adapter = HTTPAdapter(max_retries=_retry_policy(self.settings.retries), pool_connections=1,
                              pool_maxsize=16)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        # TLS (GPU_BRIDGE_GPU_SCHEME=https): verify the host against our CA bundle, never the
        # environment's (trust_env is off), and present our certificate for mutual TLS.
        if self.settings.ca_file:
            self.session.verify = self.settings.ca_file
        if self.settings.client_cert_file:
            self.session.cert = ((self.settings.client_cert_file, self.settings.client_key_file)
                                 if self.settings.client_key_file else self.settings.client_cert_file)
        self.session.headers["User-Agent"] = f"gpu-bridge-client/{__version__}"
        self.session.headers["Accept"] = "application/json"
        # Several tokens (one per line) during a rotation: the first is sent; when the host refuses it,
        # the others are tried and the one it accepts is kept for this host.
        self.tokens = token_lines(self.settings.api_token)
        for token in self.tokens:
            if not token.isascii() or not token.isprintable():
                raise ConfigError("GPU_BRIDGE_API_TOKEN holds characters that cannot travel in an HTTP header: use "
                                  "printable ASCII")
        if self.tokens:
            self.session.headers["Authorization"] = f"Bearer {self.tokens[0]}"
        self._token_lock = threading.Lock()
        self.last_latency_ms: float | None = None

    # --- GpuTransport ------------------------------------------------------------------------
    def health(self) -> dict:
        return self._request("GET", "/api/health")

    def probe(self) -> dict:
        # The breaker's half-open trial: health answers from cached probes, so 2 s is plenty.
        return self._request("GET", "/api/health", read_timeout=min(self.settings.read_timeout, PROBE_READ_TIMEOUT))

    def list_models(self) -> list[dict]:
        body = self._request("GET", "/api/models")
        models = body.get("models")
        if not isinstance(models, list):
            raise GpuHostError(f"{self.host.label} sent a model list without 'models': is it a gpu-bridge GPU server?",
                               host=self.host.label)
        return models

    def start_pull(self, model: str) -> dict:
        return self._request("POST", f"/api/models/{self._model_path(model)}")

    def pull_and_wait(self, model: str) -> dict:
        """Start the pull, then poll its job: no request (and no thread of the GPU server) is held
        for the whole pull, and a slow pull that makes progress is never a read timeout."""
        job = self.start_pull(model)
        job.pop("joined", None)
        return self.wait_job(job)

    def wait_job(self, job: dict) -> dict:
        """Poll a job until it is finished; raise its error as ``?wait=true`` would.

        The same limits as over NFS: GPU_BRIDGE_PULL_TIMEOUT without progress, and
        GPU_BRIDGE_PULL_DEADLINE in all when set. A poll that fails (the host restarting, a dropped
        connection) is retried until the no-progress limit, then its error is raised."""
        label, job_id = self.host.label, job["id"]
        stall, total = self.settings.pull_timeout, self.settings.pull_deadline
        started = last_change = time.monotonic()
        key: tuple | None = None
        poll_error: GpuHostError | None = None
        while True:
            state = job.get("state")
            if state == "succeeded":
                return job
            if state in ("failed", "cancelled"):
                raise self._job_error(job)
            now = time.monotonic()
            new_key = (state, job.get("completed"), job.get("total"), job.get("status"))
            if new_key != key:
                key, last_change = new_key, now
            if now - last_change > stall:
                if poll_error is not None:
                    poll_error.extra.setdefault("job", job)
                    raise poll_error
                raise PullStalled(f"{label}: the pull of {job.get('model')!r} (job {job_id}) made no progress for "
                                  f"{stall:g} s (GPU_BRIDGE_PULL_TIMEOUT); last status: {job.get('status') or 'none'}",
                                  host=label, extra={"job": job})
            if total and now - started > total:
                raise PullStalled(f"{label}: the pull of {job.get('model')!r} (job {job_id}) is still {state} after "
                                  f"{total:g} s (GPU_BRIDGE_PULL_DEADLINE); it goes on on the host: follow it with "
                                  f"GET /api/jobs/{job_id}", host=label, code="pull_deadline", extra={"job": job})
            time.sleep(PULL_POLL_INTERVAL)
            try:
                job = self.get_job(job_id)
                poll_error = None
            except GpuHostError as exc:
                poll_error = exc

    def _job_error(self, job: dict) -> GpuBridgeError:
        state = job.get("state")
        code = job.get("error_code") or ("cancelled" if state == "cancelled" else "ollama_error")
        cls = _CODE_TYPES.get(code, OllamaError)
        return cls(f"{self.host.label}: {job.get('error') or f'pull {state}'}", host=self.host.label, code=code,
                   extra={"job": job})

    def list_jobs(self) -> list[dict]:
        """All jobs the host remembers, newest first (not part of GpuTransport; the CLI uses it)."""
        body = self._request("GET", "/api/jobs")
        return body.get("jobs") or []

    def get_job(self, job_id: str) -> dict:
        return self._request("GET", f"/api/jobs/{self._job_path(job_id)}")

    def cancel_job(self, job_id: str) -> dict:
        path = f"/api/jobs/{self._job_path(job_id)}"
        try:
            return self._request("DELETE", path)
        except Conflict as exc:
            if not getattr(exc, "retried", False):
                raise
            # Our first DELETE was cut off by a read timeout but did cancel: the retry found it finished.
            return self.get_job(job_id)

    def delete_model(self, model: str) -> dict:
        path = f"/api/models/{self._model_path(model)}"
        try:
            return self._request("DELETE", path)
        except ModelNotFound as exc:
            if not getattr(exc, "retried", False):
                raise
            # The first DELETE timed out after deleting; the (safe) retry then saw 404: it is deleted.
            return {"deleted": names.parse(model).display}

    def close(self) -> None:
        self.session.close()

    # --- plumbing ------------------------------------------------------------------------------
    @staticmethod
    def _model_path(model: str) -> str:
        parsed = names.parse(model)  # InvalidModelName before anything is sent
        return quote(parsed.display, safe="/:")

    @staticmethod
    def _job_path(job_id: str) -> str:
        if not isinstance(job_id, str) or not job_id or len(job_id) > 200 or "/" in job_id or job_id in (".", ".."):
            raise InvalidRequest(f"invalid job id {job_id!r}")
        return quote(job_id, safe="")

    def _request(self, method: str, path: str, *, params: dict | None = None,
                 read_timeout: float | None = None) -> dict:
        timeout = (self.settings.connect_timeout, read_timeout or self.settings.read_timeout)
        headers = {}
        request_id = current_request_id.get()
        if request_id:
            headers["X-Request-ID"] = request_id
        started = time.monotonic()
        try:
            resp = self.session.request(method, self.base_url + path, params=params, headers=headers,
                                        timeout=timeout, allow_redirects=False)
            if resp.status_code == 401 and len(self.tokens) > 1:
                resp = self._with_another_token(resp, method, path, params, headers, timeout)
        except requests.RequestException as exc:
            raise self._classify(exc, method, path, timeout) from None
        self.last_latency_ms = round((time.monotonic() - started) * 1000, 1)
        try:
            return self._decode(resp, method, path)
        except GpuBridgeError as exc:
            retries = getattr(resp.raw, "retries", None)
            if retries is not None and any(isinstance(h.error, ReadTimeoutError | ProtocolError)
                                           for h in retries.history):
                exc.retried = True  # an earlier attempt reached the host and may already have done the work
            raise

    def _with_another_token(self, refused: requests.Response, method: str, path: str, params: dict | None,
                            headers: dict, timeout: tuple[float, float]) -> requests.Response:
        """The host refused our token (a 401 is answered before anything is done, so resending is
        safe): try the other tokens; keep the first one it accepts."""
        sent = self.session.headers.get("Authorization")
        for token in self.tokens:
            auth = f"Bearer {token}"
            if auth == sent:
                continue
            resp = self.session.request(method, self.base_url + path, params=params,
                                        headers={**headers, "Authorization": auth}, timeout=timeout,
                                        allow_redirects=False)
            if resp.status_code != 401:
                with self._token_lock:
                    self.session.headers["Authorization"] = auth
                return resp
        return refused

    def _decode(self, resp: requests.Response, method: str, path: str) -> dict:
        label = self.host.label
        try:
            body = resp.json() if resp.content else {}
        except ValueError:
            body = None
        if resp.status_code < 300:
            if not isinstance(body, dict):
                raise GpuHostError(f"{label} answered {method} {path} with something that is not a JSON object: "
                                   "is GPU_INSTANCE_HOSTS pointing at a gpu-bridge GPU server?", host=label)
            return body
        raise self._error_from_response(resp, body if isinstance(body, dict) else None, method, path)

    def _error_from_response(self, resp: requests.Response, body: dict | None, method: str,
                             path: str) -> GpuBridgeError:
        """An HTTP error answer from the host -> our error type (the other half of ``_classify``)."""
        label, status = self.host.label, resp.status_code
        code = body.get("code") if body else None
        message = (body.get("error") if body else None) or f"HTTP {status} {resp.reason or ''}".strip()
        if code in _TLS_CLIENT_CODES:
            # The GPU host's TLS proxy (nginx) refused our client certificate: configuration, not a
            # sick host, so it never counts against the breaker (like a refused token).
            have = "presented no client certificate" if not self.settings.client_cert_file else \
                "presented a client certificate it does not accept"
            return GpuHostUnauthorized(f"{label} requires mutual TLS and this client {have}: set "
                                       "GPU_BRIDGE_CLIENT_CERT_FILE and GPU_BRIDGE_CLIENT_KEY_FILE to a certificate "
                                       "signed by the CA the GPU host trusts (gpu_http_server_tls_client_ca)",
                                       host=label)
        if code == "tls_required":
            return GpuHostError(f"{label} speaks TLS on port {self.host.port}: set GPU_BRIDGE_GPU_SCHEME=https",
                                host=label)
        if status == 401:
            if len(self.tokens) > 1:
                return GpuHostUnauthorized(f"all {len(self.tokens)} tokens rejected by {label}: one line of "
                                           "GPU_BRIDGE_API_TOKEN(_FILE) must match a token of the GPU host's",
                                           host=label)
            if self.tokens:
                return GpuHostUnauthorized(f"token rejected by {label}: GPU_BRIDGE_API_TOKEN must match the "
                                           "GPU host's", host=label)
            return GpuHostUnauthorized(f"{label} requires a token: set GPU_BRIDGE_API_TOKEN or "
                                       "GPU_BRIDGE_API_TOKEN_FILE to the GPU host's token", host=label)
        if body is None or not isinstance(code, str):
            # Not our GPU server's JSON error: a proxy, another service, or a crashed worker.
            hint = "is GPU_INSTANCE_HOSTS pointing at a gpu-bridge GPU server?" if status in (404, 405) else \
                "check gpu-http-server.service's log on that host"
            return GpuHostError(f"{label} answered {method} {path} with HTTP {status}: {hint}", host=label)
        extra = {}
        if body.get("job") is not None:
            extra["job"] = body["job"]
        detail = f"{label}: {message}"
        if code in _HOST_DOWN_CODES:
            cls_status = 504 if code == "ollama_timeout" else 503
            return GpuHostError(f"{detail} (check ollama.service on {self.host.name})", host=label,
                                status=cls_status, code=code, extra=extra)
        cls = _CODE_TYPES.get(code)
        if cls is None:
            if status >= 500:
                return GpuHostError(detail, host=label, status=502 if status == 500 else status, code=code,
                                    extra=extra)
            cls = {400: InvalidRequest, 404: NotFound, 409: Conflict, 413: PayloadTooLarge,
                   429: RateLimited}.get(status, GpuBridgeError)
        kwargs: dict[str, Any] = {"host": label, "status": status, "code": code, "extra": extra}
        if issubclass(cls, RateLimited):
            try:
                kwargs["retry_after"] = int(float(resp.headers.get("Retry-After", "1")))
            except ValueError:
                kwargs["retry_after"] = 1
        return cls(detail, **kwargs)

    def _classify(self, exc: requests.RequestException, method: str, path: str,
                  timeout: tuple[float, float]) -> GpuHostError:
        """THE place where transport exceptions become our error types."""
        label = self.host.label
        connect_s, read_s = timeout
        chain = _causes(exc)
        cause = chain[-1]

        def seen(*types) -> bool:
            return any(isinstance(c, types) for c in chain)

        if isinstance(exc, requests.ConnectTimeout) or any(
                isinstance(c, ConnectTimeoutError) and not isinstance(c, NewConnectionError) for c in chain):
            return GpuHostUnreachable(f"{label} did not accept a connection within {connect_s:g} s: is the host up "
                                      f"and port {self.host.port} open (firewall)?", host=label)
        if isinstance(exc, requests.ReadTimeout) or seen(ReadTimeoutError) or isinstance(cause, TimeoutError):
            # Also reached as requests.ConnectionError(MaxRetryError(ReadTimeoutError)) once GET/DELETE
            # read retries are exhausted.
            setting = "GPU_BRIDGE_PULL_TIMEOUT" if read_s == self.settings.pull_timeout and \
                read_s != self.settings.read_timeout else "GPU_BRIDGE_READ_TIMEOUT"
            return GpuHostTimeout(f"{label} did not answer {method} {path} within {read_s:g} s (read timeout, "
                                  f"{setting}): the host or its Ollama is overloaded or hung", host=label)
        if seen(NameResolutionError):
            return GpuHostUnreachable(f"cannot resolve {self.host.name!r}: check GPU_INSTANCE_HOSTS and DNS",
                                      host=label)
        if seen(NewConnectionError) and _is_refused(cause):
            return GpuHostUnreachable(f"{label} refused the connection: is gpu-http-server.service running?",
                                      host=label)
        if isinstance(exc, requests.exceptions.SSLError) or seen(ssl.SSLError):
            return self._tls_error(exc, chain)
        if seen(NewConnectionError):
            return GpuHostUnreachable(f"cannot connect to {label}: {cause}", host=label)
        if isinstance(exc, requests.exceptions.ChunkedEncodingError | requests.ConnectionError):
            # The request may have reached the host (ProtocolError: connection reset or closed).
            return GpuHostError(f"{label} closed the connection during {method} {path}: check "
                                "gpu-http-server.service's log on that host", host=label)
        return GpuHostError(f"request to {label} failed: {type(exc).__name__}: {exc}", host=label)

    def _tls_error(self, exc: requests.RequestException, chain: list[BaseException]) -> GpuHostError:
        label = self.host.label
        text = " ".join(str(c) for c in chain)
        if "CERTIFICATE_VERIFY_FAILED" in text or "doesn't match" in text or "Hostname mismatch" in text:
            where = f"the CA bundle {self.settings.ca_file}" if self.settings.ca_file else "the system's CA bundle"
            reason = next((v for c in chain if (v := getattr(c, "verify_message", None))), None)
            return GpuHostUnreachable(f"cannot verify {label}'s TLS certificate against {where}"
                                      f"{f' ({reason})' if reason else ''}: GPU_BRIDGE_GPU_CA_FILE must name the CA "
                                      f"that signed it, and the certificate must name {self.host.name!r}", host=label)
        if "CERTIFICATE_REQUIRED" in text or "certificate required" in text or "UNKNOWN_CA" in text \
                or "BAD_CERTIFICATE" in text or "bad certificate" in text:
            return GpuHostUnauthorized(f"{label} refused this client's TLS certificate: set "
                                       "GPU_BRIDGE_CLIENT_CERT_FILE and GPU_BRIDGE_CLIENT_KEY_FILE to a certificate "
                                       "signed by the CA the GPU host trusts", host=label)
        if not self.settings.client_cert_file and ("EOF occurred in violation of protocol" in text
                                                   or "UNEXPECTED_EOF" in text or "Connection reset" in text):
            # With TLS 1.3 a server that wants a client certificate often just closes the connection
            # (the alert races the EOF): without a certificate of ours, that is the likely reason.
            return GpuHostUnauthorized(f"{label} refused this client's TLS certificate (none was sent: the host "
                                       "closed the connection during the handshake): set "
                                       "GPU_BRIDGE_CLIENT_CERT_FILE and GPU_BRIDGE_CLIENT_KEY_FILE to a certificate "
                                       "signed by the CA the GPU host trusts", host=label)
        if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text or "record layer failure" in text:
            return GpuHostUnreachable(f"{label} does not speak TLS on port {self.host.port}: check "
                                      "GPU_BRIDGE_GPU_SCHEME (https needs the TLS proxy on the GPU host)", host=label)
        return GpuHostUnreachable(f"TLS with {label} failed ({type(chain[-1]).__name__}: {chain[-1]}): check "
                                  "GPU_BRIDGE_GPU_SCHEME, GPU_BRIDGE_GPU_CA_FILE and the client certificate",
                                  host=label)

    def __repr__(self) -> str:
        return f"<HttpTransport {self.base_url}>"


__all__ = ["HttpTransport", "current_request_id"]
