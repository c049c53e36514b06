"""The GPU server's per-app state: what the routes and the request hooks share.

It lives apart from the application factory (``app.py``) so that ``routes.py`` can reach it without
importing the factory, which imports the routes: the factory builds a ``ServerState`` and hangs it on
``app.extensions[EXTENSION]``; the routes read it back from there.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ..config import GpuServerSettings
from ..gpu_service import GpuService
from ..jobs import JobManager
from ..ollama import OllamaAdapter
from .health import PROBE_READ_TIMEOUT, GpuProbe, OllamaProbe, probe_read_timeout
from .metrics import Metrics
from .ratelimit import TokenBucket

EXTENSION = "gpu_bridge"


@dataclass
class ServerState:
    """Everything the routes share; one per app (``app.extensions["gpu_bridge"]``).

    ``service`` holds what the operations mean (gpu_service.py); the rest is HTTP's own: metrics,
    the rate-limit bucket, the accepted tokens and the ``?wait=true`` slots.
    """

    settings: GpuServerSettings
    service: GpuService
    metrics: Metrics
    limiter: TokenBucket
    tokens: tuple[bytes, ...]  # every accepted token (one per line of the token file); empty: no auth
    started: float = field(default_factory=time.monotonic)
    # ?wait=true holds a gunicorn thread for a whole pull: at most max_waiting_pulls at once, so
    # health, ready and metrics always find a thread (a 429 tells the rest to poll the job).
    wait_slots: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        self.wait_slots = threading.BoundedSemaphore(max(self.settings.max_waiting_pulls, 1))

    # The service's parts, for the hooks and the metrics callbacks that read them directly.
    @property
    def adapter(self) -> OllamaAdapter:
        return self.service.adapter

    @property
    def jobs(self) -> JobManager:
        return self.service.jobs

    @property
    def gpu(self) -> GpuProbe:
        return self.service.gpu

    @property
    def ollama_probe(self) -> OllamaProbe:
        return self.service.ollama_probe

    def probe_read_timeout(self) -> float:
        return probe_read_timeout(self.settings)

    def close(self) -> None:
        self.service.close()


__all__ = ["EXTENSION", "PROBE_READ_TIMEOUT", "ServerState", "probe_read_timeout"]
