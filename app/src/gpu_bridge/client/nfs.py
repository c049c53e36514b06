"""NFS transport: one GPU host reached through the spool on the share (``GPU_BRIDGE_TRANSPORT=nfs``).

The emergency fallback when a GPU host's HTTP port is unreachable but both sides mount the share.
Same dict shapes and error types as ``client.http.HttpTransport``, so the backend, the fleet and the
CLI work unchanged. Protocol, layout and mount options: ``gpu_bridge.spool``.

* ``list_models`` and ``health`` need no round trip: the worker keeps ``models.json`` (models,
  Ollama reachability, GPU facts) current, and the heartbeat says whether the worker is alive.
  ``models.json`` counts as fresh when it was written by the running worker within
  ``refresh_interval + 3`` heartbeats; otherwise ``list_models`` falls back to a ``list`` command.
* Other operations publish a command and wait for the answer by trying ``open()`` of its name:
  5 ms at first, backing off to ``GPU_BRIDGE_NFS_POLL_INTERVAL`` (50 ms), within
  ``GPU_BRIDGE_NFS_COMMAND_TIMEOUT``. While waiting the heartbeat is watched: a dead worker ends the
  wait early (``GpuHostUnreachable``) instead of costing the whole timeout. A command that was not
  picked up is withdrawn (unlinked from ``new/``) so it can never run later behind the caller's back.
* Jobs on this channel have the pull command's request id as ``id``; ``get_job`` reads the worker's
  progress file; ``pull_and_wait`` waits for a terminal state, bounded by *progress*: it gives up
  when the job has not changed for ``GPU_BRIDGE_PULL_TIMEOUT`` seconds, or the worker has been down
  for ``RESTART_GRACE`` seconds (a restarted worker resumes the pull under the same job id).

Every error carries ``host=<label>``. A dead heartbeat or an unprepared share is
``GpuHostUnreachable``; no answer in time is ``GpuHostTimeout`` (``code=command_expired`` when the
worker reports the command expired before it could run it); the worker's own error answers go
through ``client.wire_errors.error_from_wire``, the mapping the HTTP transport uses for the GPU
server's (``ModelNotFound``, ``QueueFull``, Ollama down → a ``GpuHostError`` with
``code=ollama_unavailable``, ...), and a failed job through its ``job_error``.
"""

from __future__ import annotations

import threading
import time
from typing import TypeGuard

from .. import keep_alive as keep_alive_rule
from .. import names, spool
from ..config import BackendSettings, GpuHost
from ..errors import (
    ChannelError,
    GpuBridgeError,
    GpuHostError,
    GpuHostTimeout,
    GpuHostUnreachable,
    InvalidRequest,
    JobNotFound,
    PullStalled,
    ShareNotReady,
)
from .base import GpuTransport, JsonDict, job_kind, no_change_limit
from .wire_errors import error_from_wire, job_error

RESTART_GRACE = 5.0  # seconds a pull_and_wait tolerates a down worker (it resumes pulls after a restart)
_DOWN_HINT = "is gpu-nfs-worker.service running there and the share mounted?"


class _WorkerDown(Exception):
    def __init__(self, live: spool.Liveness):
        super().__init__(live.describe())
        self.live = live


class NfsTransport(GpuTransport):
    """The spool of one GPU host (its id is ``host.name``) on the share ``settings.nfs.root``."""

    kind = "nfs"

    def __init__(self, host: GpuHost, settings: BackendSettings | None = None):
        self.settings = settings or BackendSettings()
        super().__init__(host, self.settings.client)
        self.nfs = self.settings.nfs
        self.label = host.label
        self.paths = spool.HostPaths(self.nfs.root, host.name)  # ConfigError for a name unusable on the share
        self._monitor = spool.HeartbeatMonitor(self.paths.heartbeat)
        self._monitor_lock = threading.Lock()

    # --- GpuTransport ------------------------------------------------------------------------------
    def health(self) -> JsonDict:
        self._check_share()
        live = self._alive_or_raise("health check")
        hb = live.doc or {}
        snapshot = self._read_models()
        fresh = self._fresh(snapshot, hb)
        if fresh:
            ollama = dict((snapshot or {}).get("ollama") or {})
        else:
            ollama = {"reachable": False, "version": None, "latency_ms": None,
                      "error": "the worker has not reported Ollama's state recently (models.json is stale)"}
        ollama.pop("code", None)
        gpu = (snapshot or {}).get("gpu") or {"available": False, "devices": [], "error": "not reported yet"}
        return {
            "status": "ok" if ollama.get("reachable") else "degraded",
            "version": hb.get("version"),
            "uptime_seconds": hb.get("uptime_seconds"),
            "ollama": ollama,
            "gpu": gpu,
            "pulls": hb.get("pulls") or {"running": 0, "queued": 0},
            "transport": "nfs",
            "worker": {"host_id": self.paths.host_id, "node": hb.get("node"), "pid": hb.get("pid"),
                       "counter": hb.get("counter"), "interval": hb.get("interval"),
                       "heartbeat_age_seconds": None if live.age is None else round(live.age, 2),
                       "models_fresh": fresh},
        }

    def list_models(self) -> list[JsonDict]:
        self._check_share()
        started = time.monotonic()
        live = self._alive_or_raise("model listing")
        snapshot = self._read_models()
        if self._fresh(snapshot, live.doc or {}):
            ollama = snapshot.get("ollama") or {}
            if not ollama.get("reachable"):
                raise self._error({"error": ollama.get("error") or "Ollama is not reachable",
                                   "code": ollama.get("code") or "ollama_unavailable", "status": 503})
            models = snapshot.get("models")
            if isinstance(models, list):
                self.last_latency_ms = round((time.monotonic() - started) * 1000, 2)
                return models
        result = self._call("list")
        models = result.get("models")
        if not isinstance(models, list):
            raise GpuHostError(f"{self.label} answered 'list' without 'models'", host=self.label)
        return models

    def ping(self, timeout: float | None = None) -> JsonDict:
        """A full round trip through the worker's main loop (not part of GpuTransport)."""
        return self._call("ping", timeout=timeout)

    def start_pull(self, model: str) -> JsonDict:
        parsed = names.parse(model)  # InvalidModelName before anything is written
        job = self._call("pull", {"model": parsed.display})
        if not job.pop("joined", False):
            return job
        return {**job, "joined": True}

    def wait_job(self, job: JsonDict) -> JsonDict:
        """Follow a job's progress file until it is terminal; raise its error like ``?wait=true`` does."""
        job_id, what = job["id"], job_kind(job)
        stall_limit, total = no_change_limit(job, self.settings.client.pull_timeout), self.settings.client.pull_deadline
        poll = max(self.nfs.poll_interval, 0.05)
        key, last_change = None, time.monotonic()
        started = last_change
        next_beat_check, down_since = 0.0, None
        while True:
            doc = self._read_progress(job_id)
            if doc is not None:
                job = doc["job"]
                state = job.get("state")
                if state == "succeeded":
                    return job
                if state in spool.TERMINAL_STATES:
                    raise job_error(job, host=self.host)
                new_key = (doc.get("boot"), doc.get("seq"), state, job.get("completed"), job.get("total"),
                           job.get("status"))
                if new_key != key:
                    key, last_change = new_key, time.monotonic()
            now = time.monotonic()
            if total and now - started > total:
                raise PullStalled(f"{self.label}: the {what} of {job.get('model')!r} (job {job_id}) is unfinished "
                                  f"after {total:g} s (GPU_BRIDGE_PULL_DEADLINE); it goes on on the host",
                                  host=self.label, code="pull_deadline", extra={"job": job})
            if now - last_change > stall_limit:
                raise PullStalled(f"{self.label}: the {what} of {job.get('model')!r} (job {job_id}) made no progress "
                                  f"for {stall_limit:g} s (GPU_BRIDGE_PULL_TIMEOUT); last status: "
                                  f"{job.get('status') or 'none'}", host=self.label, extra={"job": job})
            if now >= next_beat_check:
                live = self._liveness()
                down_since = (down_since or now) if live.alive is False else None
                # A restart (systemctl restart, a crash and Restart=) resumes the pull: give it time.
                grace = max(RESTART_GRACE, spool.DEAD_AFTER_BEATS * self._monitor.interval())
                if down_since is not None and now - down_since >= grace:
                    raise GpuHostUnreachable(
                        f"{self.label}: the pull of {job.get('model')!r} (job {job_id}) is unfinished and "
                        f"{live.describe()}: {_DOWN_HINT} (the worker resumes the pull when it restarts)",
                        host=self.label, extra={"job": job})
                next_beat_check = now + max(poll, self._monitor.interval() / 4)
            time.sleep(poll)

    def get_job(self, job_id: str) -> JsonDict:
        job_id = _check_job_id(job_id)
        self._check_share()
        doc = self._read_progress(job_id)
        if doc is None:
            raise JobNotFound(f"{self.label}: no job {job_id!r} (jobs on the NFS channel are pull request ids; "
                              f"finished ones are kept {self.nfs.answer_retention:g} s)", host=self.label)
        job: JsonDict = doc["job"]
        if job.get("state") not in spool.TERMINAL_STATES:
            live = self._liveness()
            if live.alive is False:
                raise GpuHostUnreachable(f"{self.label}: job {job_id} is unfinished and {live.describe()}: "
                                         f"{_DOWN_HINT}", host=self.label, extra={"job": job})
        return job

    def list_jobs(self) -> list[JsonDict]:
        """Every job whose progress file is still on the share, newest first (the CLI's ``jobs``)."""
        self._check_share()
        jobs = []
        for name in spool.list_names(self.paths.jobs):
            if name.endswith(".json"):
                doc = self._read_progress(name[:-5])
                if doc is not None:
                    jobs.append(doc["job"])
        jobs.sort(key=lambda j: j.get("created_at") or "", reverse=True)
        return jobs

    def cancel_job(self, job_id: str) -> JsonDict:
        return self._call("cancel", {"job_id": _check_job_id(job_id)})

    def delete_model(self, model: str) -> JsonDict:
        parsed = names.parse(model)
        return self._call("delete", {"model": parsed.display})

    def copy_model(self, source: str, destination: str) -> JsonDict:
        return self._call("copy", {"source": names.parse(source).display,
                                   "destination": names.parse(destination).display})

    def loaded_models(self) -> list[JsonDict]:
        # Always a round trip: what is loaded changes by the minute (keep_alive), models.json would lag.
        models = self._call("loaded").get("models")
        if not isinstance(models, list):
            raise GpuHostError(f"{self.label} answered 'loaded' without 'models'", host=self.label)
        return models

    def load_model(self, model: str, keep_alive: object = None, wait: bool = True) -> JsonDict:
        parsed = names.parse(model)  # InvalidModelName, then InvalidRequest, before anything is written
        job = self._call("load", {"model": parsed.display, "keep_alive": keep_alive_rule.parse(keep_alive)})
        joined = job.pop("joined", False)
        if wait:
            return self.wait_job(job)  # the progress file, as for pulls
        return {**job, "joined": True} if joined else job

    def unload_model(self, model: str) -> JsonDict:
        return self._call("unload", {"model": names.parse(model).display})

    def close(self) -> None:
        """Nothing to release: every file is opened and closed per operation."""

    def __repr__(self) -> str:
        return f"<NfsTransport {self.paths.host_id} on {self.nfs.root}>"

    # --- the round trip ---------------------------------------------------------------------------
    def _call(self, op: str, args: JsonDict | None = None, *, timeout: float | None = None) -> JsonDict:
        self._check_share()
        live = self._liveness()
        if live.alive is False:
            raise self._down(f"{self.label} cannot take '{op}'", live)
        timeout = self.nfs.command_timeout if timeout is None else timeout
        command = spool.make_command(self.paths.host_id, op, args, timeout=timeout)
        rid = command["id"]
        started = time.monotonic()
        try:
            spool.send_command(self.paths, command)
        except ShareNotReady as exc:
            raise GpuHostUnreachable(f"{self.label}: {exc.message}", host=self.label, code=exc.code) from None
        except OSError as exc:
            raise GpuHostError(f"{self.label}: cannot write a command to {self.paths.cmd_new}: {exc.strerror}",
                               host=self.label, code=ChannelError.code) from None
        check_every = max(self.nfs.poll_interval, self._monitor.interval() / 4)
        next_check = [started + check_every]

        def watch_heartbeat() -> None:
            now = time.monotonic()
            if now >= next_check[0]:
                next_check[0] = now + check_every
                state = self._liveness()
                if state.alive is False:
                    raise _WorkerDown(state)

        try:
            answer = spool.wait_answer(self.paths, rid, started + timeout, poll_interval=self.nfs.poll_interval,
                                       on_poll=watch_heartbeat)
        except _WorkerDown as down:
            answer = spool.read_answer(self.paths, rid)  # it may have answered just before stopping
            if answer is None:
                fate = self._withdraw(rid)
                raise self._down(f"no answer from {self.paths.host_id} to '{op}' ({fate})", down.live) from None
        except ChannelError as exc:
            raise GpuHostError(f"{self.label}: {exc.message}", host=self.label, code=exc.code) from None
        if answer is None:
            fate = self._withdraw(rid)
            state = self._liveness()
            hint = _DOWN_HINT if not state.alive else \
                "the worker is alive but did not get to it: busy with slow Ollama calls, or serving another id?"
            raise GpuHostTimeout(f"no answer from {self.paths.host_id} within {timeout:g} s to '{op}' ({fate}); "
                                 f"{state.describe()}: {hint}", host=self.label)
        self.last_latency_ms = round((time.monotonic() - started) * 1000, 2)
        if answer.get("ok"):
            result = answer.get("result")
            return result if isinstance(result, dict) else {}
        raise self._error(answer.get("error"))

    def _withdraw(self, rid: str) -> str:
        if spool.withdraw(self.paths, rid):
            return "the command was withdrawn and will not run"
        return "the worker had claimed the command; it may still complete"

    # --- helpers -----------------------------------------------------------------------------------
    def _check_share(self) -> None:
        if not spool.openable(self.paths.sentinel):
            raise GpuHostUnreachable(
                f"{self.label}: NFS share {self.nfs.root} is not mounted or not prepared on this host "
                f"(no {spool.SENTINEL}): mount it (GPU_BRIDGE_NFS_ROOT) and run `gpu-bridge nfs-init` once",
                host=self.label, code=ShareNotReady.code)

    def heartbeat(self) -> spool.Liveness:
        """The worker's heartbeat as judged now, without waiting (the backend's metrics, at scrape)."""
        return self._liveness()

    def _liveness(self) -> spool.Liveness:
        with self._monitor_lock:
            return self._monitor.check()

    def _alive_or_raise(self, what: str) -> spool.Liveness:
        """Alive, waiting (at most 3 heartbeats) when this reader has no history yet; else raise."""
        live = self._liveness()
        if live.alive is None:
            end = time.monotonic() + spool.DEAD_AFTER_BEATS * self._monitor.interval() + 0.1
            poll = max(self.nfs.poll_interval, 0.02)
            while live.alive is None and time.monotonic() < end:
                time.sleep(poll)
                live = self._liveness()
        if not live.alive:
            raise self._down(f"{self.label} cannot serve the {what}", live)
        return live

    def _down(self, what: str, live: spool.Liveness) -> GpuHostUnreachable:
        return GpuHostUnreachable(f"{what}: {live.describe()}: {_DOWN_HINT}", host=self.label)

    def _read_models(self) -> JsonDict | None:
        try:
            return spool.read_json(self.paths.models)
        except (ChannelError, OSError):
            return None

    def _read_progress(self, job_id: str) -> JsonDict | None:
        try:
            doc = spool.read_json(self.paths.job_path(job_id))
        except (ChannelError, OSError):
            return None
        if doc is None or not isinstance(doc.get("job"), dict):
            return None
        return doc

    @staticmethod
    def _fresh(snapshot: JsonDict | None, hb: JsonDict) -> TypeGuard[JsonDict]:
        """models.json written by the running worker within refresh_interval + 3 heartbeats."""
        if not snapshot or snapshot.get("boot") != hb.get("boot"):
            return False
        m_counter, h_counter = snapshot.get("counter"), hb.get("counter")
        interval, refresh = hb.get("interval"), snapshot.get("refresh_interval")
        if not (isinstance(m_counter, int | float) and isinstance(h_counter, int | float)
                and isinstance(interval, int | float) and isinstance(refresh, int | float)):
            return False
        return 0 <= (h_counter - m_counter) * interval <= refresh + spool.DEAD_AFTER_BEATS * interval

    def _error(self, body: object) -> GpuBridgeError:
        """A worker's error answer (``spool.error_to_dict``) -> our error type, by the shared mapping."""
        fields = body if isinstance(body, dict) else {}
        return error_from_wire(fields, host=self.host, status=fields.get("status"),
                               retry_after=fields.get("retry_after"))


def _check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not job_id or len(job_id) > 200 or "/" in job_id or job_id.startswith("."):
        raise InvalidRequest(f"invalid job id {job_id!r}")
    return job_id


__all__ = ["NfsTransport"]
