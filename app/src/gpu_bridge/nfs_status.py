"""What the NFS worker publishes about itself: ``heartbeat.json``, ``models.json``, clock skew, housekeeping.

* The **heartbeat** is rewritten by the main loop every ``heartbeat_interval`` with a counter, so a
  heartbeat means "this worker is taking commands", not merely "the process exists". Only a
  heartbeat that reached the share feeds systemd's watchdog (``WATCHDOG=1``): a write that blocks (a
  hung NFS server, a FIFO) or fails stops the pings, and ``WatchdogSec=`` restarts the worker.
* ``models.json`` (models, Ollama's state, the GPU snapshot) is refreshed every
  ``GPU_BRIDGE_NFS_MODELS_REFRESH`` seconds by a background thread, and synchronously after a delete or
  a successful pull, so a listing that follows never shows the old state.
* **Clocks**: deadlines are absolute times. The worker compares its clock with the share's (the mtime
  of the heartbeat it has just written) and each sender's (a command's ``created_at`` against its
  file's mtime); beyond ``spool.CLOCK_SKEW_WARN`` it warns (rate-limited) and ``command_expired``
  answers name the clock that looks off. Nothing is corrected: NTP is a requirement.
* **Housekeeping** removes stale temp files, and answers, quarantined files and finished progress
  files older than ``GPU_BRIDGE_NFS_ANSWER_RETENTION`` (quarantined directories stay for the operator).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeGuard

from . import __version__, spool
from .config import NfsSettings
from .errors import ChannelError, GpuBridgeError
from .gpu_service import GpuService, JsonDict
from .sdnotify import Notifier, watchdog_seconds

# One logger for the whole worker process (every nfs_* module): operators filter on its name.
log = logging.getLogger("gpu_bridge.nfs_worker")

SKEW_WARN_EVERY = 300.0  # seconds between two warnings about the same clock disagreement


def finite_number(value: object) -> TypeGuard[float]:
    """A usable time from a command (``created_at``, ``deadline``): a finite int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class WorkerStatus:
    """The status files of one worker (``paths``) and the facts they carry (counter, served, skew)."""

    def __init__(self, nfs: NfsSettings, paths: spool.HostPaths, boot: str, *, wall: Callable[[], float],
                 notifier: Notifier) -> None:
        self.nfs, self.paths, self.boot = nfs, paths, boot
        self._wall = wall  # the clock deadlines are judged by (tests give it an offset)
        self._notifier = notifier
        self.counter = 0
        self.served = 0
        self.ready_sent = False  # READY=1 went out: from now on every heartbeat written feeds the watchdog
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self._share_skew: float | None = None  # share (NFS server) clock minus ours, from the heartbeat's mtime
        self._skew_warned: dict[str, float] = {}
        self._refresh_lock = threading.Lock()
        self._models: list[JsonDict] = []
        self._last_ollama: JsonDict | None = None

    # --- heartbeat -------------------------------------------------------------------------------
    def previous_counter(self) -> int:
        """The counter of the heartbeat a previous run left (the new one continues from it)."""
        try:
            doc = spool.read_json(self.paths.heartbeat, nofollow=True, max_depth=spool.MAX_JSON_DEPTH)
        except (ChannelError, OSError):
            return 0
        value = (doc or {}).get("counter")
        return value if isinstance(value, int) and value >= 0 else 0

    def write_heartbeat(self, pulls: JsonDict, state: str = "running") -> None:
        doc = {"v": spool.PROTOCOL_VERSION, "host": self.paths.host_id, "node": socket.gethostname(),
               "pid": os.getpid(), "boot": self.boot, "counter": self.counter,
               "interval": self.nfs.heartbeat_interval, "poll_interval": self.nfs.poll_interval,
               "started_at": self.started_at, "written_at": time.time(), "state": state,
               "uptime_seconds": round(time.monotonic() - self._started_mono, 1), "version": __version__,
               "served": self.served, "pulls": pulls}
        before = self._wall()
        spool.write_json(self.paths.status_tmp, self.paths.heartbeat, doc)
        if state == "running" and self.ready_sent:
            self._notifier.watchdog()
        self._measure_share_clock(before, self._wall())

    def check_watchdog(self) -> None:
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
        mtime. A worker clock ahead of everyone else's expires every command; this is where that
        becomes a warning instead of a mystery."""
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

    def clock_hints(self, command: dict[str, Any], mtime: float | None, now: float) -> list[str]:
        """What looks wrong with the clocks, judging by this command; warns (rate-limited) as well."""
        hints = []
        if self._share_skew is not None and abs(self._share_skew) > spool.CLOCK_SKEW_WARN:
            hints.append(f"this worker's clock is {abs(self._share_skew):.0f} s "
                         f"{'behind' if self._share_skew > 0 else 'ahead of'} the share's")
        created = command.get("created_at")
        if not finite_number(created):
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

    # --- models.json -----------------------------------------------------------------------------
    def refresh_quiet(self, service: GpuService, probe: bool = False) -> None:
        """``refresh_models`` for background callers: a failure is recorded in models.json, not raised."""
        try:
            self.refresh_models(service, probe=probe)
        except GpuBridgeError:
            pass  # recorded in models.json
        except Exception:  # noqa: BLE001 - background thread: log and carry on
            log.exception("models.json refresh failed")

    def refresh_models(self, service: GpuService, *, probe: bool = False) -> list[JsonDict]:
        """Ask Ollama, rewrite models.json (atomic replace); raise the service's error after recording it.

        ``probe``: also ask Ollama's version (the periodic refresh); a listing on demand (the ``list``
        command, after a delete or a pull) makes one Ollama call and reuses the last version.
        """
        with self._refresh_lock:
            error: GpuBridgeError | None = None
            ollama = service.ollama_status() if probe or self._last_ollama is None else dict(self._last_ollama)
            started = time.perf_counter()
            try:
                self._models = service.list_models()
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
                   "gpu": service.gpu_snapshot()}
            try:
                spool.write_json(self.paths.status_tmp, self.paths.models, doc)
            except OSError as exc:
                log.error("cannot write %s: %s", self.paths.models, exc)
        if error is not None:
            raise error
        return list(self._models)

    # --- housekeeping ----------------------------------------------------------------------------
    def housekeeping(self, pull_active: Callable[[str], bool]) -> None:
        """Remove old temp files, answers, quarantined files and progress files of finished pulls."""
        removed = 0
        for tmp in (self.paths.cmd_tmp, self.paths.status_tmp):
            for path in spool.iter_old_entries(tmp, spool.STALE_TEMP_SECONDS, dot_only=True):
                removed += spool.unlink_quiet(path)
        for path in spool.iter_old_entries(self.paths.answers, self.nfs.answer_retention):
            removed += spool.unlink_quiet(path)
        for path in spool.iter_old_entries(self.paths.cmd_bad, self.nfs.answer_retention, any_type=True):
            removed += spool.unlink_quiet(path)  # quarantined directories stay for the operator
        for path in spool.iter_old_entries(self.paths.jobs, self.nfs.answer_retention):
            if not pull_active(os.path.basename(path)[:-5]):
                removed += spool.unlink_quiet(path)
        if removed:
            log.info("housekeeping removed %d old files", removed)


__all__ = ["WorkerStatus", "finite_number"]
