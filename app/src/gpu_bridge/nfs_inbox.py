"""The NFS worker's intake: claiming commands from ``new/`` (and ``cur/`` after a restart), hostile or not.

Every entry is hostile until proven otherwise: anyone who can write to the share can put a directory,
a FIFO, a symlink, a 5,000-deep JSON file or a name with a newline into ``new/``. So the worker reads
regular files only (``O_NOFOLLOW|O_NONBLOCK``, then ``fstat``), commands of at most
``spool.MAX_COMMAND_BYTES`` nesting at most ``spool.MAX_JSON_DEPTH`` levels, named ``<request id>.json``.
Anything else is moved to ``bad/`` with a reason (and answered ``invalid_request`` when its name is a
usable request id); each entry is handled in its own error handler, so none can stop the worker or
the commands behind it. Deadlines must be finite and at most ``spool.MAX_DEADLINE_AHEAD`` ahead; a
command past its deadline is answered ``command_expired`` and not executed. File names are logged
with ``repr`` (a newline in a name cannot forge a log line).

A command is claimed (``new/`` -> ``cur/``) before it runs; its ``cur/`` entry is removed only after
its answer is published (nfs_worker.py). After a restart ``recover()`` serves what is left in
``cur/``: a command that already has an answer is dropped (never answered twice), one without runs
again, marked ``recovered``.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable
from typing import Any, Protocol

from . import spool
from .errors import ChannelError, CommandExpired, GpuBridgeError, InvalidRequest
from .gpu_service import JsonDict
from .nfs_progress import rid_of
from .nfs_status import finite_number

# One logger for the whole worker process (every nfs_* module): operators filter on its name.
log = logging.getLogger("gpu_bridge.nfs_worker")

Command = dict[str, Any]


class Answer(Protocol):
    def __call__(self, rid: str, command: Command, *, result: JsonDict | None = None,
                 error: GpuBridgeError | None = None, recovered: bool = False, ms: float | None = None) -> None: ...


class Audit(Protocol):
    def __call__(self, rid: str, op: object, event: str, recovered: bool, **extra: object) -> None: ...


def deadline_problem(deadline: object, now: float) -> str | None:
    """Why a command's deadline is unusable (None: it is a sane absolute time)."""
    if not isinstance(deadline, int | float) or isinstance(deadline, bool):
        return "command without a numeric 'deadline'"
    if not finite_number(deadline):
        return f"its deadline {deadline!r} is not a finite number"
    ahead = deadline - now
    if ahead > spool.MAX_DEADLINE_AHEAD:
        return (f"its deadline is {ahead:.3g} s ahead of this worker's clock; at most "
                f"{spool.MAX_DEADLINE_AHEAD:g} s are accepted (GPU_BRIDGE_NFS_COMMAND_TIMEOUT is far lower)")
    return None


def hint_text(hints: list[str]) -> str:
    return f" (the clocks look skewed: {'; '.join(hints)}; check NTP)" if hints else ""


class Inbox:
    """Claims, checks and quarantines the entries of one worker's spool; hands each admitted command
    (a dict with a usable ``op`` and ``deadline``) to ``schedule(rid, command, recovered)``."""

    def __init__(self, paths: spool.HostPaths, *, stop: threading.Event, wall: Callable[[], float],
                 answer: Answer, audit: Audit, clock_hints: Callable[[Command, float | None, float], list[str]],
                 schedule: Callable[[str, Command, bool], None]) -> None:
        self.paths = paths
        self._stop, self._wall = stop, wall
        self._answer, self._audit, self._clock_hints, self._schedule = answer, audit, clock_hints, schedule
        self._unclaimable: set[str] = set()  # names already logged as unclaimable (logged once each)

    def clear_status_names(self) -> None:
        """A directory planted where the worker writes its own status files would make every heartbeat
        fail (a rename cannot replace a directory): move it to bad/. Other types are simply replaced."""
        for path in (self.paths.heartbeat, self.paths.models):
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    self.refuse(path, None, "a directory where the worker writes its status file")
            except FileNotFoundError:
                pass

    def serve(self) -> int:
        """Claim and dispatch everything in ``new/``; the number of entries taken out of it."""
        served = 0
        for name in spool.list_names(self.paths.cmd_new):
            if self._stop.is_set():
                break
            try:
                served += self._take(name)
            except Exception:  # noqa: BLE001 - one entry must never stop the worker
                log.exception("unexpected error while taking inbox entry %r; moving it aside", name)
                self.refuse(os.path.join(self.paths.cmd_new, name), rid_of(name), "worker error while reading it")
        return served

    def _take(self, name: str) -> int:
        """Claim one inbox entry and serve it; 1 when something was taken out of new/."""
        src = os.path.join(self.paths.cmd_new, name)
        rid = rid_of(name)
        if rid is None:
            return self.refuse(src, None, "its name is not <request id>.json")
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            return 0  # withdrawn by its producer
        except OSError as exc:
            return self._unclaimable_once(name, src, exc)
        if not stat.S_ISREG(st.st_mode):
            return self.refuse(src, rid, f"it is {spool.file_kind(st.st_mode)}, not a regular file")
        try:
            claimed = spool.claim(src, self.paths.cur_path(rid))
        except OSError as exc:
            return self._unclaimable_once(name, src, exc)
        if not claimed:
            return 0
        self.admit(rid, recovered=False)
        return 1

    def _unclaimable_once(self, name: str, src: str, exc: OSError) -> int:
        if name not in self._unclaimable:
            self._unclaimable.add(name)
            log.error("cannot claim %r: %s (check the spool's ownership and permissions)", src, exc.strerror or exc)
        return 0

    def refuse(self, path: str, rid: str | None, reason: str) -> int:
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

    def recover(self) -> None:
        """Serve what a previous run claimed (``cur/``) but did not answer."""
        for name in spool.list_names(self.paths.cmd_cur):
            if self._stop.is_set():
                break
            try:
                rid = rid_of(name)
                if rid is None:
                    self.refuse(os.path.join(self.paths.cmd_cur, name), None, "its name is not <request id>.json")
                    continue
                if spool.openable(self.paths.answer_path(rid)):
                    self._drop_cur(rid)  # answered before the crash: never answer twice
                    continue
                log.info("re-serving command %s claimed by a previous run", rid)
                self.admit(rid, recovered=True)
            except Exception:  # noqa: BLE001 - one entry must never stop the worker
                log.exception("unexpected error while re-serving %r; moving it aside", name)
                self.refuse(os.path.join(self.paths.cmd_cur, name), rid_of(name), "worker error while reading it")

    def _drop_cur(self, rid: str) -> None:
        cur = self.paths.cur_path(rid)
        if not spool.unlink_quiet(cur) and os.path.lexists(cur):  # e.g. a directory: unlink cannot remove it
            self.refuse(cur, None, "answered already, and not a regular file")

    def admit(self, rid: str, *, recovered: bool) -> None:
        """Read the claimed ``cur/<rid>.json``; refuse, reject or expire it, or hand it to ``schedule``."""
        cur = self.paths.cur_path(rid)
        try:
            got = spool.read_bytes_stat(cur, spool.MAX_COMMAND_BYTES, nofollow=True)
            if got is None:
                return
            data, st = got
            command = spool.parse_json(data, f"command {rid}", max_depth=spool.MAX_JSON_DEPTH)
        except spool.UnsafeEntry as exc:
            self.refuse(cur, rid, exc.message.replace(repr(cur), "it"))
            return
        except ChannelError as exc:
            self.refuse(cur, rid, f"unreadable command ({exc.message.replace(repr(cur), 'the file')})")
            return
        command["id"] = rid  # the file name is authoritative: it is what the producer waits for
        op = command.get("op")
        if op not in spool.OPS:
            self._answer(rid, command, error=InvalidRequest(
                f"unknown command {str(op)[:100]!r}; known: {', '.join(spool.OPS)}"))
            return
        now = self._wall()
        deadline = command.get("deadline")
        problem = deadline_problem(deadline, now)
        if problem or not finite_number(deadline):
            log.warning("refusing command %s %s: %s", op, rid, problem)
            self._answer(rid, command, error=InvalidRequest(f"command {op} {rid}: {problem}; not executed"))
            return
        hints = self._clock_hints(command, st.st_mtime, now)
        late = now - deadline
        if late > 0:
            self._audit(rid, op, "expired", recovered)
            self._answer(rid, command, error=CommandExpired(
                f"command {op} {rid} expired {late:.1f} s before {self.paths.host_id} picked it up; not executed"
                + hint_text(hints)))
            return
        self._schedule(rid, command, recovered)


__all__ = ["Answer", "Audit", "Command", "Inbox", "deadline_problem", "hint_text"]
