"""The client interface: how production talks to one GPU host, whatever the transport.

Two implementations: ``client.http.HttpTransport`` (the GPU server's HTTP API) and
``client.nfs.NfsTransport`` (the file channel on the share). Both return plain dicts shaped like the
GPU server's JSON (see docs/architecture.md) and raise ``errors.GpuBridgeError`` subclasses; host
failures always carry ``host=``. The backend and CLI only ever see this interface, which is what
lets ``GPU_BRIDGE_TRANSPORT`` switch channels with no other change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..config import GpuHost


class GpuTransport(ABC):
    """One GPU host reached through one channel."""

    kind = "abstract"

    def __init__(self, host: GpuHost):
        self.host = host

    @abstractmethod
    def health(self) -> dict:
        """The host's health document (``GET /api/health`` shape)."""

    def probe(self) -> dict:
        """A cheap liveness check for the circuit breaker's half-open trial (default: ``health``)."""
        return self.health()

    @abstractmethod
    def list_models(self) -> list[dict]:
        """Installed models: dicts with name, size, digest, modified_at, details."""

    @abstractmethod
    def start_pull(self, model: str) -> dict:
        """Start (or join) a pull; returns the Job dict at once."""

    @abstractmethod
    def pull_and_wait(self, model: str) -> dict:
        """Pull synchronously (the seed's behaviour); returns the finished Job or raises its error."""

    @abstractmethod
    def get_job(self, job_id: str) -> dict:
        """A Job dict by id."""

    @abstractmethod
    def cancel_job(self, job_id: str) -> dict:
        """Cancel a running pull; returns the Job."""

    @abstractmethod
    def delete_model(self, model: str) -> dict:
        """Delete a model; returns ``{"deleted": name}``."""

    def close(self) -> None:  # noqa: B027 - optional hook, transports without resources skip it
        """Release connections or files."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host.label}>"
