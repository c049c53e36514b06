"""Jobs: pulls (one download per model, live progress, stall detection) and loads into GPU memory.

State lives in memory, in the one process that serves the GPU host: gunicorn runs one worker
process with threads (docs/architecture.md, "Why one gunicorn process with threads"), so every
request thread sees the same job table, and dedupe and the concurrency limit hold exactly. With a
``state`` file (``GPU_BRIDGE_JOB_STATE_FILE``, ``job_state.py``) the table is also on disk, and a new
process (a reload's new gunicorn worker, a restart) resumes the unfinished pulls under the same job
ids: Ollama keeps partial downloads and resumes them. Without one, a restart forgets jobs.

* ``submit(model)`` returns the active job for the same model (``llama3.2`` == ``llama3.2:latest``)
  instead of starting a second download.
* At most ``max_concurrent`` pulls run; up to ``max_queued`` more wait (``QueueFull`` beyond).
  Runner threads are daemon threads, at most ``max_concurrent`` of them: a runner that finishes a
  job takes the next queued one.
* Progress is summed over layers (per digest; a cached layer with ``completed == total`` counts).
* Stall detection: Ollama keeps sending progress lines while bytes stand still, and its verify
  phase is silent, so neither line arrival nor a read timeout reveals a stall. A watchdog fails a
  job whose downloaded bytes have not grown (and whose status has not moved to a new phase) for
  ``stall_timeout`` seconds, and cancels its Ollama stream.

One job (states, progress, its JSON forms) is ``pull_job.Job``; its names are re-exported here.

Loads (``kind="load"``, ``load_job.py``) share the table, the ids, the state file, cancel and
retention; they have runner slots and a queue of their own (the same limits), so a load never waits
behind hours of downloads, and no stall watchdog (a load has no byte progress; its request to Ollama
is bounded instead). The free-space rule of new pulls is ``disk_space.check_free_space``.
"""

from __future__ import annotations

import builtins
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from . import names, pull_job
from .disk_space import check_free_space
from .errors import Conflict, GpuBridgeError, JobNotFound, OllamaError, PullStalled, QueueFull
from .job_state import JobRecord, JobStateFile
from .load_job import LOADING, LoadAdapter, run_load
from .pull_job import ACTIVE, CANCELLED, FAILED, QUEUED, RUNNING, STATES, SUCCEEDED, TERMINAL, Job, iso

__all__ = ["ACTIVE", "CANCELLED", "FAILED", "QUEUED", "QUEUE_RETRY_AFTER", "READ_TIMEOUT_MARGIN", "RUNNING",
           "STATES", "SUCCEEDED", "TERMINAL", "Job", "JobAdapter", "JobManager", "PullAdapter", "check_free_space",
           "iso"]

log = logging.getLogger(__name__)
# Seconds a refused caller is told to wait (Retry-After) when the queue is full.
QUEUE_RETRY_AFTER = 10
# A pull stream may be silent this much longer than the stall timeout before its read times out:
# the watchdog, not the socket, decides that a pull has stalled.
READ_TIMEOUT_MARGIN = 30.0


class PullAdapter(Protocol):
    """What the manager needs of ``ollama.OllamaAdapter`` (tests pass a scripted fake)."""

    def pull(self, name: str, *, cancel: threading.Event | None = None,
             read_timeout: float | None = None) -> Iterator[dict[str, Any]]: ...


class JobAdapter(PullAdapter, LoadAdapter, Protocol):
    """Pulls and loads: what ``ollama.OllamaAdapter`` offers the manager."""


class JobManager:
    """Runs pulls and loads through an ``OllamaAdapter``-like object (``pull(name, cancel=, read_timeout=)``,
    ``load(name, keep_alive=, cancel=, read_timeout=)``)."""

    def __init__(self, adapter: JobAdapter, *, max_concurrent: int = 2, max_queued: int = 16,
                 stall_timeout: float = 300.0, retention: float = 3600.0,
                 on_change: Callable[[Job], None] | None = None, state: JobStateFile | None = None,
                 allowed_registries: tuple[str, ...] | None = None):
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        self.adapter = adapter
        self.max_concurrent = max_concurrent
        self.max_queued = max(0, max_queued)
        self.stall_timeout = float(stall_timeout)
        self.retention = float(retention)
        self.on_change = on_change
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}  # creation order
        self._active: dict[str, Job] = {}  # dedupe key -> queued or running job
        # Per kind: jobs waiting for a runner, and runner threads alive (each runs one job at a time).
        self._pending: dict[str, deque[Job]] = {kind: deque() for kind in pull_job.KINDS}
        self._runners: dict[str, int] = dict.fromkeys(pull_job.KINDS, 0)
        self._stop = threading.Event()
        self._state = state
        self._allowed_registries = allowed_registries
        self._watchdog = threading.Thread(target=self._watch, name="pull-watchdog", daemon=True)
        self._watchdog.start()
        if state is not None:
            self._restore(state.claim())

    # --- public API ------------------------------------------------------------------------------
    @staticmethod
    def key_for(model: str) -> str:
        return names.parse(model).full.lower()

    def submit(self, model: str, *, kind: str = pull_job.PULL, keep_alive: float | None = None) -> tuple[Job, bool]:
        """Start (or queue) a pull, or a load with ``kind=LOAD`` (``keep_alive`` seconds, -1 forever);
        ``(job, True)`` when an active job of the same kind, model (and keep_alive) was joined."""
        parsed = names.parse(model)
        key = pull_job.job_key(kind, parsed.full, keep_alive)
        pending = self._pending[kind]
        what = "pulls" if kind == pull_job.PULL else "loads"
        with self._lock:
            if self._stop.is_set():
                raise GpuBridgeError("the GPU server is shutting down", status=503, code="shutting_down")
            self._prune_locked()
            job = self._active.get(key)
            if job is not None:
                return job, True
            start_runner = self._runners[kind] < self.max_concurrent
            if not start_runner and len(pending) >= self.max_queued:
                raise QueueFull(f"{self.max_concurrent} {what} are running and {len(pending)} are queued "
                                f"(limit {self.max_queued}); try again later", retry_after=QUEUE_RETRY_AFTER)
            job = Job(parsed.display, key, lock=self._lock, kind=kind, keep_alive=keep_alive)
            self._jobs[job.id] = job
            self._active[key] = job
            if start_runner:
                self._runners[kind] += 1
            else:
                pending.append(job)
        log.info("%s job %s for %s %s", kind, job.id, job.model, "started" if start_runner else "queued")
        self._notify(job)
        if start_runner:
            threading.Thread(target=self._runner, args=(job,), name=f"pull-{job.id[:8]}", daemon=True).start()
        return job, False

    def find_active(self, model: str) -> Job | None:
        """The queued or running pull of ``model``, if any."""
        key = self.key_for(model)
        with self._lock:
            return self._active.get(key)

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} (finished jobs are kept for {self.retention:g} s)")
        return job

    def list(self) -> list[Job]:
        """Every job still kept, newest first."""
        with self._lock:
            self._prune_locked()
            return list(reversed(self._jobs.values()))

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job (its Ollama request is closed); ``Conflict`` if it finished."""
        with self._lock:
            job = self.get(job_id)
            if job.state in TERMINAL:
                raise Conflict(f"job {job_id} has already {job.state}; only queued or running jobs can be cancelled")
            if job.state == QUEUED:
                try:
                    self._pending[job.kind].remove(job)
                except ValueError:
                    pass
            self._finish_locked(job, CANCELLED, error=f"{job.kind} cancelled by request", code="cancelled",
                                status=409)
            job._cancel.set()
        log.info("%s job %s for %s cancelled", job.kind, job.id, job.model)
        self._notify(job)
        job._done.set()
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job finishes or ``timeout`` passes; returns the job either way."""
        job = self.get(job_id)
        job._done.wait(timeout)
        return job

    def counts(self, kind: str = pull_job.PULL) -> dict[str, int]:
        """``{"running", "queued"}`` of one kind (health's and the metrics' ``pulls``: pulls only)."""
        with self._lock:
            running = sum(1 for j in self._active.values() if j.state == RUNNING and j.kind == kind)
            queued = sum(1 for j in self._active.values() if j.state == QUEUED and j.kind == kind)
        return {"running": running, "queued": queued}

    def shutdown(self, timeout: float = 2.0) -> None:
        """Cancel every active pull and stop the watchdog. The state file keeps them active: the next
        process resumes them (this process's shutdown is not the user's cancel)."""
        self._stop.set()
        with self._lock:
            active = list(self._active.values())
            for pending in self._pending.values():
                pending.clear()
            for job in active:
                self._finish_locked(job, CANCELLED, error="the GPU server shut down", code="cancelled", status=409)
                job._cancel.set()
        for job in active:
            self._notify(job)
            job._done.set()
        self._watchdog.join(timeout)

    # --- runners ---------------------------------------------------------------------------------
    def _runner(self, job: Job | None) -> None:
        while job is not None:
            try:
                self._execute(job)
            except Exception:  # noqa: BLE001 - a runner must never die holding a slot
                log.exception("%s runner failed on job %s", job.kind, job.id)
            kind = job.kind
            with self._lock:
                pending = self._pending[kind]
                job = pending.popleft() if pending and not self._stop.is_set() else None
                if job is None:
                    self._runners[kind] -= 1

    def _execute(self, job: Job) -> None:
        with self._lock:
            if job.state != QUEUED:
                return  # cancelled while it waited
            job.state = RUNNING
            job.updated_at = time.time()
            job.started_at = job.started_at or job.updated_at  # a resumed pull keeps its first start
            job._last_advance = time.monotonic()
            if job.kind == pull_job.LOAD:
                job.status = LOADING
        self._notify(job)
        if job.kind == pull_job.LOAD:
            error = run_load(self.adapter, job, self.stall_timeout)
        else:
            error = self._pull(job)
        self._finish_run(job, error)

    def _pull(self, job: Job) -> GpuBridgeError | None:
        """Stream the pull into the job's progress; the error that ended it, if any."""
        error: GpuBridgeError | None = None
        try:
            stream = self.adapter.pull(job.model, cancel=job._cancel,
                                       read_timeout=self.stall_timeout + READ_TIMEOUT_MARGIN)
            for event in stream:
                self._apply(job, event)
                self._notify(job)
        except GpuBridgeError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - reported on the job, traceback in the log
            log.exception("unexpected error while pulling %s", job.model)
            error = OllamaError(f"unexpected error while pulling: {type(exc).__name__}")
        return error

    def _finish_run(self, job: Job, error: GpuBridgeError | None) -> None:
        with self._lock:
            if job.state in TERMINAL:  # cancelled by request or by shutdown meanwhile
                return
            if job._succeeded:
                self._finish_locked(job, SUCCEEDED)
            elif job._stalled:
                stalled = PullStalled(f"no download progress for {self.stall_timeout:g} s while pulling "
                                      f"{job.model!r} (last status: {job.status or 'none'}); the pull was stopped")
                self._finish_error_locked(job, stalled)
            elif error is not None:
                self._finish_error_locked(job, error)
            elif job._cancel.is_set():
                self._finish_locked(job, CANCELLED, error=f"{job.kind} cancelled", code="cancelled", status=409)
            else:
                self._finish_error_locked(job, OllamaError(f"the {job.kind} of {job.model!r} ended without success"))
        log.info("%s job %s for %s %s%s", job.kind, job.id, job.model, job.state,
                 f": {job.error_code}: {job.error}" if job.error else "")
        self._notify(job)
        job._done.set()  # after the listeners: whoever waits sees a job they have already been told about

    def _apply(self, job: Job, event: dict[str, Any]) -> None:
        with self._lock:
            status = event.get("status")
            if isinstance(status, str) and status:
                job.status = status
            digest = event.get("digest")
            if isinstance(digest, str) and digest:
                total = max(0, int(event.get("total") or 0))
                completed = max(0, int(event.get("completed") or 0))
                if total:
                    completed = min(completed, total)
                job._layers[digest] = (completed, total)
            advanced = False
            completed_sum = job.completed
            if completed_sum > job._best_completed:
                job._best_completed = completed_sum
                advanced = True
            if isinstance(status, str) and status and status not in job._seen_status:
                job._seen_status.add(status)  # a new phase or a new layer is progress too
                advanced = True
            if advanced:
                job._last_advance = time.monotonic()
            if status == "success":
                job._succeeded = True
            job.updated_at = time.time()

    def _finish_error_locked(self, job: Job, exc: GpuBridgeError) -> None:
        self._finish_locked(job, FAILED, error=exc.message, code=exc.code, status=exc.status)

    def _finish_locked(self, job: Job, state: str, *, error: str | None = None, code: str | None = None,
                       status: int | None = None) -> None:
        job.state = state
        job.error, job.error_code, job.error_status = error, code, status
        job.finished_at = job.updated_at = time.time()
        if self._active.get(job.key) is job:
            del self._active[job.key]

    # --- watchdog --------------------------------------------------------------------------------
    def _watch(self) -> None:
        interval = min(1.0, max(0.05, self.stall_timeout / 4))
        while not self._stop.wait(interval):
            now = time.monotonic()
            with self._lock:
                for job in self._active.values():
                    if job.state == RUNNING and job.kind == pull_job.PULL and not job._cancel.is_set() \
                            and now - job._last_advance > self.stall_timeout:
                        log.warning("pull job %s for %s stalled: no progress for %.1f s; stopping it",
                                    job.id, job.model, now - job._last_advance)
                        job._stalled = True
                        job._cancel.set()
                self._prune_locked()

    def _prune_locked(self) -> None:
        cutoff = time.time() - self.retention
        for job_id in [j.id for j in self._jobs.values() if j.finished_at is not None and j.finished_at < cutoff]:
            del self._jobs[job_id]

    def _notify(self, job: Job) -> None:
        self._persist(job)
        if self.on_change is None:
            return
        try:
            self.on_change(job)
        except Exception:  # noqa: BLE001 - a listener's bug must not break the pull
            log.exception("on_change listener failed for job %s", job.id)

    # --- the state file (reloads and restarts keep pulls) --------------------------------------
    def _persist(self, job: Job) -> None:
        if self._state is None or self._stop.is_set():
            return  # shutting down: the file keeps the pulls active for the next process
        force = job.state != job._saved_state

        def snapshot() -> list[JobRecord]:
            with self._lock:
                self._prune_locked()
                records = []
                for j in self._jobs.values():
                    records.append(j.to_record())
                    j._saved_state = j.state
                return records

        try:
            self._state.save(snapshot, force=force)
        except Exception:  # noqa: BLE001 - the file serves reloads; it must never break a pull
            log.exception("could not save the job state file")

    def _restore(self, records: builtins.list[JobRecord]) -> None:  # list: the method above shadows the builtin
        """Take over the jobs a previous process left: finished ones are shown until their retention
        ends; queued and running ones are pulled again under the same id (Ollama resumes the bytes)."""
        now = time.time()
        resumed: list[Job] = []
        with self._lock:
            for record in sorted(records, key=_created_at):
                got = Job.from_record(record, lock=self._lock, now=now, allowed_registries=self._allowed_registries)
                if got is None or got[0].id in self._jobs:
                    log.warning("job state file: skipping a malformed job record")
                    continue
                job, state, error = got
                if state in TERMINAL:
                    if job.finished_at is None or job.finished_at < now - self.retention:
                        continue
                    job.state = state
                    job._done.set()
                    self._jobs[job.id] = job
                    continue
                self._jobs[job.id] = job
                if error is not None:
                    log.warning("not resuming pull job %s of %r: %s: %s", job.id, job.model, error.code, error.message)
                    self._finish_error_locked(job, error)
                    job._done.set()
                elif job.key in self._active:
                    self._finish_locked(job, CANCELLED, error="a duplicate of another pull of the same model",
                                        code="cancelled", status=409)
                    job._done.set()
                else:
                    job.state = QUEUED
                    job.resumed += 1
                    self._active[job.key] = job
                    resumed.append(job)
        for job in resumed:
            log.info("resuming %s job %s of %s left by the previous worker process (reload or restart)",
                     job.kind, job.id, job.model)
            with self._lock:
                start_runner = self._runners[job.kind] < self.max_concurrent
                if start_runner:
                    self._runners[job.kind] += 1
                else:
                    self._pending[job.kind].append(job)
            if start_runner:
                threading.Thread(target=self._runner, args=(job,), name=f"pull-{job.id[:8]}", daemon=True).start()
        if self._jobs:
            self._persist(next(iter(self._jobs.values())))


def _created_at(record: JobRecord) -> float:
    """Sort key: a record's creation time, 0 when it has none (restored oldest first)."""
    value = record.get("created_at")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return 0.0
