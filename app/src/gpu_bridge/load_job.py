"""Running one load job (``pull_job.Job`` of kind ``load``) for ``jobs.JobManager``.

A load is one request that Ollama answers when the model is resident: there is no byte progress
and no stall to watch, only a limit on how long it may take. That limit is the pulls' stall timeout
(``GPU_BRIDGE_PULL_STALL_TIMEOUT``, 300 s by default): a load that shows nothing for that long is
given up the same way, so one setting bounds how long the GPU host waits for Ollama to show a sign
of life. The job's ``status`` is ``loading`` while it runs and ``loaded`` once done.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from .errors import GpuBridgeError, OllamaError, OllamaTimeout
from .pull_job import Job

log = logging.getLogger("gpu_bridge.jobs")

LOADING, LOADED = "loading", "loaded"


class LoadAdapter(Protocol):
    """What a load needs of ``ollama.OllamaAdapter`` (tests pass a scripted fake)."""

    def load(self, name: str, *, keep_alive: float | None = None, cancel: threading.Event | None = None,
             read_timeout: float | None = None) -> dict[str, Any]: ...


def run_load(adapter: LoadAdapter, job: Job, limit: float) -> GpuBridgeError | None:
    """Load the job's model; None once it is resident (``job._succeeded`` set), else the error. Never raises."""
    try:
        adapter.load(job.model, keep_alive=job.keep_alive, cancel=job._cancel, read_timeout=limit)
    except OllamaTimeout:
        return OllamaTimeout(f"Ollama did not finish loading {job.model!r} within {limit:g} s "
                             "(GPU_BRIDGE_PULL_STALL_TIMEOUT bounds loads too); it may still finish: check "
                             "GET /api/models/loaded")
    except GpuBridgeError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - reported on the job, traceback in the log
        log.exception("unexpected error while loading %s", job.model)
        return OllamaError(f"unexpected error while loading: {type(exc).__name__}")
    with job._lock:
        job.status = LOADED
        job._succeeded = True
    return None


__all__ = ["LOADED", "LOADING", "LoadAdapter", "run_load"]
