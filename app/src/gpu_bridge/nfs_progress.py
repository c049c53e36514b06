"""Pull bookkeeping of the NFS worker: command ids <-> pull jobs, and the progress files ``jobs/<id>.json``.

The job id on this channel is the pull command's request id (docs/architecture.md). Pulls that join a
running pull of the same model share the download (one ``JobManager`` job) and each command gets its
own progress file, so one job maps to a set of command ids.

* ``JobManager.on_change`` marks the job dirty; the main loop's ``flush()`` writes its progress files
  at most every ``PROGRESS_MIN_INTERVAL`` (the newest state always lands).
* Terminal states are written right away, after a models.json refresh when the pull succeeded (so a
  listing that follows shows the model), and are final: an older state never overwrites them.
* On stop the worker writes the unfinished pulls' progress with "resumes when the worker restarts";
  at the next start ``unfinished()`` yields them and the worker re-submits each under the same id,
  through the same checks as a new pull (a progress file is as hostile as an inbox entry).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from . import spool
from .errors import ChannelError, GpuBridgeError
from .gpu_service import JsonDict
from .jobs import Job, iso

# One logger for the whole worker process (every nfs_* module): operators filter on its name.
log = logging.getLogger("gpu_bridge.nfs_worker")

PROGRESS_MIN_INTERVAL = 0.1  # seconds between two writes of one progress file (terminal states excepted)
MAX_ID_LENGTH = 200


def rid_of(name: str) -> str | None:
    """The request id of a spool name ``<request id>.json``; None when the name is anything else."""
    if not name.endswith(".json"):
        return None
    rid = name[:-5]
    return rid if len(rid) <= MAX_ID_LENGTH and spool.valid_request_id(rid) else None


def iso_now() -> str:
    return iso(time.time())


class PullProgress:
    """The progress files of one worker. ``on_succeeded`` refreshes models.json (before the terminal
    state is written); ``executor`` runs completions off the job manager's thread once the worker
    has one (inline before and after)."""

    def __init__(self, paths: spool.HostPaths, boot: str, *, on_succeeded: Callable[[], None]) -> None:
        self.paths, self.boot = paths, boot
        self._on_succeeded = on_succeeded
        self.executor: ThreadPoolExecutor | None = None
        self.stopping = False  # set once shutdown begins: job changes caused by it are not published
        self._lock = threading.RLock()
        self._write_lock = threading.Lock()
        self._job_cmds: dict[str, set[str]] = {}  # JobManager id -> command ids (one download, many commands)
        self._cmd_job: dict[str, str] = {}
        self._latest: dict[str, JsonDict] = {}  # JobManager id -> newest Job dict
        self._dirty: set[str] = set()
        self._last_write: dict[str, float] = {}
        self._seq: dict[str, int] = {}
        self._terminal_done: set[str] = set()  # command ids whose terminal progress is written

    # --- the mapping -----------------------------------------------------------------------------
    def job_of(self, cmd_id: str) -> str | None:
        """The JobManager id behind a pull command still in progress."""
        with self._lock:
            return self._cmd_job.get(cmd_id)

    def is_active(self, cmd_id: str) -> bool:
        return self.job_of(cmd_id) is not None

    def track(self, cmd_id: str, job: Job, joined: bool, previous: JsonDict | None = None) -> JsonDict:
        """Map a submitted pull to its command, write its first progress; the answer's job dict."""
        with self._lock:
            self._job_cmds.setdefault(job.id, set()).add(cmd_id)
            self._cmd_job[cmd_id] = job.id
        # Read the state only now: a change after registration reaches on_job_change as tracked.
        snap = job.to_dict()
        with self._lock:
            self._latest.setdefault(job.id, snap)
        public = {**snap, "id": cmd_id}
        if previous is not None:  # resumed after a restart: keep the original creation time
            public["created_at"] = previous.get("created_at") or public["created_at"]
        if snap["state"] in spool.TERMINAL_STATES:
            self.complete(job.id, snap)
        else:
            self.write(cmd_id, public)
        return {**public, "joined": joined}

    def on_job_change(self, job: Job) -> None:
        """``JobManager.on_change``: mark progress dirty, or hand a terminal state to ``complete``."""
        if self.stopping:
            return  # shutdown cancels pulls: they are not finished, they resume after the restart
        snap = job.to_dict()
        with self._lock:
            self._latest[job.id] = snap
            tracked = job.id in self._job_cmds
            if snap["state"] not in spool.TERMINAL_STATES:
                self._dirty.add(job.id)
                return
        if not tracked:
            return
        if self.executor is not None:
            try:
                self.executor.submit(self.complete, job.id, snap)
                return
            except RuntimeError:  # executor already shut down
                pass
        self.complete(job.id, snap)

    def complete(self, jm_id: str, snap: JsonDict) -> None:
        """A pull reached a terminal state: refresh models.json first (succeeded), then write every
        progress file of that pull, then forget the mapping."""
        with self._lock:
            cmds = [c for c in self._job_cmds.get(jm_id, ()) if c not in self._terminal_done]
        if not cmds:
            return
        if snap["state"] == "succeeded":
            self._on_succeeded()
        for cmd_id in cmds:
            self.write(cmd_id, {**snap, "id": cmd_id}, terminal=True)
        with self._lock:
            for cmd_id in cmds:
                self._cmd_job.pop(cmd_id, None)
                self._last_write.pop(cmd_id, None)
            remaining = self._job_cmds.get(jm_id, set()) - set(cmds)
            if remaining:
                self._job_cmds[jm_id] = remaining
            else:
                self._job_cmds.pop(jm_id, None)
                self._latest.pop(jm_id, None)
                self._dirty.discard(jm_id)
            if len(self._terminal_done) > 10000:
                self._terminal_done.clear()

    # --- progress files --------------------------------------------------------------------------
    def flush(self, *, force: bool = False, note: str | None = None) -> None:
        """Write the progress of dirty pulls (every tracked unfinished pull when ``force``)."""
        now = time.monotonic()
        with self._lock:
            work = []
            for jm_id in list(self._dirty):
                snap = self._latest.get(jm_id)
                if snap is None or snap["state"] in spool.TERMINAL_STATES:
                    self._dirty.discard(jm_id)
                    continue
                pending = False
                for cmd_id in self._job_cmds.get(jm_id, ()):
                    if force or now - self._last_write.get(cmd_id, 0.0) >= PROGRESS_MIN_INTERVAL:
                        work.append((cmd_id, snap))
                    else:
                        pending = True
                if not pending:
                    self._dirty.discard(jm_id)
            if force:
                work.extend((c, self._latest[j]) for j, cs in self._job_cmds.items() if j in self._latest
                            and self._latest[j]["state"] not in spool.TERMINAL_STATES for c in cs)
        for cmd_id, snap in work:
            doc = {**snap, "id": cmd_id}
            if note:
                doc["status"] = note
            self.write(cmd_id, doc)

    def write(self, cmd_id: str, job: JsonDict, *, terminal: bool = False) -> None:
        with self._write_lock:
            if cmd_id in self._terminal_done:
                return  # a terminal state is final: never overwrite it with an older one
            seq = self._seq.get(cmd_id, 0) + 1
            doc = {"v": spool.PROTOCOL_VERSION, "host": self.paths.host_id, "seq": seq, "boot": self.boot,
                   "written_at": time.time(), "job": job}
            try:
                spool.write_json(self.paths.status_tmp, self.paths.job_path(cmd_id), doc)
            except OSError as exc:
                log.error("cannot write progress of job %s: %s", cmd_id, exc)
                return
            self._seq[cmd_id] = seq
            self._last_write[cmd_id] = time.monotonic()
            if terminal or job.get("state") in spool.TERMINAL_STATES:
                self._terminal_done.add(cmd_id)
                self._seq.pop(cmd_id, None)

    def read(self, job_id: str) -> JsonDict | None:
        """The job in ``jobs/<job_id>.json``; None when there is none (or it is unreadable)."""
        try:
            doc = spool.read_json(self.paths.job_path(job_id), nofollow=True, max_depth=spool.MAX_JSON_DEPTH)
        except (ChannelError, OSError):
            return None
        job = (doc or {}).get("job")
        return job if isinstance(job, dict) else None

    def close_orphan(self, job_id: str, job: JsonDict) -> JsonDict:
        """Cancel a progress file with no live job behind it (should not happen after recovery)."""
        now = iso_now()
        doc = {**job, "state": "cancelled", "error": "pull cancelled by request", "error_code": "cancelled",
               "finished_at": now, "updated_at": now}
        self.write(job_id, doc, terminal=True)
        return doc

    def fail(self, cmd_id: str, job: JsonDict, error: GpuBridgeError) -> None:
        """Close a progress file whose pull cannot resume, with the reason."""
        now = iso_now()
        self.write(cmd_id, {**job, "id": cmd_id, "state": "failed", "error": error.message, "error_code": error.code,
                            "finished_at": now, "updated_at": now}, terminal=True)

    def unfinished(self) -> Iterator[tuple[str, str, JsonDict]]:
        """``(command id, model, job)`` of each progress file a previous run left unfinished.

        Unusable files are skipped with a warning; the model is only known to be a string here: the
        caller puts it through the same checks as a new pull."""
        for name in spool.list_names(self.paths.jobs):
            try:
                found = self._unfinished_file(name)
            except Exception:  # noqa: BLE001 - one progress file must never stop the worker
                log.exception("unexpected error while reading progress file %r; skipped", name)
                continue
            if found is not None:
                yield found

    def _unfinished_file(self, name: str) -> tuple[str, str, JsonDict] | None:
        cmd_id = rid_of(name)
        if cmd_id is None:
            log.warning("ignoring progress file %r: its name is not <request id>.json", name)
            return None
        try:
            doc = spool.read_json(self.paths.job_path(cmd_id), nofollow=True, max_depth=spool.MAX_JSON_DEPTH)
        except (ChannelError, OSError) as exc:
            log.warning("ignoring progress file %r: %s", name, getattr(exc, "message", None) or exc)
            return None
        job = (doc or {}).get("job")
        if not isinstance(job, dict) or job.get("state") in spool.TERMINAL_STATES:
            return None
        model = job.get("model")
        return (cmd_id, model, job) if isinstance(model, str) else None

__all__ = ["MAX_ID_LENGTH", "PROGRESS_MIN_INTERVAL", "PullProgress", "iso_now", "rid_of"]
