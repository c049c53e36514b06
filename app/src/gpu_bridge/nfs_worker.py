"""The GPU-side NFS worker: ``gpu-bridge nfs-worker`` (unit ``gpu-nfs-worker.service``).

Serves the commands addressed to this host's id (``GPU_BRIDGE_NFS_HOST_ID``, default the host name)
from the spool on the share (protocol and layout: ``spool``). It is the NFS front door to the same
``GpuService`` as the HTTP GPU server (gpu_service.py: what list, pull, delete, job, cancel and health
mean, and which errors they raise), so both channels behave the same. The worker is split along its
seams:

* this module: the process: lifecycle, the main loop, running and answering commands, the audit log;
* ``nfs_inbox``: claiming commands and the hostile-spool rules (what is refused, quarantined, expired);
* ``nfs_commands``: each spool operation as a thin call into the service;
* ``nfs_progress``: pull bookkeeping (command id <-> job) and the progress files ``jobs/<id>.json``;
* ``nfs_status``: ``heartbeat.json``, ``models.json``, clock-skew checks, housekeeping.

One process, threads:

* the **main loop** lists ``new/`` every ``poll_interval`` (and at once again after finding work),
  claims each command by renaming it into ``cur/``, answers cheap ones itself (ping, job, cancel,
  expired) and hands Ollama calls (list, delete, health, pull submission) to a small thread pool; it
  also rewrites the heartbeat every ``heartbeat_interval``, flushes pull progress and does
  housekeeping. A heartbeat therefore means "this worker is taking commands", not merely "the process
  exists".
* ``models.json`` is refreshed every ``GPU_BRIDGE_NFS_MODELS_REFRESH`` seconds by a background thread,
  and synchronously after a delete or a successful pull (before the answer/terminal progress is
  written, so a listing that follows never shows the old state).
* Pull progress: written at most every ``nfs_progress.PROGRESS_MIN_INTERVAL``, terminal states at
  once. The job id on this channel is the pull command's request id (docs/architecture.md); pulls that
  join a running pull of the same model share the download and each gets its own progress file.

Crash and restart semantics (the choice the issue asked for):

* A command is claimed (``new/`` -> ``cur/``) before it runs and its ``cur/`` entry is removed only
  after its answer is published. On start the worker first serves what is left in ``cur/``: a command
  that already has an answer is just dropped (never answered twice); one without is run again.
  ``ping``, ``list``, ``job`` and ``health`` are read-only and re-run safely; ``pull`` re-submits,
  which joins the resumed download (Ollama keeps partial layers); ``cancel`` is idempotent; a
  ``delete`` that already happened before the crash is answered ``model_not_found`` with a note that
  the worker restarted while deleting it. A command that expired meanwhile is answered expired.
  So a command is never lost and never answered twice; only a command that was *executing* at the
  moment of a SIGKILL can run a second time, and only those idempotent ones.
* Pulls whose progress file is not terminal at start (the worker died or stopped mid-download) are
  re-submitted under the same job id through the same checks as a new pull, so a production
  ``pull_and_wait`` sees the pull continue.
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

Hostile spool (``nfs_inbox``): anyone who can write to the share can plant entries; only regular
files of bounded size and depth, named ``<request id>.json``, are read, anything else is moved to
``bad/`` with a reason. Deadlines are checked at claim and again when a pool thread starts the
command. Resumed pulls go through the same checks as new ones. Clock skew (this worker vs. the share,
a sender vs. the share) is logged as a warning. File names are logged with ``repr``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import FrameType
from typing import Any

from . import spool
from .config import GpuServerSettings, NfsSettings
from .errors import CommandExpired, GpuBridgeError
from .gpu_service import GpuService, JsonDict
from .jobs import JobManager
from .nfs_commands import INLINE_OPS, NfsCommands
from .nfs_inbox import Command, Inbox, hint_text
from .nfs_progress import PullProgress
from .nfs_status import WorkerStatus
from .ollama import OllamaAdapter
from .sdnotify import Notifier

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL = 30.0
POOL_THREADS = 4
PROCESS = "nfs-worker"  # the process name in every log line (logs.configure_logging)


class NfsWorker:
    """The worker for one host id. ``run()`` blocks until ``stop()`` (or a signal) and returns the exit code.

    ``adapter`` and ``jobs`` replace the ones the service builds from ``server`` (tests); ``wall`` is
    the clock deadlines are judged by (tests give it an offset).
    """

    def __init__(self, nfs: NfsSettings, server: GpuServerSettings | None = None, *,
                 adapter: OllamaAdapter | None = None, jobs: JobManager | None = None,
                 wall: Callable[[], float] = time.time, notifier: Notifier | None = None) -> None:
        self.nfs = nfs
        self.server = server or GpuServerSettings()
        self.paths = spool.HostPaths(nfs.root, spool.check_host_id(nfs.host_id))
        self.boot = secrets.token_hex(6)
        self._wall = wall
        # systemd (Type=notify, WatchdogSec=): READY=1 once serving, WATCHDOG=1 with every heartbeat written
        self._notifier = notifier if notifier is not None else Notifier.from_env()
        self._stop = threading.Event()
        self._backends = (adapter, jobs)
        self._service: GpuService | None = None
        self._commands: NfsCommands | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._aux: ThreadPoolExecutor | None = None
        self._inflight: dict[str, Future[None]] = {}
        self._refresh_future: Future[None] | None = None
        self._next_refresh = 0.0
        self._audit_fd: int | None = None
        self._audit_lock = threading.Lock()
        self.status = WorkerStatus(nfs, self.paths, self.boot, wall=wall, notifier=self._notifier)
        self.progress = PullProgress(self.paths, self.boot,
                                     on_succeeded=lambda: self.status.refresh_quiet(self.service))
        self.inbox = Inbox(self.paths, stop=self._stop, wall=wall, answer=self._answer, audit=self._audit,
                           clock_hints=self.status.clock_hints, schedule=self._schedule)
        self.exit_code = 0

    @property
    def service(self) -> GpuService:
        assert self._service is not None, "run() builds the service"  # noqa: S101 - a programming error
        return self._service

    # --- lifecycle -------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse to run on an unmounted or unprepared share (ShareNotReady, one clear line)."""
        spool.check_share(self.nfs.root, require_mount=self.nfs.require_mount)

    def stop(self, *_args: object) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def handler(_signum: int, _frame: FrameType | None) -> None:
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> int:
        self.check()
        spool.prepare_host(self.paths)
        self.inbox.clear_status_names()
        if self.nfs.audit_log:
            self._audit_fd = os.open(self.nfs.audit_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self.status.counter = self.status.previous_counter() + 1
        adapter, jobs = self._backends
        # Built here, not in __init__: the job manager starts threads, and a worker that fails its
        # checks must not have any.
        self._service = GpuService(self.server, adapter=adapter, jobs=jobs, on_job_change=self.progress.on_job_change,
                                   where=f" on {self.paths.host_id}")
        self._commands = NfsCommands(self._service, self.progress, self.status)
        self._pool = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="nfs-cmd")
        self._aux = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nfs-aux")
        self.progress.executor = self._aux
        log.info("nfs-worker %s serving %s (share %s, poll %.3g s, heartbeat %.3g s, Ollama %s)",
                 self.boot, self.paths.host_id, self.nfs.root, self.nfs.poll_interval,
                 self.nfs.heartbeat_interval, self.server.ollama_url)
        self.status.check_watchdog()
        try:
            self._heartbeat()
            self._notifier.ready(f"serving {self.paths.host_id}")  # after the first heartbeat reached the share
            self.status.ready_sent = True
            self._recover()
            self.status.housekeeping(self.progress.is_active)
            self._loop()
        finally:
            self._shutdown()
        return self.exit_code

    def _heartbeat(self, state: str = "running") -> None:
        self.status.write_heartbeat(self._service.pull_counts() if self._service is not None else {}, state)

    def _recover(self) -> None:
        """Resume unfinished pulls, then serve what a previous run claimed but did not answer.

        A progress file is as hostile as an inbox entry (anyone can write jobs/): a resumed pull is
        validated exactly like a new one (name grammar, registry allow-list, free-space rule)."""
        assert self._commands is not None  # noqa: S101 - built in run() before this is called
        for cmd_id, model, job in self.progress.unfinished():
            log.info("resuming pull %s of %r interrupted by a restart", cmd_id, model[:300])
            try:
                self._commands.start_pull(cmd_id, model, previous=job)
            except GpuBridgeError as exc:
                log.warning("not resuming pull %s: %s: %s", cmd_id, exc.code, exc.message)
                self.progress.fail(cmd_id, job, exc)
            except Exception:  # noqa: BLE001 - one progress file must never stop the worker
                log.exception("unexpected error while resuming progress file of %s; skipped", cmd_id)
        self.inbox.recover()

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
                    self.status.counter += 1
                    self._heartbeat()
                if now >= self._next_refresh and (self._refresh_future is None or self._refresh_future.done()):
                    self._next_refresh = now + self.nfs.models_refresh_interval
                    assert self._aux is not None  # noqa: S101 - created in run(), before this loop runs
                    self._refresh_future = self._aux.submit(self.status.refresh_quiet, self.service, True)
                self.progress.flush()
                if now >= next_housekeeping:
                    next_housekeeping = now + HOUSEKEEPING_INTERVAL
                    self.status.housekeeping(self.progress.is_active)
                served = self.inbox.serve()
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
        self.progress.stopping = True
        self.progress.flush(force=True, note="interrupted: the worker stopped; the pull resumes when it restarts")
        if self._service is not None:
            try:
                self._service.jobs.shutdown()
            except Exception:  # noqa: BLE001 - shutting down anyway
                log.exception("job manager shutdown failed")
        if self._aux is not None:
            self._aux.shutdown(wait=True, cancel_futures=True)
        if self.exit_code == 0:
            try:
                self._heartbeat(state="stopped")
            except OSError as exc:
                log.warning("could not write the final heartbeat: %s", exc)
        if self._service is not None:
            self._service.adapter.close()
        if self._audit_fd is not None:
            os.close(self._audit_fd)
            self._audit_fd = None
        log.info("nfs-worker %s stopped (%d commands served)", self.boot, self.status.served)

    # --- running and answering commands ------------------------------------------------------------
    def _schedule(self, rid: str, command: Command, recovered: bool) -> None:
        """An admitted command: answered inline when cheap, else queued for a pool thread."""
        if command["op"] in INLINE_OPS:
            self._execute(rid, command, recovered)
            return
        assert self._pool is not None  # noqa: S101 - created in run(), before any command is claimed
        self._inflight[rid] = self._pool.submit(self._execute, rid, command, recovered, time.monotonic())
        for done in [k for k, f in self._inflight.items() if f.done()]:
            del self._inflight[done]

    def _execute(self, rid: str, command: Command, recovered: bool, queued_at: float | None = None) -> None:
        op = command["op"]
        raw_args = command.get("args")
        args: dict[str, Any] = raw_args if isinstance(raw_args, dict) else {}
        late = self._wall() - command["deadline"]
        if late > 0:  # it waited in the pool past its deadline: its producer has given up on it
            waited = f" after waiting {time.monotonic() - queued_at:.1f} s for a free worker thread" \
                if queued_at is not None else ""
            self._audit(rid, op, "expired", recovered)
            self._answer(rid, command, error=CommandExpired(
                f"command {op} {rid} expired {late:.1f} s before {self.paths.host_id} could start it{waited}; "
                "not executed" + hint_text(self.status.clock_hints(command, None, self._wall()))))
            return
        started = time.monotonic()
        self._audit(rid, op, "exec", recovered)
        result: JsonDict | None = None
        error: GpuBridgeError | None = None
        try:
            assert self._commands is not None  # noqa: S101 - built in run() before any command is claimed
            result = self._commands.run(op, rid, args, recovered)
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

    def _answer(self, rid: str, command: Command, *, result: JsonDict | None = None,
                error: GpuBridgeError | None = None, recovered: bool = False, ms: float | None = None) -> None:
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
        self.status.served += 1
        self._audit(rid, command.get("op"), "answered", recovered, code=error.code if error else "ok", ms=ms)

    def _audit(self, rid: str, op: object, event: str, recovered: bool, **extra: object) -> None:
        if self._audit_fd is None:
            return
        line = {"t": round(time.time(), 6), "id": rid, "op": op, "event": event, "recovered": recovered,
                "pid": os.getpid(), **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in extra.items()}}
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        with self._audit_lock:
            os.write(self._audit_fd, data)


def cmd_nfs_worker(args: argparse.Namespace) -> int:
    """``gpu-bridge nfs-worker``: serve the spool until SIGTERM; exit 0 after a clean stop."""
    from .logs import configure_logging

    configure_logging(PROCESS)
    worker = NfsWorker(NfsSettings.from_env(), GpuServerSettings.from_env())
    worker.check()  # ShareNotReady: one line on stderr, exit 1, before anything is written
    worker.install_signal_handlers()
    return worker.run()
