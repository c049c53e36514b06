"""Moving commands and answers through one host's spool: publish, withdraw, wait, quarantine.

The producer's half (``send_command``, ``withdraw``, ``read_answer``, ``wait_answer``) and the part of
the worker's half that is about the inbox itself (``quarantine``); the worker's claim is
``files.claim``. Everything is built on ``files``' atomic rename and open()-based lookups.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable

from .. import errors
from .files import JsonObject, read_json, unlink_quiet, write_atomic, write_json
from .paths import HostPaths
from .protocol import PROTOCOL_VERSION, Command


def send_command(paths: HostPaths, command: Command) -> str:
    """Publish a command into the host's inbox; returns its request id.

    ShareNotReady when the host's inbox does not exist (no worker ever served that id here).
    """
    rid = command["id"]
    data = json.dumps(command, separators=(",", ":")).encode()
    try:
        write_atomic(paths.cmd_tmp, paths.new_path(rid), data)
    except FileNotFoundError:
        raise errors.ShareNotReady(
            f"{paths.commands} does not exist: no nfs-worker has served host id {paths.host_id!r} on "
            f"share {paths.root} (start gpu-nfs-worker.service there with GPU_BRIDGE_NFS_HOST_ID="
            f"{paths.host_id})") from None
    return rid


def withdraw(paths: HostPaths, request_id: str) -> bool:
    """Take back an unclaimed command. True: it is gone and will never run."""
    return unlink_quiet(paths.new_path(request_id))


def read_answer(paths: HostPaths, request_id: str) -> JsonObject | None:
    """The answer if it exists, else None. One open() per call: a fresh LOOKUP on NFS."""
    return read_json(paths.answer_path(request_id))


def wait_answer(paths: HostPaths, request_id: str, deadline: float, *, poll_interval: float = 0.05,
                on_poll: Callable[[], None] | None = None) -> JsonObject | None:
    """Poll open() of the answer until it exists or ``deadline`` (monotonic) passes.

    The first tries come quickly (5 ms, doubling) and settle at ``poll_interval``. ``on_poll()`` is
    called between tries; it may raise to abort.
    """
    delay = min(0.005, poll_interval)
    while True:
        answer = read_answer(paths, request_id)
        if answer is not None:
            return answer
        now = time.monotonic()
        if now >= deadline:
            return None
        if on_poll is not None:
            on_poll()
        time.sleep(max(0.0, min(delay, deadline - now)))
        delay = min(delay * 2, poll_interval)


_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def quarantine(paths: HostPaths, src: str, reason: str, *, now: float | None = None) -> str:
    """Move a refused inbox entry (any type: file, directory, FIFO, symlink) into ``bad/`` without
    opening or following it, next to ``<name>.reason.json`` saying why. Returns the new path.

    The new name is ``<time ns>.<name with unsafe characters replaced>``: unique, and printable
    whatever the original name held (the reason file keeps the original as written by ``repr``).
    OSError when the rename fails (e.g. permissions): the caller logs and leaves the entry.
    """
    original = os.path.basename(src)
    safe = _UNSAFE_NAME_CHARS.sub("_", original)[:100].lstrip(".") or "_"
    target = os.path.join(paths.cmd_bad, f"{time.time_ns():019d}.{safe}")
    try:
        os.rename(src, target)
    except OSError:
        if os.path.lexists(src) or not os.path.lexists(target):  # not a retransmitted rename that happened
            raise
    doc = {"v": PROTOCOL_VERSION, "name": repr(original), "from": os.path.basename(os.path.dirname(src)),
           "reason": reason, "quarantined_at": time.time() if now is None else now}
    try:
        write_json(paths.cmd_tmp, target + ".reason.json", doc)
    except OSError:
        pass  # the entry is out of the inbox; the log line says why
    return target
