"""The NFS channel's operations: each spool command (``spool.OPS``) as a thin call into ``GpuService``.

What an operation means (name grammar, registry allow-list, free-space rule, the delete rule) is
decided by the service, the same for HTTP (gpu_service.py). This module only translates: a command's
``args`` in, the answer's ``result`` out, plus what only this channel has: job ids that are pull
(and load) command ids (nfs_progress.py), models.json refreshed after a change, and the note on a
``delete`` re-run after a crash. A load is a job like a pull: ``load`` answers the job, its progress
file follows it, and a restart resumes it (``start_pull`` sees the job's ``kind``).

Adding an operation: a method on ``GpuService``, a ``_op_<name>`` method here, and the name in
``spool.OPS`` (the protocol; ``INLINE_OPS`` when it answers from memory without calling Ollama).
"""

from __future__ import annotations

from typing import Any

from . import spool
from .errors import Conflict, JobNotFound, ModelNotFound
from .gpu_service import GpuService, JsonDict
from .nfs_progress import MAX_ID_LENGTH, PullProgress
from .nfs_status import WorkerStatus

INLINE_OPS = frozenset({"ping", "job", "cancel"})  # in-memory answers: served by the main loop itself


def job_id_arg(args: dict[str, Any]) -> str:
    """A command's ``job_id``: a usable file name on the share, else ``job_not_found``."""
    job_id = args.get("job_id")
    if not isinstance(job_id, str) or not job_id or job_id.startswith(".") or "/" in job_id \
            or len(job_id) > MAX_ID_LENGTH:
        raise JobNotFound(f"invalid job id {job_id!r}")
    return job_id


class NfsCommands:
    """Runs one command's operation; raises the service's ``GpuBridgeError`` for a refusal."""

    def __init__(self, service: GpuService, progress: PullProgress, status: WorkerStatus) -> None:
        self.service, self.progress, self.status = service, progress, status
        self.host_id = status.paths.host_id

    def run(self, op: str, rid: str, args: dict[str, Any], recovered: bool) -> JsonDict:
        """``op`` is one of ``spool.OPS`` (checked at claim)."""
        result: JsonDict = getattr(self, f"_op_{op}")(rid, args, recovered)
        return result

    def _op_ping(self, rid: str, args: dict[str, Any], recovered: bool) -> JsonDict:
        return {"pong": True, "host": self.host_id, "counter": self.status.counter, "boot": self.status.boot}

    def _op_list(self, rid: str, args: dict[str, Any], recovered: bool) -> JsonDict:
        return {"models": self.status.refresh_models(self.service)}

    def _op_health(self, rid: str, args: dict[str, Any], recovered: bool) -> JsonDict:
        return self.service.health()

    def _op_delete(self, rid: str, args: dict[str, Any], recovered: bool) -> JsonDict:
        try:
            return self.service.delete(args.get("model"))
        except ModelNotFound as exc:
            if recovered:
                raise ModelNotFound(f"{exc.message} (the worker restarted while running this delete; an earlier "
                                    "attempt may already have deleted it)") from None
            raise
        finally:
            self.status.refresh_quiet(self.service)  # a listing that follows never shows the old state

    def _op_copy(self, rid: str, args: dict[str, Any], recovered: bool) -> JsonDict:
        # A re-run after a crash copies again: harmless, a copy is the same manifest under the new name.
        try:
            return self.service.copy(args.get("source"), args.get("destination"))
        finally:
            self.status.refresh_quiet(self.service)  # a listing that follows shows the copy

    def _op_pull(self, rid: str, args: dict[str, Any], recovered: bool) -> JsonDict:
        return self.start_pull(rid, args.get("model"))

    def start_pull(self, cmd_id: str, model: object, previous: JsonDict | None = None) -> JsonDict:
        """The one way into a pull, for a new command and for a resumed progress file alike (a resumed
        load job, ``kind: "load"``, loads again with its keep_alive: a load is as safe to repeat)."""
        if previous is not None and previous.get("kind") == "load":
            return self.start_load(cmd_id, model, previous.get("keep_alive"), previous)
        job, joined = self.service.pull(model)
        return self.progress.track(cmd_id, job, joined, previous)

    # --- GPU memory ----------------------------------------------------------------------------------
    def _op_loaded(self, rid: str, args: dict[str, Any], recovered: bool) -> JsonDict:
        return {"models": self.service.loaded()}

    def _op_load(self, rid: str, args: dict[str, Any], recovered: bool) -> JsonDict:
        return self.start_load(rid, args.get("model"), args.get("keep_alive"))

    def start_load(self, cmd_id: str, model: object, keep_alive: object, previous: JsonDict | None = None) -> JsonDict:
        job, joined = self.service.load(model, keep_alive)
        return self.progress.track(cmd_id, job, joined, previous)

    def _op_unload(self, rid: str, args: dict[str, Any], recovered: bool) -> JsonDict:
        return self.service.unload(args.get("model"))

    def _op_job(self, rid: str, args: dict[str, Any], recovered: bool) -> JsonDict:
        job_id = job_id_arg(args)
        jm_id = self.progress.job_of(job_id)
        if jm_id is not None:
            try:
                return {**self.service.job(jm_id).to_dict(), "id": job_id}
            except JobNotFound:
                pass
        doc = self.progress.read(job_id)
        if doc is None:
            raise JobNotFound(f"no job {job_id!r} on {self.host_id}")
        return doc

    def _op_cancel(self, rid: str, args: dict[str, Any], recovered: bool) -> JsonDict:
        job_id = job_id_arg(args)
        jm_id = self.progress.job_of(job_id)
        if jm_id is not None:
            try:
                job = self.service.cancel(jm_id)
            except JobNotFound:
                pass
            else:
                snap = job.to_dict()
                self.progress.complete(jm_id, snap)
                return {**snap, "id": job_id}
        doc = self.progress.read(job_id)
        if doc is None:
            raise JobNotFound(f"no job {job_id!r} on {self.host_id}")
        if doc.get("state") in spool.TERMINAL_STATES:
            raise Conflict(f"job {job_id} has already {doc.get('state')}; only queued or running pulls can be "
                           "cancelled", extra={"job": doc})
        return self.progress.close_orphan(job_id, doc)


__all__ = ["INLINE_OPS", "NfsCommands", "job_id_arg"]
