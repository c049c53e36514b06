"""The GPU-side NFS worker: ``gpu-bridge nfs-worker`` (unit ``gpu-nfs-worker.service``).

Serves the commands addressed to this host's id (``GPU_BRIDGE_NFS_HOST_ID``, default the host name)
from the spool on the share (protocol and layout: ``spool.py``). Everything runs through the same
Ollama adapter and pull-job manager as the HTTP GPU server, so both channels behave the same.

One process, threads:

* the **main loop** lists ``new/`` every ``poll_interval`` (and at once again after finding work),
  claims each command by renaming it into ``cur/``, answers cheap ones itself (ping, job, cancel,
  expired) and hands Ollama calls (list, delete, pull submission) to a small thread pool; it also
  rewrites the heartbeat every ``heartbeat_interval``, flushes pull progress and does housekeeping.
  A heartbeat therefore means "this worker is taking commands", not merely "the process exists".
* ``models.json`` is refreshed every ``GPU_BRIDGE_NFS_MODELS_REFRESH`` seconds by a background
  thread, and synchronously after a delete or a successful pull (before the answer/terminal progress
  is written, so a listing that follows never shows the old state).
* Pull progress: ``JobManager.on_change`` marks the job dirty; the main loop writes
  ``jobs/<job id>.json`` at most every ``PROGRESS_MIN_INTERVAL`` (the newest state always lands);
  terminal states are always written, right away (after a models refresh when it succeeded). The job
  id on this channel is the pull command's request id (docs/architecture.md); pulls that join a
  running pull of the same model share the download and each gets its own progress file.

Crash and restart semantics (the choice the issue asked for):

* A command is claimed (``new/`` → ``cur/``) before it runs and its ``cur/`` entry is removed only
  after its answer is published. On start the worker first serves what is left in ``cur/``: a command
  that already has an answer is just dropped (never answered twice); one without is run again.
  ``ping``, ``list``, ``job`` and ``health`` are read-only and re-run safely; ``pull`` re-submits,
  which joins the resumed download (Ollama keeps partial layers); ``cancel`` is idempotent; a
  ``delete`` that already happened before the crash is answered ``model_not_found`` with a note that
  the worker restarted while deleting it. A command that expired meanwhile is answered expired.
  So a command is never lost and never answered twice; only a command that was *executing* at the
  moment of a SIGKILL can run a second time, and only those idempotent ones.
* Pulls whose progress file is not terminal at start (the worker died or stopped mid-download) are
  re-submitted under the same job id, so a production ``pull_and_wait`` sees the pull continue.
* SIGTERM/SIGINT: stop claiming, let running commands finish (unstarted ones stay in ``cur/`` and run
  after the restart), write progress of unfinished pulls ("resumes when the worker restarts"), write a
  final heartbeat with ``"state": "stopped"`` (production then reports the worker down at once), and
  exit 0.

Safety: refuses to start (one line, exit 1) unless the share root is a mount point or below one
other than ``/`` (``GPU_BRIDGE_NFS_REQUIRE_MOUNT=false`` for tests) and carries the sentinel written
by ``gpu-bridge nfs-init``; stops (exit 1) if the sentinel disappears while running. Stale temp files
(``spool.STALE_TEMP_SECONDS``), answers and finished progress files older than
``GPU_BRIDGE_NFS_ANSWER_RETENTION`` are removed. Run exactly one worker per host id.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from . import __version__, names, spool
from .config import GpuServerSettings, NfsSettings
from .errors import (
    ChannelError,
    CommandExpired,
    Conflict,
    GpuBridgeError,
    InvalidRequest,
    JobNotFound,
    ModelNotFound,
)
from .jobs import check_free_space

log = logging.getLogger(__name__)

PROGRESS_MIN_INTERVAL = 0.1  # seconds between two writes of one progress file (terminal states excepted)
HOUSEKEEPING_INTERVAL = 30.0
POOL_THREADS = 4
INLINE_OPS = frozenset({"ping", "job", "cancel"})  # in-memory answers: served by the main loop itself
MAX_ID_LENGTH = 200


class NfsWorker:
    """The worker for one host id. ``run()`` blocks until ``stop()`` (or a signal) and returns the exit code."""

    def __init__(self, nfs: NfsSettings, server: GpuServerSettings | None = None, *, adapter=None, jobs=None):
        self.nfs = nfs
        self.server = server or GpuServerSettings()
        self.paths = spool.HostPaths(nfs.root, spool.check_host_id(nfs.host_id))
        self.boot = secrets.token_hex(6)
        self.counter = 0
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self._stop = threading.Event()
        self._stopping = False  # set once shutdown begins: job changes caused by it are not published
        self._lock = threading.RLock()
        self._progress_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._adapter = adapter
        self._jobs = jobs
        self._pool: ThreadPoolExecutor | None = None
        self._aux: ThreadPoolExecutor | None = None
        self._inflight: dict[str, Future] = {}
        # pull bookkeeping: JobManager id <-> command ids (one download may serve several pull commands)
        self._job_cmds: dict[str, set[str]] = {}
        self._cmd_job: dict[str, str] = {}
        self._latest: dict[str, dict] = {}  # JobManager id -> newest Job dict
        self._dirty: set[str] = set()
        self._last_progress_write: dict[str, float] = {}
        self._progress_seq: dict[str, int] = {}
        self._terminal_done: set[str] = set()  # command ids whose terminal progress is written
        self._refresh_future: Future | None = None
        self._next_refresh = 0.0
        self._models: list[dict] = []
        self._unclaimable: set[str] = set()
        self._last_ollama: dict | None = None
        self._gpu_probe = None
        self._served = 0
        self._audit_fd: int | None = None
        self._audit_lock = threading.Lock()
        self.exit_code = 0

    # --- lifecycle -------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse to run on an unmounted or unprepared share (ShareNotReady, one clear line)."""
        spool.check_share(self.nfs.root, require_mount=self.nfs.require_mount)

    def stop(self, *_args) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> int:
        self.check()
        spool.prepare_host(self.paths)
        if self.nfs.audit_log:
            self._audit_fd = os.open(self.nfs.audit_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self.counter = self._previous_counter() + 1
        self._build_backends()
        self._pool = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="nfs-cmd")
        self._aux = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nfs-aux")
        log.info("nfs-worker %s serving %s (share %s, poll %.3g s, heartbeat %.3g s, Ollama %s)",
                 self.boot, self.paths.host_id, self.nfs.root, self.nfs.poll_interval,
                 self.nfs.heartbeat_interval, self.server.ollama_url)
        try:
            self._write_heartbeat()
            self._recover()
            self._housekeeping()
            self._loop()
        finally:
            self._shutdown()
        return self.exit_code

    def _build_backends(self) -> None:
        if self._adapter is None:
            from .ollama import OllamaAdapter

            self._adapter = OllamaAdapter(self.server.ollama_url, connect_timeout=self.server.ollama_connect_timeout,
                                          read_timeout=self.server.ollama_read_timeout)
        if self._jobs is None:
            from .jobs import JobManager

            self._jobs = JobManager(self._adapter, max_concurrent=self.server.max_concurrent_pulls,
                                    max_queued=self.server.max_queued_pulls,
                                    stall_timeout=self.server.pull_stall_timeout,
                                    retention=self.server.job_retention_seconds, on_change=self._on_job_change)
        else:
            self._jobs.on_change = self._on_job_change

    def _previous_counter(self) -> int:
        try:
            doc = spool.read_json(self.paths.heartbeat)
        except (ChannelError, OSError):
            return 0
        value = (doc or {}).get("counter")
        return value if isinstance(value, int) and value >= 0 else 0

    def _loop(self) -> None:
        poll = self.nfs.poll_interval
        next_beat = time.monotonic() + self.nfs.heartbeat_interval
        next_housekeeping = time.monotonic() + HOUSEKEEPING_INTERVAL
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_beat:
                    next_beat = now + self.nfs.heartbeat_interval
                    if not spool.openable(self.paths.sentinel):
                        log.error("the share's sentinel %s disappeared (share unmounted?): stopping",
                                  self.paths.sentinel)
                        self.exit_code = 1
                        return
                    self.counter += 1
                    self._write_heartbeat()
                if now >= self._next_refresh and (self._refresh_future is None or self._refresh_future.done()):
                    self._next_refresh = now + self.nfs.models_refresh_interval
                    self._refresh_future = self._aux.submit(self._refresh_quiet, True)
                self._flush_progress()
                if now >= next_housekeeping:
                    next_housekeeping = now + HOUSEKEEPING_INTERVAL
                    self._housekeeping()
                served = self._serve_inbox()
            except OSError as exc:
                # ENOSPC, EDQUOT, EIO...: the heartbeat stops advancing, so production sees the worker as
                # down while this lasts; keep trying rather than exit (systemd would only restart us).
                log.error("share I/O error in the worker loop: %s; retrying", exc)
                self._stop.wait(max(poll, 1.0))
                continue
            if not served:
                self._stop.wait(min(poll, max(0.0, next_beat - time.monotonic())))

    def _shutdown(self) -> None:
        log.info("nfs-worker %s stopping", self.boot)
        if self._pool is not None:
            # Commands already running finish and are answered; unstarted ones stay in cur/ for the restart.
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._stopping = True
        self._flush_progress(force=True, note="interrupted: the worker stopped; the pull resumes when it restarts")
        if self._jobs is not None:
            try:
                self._jobs.shutdown()
            except Exception:  # noqa: BLE001 - shutting down anyway
                log.exception("job manager shutdown failed")
        if self._aux is not None:
            self._aux.shutdown(wait=True, cancel_futures=True)
        if self.exit_code == 0:
            try:
                self._write_heartbeat(state="stopped")
            except OSError as exc:
                log.warning("could not write the final heartbeat: %s", exc)
        if self._adapter is not None and hasattr(self._adapter, "close"):
            self._adapter.close()
        if self._audit_fd is not None:
            os.close(self._audit_fd)
            self._audit_fd = None
        log.info("nfs-worker %s stopped (%d commands served)", self.boot, self._served)

    # --- heartbeat, models.json, housekeeping ------------------------------------------------------
    def _write_heartbeat(self, state: str = "running") -> None:
        doc = {"v": spool.PROTOCOL_VERSION, "host": self.paths.host_id, "node": socket.gethostname(),
               "pid": os.getpid(), "boot": self.boot, "counter": self.counter,
               "interval": self.nfs.heartbeat_interval, "poll_interval": self.nfs.poll_interval,
               "started_at": self.started_at, "written_at": time.time(), "state": state,
               "uptime_seconds": round(time.monotonic() - self._started_mono, 1), "version": __version__,
               "served": self._served, "pulls": self._jobs.counts() if self._jobs is not None else {}}
        spool.write_json(self.paths.status_tmp, self.paths.heartbeat, doc)

    def _refresh_quiet(self, probe: bool = False) -> None:
        try:
            self.refresh_models(probe=probe)
        except GpuBridgeError:
            pass  # recorded in models.json
        except Exception:  # noqa: BLE001 - background thread: log and carry on
            log.exception("models.json refresh failed")

    def refresh_models(self, *, probe: bool = False) -> list[dict]:
        """Ask Ollama, rewrite models.json (atomic replace); raise the adapter's error after recording it.

        ``probe``: also ask Ollama's version (the periodic refresh); a listing on demand (the ``list``
        command, after a delete or a pull) makes one Ollama call and reuses the last version.
        """
        with self._refresh_lock:
            error: GpuBridgeError | None = None
            ollama = self._ollama_status() if probe or self._last_ollama is None else dict(self._last_ollama)
            started = time.perf_counter()
            try:
                self._models = self._adapter.list_models()
                if ollama.get("reachable"):
                    ollama["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
                else:  # the listing worked: Ollama is back even if the last probe failed
                    ollama = {"reachable": True, "version": ollama.get("version"),
                              "latency_ms": round((time.perf_counter() - started) * 1000, 1)}
            except GpuBridgeError as exc:
                error = exc
                ollama = {"reachable": False, "version": ollama.get("version"), "latency_ms": None,
                          "error": exc.message, "code": exc.code}
            self._last_ollama = dict(ollama)
            if not ollama.get("reachable") and "code" not in ollama:
                ollama["code"] = "ollama_unavailable"
            doc = {"v": spool.PROTOCOL_VERSION, "host": self.paths.host_id, "boot": self.boot,
                   "counter": self.counter, "refresh_interval": self.nfs.models_refresh_interval,
                   "refreshed_at": time.time(), "models": self._models, "ollama": ollama,
                   "gpu": self._gpu_snapshot()}
            try:
                spool.write_json(self.paths.status_tmp, self.paths.models, doc)
            except OSError as exc:
                log.error("cannot write %s: %s", self.paths.models, exc)
        if error is not None:
            raise error
        return list(self._models)

    def _housekeeping(self) -> None:
        removed = 0
        for tmp in (self.paths.cmd_tmp, self.paths.status_tmp):
            for path in spool.iter_old_entries(tmp, spool.STALE_TEMP_SECONDS, dot_only=True):
                removed += spool.unlink_quiet(path)
        for path in spool.iter_old_entries(self.paths.answers, self.nfs.answer_retention):
            removed += spool.unlink_quiet(path)
        for path in spool.iter_old_entries(self.paths.jobs, self.nfs.answer_retention):
            cmd_id = os.path.basename(path)[:-5]
            with self._lock:
                active = cmd_id in self._cmd_job
            if not active:
                removed += spool.unlink_quiet(path)
        if removed:
            log.info("housekeeping removed %d old files", removed)

    # --- the inbox -------------------------------------------------------------------------------
    def _serve_inbox(self) -> int:
        served = 0
        for name in spool.list_names(self.paths.cmd_new):
            if self._stop.is_set():
                break
            rid = name[:-5] if name.endswith(".json") else name
            src = os.path.join(self.paths.cmd_new, name)
            dst = self.paths.cur_path(rid)
            try:
                claimed = spool.claim(src, dst)
            except OSError as exc:
                if name not in self._unclaimable:
                    self._unclaimable.add(name)
                    log.error("cannot claim %s: %s (check the spool's ownership and permissions)", src, exc)
                continue
            if not claimed:
                continue
            served += 1
            self._dispatch(rid, recovered=False)
        return served

    def _recover(self) -> None:
        """Resume unfinished pulls, then serve what a previous run claimed but did not answer."""
        for name in spool.list_names(self.paths.jobs):
            if not name.endswith(".json"):
                continue
            cmd_id = name[:-5]
            try:
                doc = spool.read_json(os.path.join(self.paths.jobs, name))
            except (ChannelError, OSError):
                continue
            job = (doc or {}).get("job") or {}
            if job.get("state") in spool.TERMINAL_STATES or not isinstance(job.get("model"), str):
                continue
            log.info("resuming pull %s of %s interrupted by a restart", cmd_id, job["model"])
            try:
                self._submit_pull(cmd_id, job["model"], previous=job)
            except GpuBridgeError as exc:
                self._write_progress(cmd_id, {**job, "state": "failed", "error": exc.message,
                                              "error_code": exc.code, "finished_at": _iso_now(),
                                              "updated_at": _iso_now()}, terminal=True)
        for name in spool.list_names(self.paths.cmd_cur):
            rid = name[:-5] if name.endswith(".json") else name
            if spool.openable(self.paths.answer_path(rid)):
                spool.unlink_quiet(self.paths.cur_path(rid))  # answered before the crash: never answer twice
                continue
            log.info("re-serving command %s claimed by a previous run", rid)
            self._dispatch(rid, recovered=True)

    def _dispatch(self, rid: str, *, recovered: bool) -> None:
        cur = self.paths.cur_path(rid)
        if rid.startswith(".") or len(rid) > MAX_ID_LENGTH:
            log.warning("dropping %s: not a usable request id", cur)
            spool.unlink_quiet(cur)
            return
        try:
            data = spool.read_bytes(cur, spool.MAX_COMMAND_BYTES)
            if data is None:
                return
            command = json.loads(data)
            if not isinstance(command, dict):
                raise ValueError("not an object")
        except (ChannelError, ValueError, UnicodeDecodeError) as exc:
            self._answer(rid, {"id": rid, "op": None}, error=InvalidRequest(f"unreadable command {rid}: {exc}"))
            return
        command["id"] = rid  # the file name is authoritative: it is what the producer waits for
        op = command.get("op")
        deadline = command.get("deadline")
        if op not in spool.OPS:
            self._answer(rid, command, error=InvalidRequest(f"unknown command {op!r}; known: {', '.join(spool.OPS)}"))
            return
        if not isinstance(deadline, int | float):
            self._answer(rid, command, error=InvalidRequest("command without a numeric 'deadline'"))
            return
        late = time.time() - deadline
        if late > 0:
            self._audit(rid, op, "expired", recovered)
            self._answer(rid, command, error=CommandExpired(
                f"command {op} {rid} expired {late:.1f} s before {self.paths.host_id} picked it up; not executed"))
            return
        if op in INLINE_OPS:
            self._execute(rid, command, recovered)
        else:
            self._inflight[rid] = self._pool.submit(self._execute, rid, command, recovered)
            for done in [k for k, f in self._inflight.items() if f.done()]:
                del self._inflight[done]

    def _execute(self, rid: str, command: dict, recovered: bool) -> None:
        op = command["op"]
        args = command.get("args") if isinstance(command.get("args"), dict) else {}
        started = time.monotonic()
        self._audit(rid, op, "exec", recovered)
        result = error = None
        try:
            result = getattr(self, f"_op_{op}")(rid, args, recovered)
        except GpuBridgeError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - the producer gets an answer, the log gets the traceback
            log.exception("command %s %s failed", op, rid)
            error = GpuBridgeError(f"{self.paths.host_id}: nfs-worker error while running {op}: "
                                   f"{type(exc).__name__}: {exc}")
        if op in ("delete", "pull") or error is not None:
            log.info("%s %s %s -> %s", op, rid, args, error.code if error else "ok")
        self._answer(rid, command, result=result, error=error, recovered=recovered,
                     ms=(time.monotonic() - started) * 1000)

    def _answer(self, rid: str, command: dict, *, result: dict | None = None, error: GpuBridgeError | None = None,
                recovered: bool = False, ms: float | None = None) -> None:
        worker = {"pid": os.getpid(), "boot": self.boot, "recovered": recovered}
        answer = spool.make_answer(command, self.paths.host_id, result=result,
                                   error=spool.error_to_dict(error) if error else None, worker=worker)
        try:
            spool.write_json(self.paths.status_tmp, self.paths.answer_path(rid), answer)
        except OSError as exc:
            # Left in cur/: served again at the next start. Nothing else can be done from here.
            log.error("cannot publish the answer to %s: %s", rid, exc)
            return
        spool.unlink_quiet(self.paths.cur_path(rid))
        self._served += 1
        self._audit(rid, command.get("op"), "answered", recovered, code=error.code if error else "ok", ms=ms)

    def _audit(self, rid: str, op, event: str, recovered: bool, **extra) -> None:
        if self._audit_fd is None:
            return
        line = {"t": round(time.time(), 6), "id": rid, "op": op, "event": event, "recovered": recovered,
                "pid": os.getpid(), **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in extra.items()}}
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        with self._audit_lock:
            os.write(self._audit_fd, data)

    # --- operations --------------------------------------------------------------------------------
    def _op_ping(self, rid: str, args: dict, recovered: bool) -> dict:
        return {"pong": True, "host": self.paths.host_id, "counter": self.counter, "boot": self.boot}

    def _op_list(self, rid: str, args: dict, recovered: bool) -> dict:
        return {"models": self.refresh_models()}

    def _op_health(self, rid: str, args: dict, recovered: bool) -> dict:
        ollama = self._ollama_status()
        return {"status": "ok" if ollama.get("reachable") else "degraded", "version": __version__,
                "uptime_seconds": round(time.monotonic() - self._started_mono, 1), "ollama": ollama,
                "gpu": self._gpu_snapshot(), "pulls": self._jobs.counts()}

    def _ollama_status(self) -> dict:
        """``{"reachable", "version", "latency_ms", "error"?}`` like the GPU server's health; never raises."""
        started = time.perf_counter()
        try:
            version = self._adapter.version(read_timeout=self.server.ollama_connect_timeout + 3.0)
        except GpuBridgeError as exc:
            return {"reachable": False, "version": None, "latency_ms": None, "error": exc.message, "code": exc.code}
        return {"reachable": True, "version": version, "latency_ms": round((time.perf_counter() - started) * 1000, 1)}

    def _gpu_snapshot(self) -> dict:
        """NVML facts through the GPU server's probe (cached 5 s); never raises."""
        if self._gpu_probe is None:
            try:
                from .gpu_server.health import GpuProbe

                self._gpu_probe = GpuProbe()
            except Exception as exc:  # noqa: BLE001 - health must never fail the worker
                return {"available": False, "devices": [], "error": f"GPU probe unavailable: {exc}"}
        return self._gpu_probe.snapshot()

    def _op_delete(self, rid: str, args: dict, recovered: bool) -> dict:
        model = names.validate(args.get("model"), self.server.allowed_registries).display
        try:
            self._adapter.delete(model)
        except ModelNotFound as exc:
            if recovered:
                raise ModelNotFound(f"{exc.message} (the worker restarted while running this delete; an earlier "
                                    "attempt may already have deleted it)") from None
            raise
        finally:
            self._refresh_quiet()
        return {"deleted": model}

    def _op_pull(self, rid: str, args: dict, recovered: bool) -> dict:
        model = names.validate(args.get("model"), self.server.allowed_registries).display
        check_free_space(self.server.ollama_models_dir, self.server.min_free_bytes, f" on {self.paths.host_id}")
        return self._submit_pull(rid, model)

    def _op_job(self, rid: str, args: dict, recovered: bool) -> dict:
        job_id = _job_id(args)
        with self._lock:
            jm_id = self._cmd_job.get(job_id)
        if jm_id is not None:
            try:
                return {**self._jobs.get(jm_id).to_dict(), "id": job_id}
            except JobNotFound:
                pass
        doc = self._read_progress(job_id)
        if doc is None:
            raise JobNotFound(f"no job {job_id!r} on {self.paths.host_id}")
        return doc

    def _op_cancel(self, rid: str, args: dict, recovered: bool) -> dict:
        job_id = _job_id(args)
        with self._lock:
            jm_id = self._cmd_job.get(job_id)
        if jm_id is not None:
            try:
                job = self._jobs.cancel(jm_id)
            except JobNotFound:
                pass
            else:
                snap = job.to_dict()
                self._complete(jm_id, snap)
                return {**snap, "id": job_id}
        doc = self._read_progress(job_id)
        if doc is None:
            raise JobNotFound(f"no job {job_id!r} on {self.paths.host_id}")
        if doc.get("state") in spool.TERMINAL_STATES:
            raise Conflict(f"job {job_id} has already {doc.get('state')}; only queued or running pulls can be "
                           "cancelled", extra={"job": doc})
        # A progress file with no live job behind it (should not happen after recovery): close it.
        now = _iso_now()
        doc = {**doc, "state": "cancelled", "error": "pull cancelled by request", "error_code": "cancelled",
               "finished_at": now, "updated_at": now}
        self._write_progress(job_id, doc, terminal=True)
        return doc

    # --- pulls and their progress files ------------------------------------------------------------
    def _submit_pull(self, cmd_id: str, model: str, previous: dict | None = None) -> dict:
        job, joined = self._jobs.submit(model)
        with self._lock:
            self._job_cmds.setdefault(job.id, set()).add(cmd_id)
            self._cmd_job[cmd_id] = job.id
        # Read the state only now: a change after registration reaches _on_job_change as tracked.
        snap = job.to_dict()
        with self._lock:
            self._latest.setdefault(job.id, snap)
        public = {**snap, "id": cmd_id}
        if previous is not None:  # resumed after a restart: keep the original creation time
            public["created_at"] = previous.get("created_at") or public["created_at"]
        if snap["state"] in spool.TERMINAL_STATES:
            self._complete(job.id, snap)
        else:
            self._write_progress(cmd_id, public)
        return {**public, "joined": joined}

    def _on_job_change(self, job) -> None:
        if self._stopping:
            return  # shutdown cancels pulls: they are not finished, they resume after the restart
        snap = job.to_dict()
        with self._lock:
            self._latest[job.id] = snap
            tracked = job.id in self._job_cmds
            if snap["state"] not in spool.TERMINAL_STATES:
                self._dirty.add(job.id)
                return
        if tracked and self._aux is not None:
            try:
                self._aux.submit(self._complete, job.id, snap)
            except RuntimeError:  # executor already shut down
                self._complete(job.id, snap)

    def _complete(self, jm_id: str, snap: dict) -> None:
        """A pull reached a terminal state: refresh models.json first (succeeded), then write every
        progress file of that pull, then forget the mapping."""
        with self._lock:
            cmds = [c for c in self._job_cmds.get(jm_id, ()) if c not in self._terminal_done]
        if not cmds:
            return
        if snap["state"] == "succeeded":
            self._refresh_quiet()
        for cmd_id in cmds:
            self._write_progress(cmd_id, {**snap, "id": cmd_id}, terminal=True)
        with self._lock:
            for cmd_id in cmds:
                self._cmd_job.pop(cmd_id, None)
                self._last_progress_write.pop(cmd_id, None)
            remaining = self._job_cmds.get(jm_id, set()) - set(cmds)
            if remaining:
                self._job_cmds[jm_id] = remaining
            else:
                self._job_cmds.pop(jm_id, None)
                self._latest.pop(jm_id, None)
                self._dirty.discard(jm_id)
            if len(self._terminal_done) > 10000:
                self._terminal_done.clear()

    def _flush_progress(self, *, force: bool = False, note: str | None = None) -> None:
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
                    if force or now - self._last_progress_write.get(cmd_id, 0.0) >= PROGRESS_MIN_INTERVAL:
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
            self._write_progress(cmd_id, doc)

    def _write_progress(self, cmd_id: str, job: dict, *, terminal: bool = False) -> None:
        with self._progress_lock:
            if cmd_id in self._terminal_done:
                return  # a terminal state is final: never overwrite it with an older one
            seq = self._progress_seq.get(cmd_id, 0) + 1
            doc = {"v": spool.PROTOCOL_VERSION, "host": self.paths.host_id, "seq": seq, "boot": self.boot,
                   "written_at": time.time(), "job": job}
            try:
                spool.write_json(self.paths.status_tmp, self.paths.job_path(cmd_id), doc)
            except OSError as exc:
                log.error("cannot write progress of job %s: %s", cmd_id, exc)
                return
            self._progress_seq[cmd_id] = seq
            self._last_progress_write[cmd_id] = time.monotonic()
            if terminal or job.get("state") in spool.TERMINAL_STATES:
                self._terminal_done.add(cmd_id)
                self._progress_seq.pop(cmd_id, None)

    def _read_progress(self, job_id: str) -> dict | None:
        try:
            doc = spool.read_json(self.paths.job_path(job_id))
        except (ChannelError, OSError):
            return None
        job = (doc or {}).get("job")
        return job if isinstance(job, dict) else None


def _job_id(args: dict) -> str:
    job_id = args.get("job_id")
    if not isinstance(job_id, str) or not job_id or job_id.startswith(".") or "/" in job_id \
            or len(job_id) > MAX_ID_LENGTH:
        raise JobNotFound(f"invalid job id {job_id!r}")
    return job_id


def _iso_now() -> str:
    from .jobs import iso

    return iso(time.time())


def cmd_nfs_worker(args: argparse.Namespace) -> int:
    """``gpu-bridge nfs-worker``: serve the spool until SIGTERM; exit 0 after a clean stop."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = NfsWorker(NfsSettings.from_env(), GpuServerSettings.from_env())
    worker.check()  # ShareNotReady: one line on stderr, exit 1, before anything is written
    worker.install_signal_handlers()
    return worker.run()
