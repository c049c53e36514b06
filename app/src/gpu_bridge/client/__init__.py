"""Production-side access to GPU hosts: transports (HTTP, NFS), circuit breaker, multi-host fleet."""

from __future__ import annotations

from ..config import BackendSettings, GpuHost
from .base import GpuTransport


def make_transport(host: GpuHost, settings: BackendSettings) -> GpuTransport:
    """The transport ``GPU_BRIDGE_TRANSPORT`` selects, for one host."""
    if settings.client.transport == "nfs":
        from .nfs import NfsTransport

        return NfsTransport(host, settings)
    from .http import HttpTransport

    return HttpTransport(host, settings.client)


__all__ = ["GpuTransport", "make_transport"]
