"""One job: its states, its progress summed over layers, and its two JSON forms.

A job is of one ``kind``: a ``pull`` (download a model; progress in bytes) or a ``load`` (bring an
installed model into GPU memory with a ``keep_alive``; no byte progress, ``status`` says ``loading``
then ``loaded``). Both share the states, the JSON forms and the job routes.

``Job.to_dict()`` is the Job object of docs/architecture.md (HTTP answers, the spool's progress
files); ``Job.to_record()`` is what the state file keeps so that the next process can take the job
over, and ``Job.from_record()`` reads such a record back, trusting none of it. The scheduling (dedupe,
queue, runners, stall watchdog) is ``jobs.JobManager``'s; only it changes a job, under its lock.
"""

from __future__ import annotations

import math
import re
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, overload

from . import keep_alive, names
from .errors import GpuBridgeError

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = frozenset({QUEUED, RUNNING})
PULL, LOAD = "pull", "load"
KINDS = (PULL, LOAD)

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_MAX_RECORD_LAYERS = 1000  # a real model has a handful of layers; more is not our file


def job_key(kind: str, full_name: str, keep_alive_seconds: float | None = None) -> str:
    """The dedupe key: one active pull per model; one active load per model and keep_alive (a load
    asking for another keep_alive must run, or the later caller's wish would be lost)."""
    if kind == PULL:
        return full_name.lower()
    return f"{kind}:{full_name.lower()}:{keep_alive_seconds}"


@overload
def iso(ts: float) -> str: ...
@overload
def iso(ts: None) -> None: ...
@overload
def iso(ts: float | None) -> str | None: ...
def iso(ts: float | None) -> str | None:
    """Epoch seconds → ISO 8601 UTC (``2025-05-04T17:37:44.706Z``), None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Job:
    """One pull or load. Read it with ``to_dict()``; the manager alone changes it (under its lock)."""

    def __init__(self, model: str, key: str, *, lock: threading.RLock | None = None, job_id: str | None = None,
                 kind: str = PULL, keep_alive: float | None = None):
        now = time.time()
        self.id = job_id or uuid.uuid4().hex
        self.model = model
        self.key = key
        self.kind = kind
        self.keep_alive = keep_alive  # a load's seconds (-1 forever, None Ollama's default)
        self.state = QUEUED
        self.status: str | None = None
        self.error: str | None = None
        self.error_code: str | None = None
        self.error_status: int | None = None  # HTTP status of the error, for ``?wait=true`` answers
        self.created_at = now
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.updated_at = now
        self._lock = lock or threading.RLock()
        self._layers: dict[str, tuple[int, int]] = {}  # digest -> (completed, total)
        self._best_completed = 0
        self._seen_status: set[str] = set()
        self._last_advance = time.monotonic()
        self._succeeded = False
        self._stalled = False
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._saved_state: str | None = None  # the state last written to the state file
        self.resumed = 0  # how many times a new process took this pull over (reloads, restarts)

    @property
    def completed(self) -> int:
        with self._lock:
            return sum(c for c, _ in self._layers.values())

    @property
    def total(self) -> int:
        with self._lock:
            return sum(t for _, t in self._layers.values())

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        """The Job object of docs/architecture.md (a JSON object: callers add keys such as ``joined``)."""
        with self._lock:
            completed, total = self.completed, self.total
            if self.state == SUCCEEDED:
                percent: float | None = 100.0
            elif total > 0:
                percent = round(min(100.0, 100.0 * completed / total), 1)
            else:
                percent = None
            doc: dict[str, Any] = {
                "id": self.id,
                "kind": self.kind,
                "model": self.model,
                "state": self.state,
                "completed": completed,
                "total": total,
                "percent": percent,
                "status": self.status,
                "error": self.error,
                "error_code": self.error_code,
                "created_at": iso(self.created_at),
                "started_at": iso(self.started_at),
                "finished_at": iso(self.finished_at),
                "updated_at": iso(self.updated_at),
            }
            if self.kind == LOAD:
                doc["keep_alive"] = self.keep_alive
            return doc

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.kind} {self.model} {self.state}>"

    def to_record(self) -> dict[str, Any]:
        """What the state file keeps of a job (``from_record`` reads it back)."""
        with self._lock:
            return {"id": self.id, "kind": self.kind, "keep_alive": self.keep_alive, "model": self.model,
                    "state": self.state, "status": self.status,
                    "error": self.error, "error_code": self.error_code, "error_status": self.error_status,
                    "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at,
                    "updated_at": self.updated_at, "resumed": self.resumed,
                    "layers": {digest: [c, t] for digest, (c, t) in self._layers.items()}}

    @classmethod
    def from_record(cls, record: Mapping[str, object], *, lock: threading.RLock, now: float,
                    allowed_registries: tuple[str, ...] | None) -> tuple[Job, str, GpuBridgeError | None] | None:
        """A job rebuilt from a state-file record: ``(job, recorded state, why it may not run again)``.

        None for a malformed record. The job comes back ``queued`` whatever the record says; the
        caller applies the recorded state. A record whose model no longer passes the grammar or the
        registry allow-list (the settings may have changed) still comes back, with that error, so
        that it is shown as failed rather than silently dropped. Terminal records keep their error.
        """
        job_id, model, state = record.get("id"), record.get("model"), record.get("state")
        kind = record.get("kind", PULL)  # files written before loads existed hold pulls only
        if not (isinstance(job_id, str) and _JOB_ID.match(job_id) and isinstance(model, str)
                and isinstance(state, str) and state in STATES and kind in KINDS):
            return None
        error: GpuBridgeError | None = None
        seconds: float | None = None
        try:
            # A load fetches nothing: the grammar applies, the registry allow-list does not.
            parsed: names.ModelName | None = names.validate(model, allowed_registries) if kind == PULL \
                else names.parse(model)
            if kind == LOAD:
                seconds = keep_alive.parse(record.get("keep_alive"))
        except GpuBridgeError as exc:
            parsed, error = None, exc
        full = parsed.full if parsed is not None else model[:300]
        job = cls(parsed.display if parsed is not None else model[:300], job_key(str(kind), full, seconds), lock=lock,
                  job_id=job_id, kind=str(kind), keep_alive=seconds)
        job.created_at = _number(record.get("created_at"), now)
        job.started_at = _number(record.get("started_at"))
        job.finished_at = _number(record.get("finished_at"))
        job.updated_at = _number(record.get("updated_at"), now)
        job.status = _text(record.get("status"))
        job.resumed = int(_number(record.get("resumed"), 0.0))
        layers = record.get("layers")
        if isinstance(layers, dict):
            for digest, pair in list(layers.items())[:_MAX_RECORD_LAYERS]:
                if isinstance(digest, str) and isinstance(pair, list) and len(pair) == 2:
                    completed, total = (int(_number(x, 0.0)) for x in pair)
                    job._layers[digest[:200]] = (max(0, completed), max(0, total))
        job._best_completed = job.completed
        if state in TERMINAL:
            job.error, job.error_code = _text(record.get("error")), _text(record.get("error_code"), 100)
            status = record.get("error_status")
            job.error_status = status if isinstance(status, int) and 400 <= status < 600 else None
        return job, state, error


@overload
def _number(value: object, default: float) -> float: ...
@overload
def _number(value: object, default: None = None) -> float | None: ...
def _number(value: object, default: float | None = None) -> float | None:
    """A finite number from a record (bools are not numbers here), else ``default``."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return default


def _text(value: object, limit: int = 2000) -> str | None:
    return value[:limit] if isinstance(value, str) else None
