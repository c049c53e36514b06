"""HTTP transport: one GPU host's ``/api/*`` reached with one ``requests.Session``.

The session (retry policy, TLS, headers, tokens) is set up in ``client.http_session``; what can go
wrong on the way (sockets, TLS, refused tokens) becomes our error types in ``client.http_errors``;
the GPU server's own error bodies go through ``client.wire_errors.error_from_wire``, the mapping the
NFS transport shares. Every call has ``timeout=(connect, read)``; only GET and DELETE are retried
after a dropped connection (any method when the connection was refused), never after a timeout.
"""

from __future__ import annotations

import contextvars
import threading
import time
from urllib.parse import quote

import requests
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from .. import keep_alive as keep_alive_rule
from .. import names
from ..config import ClientSettings, GpuHost
from ..errors import Conflict, GpuBridgeError, GpuHostError, InvalidRequest, ModelNotFound
from .base import GpuTransport, JsonDict
from .http_errors import answer_error, classify
from .http_session import new_session, sendable_tokens

# The X-Request-ID of the request being served; forwarded to GPU hosts. The backend sets it per
# request; GpuFleet copies the context into its worker threads.
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("gpu_bridge_request_id",
                                                                                default=None)
PROBE_READ_TIMEOUT = 2.0
Params = dict[str, str]


class HttpTransport(GpuTransport):
    """The GPU server's HTTP API for one host (``GpuHost``), per ``ClientSettings``."""

    kind = "http"

    def __init__(self, host: GpuHost, settings: ClientSettings | None = None):
        super().__init__(host, settings)
        self.settings = self.client_settings
        self.base_url = host.base_url
        # Several tokens (one per line) during a rotation: the first is sent; when the host refuses it,
        # the others are tried and the one it accepts is kept for this host.
        self.tokens = sendable_tokens(self.settings)  # ConfigError before any session exists
        self.session = new_session(self.settings, self.tokens)
        self._token_lock = threading.Lock()

    # --- GpuTransport ------------------------------------------------------------------------
    def health(self) -> JsonDict:
        return self._request("GET", "/api/health")

    def probe(self) -> JsonDict:
        # The breaker's half-open trial: health answers from cached probes, so 2 s is plenty.
        return self._request("GET", "/api/health", read_timeout=min(self.settings.read_timeout, PROBE_READ_TIMEOUT))

    def list_models(self) -> list[JsonDict]:
        body = self._request("GET", "/api/models")
        models = body.get("models")
        if not isinstance(models, list):
            raise GpuHostError(f"{self.host.label} sent a model list without 'models': is it a gpu-bridge GPU server?",
                               host=self.host.label)
        return models

    def start_pull(self, model: str) -> JsonDict:
        return self._request("POST", f"/api/models/{self._model_path(model)}")

    # pull_and_wait and wait_job: GpuTransport's (start, then poll GET /api/jobs/<id>).

    def list_jobs(self) -> list[JsonDict]:
        body = self._request("GET", "/api/jobs")
        jobs = body.get("jobs")
        return jobs if isinstance(jobs, list) else []

    def get_job(self, job_id: str) -> JsonDict:
        return self._request("GET", f"/api/jobs/{self._job_path(job_id)}")

    def cancel_job(self, job_id: str) -> JsonDict:
        path = f"/api/jobs/{self._job_path(job_id)}"
        try:
            return self._request("DELETE", path)
        except Conflict as exc:
            if not getattr(exc, "retried", False):
                raise
            # Our first DELETE was cut off by a read timeout but did cancel: the retry found it finished.
            return self.get_job(job_id)

    def delete_model(self, model: str) -> JsonDict:
        path = f"/api/models/{self._model_path(model)}"
        try:
            return self._request("DELETE", path)
        except ModelNotFound as exc:
            if not getattr(exc, "retried", False):
                raise
            # The first DELETE timed out after deleting; the (safe) retry then saw 404: it is deleted.
            return {"deleted": names.parse(model).display}

    def copy_model(self, source: str, destination: str) -> JsonDict:
        body = {"source": names.parse(source).display, "destination": names.parse(destination).display}
        return self._request("POST", "/api/copy", json_body=body)

    def loaded_models(self) -> list[JsonDict]:
        body = self._request("GET", "/api/models/loaded")
        models = body.get("models")
        if not isinstance(models, list):
            raise GpuHostError(f"{self.host.label} sent a loaded-model list without 'models': is it a gpu-bridge GPU "
                               "server of this version?", host=self.host.label)
        return models

    def load_model(self, model: str, keep_alive: object = None, wait: bool = True) -> JsonDict:
        seconds = keep_alive_rule.parse(keep_alive)  # InvalidRequest before anything is sent
        body = {} if seconds is None else {"keep_alive": seconds}
        job = self._request("POST", f"/api/models/{self._model_path(model)}/load", json_body=body)
        if not wait:
            return job
        job.pop("joined", None)
        return self.wait_job(job)  # polls GET /api/jobs/<id>: no GPU-server thread held for the load

    def unload_model(self, model: str) -> JsonDict:
        return self._request("POST", f"/api/models/{self._model_path(model)}/unload")

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

    def _request(self, method: str, path: str, *, params: Params | None = None,
                 read_timeout: float | None = None, json_body: JsonDict | None = None) -> JsonDict:
        timeout = (self.settings.connect_timeout, read_timeout or self.settings.read_timeout)
        headers: dict[str, str] = {}
        request_id = current_request_id.get()
        if request_id:
            headers["X-Request-ID"] = request_id
        started = time.monotonic()
        try:
            resp = self.session.request(method, self.base_url + path, params=params, headers=headers,
                                        json=json_body, timeout=timeout, allow_redirects=False)
            if resp.status_code == 401 and len(self.tokens) > 1:
                resp = self._with_another_token(resp, method, path, params, headers, timeout, json_body)
        except requests.RequestException as exc:
            raise classify(exc, method, path, timeout, host=self.host, settings=self.settings) from None
        self.last_latency_ms = round((time.monotonic() - started) * 1000, 1)
        try:
            return self._decode(resp, method, path)
        except GpuBridgeError as exc:
            retries = getattr(resp.raw, "retries", None)
            if retries is not None and any(isinstance(h.error, ReadTimeoutError | ProtocolError)
                                           for h in retries.history):
                exc.retried = True  # an earlier attempt reached the host and may already have done the work
            raise

    def _with_another_token(self, refused: requests.Response, method: str, path: str, params: Params | None,
                            headers: dict[str, str], timeout: tuple[float, float],
                            json_body: JsonDict | None = None) -> requests.Response:
        """The host refused our token (a 401 is answered before anything is done, so resending is
        safe): try the other tokens; keep the first one it accepts."""
        sent = self.session.headers.get("Authorization")
        for token in self.tokens:
            auth = f"Bearer {token}"
            if auth == sent:
                continue
            resp = self.session.request(method, self.base_url + path, params=params, json=json_body,
                                        headers={**headers, "Authorization": auth}, timeout=timeout,
                                        allow_redirects=False)
            if resp.status_code != 401:
                with self._token_lock:
                    self.session.headers["Authorization"] = auth
                return resp
        return refused

    def _decode(self, resp: requests.Response, method: str, path: str) -> JsonDict:
        label = self.host.label
        body: object
        try:
            body = resp.json() if resp.content else {}
        except ValueError:
            body = None
        if resp.status_code < 300:
            if not isinstance(body, dict):
                raise GpuHostError(f"{label} answered {method} {path} with something that is not a JSON object: "
                                   "is GPU_INSTANCE_HOSTS pointing at a gpu-bridge GPU server?", host=label)
            return body
        raise answer_error(resp, body, method, path, host=self.host, settings=self.settings, tokens=len(self.tokens))

    def __repr__(self) -> str:
        return f"<HttpTransport {self.base_url}>"


__all__ = ["HttpTransport", "current_request_id"]
