"""What each operation means on a GPU host, once, for both front doors.

The HTTP GPU server (``gpu_server/routes.py``) and the NFS worker (``nfs_worker.py`` and its
``nfs_*`` modules) are two ways in to the same operations: list, pull, delete, job, jobs, cancel,
health and ready. ``GpuService`` is the one place that decides what those mean: which names are
accepted (``names.py``'s grammar and the registry allow-list), when a pull may start (the free-space
rule, ``jobs.check_free_space``), how it runs (``jobs.JobManager``: dedupe, queue, stall detection),
what Ollama is asked (``ollama.py``) and which error each refusal raises (``errors.py``). The front
doors only translate: query flags, status codes and headers for HTTP; command files, progress files
and answers for NFS. A new operation is one method here plus one line in each front door.

The rules, identical on both channels (``tests/nfs/test_channel_parity.py`` runs one table through
both):

* **pull**: the grammar, then the registry allow-list (``GPU_BRIDGE_ALLOWED_REGISTRIES``:
  ``registry_not_allowed``), then the free-space rule (``insufficient_storage``) unless the pull joins
  one already running for the same model (joining downloads nothing new), then the job manager.
* **delete**: the grammar only. Deleting fetches nothing, so the allow-list, which exists to stop
  downloads from unknown registries, does not apply: an operator who narrowed the allow-list can still
  remove the models pulled from a registry that is no longer allowed. A model Ollama does not have is
  ``model_not_found``.
* **copy**: the grammar for both names, no allow-list (a copy shares the source's blobs and fetches
  nothing); a source Ollama does not have is ``model_not_found``.
* **loaded / load / unload** (what is in GPU memory): the grammar only (nothing is fetched). A load
  of a model that is not installed is ``model_not_found`` at once, before any job; ``keep_alive`` is
  checked by ``keep_alive.parse`` (``invalid_request``). A load is a job of kind ``load`` (the job
  routes follow and cancel it); an embedding-only model fails it with ``invalid_request``. Unloading
  a model that is not loaded is no error; one that is not installed is ``model_not_found``.
* **job / cancel**: by job id; ``job_not_found`` for an unknown one, ``conflict`` to cancel a
  finished one.
* **health** never fails: Ollama's state (probed at most once a second) and the GPUs' (NVML, cached
  5 s); ``status`` is ``ok`` when Ollama answers and a GPU is available, ``degraded`` otherwise.
  **ready** raises ``ollama_unavailable`` when Ollama does not answer within the probe timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import __version__, keep_alive, names
from .config import GpuServerSettings
from .errors import GpuBridgeError, ModelNotFound, OllamaError, OllamaUnavailable
from .job_state import JobStateFile
from .jobs import Job, JobManager, check_free_space
from .ollama import OllamaAdapter
from .pull_job import LOAD

if TYPE_CHECKING:
    from .gpu_server.health import GpuProbe, OllamaProbe

JsonDict = dict[str, Any]
# How long the metrics reuse one /api/ps answer: scrapes in a burst (two Prometheus servers, a
# curl) cost Ollama one request.
LOADED_CACHE_SECONDS = 2.0


class GpuService:
    """The operations of one GPU host. One instance per process (it owns the job table).

    ``adapter`` and ``jobs`` replace the ones built from ``settings`` (tests); ``on_job_change`` is
    the job manager's change callback (the GPU server's metrics, the NFS worker's progress files);
    ``persist_jobs`` keeps the job table in ``settings.job_state_file`` (the GPU server only: the NFS
    worker reads the same environment file, and two processes must never claim one table);
    ``where`` is added to free-space refusals (`` on gpu-01``) where the caller cannot see the host.
    """

    def __init__(self, settings: GpuServerSettings, *, adapter: OllamaAdapter | None = None,
                 jobs: JobManager | None = None, on_job_change: Callable[[Job], None] | None = None,
                 persist_jobs: bool = False, where: str = "") -> None:
        # Imported here, not at the top: importing the gpu_server package loads its Flask app module,
        # which imports this one (and the NFS worker needs no Flask until it probes health).
        from .gpu_server.health import GpuProbe, OllamaProbe, TtlCache, probe_read_timeout

        self.settings = settings
        self.where = where
        self.adapter = adapter if adapter is not None else OllamaAdapter(
            settings.ollama_url, connect_timeout=settings.ollama_connect_timeout,
            read_timeout=settings.ollama_read_timeout)
        if jobs is None:
            state = JobStateFile(settings.job_state_file) if persist_jobs and settings.job_state_file else None
            jobs = JobManager(self.adapter, max_concurrent=settings.max_concurrent_pulls,
                              max_queued=settings.max_queued_pulls, stall_timeout=settings.pull_stall_timeout,
                              retention=settings.job_retention_seconds, on_change=on_job_change,
                              # A reload's new process takes the pulls over from this file (job_state.py).
                              allowed_registries=settings.allowed_registries, state=state)
        elif on_job_change is not None:
            jobs.on_change = on_job_change
        self.jobs = jobs
        self.probe_read_timeout = probe_read_timeout(settings)
        self.gpu: GpuProbe = GpuProbe()
        self.ollama_probe: OllamaProbe = OllamaProbe(self.adapter, self.probe_read_timeout)
        self._loaded_cache = TtlCache(self._loaded_report, LOADED_CACHE_SECONDS)
        self.started = time.monotonic()

    # --- models ----------------------------------------------------------------------------------
    def list_models(self) -> list[JsonDict]:
        return self.adapter.list_models()

    def model_to_pull(self, model: object) -> names.ModelName:
        """The name a pull may fetch: the grammar, then the registry allow-list."""
        return names.validate(model, self.settings.allowed_registries)

    def pull(self, model: object) -> tuple[Job, bool]:
        """Start (or join) a pull; ``(job, joined)``. A join needs no free space: it fetches nothing new."""
        name = self.model_to_pull(model).display
        if self.jobs.find_active(name) is None:
            check_free_space(self.settings.ollama_models_dir, self.settings.min_free_bytes, self.where)
        return self.jobs.submit(name)

    def delete(self, model: object) -> JsonDict:
        """Remove a model. The grammar applies, the allow-list does not (module docstring)."""
        name = names.parse(model).display
        self.adapter.delete(name)
        return {"deleted": name}

    def copy(self, source: object, destination: object) -> JsonDict:
        """Copy a model under another name (Ollama's ``/api/copy``: the blobs are shared, nothing is
        fetched, so the grammar applies to both names and the allow-list to neither, as for delete).
        The answer names the digest the copy has, which is the source's: callers (models as code's
        snapshots and rollbacks) check it. A missing source is ``model_not_found``."""
        src, dst = names.parse(source).display, names.parse(destination).display
        self.adapter.copy(src, dst)
        digest = None
        for model in self.adapter.list_models():
            listed = model.get("name")
            if isinstance(listed, str) and names.same_model(listed, dst):  # llama3.2 == llama3.2:latest
                digest = model.get("digest")
                break
        return {"source": src, "destination": dst, "digest": digest}

    # --- GPU memory: loaded models -----------------------------------------------------------------
    def loaded(self) -> list[JsonDict]:
        """What Ollama holds in memory now (``ollama_loaded.normalise_loaded`` entries)."""
        return self.adapter.loaded_models()

    def load(self, model: object, keep_alive_value: object = None) -> tuple[Job, bool]:
        """Start (or join) loading an installed model; ``(job, joined)``. Refusals (bad name, not
        installed, bad keep_alive: in that order, as the OpenAPI document promises) are raised here,
        before any job exists."""
        name = names.parse(model).display
        if not any(isinstance(m.get("name"), str) and names.same_model(m["name"], name)
                   for m in self.adapter.list_models()):
            raise ModelNotFound(f"model {name!r} is not installed on this GPU host{self.where}: pull it first "
                                "(a load never downloads)")
        seconds = keep_alive.parse(keep_alive_value)
        return self.jobs.submit(name, kind=LOAD, keep_alive=seconds)

    def unload(self, model: object) -> JsonDict:
        """Free the model's memory now. Not loaded is no error (the result is the same)."""
        name = names.parse(model).display
        self.adapter.unload(name)
        return {"unloaded": name}

    def loaded_snapshot(self) -> list[JsonDict] | None:
        """``loaded()`` for the metrics: at most ``LOADED_CACHE_SECONDS`` old, asked with the probe's
        read timeout so a scrape never waits longer on a hung Ollama; None when Ollama did not answer."""
        models = self._loaded_cache.get().get("models")
        return models if isinstance(models, list) else None

    def _loaded_report(self) -> JsonDict:
        try:
            return {"models": self.adapter.loaded_models(read_timeout=self.probe_read_timeout)}
        except GpuBridgeError as exc:
            return {"models": None, "error": exc.message}

    # --- jobs ------------------------------------------------------------------------------------
    def job(self, job_id: str) -> Job:
        return self.jobs.get(job_id)

    def list_jobs(self) -> list[Job]:
        """Every job still kept, newest first."""
        return self.jobs.list()

    def cancel(self, job_id: str) -> Job:
        return self.jobs.cancel(job_id)

    def wait(self, job_id: str) -> Job:
        """Block until the job finishes: bounded by stall detection, not by a fixed deadline."""
        return self.jobs.wait(job_id)

    def pull_counts(self) -> JsonDict:
        return self.jobs.counts()

    # --- health ----------------------------------------------------------------------------------
    def ollama_status(self) -> JsonDict:
        """``{"reachable", "version", "latency_ms", "error"?}``, at most one probe a second; never raises."""
        return self.ollama_probe.status()

    def gpu_snapshot(self) -> JsonDict:
        """NVML's report (cached 5 s); never raises."""
        return self.gpu.snapshot()

    def health(self) -> JsonDict:
        ollama = self.ollama_status()
        gpu = self.gpu_snapshot()
        return {
            "status": "ok" if ollama["reachable"] and gpu["available"] else "degraded",
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - self.started, 1),
            "ollama": ollama,
            "gpu": gpu,
            "pulls": self.pull_counts(),
        }

    def ready(self) -> JsonDict:
        """``{"ready": True}`` once Ollama answers within the probe timeout; ``OllamaUnavailable`` otherwise."""
        try:
            self.adapter.version(read_timeout=self.probe_read_timeout)
        except OllamaError as exc:
            raise OllamaUnavailable(f"not ready: {exc.message}") from None
        return {"ready": True}

    def close(self) -> None:
        """Stop the pulls (a persisted table keeps them for the next process) and the Ollama session."""
        self.jobs.shutdown()
        self.adapter.close()


__all__ = ["GpuService", "JsonDict"]
