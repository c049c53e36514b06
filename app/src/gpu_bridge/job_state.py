"""The GPU server's pull jobs on disk, so that a reload (SIGHUP) or restart keeps them.

gunicorn answers SIGHUP by starting a new worker process and stopping the old one; jobs live in the
worker's memory, so before this file a reload cancelled every running pull and forgot its job. Now
the job table is also kept in one small JSON file (``GPU_BRIDGE_JOB_STATE_FILE``; the unit puts it in
its ``StateDirectory=``), and a new worker process resumes the unfinished pulls under the same job
ids: Ollama keeps the partial layers (or is still downloading them for the old worker), so the bytes
already fetched are not fetched again, and a client polling ``GET /api/jobs/<id>`` sees the job go on.

* Written atomically (temp file in the same directory, ``fsync``, ``rename``) whenever a job changes
  state, and at most every ``PROGRESS_INTERVAL`` seconds for progress alone.
* One writer at a time: a worker *claims* the file when it starts (``owner`` = a fresh random id,
  under an ``flock`` on ``<file>.lock``). During a reload the old and the new worker overlap for a
  moment; once the new one has claimed the file, the old one sees a foreign owner and stops writing,
  so it cannot overwrite the new one's table with its own (older) view.
* Only this service's user can write the state directory, but a resumed pull still goes through the
  model-name grammar and the registry allow-list (the settings may have changed since).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

# One job as ``Job.to_record()`` wrote it (and a restarted worker reads it back): a JSON object whose
# fields ``Job.from_record`` checks one by one, since the file may be stale or edited.
JobRecord = dict[str, Any]

FORMAT_VERSION = 1
PROGRESS_INTERVAL = 1.0  # seconds between two writes caused by progress alone
MAX_STATE_BYTES = 16 * 1024 * 1024  # a larger file is not ours: refuse to parse it


class JobStateFile:
    """The job table's file: ``claim()`` at start, then ``save()`` on every change (throttled)."""

    def __init__(self, path: str, *, progress_interval: float = PROGRESS_INTERVAL):
        self.path = os.path.abspath(path)
        self.progress_interval = progress_interval
        self.owner = uuid.uuid4().hex
        self.superseded = False
        self._lock = threading.Lock()
        self._last_write = 0.0
        self._warned_at = 0.0

    # --- reading and claiming --------------------------------------------------------------------
    def claim(self) -> list[JobRecord]:
        """Become the file's only writer and return the jobs it holds (empty when absent or unreadable)."""
        with self._lock:
            try:
                with self._flock():
                    doc = self._read()
                    jobs = doc.get("jobs") if isinstance(doc, dict) else None
                    jobs = [j for j in jobs if isinstance(j, dict)] if isinstance(jobs, list) else []
                    self._write(jobs)
            except OSError as exc:
                # The server still starts; its jobs just do not survive a reload until the file works.
                log.warning("cannot use the job state file %s: %s; jobs will not survive a reload", self.path, exc)
                self._warned_at = time.monotonic()
                return []
            self._last_write = time.monotonic()
            return jobs

    def _read(self) -> dict[str, Any] | None:
        try:
            with open(self.path, "rb") as fh:
                data = fh.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the job state file %s: %s; starting without its jobs", self.path, exc)
            return None
        if len(data) > MAX_STATE_BYTES:
            log.warning("the job state file %s is over %d bytes; ignored", self.path, MAX_STATE_BYTES)
            return None
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            log.warning("the job state file %s is not valid JSON; ignored", self.path)
            return None
        if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
            log.warning("the job state file %s has an unknown format; ignored", self.path)
            return None
        return doc

    # --- writing ---------------------------------------------------------------------------------
    def save(self, snapshot: Callable[[], list[JobRecord]], *, force: bool) -> bool:
        """Write ``snapshot()`` unless throttled (``force``: a state change, always written) or superseded."""
        with self._lock:
            if self.superseded:
                return False
            now = time.monotonic()
            if not force and now - self._last_write < self.progress_interval:
                return False
            try:
                with self._flock():
                    current = self._read()
                    if isinstance(current, dict) and current.get("owner") not in (None, self.owner):
                        self.superseded = True
                        log.info("the job state file %s was claimed by a newer worker process (a reload); this "
                                 "process stops writing it", self.path)
                        return False
                    self._write(snapshot())
            except OSError as exc:
                if now - self._warned_at > 60:
                    self._warned_at = now
                    log.warning("cannot write the job state file %s: %s (jobs will not survive a reload until "
                                "it works again)", self.path, exc)
                return False
            self._last_write = now
            return True

    def _write(self, jobs: list[JobRecord]) -> None:
        directory = os.path.dirname(self.path)
        doc = {"version": FORMAT_VERSION, "owner": self.owner, "pid": os.getpid(), "written_at": time.time(),
               "jobs": jobs}
        fd, tmp = tempfile.mkstemp(prefix=".jobs-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, separators=(",", ":"))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _flock(self) -> _FileLock:
        return _FileLock(self.path + ".lock")


class _FileLock:
    """An exclusive ``flock`` on a side file: the old and the new worker process never write at once."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> _FileLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
