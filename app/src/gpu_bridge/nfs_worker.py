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
* systemd (``Type=notify``, ``WatchdogSec=``): ``READY=1`` once the first heartbeat is on the share,
  ``WATCHDOG=1`` after every heartbeat written (``sdnotify.py``), ``STOPPING=1`` when it stops. A
  heartbeat write that blocks or fails sends nothing, so systemd restarts a stuck worker.
* SIGTERM/SIGINT: stop claiming, let running commands finish (unstarted ones stay in ``cur/`` and run
  after the restart), write progress of unfinished pulls ("resumes when the worker restarts"), write a
  final heartbeat with ``"state": "stopped"`` (production then reports the worker down at once), and
  exit 0.

Safety: refuses to start (one line, exit 1) unless the share root is a mount point or below one
other than ``/`` (``GPU_BRIDGE_NFS_REQUIRE_MOUNT=false`` for tests) and carries the sentinel written
by ``gpu-bridge nfs-init``; stops (exit 1) if the sentinel disappears while running. Stale temp files
(``spool.STALE_TEMP_SECONDS``), answers and finished progress files older than
``GPU_BRIDGE_NFS_ANSWER_RETENTION`` are removed. Run exactly one worker per host id.

Hostile spool: anyone who can write to the share can plant entries, so the worker reads regular
files only (``O_NOFOLLOW|O_NONBLOCK``, then ``fstat``), commands of at most ``spool.MAX_COMMAND_BYTES``
nesting at most ``spool.MAX_JSON_DEPTH`` levels, named ``<request id>.json``. Anything else is moved to
``bad/`` with a reason (and answered ``invalid_request`` when its name is a usable request id); each
entry is handled in its own error handler, so none can stop the worker or the commands behind it.
Deadlines must be finite and at most ``spool.MAX_DEADLINE_AHEAD`` ahead; they are checked at claim and
again when a pool thread starts the command. Resumed pulls go through the same checks as new ones.
Clock skew (this worker vs. the share, a sender vs. the share) is logged as a warning. File names are
logged with ``repr``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import signal
import socket
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeGuard

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
from .sdnotify import Notifier, watchdog_seconds

if TYPE_CHECKING:
    from .gpu_server.health import GpuProbe  # imported lazily at run time (NVML)

log = logging.getLogger(__name__)

PROGRESS_MIN_INTERVAL = 0.1  # seconds between two writes of one progress file (terminal states excepted)
HOUSEKEEPING_INTERVAL = 30.0
POOL_THREADS = 4
INLINE_OPS = frozenset({"ping", "job", "cancel"})  # in-memory answers: served by the main loop itself
MAX_ID_LENGTH = 200
SKEW_WARN_EVERY = 300.0  # seconds between two warnings about the same clock disagreement


class NfsWorker:
    """The worker for one host id. ``run()`` blocks until ``stop()`` (or a signal) and returns the exit code."""

    def __init__(self, nfs: NfsSettings, server: GpuServerSettings | None = None, *, adapter=None, jobs=None,
                 wall=time.time, notifier: Notifier | None = None):
        self.nfs = nfs
        # systemd (Type=notify, WatchdogSec=): READY=1 once serving, WATCHDOG=1 with every heartbeat written
        self._notifier = notifier if notifier is not None else Notifier.from_env()
        self._ready_sent = False
        self._wall = wall  # the clock deadlines are judged by (tests give it an offset)
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
        self._gpu_probe: GpuProbe | None = None
        self._served = 0
        self._audit_fd: int | None = None
        self._audit_lock = threading.Lock()
        self._share_skew: float | None = None  # share (NFS server) clock minus ours, from the heartbeat's mtime
        self._skew_warned: dict[str, float] = {}
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
        self._clear_status_names()
        if self.nfs.audit_log:
            self._audit_fd = os.open(self.nfs.audit_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self.counter = self._previous_counter() + 1
        self._build_backends()
        self._pool = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="nfs-cmd")
        self._aux = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nfs-aux")
        log.info("nfs-worker %s serving %s (share %s, poll %.3g s, heartbeat %.3g s, Ollama %s)",
                 self.boot, self.paths.host_id, self.nfs.root, self.nfs.poll_interval,
                 self.nfs.heartbeat_interval, self.server.ollama_url)
        self._check_watchdog()
        try:
            self._write_heartbeat()
            self._notifier.ready(f"serving {self.paths.host_id}")  # after the first heartbeat reached the share
            self._ready_sent = True
            self._recover()
            self._housekeeping()
            self._loop()
        finally:
            self._shutdown()
        return self.exit_code

    def _clear_status_names(self) -> None:
        """A directory planted where the worker writes its own status files would make every heartbeat
        fail (a rename cannot replace a directory): move it to bad/. Other types are simply replaced."""
        for path in (self.paths.heartbeat, self.paths.models):
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    self._refuse(path, None, "a directory where the worker writes its status file")
            except FileNotFoundError:
                pass

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
            doc = spool.read_json(self.paths.heartbeat, nofollow=True, max_depth=spool.MAX_JSON_DEPTH)
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
                    assert self._aux is not None  # created in run(), before this loop runs
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
        self._notifier.stopping()
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
        before = self._wall()
        spool.write_json(self.paths.status_tmp, self.paths.heartbeat, doc)
        if state == "running" and self._ready_sent:
            # Only a heartbeat that reached the share feeds systemd's watchdog: a write that blocks
            # (a hung NFS server, a FIFO) or fails stops the pings, and WatchdogSec= restarts the worker.
            self._notifier.watchdog()
        self._measure_share_clock(before, self._wall())

    def _check_watchdog(self) -> None:
        """Warn when the unit's WatchdogSec= leaves too little room for the heartbeat interval."""
        limit = watchdog_seconds()
        if limit is not None and limit < 3 * self.nfs.heartbeat_interval:
            log.warning("WatchdogSec=%g s is less than 3 heartbeat intervals (%g s, "
                        "GPU_BRIDGE_NFS_HEARTBEAT_INTERVAL): one slow heartbeat write restarts the worker; "
                        "raise gpu_http_server_nfs_watchdog_sec",
                        limit, 3 * self.nfs.heartbeat_interval)

    # --- clocks ----------------------------------------------------------------------------------
    def _measure_share_clock(self, before: float, after: float) -> None:
        """Compare our clock with the share's: the heartbeat we just wrote carries the NFS server's
        mtime. Deadlines are absolute times, so a worker clock ahead of everyone else's expires every
        command; this is where that becomes a warning instead of a mystery."""
        if after - before > 1.0:
            return  # a slow write says nothing precise about the clocks
        try:
            mtime = os.stat(self.paths.heartbeat).st_mtime
        except OSError:
            return
        skew = mtime - (before + after) / 2
        self._share_skew = skew
        if abs(skew) > spool.CLOCK_SKEW_WARN:
            self._warn_skew("share", f"this worker's clock is {abs(skew):.1f} s {'behind' if skew > 0 else 'ahead of'} "
                                     f"the share's (the NFS server's clock, read from {self.paths.heartbeat}'s mtime): "
                                     "command deadlines are judged by this clock; check NTP (chrony or "
                                     "systemd-timesyncd) on this host, the NFS server and the production hosts")
        elif self._skew_warned.pop("share", None) is not None:
            log.info("this worker's clock agrees with the share's again (%.1f s apart)", skew)

    def _warn_skew(self, key: str, message: str) -> None:
        now = time.monotonic()
        last = self._skew_warned.get(key)
        if last is None or now - last >= SKEW_WARN_EVERY:
            self._skew_warned[key] = now
            log.warning("clock skew: %s", message)

    def _clock_hints(self, command: dict, mtime: float | None, now: float) -> list[str]:
        """What looks wrong with the clocks, judging by this command; warns (rate-limited) as well."""
        hints = []
        if self._share_skew is not None and abs(self._share_skew) > spool.CLOCK_SKEW_WARN:
            hints.append(f"this worker's clock is {abs(self._share_skew):.0f} s "
                         f"{'behind' if self._share_skew > 0 else 'ahead of'} the share's")
        created = command.get("created_at")
        if not _finite_number(created):
            return hints
        sender = raw_sender if isinstance(raw_sender := command.get("sender"), str) else "?"
        if created - now > spool.CLOCK_SKEW_WARN:
            hints.append(f"it was created {created - now:.0f} s in the future of this worker's clock")
            self._warn_skew(f"future:{sender}", f"commands from {sender[:100]!r} are created {created - now:.0f} s "
                                                "in the future of this worker's clock; check NTP on both hosts")
        elif mtime is not None and abs(created - mtime) > spool.CLOCK_SKEW_WARN:
            delta = created - mtime
            hints.append(f"its sender's clock is {abs(delta):.0f} s {'ahead of' if delta > 0 else 'behind'} the "
                         "share's (created_at versus the file's mtime)")
            self._warn_skew(f"sender:{sender}", f"the clock of {sender[:100]!r} is {abs(delta):.0f} s "
                                                f"{'ahead of' if delta > 0 else 'behind'} the share's (its commands' "
                                                "created_at versus their files' mtime, set by the NFS server); "
                                                "check NTP on that host")
        return hints

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
        for path in spool.iter_old_entries(self.paths.cmd_bad, self.nfs.answer_retention, any_type=True):
            removed += spool.unlink_quiet(path)  # quarantined directories stay for the operator
        for path in spool.iter_old_entries(self.paths.jobs, self.nfs.answer_retention):
            cmd_id = os.path.basename(path)[:-5]
            with self._lock:
                active = cmd_id in self._cmd_job
            if not active:
                removed += spool.unlink_quiet(path)
        if removed:
            log.info("housekeeping removed %d old files", removed)

    # --- the inbox -------------------------------------------------------------------------------
    # Every entry is hostile until proven otherwise: anyone who can write to the share can put a
    # directory, a FIFO, a symlink, a 5,000-deep JSON file or a name with a newline into new/. Such an
    # entry is moved to bad/ with a reason (and answered when its name is a usable request id); one
    # bad entry never stops the worker or the commands behind it.
    def _serve_inbox(self) -> int:
        served = 0
        for name in spool.list_names(self.paths.cmd_new):
            if self._stop.is_set():
                break
            try:
                served += self._take(name)
            except Exception:  # noqa: BLE001 - one entry must never stop the worker
                log.exception("unexpected error while taking inbox entry %r; moving it aside", name)
                self._refuse(os.path.join(self.paths.cmd_new, name), _rid_of(name), "worker error while reading it")
        return served

    def _take(self, name: str) -> int:
        """Claim one inbox entry and serve it; 1 when something was taken out of new/."""
        src = os.path.join(self.paths.cmd_new, name)
        rid = _rid_of(name)
        if rid is None:
            return self._refuse(src, None, "its name is not <request id>.json")
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            return 0  # withdrawn by its producer
        except OSError as exc:
            return self._unclaimable_once(name, src, exc)
        if not stat.S_ISREG(st.st_mode):
            return self._refuse(src, rid, f"it is {spool.file_kind(st.st_mode)}, not a regular file")
        try:
            claimed = spool.claim(src, self.paths.cur_path(rid))
        except OSError as exc:
            return self._unclaimable_once(name, src, exc)
        if not claimed:
            return 0
        self._dispatch(rid, recovered=False)
        return 1

    def _unclaimable_once(self, name: str, src: str, exc: OSError) -> int:
        if name not in self._unclaimable:
            self._unclaimable.add(name)
            log.error("cannot claim %r: %s (check the spool's ownership and permissions)", src, exc.strerror or exc)
        return 0

    def _refuse(self, path: str, rid: str | None, reason: str) -> int:
        """Quarantine ``path`` (new/ or cur/) into bad/ and, when ``rid`` is usable, answer it. 1 when moved."""
        name = os.path.basename(path)
        try:
            target = spool.quarantine(self.paths, path, reason)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            if name not in self._unclaimable:
                self._unclaimable.add(name)
                log.error("cannot move refused entry %r to %s: %s; it stays where it is", path, self.paths.cmd_bad,
                          exc.strerror or exc)
            return 0
        log.warning("refused spool entry %r: %s; moved to %s%s", path, reason, target,
                    "" if rid else " (not answered: its name is not a request id)")
        if rid is not None:
            self._audit(rid, None, "refused", False, reason=reason)
            self._answer(rid, {"id": rid, "op": None},
                         error=InvalidRequest(f"command {rid} refused by {self.paths.host_id}: {reason}; "
                                              f"moved to {spool.QUARANTINE_DIR}/, not executed"))
        return 1

    def _recover(self) -> None:
        """Resume unfinished pulls, then serve what a previous run claimed but did not answer.

        A progress file is as hostile as an inbox entry (anyone can write jobs/): a resumed pull is
        validated exactly like a new one (name grammar, registry allow-list, free-space rule)."""
        for name in spool.list_names(self.paths.jobs):
            try:
                self._resume_pull(name)
            except Exception:  # noqa: BLE001 - one progress file must never stop the worker
                log.exception("unexpected error while resuming progress file %r; skipped", name)
        for name in spool.list_names(self.paths.cmd_cur):
            if self._stop.is_set():
                break
            try:
                rid = _rid_of(name)
                if rid is None:
                    self._refuse(os.path.join(self.paths.cmd_cur, name), None, "its name is not <request id>.json")
                    continue
                if spool.openable(self.paths.answer_path(rid)):
                    self._drop_cur(rid)  # answered before the crash: never answer twice
                    continue
                log.info("re-serving command %s claimed by a previous run", rid)
                self._dispatch(rid, recovered=True)
            except Exception:  # noqa: BLE001 - one entry must never stop the worker
                log.exception("unexpected error while re-serving %r; moving it aside", name)
                self._refuse(os.path.join(self.paths.cmd_cur, name), _rid_of(name), "worker error while reading it")

    def _drop_cur(self, rid: str) -> None:
        cur = self.paths.cur_path(rid)
        if not spool.unlink_quiet(cur) and os.path.lexists(cur):  # e.g. a directory: unlink cannot remove it
            self._refuse(cur, None, "answered already, and not a regular file")

    def _resume_pull(self, name: str) -> None:
        cmd_id = _rid_of(name)
        if cmd_id is None:
            log.warning("ignoring progress file %r: its name is not <request id>.json", name)
            return
        try:
            doc = spool.read_json(self.paths.job_path(cmd_id), nofollow=True, max_depth=spool.MAX_JSON_DEPTH)
        except (ChannelError, OSError) as exc:
            log.warning("ignoring progress file %r: %s", name, getattr(exc, "message", None) or exc)
            return
        job = (doc or {}).get("job")
        if not isinstance(job, dict) or job.get("state") in spool.TERMINAL_STATES:
            return
        model = job.get("model")
        if not isinstance(model, str):
            return
        log.info("resuming pull %s of %r interrupted by a restart", cmd_id, model[:300])
        try:
            self._start_pull(cmd_id, model, previous=job)
        except GpuBridgeError as exc:
            log.warning("not resuming pull %s: %s: %s", cmd_id, exc.code, exc.message)
            now = _iso_now()
            self._write_progress(cmd_id, {**job, "id": cmd_id, "state": "failed", "error": exc.message,
                                          "error_code": exc.code, "finished_at": now, "updated_at": now},
                                 terminal=True)

    def _dispatch(self, rid: str, *, recovered: bool) -> None:
        cur = self.paths.cur_path(rid)
        try:
            got = spool.read_bytes_stat(cur, spool.MAX_COMMAND_BYTES, nofollow=True)
            if got is None:
                return
            data, st = got
            command = spool.parse_json(data, f"command {rid}", max_depth=spool.MAX_JSON_DEPTH)
        except spool.UnsafeEntry as exc:
            self._refuse(cur, rid, exc.message.replace(repr(cur), "it"))
            return
        except ChannelError as exc:
            self._refuse(cur, rid, f"unreadable command ({exc.message.replace(repr(cur), 'the file')})")
            return
        command["id"] = rid  # the file name is authoritative: it is what the producer waits for
        op = command.get("op")
        if op not in spool.OPS:
            self._answer(rid, command, error=InvalidRequest(
                f"unknown command {str(op)[:100]!r}; known: {', '.join(spool.OPS)}"))
            return
        now = self._wall()
        deadline = command.get("deadline")
        problem = _deadline_problem(deadline, now)
        if problem:
            log.warning("refusing command %s %s: %s", op, rid, problem)
            self._answer(rid, command, error=InvalidRequest(f"command {op} {rid}: {problem}; not executed"))
            return
        hints = self._clock_hints(command, st.st_mtime, now)
        late = now - deadline
        if late > 0:
            self._audit(rid, op, "expired", recovered)
            self._answer(rid, command, error=CommandExpired(
                f"command {op} {rid} expired {late:.1f} s before {self.paths.host_id} picked it up; not executed"
                + _hint_text(hints)))
            return
        if op in INLINE_OPS:
            self._execute(rid, command, recovered)
        else:
            assert self._pool is not None  # created in run(), before any command is claimed
            self._inflight[rid] = self._pool.submit(self._execute, rid, command, recovered, time.monotonic())
            for done in [k for k, f in self._inflight.items() if f.done()]:
                del self._inflight[done]

    def _execute(self, rid: str, command: dict, recovered: bool, queued_at: float | None = None) -> None:
        op = command["op"]
        args = command.get("args") if isinstance(command.get("args"), dict) else {}
        late = self._wall() - command["deadline"]
        if late > 0:  # it waited in the pool past its deadline: its producer has given up on it
            waited = f" after waiting {time.monotonic() - queued_at:.1f} s for a free worker thread" \
                if queued_at is not None else ""
            self._audit(rid, op, "expired", recovered)
            self._answer(rid, command, error=CommandExpired(
                f"command {op} {rid} expired {late:.1f} s before {self.paths.host_id} could start it{waited}; "
                "not executed" + _hint_text(self._clock_hints(command, None, self._wall()))))
            return
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
        return self._start_pull(rid, args.get("model"))

    def _start_pull(self, cmd_id: str, model: object, previous: dict | None = None) -> dict:
        """The one way into a pull, for a new command and for a resumed progress file alike: the
        model-name grammar, the registry allow-list and the free-space rule, then the job manager."""
        name = names.validate(model, self.server.allowed_registries).display
        check_free_space(self.server.ollama_models_dir, self.server.min_free_bytes, f" on {self.paths.host_id}")
        return self._submit_pull(cmd_id, name, previous)

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
            doc = spool.read_json(self.paths.job_path(job_id), nofollow=True, max_depth=spool.MAX_JSON_DEPTH)
        except (ChannelError, OSError):
            return None
        job = (doc or {}).get("job")
        return job if isinstance(job, dict) else None


def _rid_of(name: str) -> str | None:
    """The request id of an inbox name ``<request id>.json``; None when the name is anything else."""
    if not name.endswith(".json"):
        return None
    rid = name[:-5]
    return rid if len(rid) <= MAX_ID_LENGTH and spool.valid_request_id(rid) else None


def _finite_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _deadline_problem(deadline: object, now: float) -> str | None:
    """Why a command's deadline is unusable (None: it is a sane absolute time)."""
    if not isinstance(deadline, int | float) or isinstance(deadline, bool):
        return "command without a numeric 'deadline'"
    if not math.isfinite(deadline):
        return f"its deadline {deadline!r} is not a finite number"
    ahead = deadline - now
    if ahead > spool.MAX_DEADLINE_AHEAD:
        return (f"its deadline is {ahead:.3g} s ahead of this worker's clock; at most "
                f"{spool.MAX_DEADLINE_AHEAD:g} s are accepted (GPU_BRIDGE_NFS_COMMAND_TIMEOUT is far lower)")
    return None


def _hint_text(hints: list[str]) -> str:
    return f" (the clocks look skewed: {'; '.join(hints)}; check NTP)" if hints else ""


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
