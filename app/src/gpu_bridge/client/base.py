"""The client interface: how production talks to one GPU host, whatever the transport.

Two implementations: ``client.http.HttpTransport`` (the GPU server's HTTP API) and
``client.nfs.NfsTransport`` (the file channel on the share). Both return plain dicts shaped like the
GPU server's JSON (see docs/architecture.md) and raise ``errors.GpuBridgeError`` subclasses; host
failures always carry ``host=``. The backend and CLI only ever see this interface, which is what
lets ``GPU_BRIDGE_TRANSPORT`` switch channels with no other change.

What every method may raise (each says which of these apply):

- ``GpuHostError`` and its subclasses: the host could not serve the call (``GpuHostUnreachable``:
  down, refused, share not mounted, worker dead; ``GpuHostTimeout``: no answer in time;
  ``GpuHostUnauthorized``: our token or client certificate was refused; a plain ``GpuHostError`` with
  ``code=ollama_unavailable``/``ollama_timeout``: its Ollama is down). The circuit breaker counts
  these, except ``GpuHostUnauthorized``.
- The host's own answers about the request, each as its ``errors.py`` class: ``InvalidModelName``
  (raised before anything is sent), ``RegistryNotAllowed``, ``ModelNotFound``, ``JobNotFound``,
  ``Conflict``, ``QueueFull``/``RateLimited`` (with ``retry_after``), ``InsufficientStorage``,
  ``PullStalled``, ``OllamaError``. The host answered, so the breaker counts a success.

Both transports turn a host's error answer into these types with ONE function,
``client.wire_errors.error_from_wire`` (a failed job: ``job_error``); they only add the checks of
their own channel (HTTP: sockets, TLS, tokens in ``client.http_errors``; NFS: share and heartbeat).

Adding an operation (loaded models, load/unload, copy, ...) costs one abstract method here, with
its signature and what it raises, plus one implementation per transport, which sends the request
its own way and hands any error answer to ``error_from_wire``. Nothing else changes: ``GpuFleet``
calls transport methods by name (``fleet.call(label, "method", ...)`` or ``fan_out``) through each
host's breaker, and the test double in tests/production/prod_helpers.py gets the method too.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any

from ..config import ClientSettings, GpuHost
from ..errors import GpuBridgeError, GpuHostError, PullStalled
from .wire_errors import job_error

# A JSON object as the GPU server sends it (a Job, a health document, a model entry). Kept as plain
# dicts: the backend passes them through to its own callers unchanged.
JsonDict = dict[str, Any]

PULL_POLL_INTERVAL = 0.25  # seconds between polls of a job someone waits for
LOAD_WAIT_GRACE = 60.0  # seconds a waited load may stay unchanged beyond GPU_BRIDGE_PULL_TIMEOUT (no_change_limit)


class GpuTransport(ABC):
    """One GPU host reached through one channel."""

    kind = "abstract"

    def __init__(self, host: GpuHost, client: ClientSettings | None = None):
        self.host = host
        # The pull limits (GPU_BRIDGE_PULL_TIMEOUT / _DEADLINE) wait_job applies, on every channel.
        self.client_settings = client or ClientSettings()
        self.last_latency_ms: float | None = None  # of the last call that reached the host

    # --- host state ----------------------------------------------------------------------------
    @abstractmethod
    def health(self) -> JsonDict:
        """The host's health document (``GET /api/health`` shape). Raises ``GpuHostError``s."""

    def probe(self) -> JsonDict:
        """A cheap liveness check for the circuit breaker's half-open trial (default: ``health``)."""
        return self.health()

    # --- models ----------------------------------------------------------------------------------
    @abstractmethod
    def list_models(self) -> list[JsonDict]:
        """Installed models: dicts with name, size, digest, modified_at, details.

        Raises ``GpuHostError``s (Ollama down: ``code=ollama_unavailable``)."""

    @abstractmethod
    def start_pull(self, model: str) -> JsonDict:
        """Start (or join: ``"joined": true``) a pull; returns the Job dict at once.

        Raises ``InvalidModelName`` before sending, ``RegistryNotAllowed``, ``QueueFull``/``RateLimited``,
        ``InsufficientStorage``, ``GpuHostError``s."""

    def pull_and_wait(self, model: str) -> JsonDict:
        """Pull synchronously (the seed's behaviour): ``start_pull`` then ``wait_job``.

        Returns the succeeded Job; raises what those two raise."""
        job = self.start_pull(model)
        job.pop("joined", None)
        return self.wait_job(job)

    @abstractmethod
    def delete_model(self, model: str) -> JsonDict:
        """Delete a model; returns ``{"deleted": name}``.

        Raises ``InvalidModelName`` before sending, ``ModelNotFound``, ``GpuHostError``s."""

    def copy_model(self, source: str, destination: str) -> JsonDict:
        """Copy a model under another name on the host (no download: the blobs are shared); returns
        ``{"source", "destination", "digest"}``, the digest being the copy's (= the source's).

        Raises ``InvalidModelName`` before sending, ``ModelNotFound`` (no such source), ``GpuHostError``s.
        Both transports implement it; the default serves test doubles that keep no models."""
        raise GpuBridgeError(f"{self.host.label}: the {self.kind} transport cannot copy models", host=self.host.label,
                             status=501, code="not_implemented")

    # --- GPU memory: loaded models -----------------------------------------------------------------
    # Both transports implement these; the defaults serve test doubles that hold nothing in memory.
    def loaded_models(self) -> list[JsonDict]:
        """Models in the host's memory: dicts with name, model, digest, size, size_vram, cpu_spill,
        context_length, expires_at (``GET /api/models/loaded``).

        Raises ``GpuHostError``s (Ollama down: ``code=ollama_unavailable``)."""
        raise self._not_implemented("list loaded models")

    def load_model(self, model: str, keep_alive: object = None, wait: bool = True) -> JsonDict:
        """Load an installed model into memory; returns its Job (kind ``load``), once it succeeded
        when ``wait`` (``wait_job``, raising the job's error), else at once (``"joined"`` as for pulls).

        ``keep_alive``: what ``keep_alive.parse`` accepts (``"1h"``, seconds, ``"forever"``), None for
        Ollama's default. Raises ``InvalidModelName`` and ``InvalidRequest`` (keep_alive) before sending,
        ``ModelNotFound`` (not installed), ``QueueFull``/``RateLimited``, ``GpuHostError``s; with wait,
        the job's error (``InvalidRequest`` for an embedding-only model, ``Conflict`` when cancelled)."""
        raise self._not_implemented("load models")

    def unload_model(self, model: str) -> JsonDict:
        """Unload a model now; returns ``{"unloaded": name}`` (also when it was not loaded).

        Raises ``InvalidModelName`` before sending, ``ModelNotFound`` (not installed), ``GpuHostError``s."""
        raise self._not_implemented("unload models")

    def _not_implemented(self, what: str) -> GpuBridgeError:
        return GpuBridgeError(f"{self.host.label}: the {self.kind} transport cannot {what}", host=self.host.label,
                              status=501, code="not_implemented")

    # --- jobs ------------------------------------------------------------------------------------
    @abstractmethod
    def get_job(self, job_id: str) -> JsonDict:
        """A Job dict by id. Raises ``InvalidRequest`` (malformed id), ``JobNotFound``, ``GpuHostError``s."""

    def list_jobs(self) -> list[JsonDict]:
        """Every job the host remembers, newest first (the CLI's ``jobs``).

        Both transports implement it; the default serves test doubles that keep no job list."""
        raise GpuBridgeError(f"{self.host.label}: the {self.kind} transport cannot list jobs", host=self.host.label,
                             status=501, code="not_implemented")

    @abstractmethod
    def cancel_job(self, job_id: str) -> JsonDict:
        """Cancel a running pull; returns the Job.

        Raises ``InvalidRequest`` (malformed id), ``JobNotFound``, ``Conflict`` (already finished),
        ``GpuHostError``s."""

    def wait_job(self, job: JsonDict) -> JsonDict:
        """Poll a job until it is finished; return it when it succeeded, else raise its error as the
        GPU server's ``?wait=true`` would (``job_error``: ``PullStalled``, ``Conflict`` when cancelled, ...).

        Bounded by progress, on every channel: ``PullStalled`` when the job has not changed for
        GPU_BRIDGE_PULL_TIMEOUT, or (``code=pull_deadline``) is unfinished after GPU_BRIDGE_PULL_DEADLINE
        when set. A poll that fails (the host restarting, a dropped connection) is retried until the
        no-progress limit, then its ``GpuHostError`` is raised. No request or GPU-server thread is held
        for the whole pull, and a slow pull that makes progress is never a read timeout."""
        label, job_id = self.host.label, job["id"]
        stall, total = no_change_limit(job, self.client_settings.pull_timeout), self.client_settings.pull_deadline
        what = job_kind(job)
        started = last_change = time.monotonic()
        key: tuple[object, ...] | None = None
        poll_error: GpuHostError | None = None
        while True:
            state = job.get("state")
            if state == "succeeded":
                return job
            if state in ("failed", "cancelled"):
                raise job_error(job, host=self.host)
            now = time.monotonic()
            new_key = (state, job.get("completed"), job.get("total"), job.get("status"))
            if new_key != key:
                key, last_change = new_key, now
            if now - last_change > stall:
                if poll_error is not None:
                    poll_error.extra.setdefault("job", job)
                    raise poll_error
                raise PullStalled(f"{label}: the {what} of {job.get('model')!r} (job {job_id}) made no progress for "
                                  f"{stall:g} s (GPU_BRIDGE_PULL_TIMEOUT); last status: {job.get('status') or 'none'}",
                                  host=label, extra={"job": job})
            if total and now - started > total:
                raise PullStalled(f"{label}: the {what} of {job.get('model')!r} (job {job_id}) is still {state} after "
                                  f"{total:g} s (GPU_BRIDGE_PULL_DEADLINE); it goes on on the host: follow it with "
                                  f"GET /api/jobs/{job_id}", host=label, code="pull_deadline", extra={"job": job})
            time.sleep(PULL_POLL_INTERVAL)
            try:
                job = self.get_job(job_id)
                poll_error = None
            except GpuHostError as exc:
                poll_error = exc

    # --- resources -------------------------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 - optional hook, transports without resources skip it
        """Release connections or files."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host.label}>"


def job_kind(job: JsonDict) -> str:
    """``"pull"`` or ``"load"``, for messages (a job from an older GPU server has no kind: a pull)."""
    return "load" if job.get("kind") == "load" else "pull"


def no_change_limit(job: JsonDict, pull_timeout: float) -> float:
    """How long a waited job may show no change. A load shows none until it ends, and the GPU host
    gives it GPU_BRIDGE_PULL_STALL_TIMEOUT (300 s by default): waiting LOAD_WAIT_GRACE longer than
    GPU_BRIDGE_PULL_TIMEOUT lets the host's own verdict (loaded, or its timeout) arrive first."""
    return pull_timeout + LOAD_WAIT_GRACE if job_kind(job) == "load" else pull_timeout


__all__ = ["LOAD_WAIT_GRACE", "PULL_POLL_INTERVAL", "GpuTransport", "JsonDict", "job_kind", "no_change_limit"]
