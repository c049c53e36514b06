"""What the documents on the share say: protocol version, operations, limits, command and answer shapes.

No I/O here: this is the contract between the production-side producer (``client/nfs.py``) and the
GPU-side worker (``nfs_worker.py``). Moving the documents through the share is ``exchange``'s job.

Command (``gpu_commands/<host>/new/<id>.json``)::

    {"v": 1, "id": "<request id>", "op": "ping|list|pull|delete|job|cancel|health|copy|loaded|load|unload",
     "args": {"model": "..."} | {"job_id": "..."} | {"source": "...", "destination": "..."} (copy)
              | {"model": "...", "keep_alive": <seconds, -1 or null>} (load) | {},
     "host": "<host id>",
     "created_at": <epoch s>, "deadline": <epoch s>, "sender": "<hostname>:<pid>"}

The deadline is absolute wall-clock time: production and GPU hosts must run NTP (any skew eats into
``command_timeout``). An expired command is answered with ``command_expired`` and not executed; the
worker checks the deadline when it claims the command and again when it starts it. A deadline that is
not finite or lies more than ``MAX_DEADLINE_AHEAD`` ahead is refused (``invalid_request``). A command
file must be a regular file named ``<request id>.json``, at most ``MAX_COMMAND_BYTES``, nesting at most
``MAX_JSON_DEPTH`` levels; the worker moves anything else to ``bad/`` (see ``exchange.quarantine``).

Answer (``gpu_status/<host>/answers/<id>.json``)::

    {"v": 1, "id": "<request id>", "op": "...", "host": "<host id>", "ok": true, "result": {...},
     "answered_at": <epoch s>, "worker": {"pid": ..., "boot": "...", "attempt": 1}}
    {"v": 1, ..., "ok": false, "error": {"error": "<message>", "code": "<errors.py code>", "status": 404,
     ...extra such as "job"}}

Status files (all replaced atomically by the worker)::

    heartbeat.json  {"v": 1, "host", "node", "pid", "boot": "<random per start>", "counter": n,
                     "interval": s, "state": "running"|"stopped", "pulls": {"running", "queued"},
                     "uptime_seconds", "version", "served", "started_at", "written_at", "poll_interval"}
    models.json     {"v": 1, "host", "boot", "counter": <heartbeat counter when written>,
                     "refresh_interval": s, "refreshed_at", "models": [<GET /api/models entries>],
                     "ollama": {"reachable", "version", "latency_ms", "error"?, "code"?},
                     "gpu": {<GET /api/health "gpu">}}
    jobs/<id>.json  {"v": 1, "host", "boot", "seq": n, "written_at", "job": {<Job object, "id" = request id>}}

The ``Command`` and ``Answer`` types below describe what this side *writes*. What a side *reads* is
a ``files.JsonObject``: a document from the share is untrusted until each field used is checked.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import NotRequired, TypedDict

from .. import errors
from .paths import new_request_id

PROTOCOL_VERSION = 1
OPS = ("ping", "list", "pull", "delete", "job", "cancel", "health", "copy", "loaded", "load", "unload")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
MAX_COMMAND_BYTES = 64 * 1024
MAX_DEADLINE_AHEAD = 3600.0  # seconds: a command whose deadline is further ahead is refused (1e300, +1 year)
CLOCK_SKEW_WARN = 5.0  # seconds of disagreement between two clocks before the worker warns


class Command(TypedDict):
    """A command as the producer writes it (see the module docstring)."""

    v: int
    id: str
    op: str
    args: dict[str, object]
    host: str
    created_at: float
    deadline: float
    sender: str


class Answer(TypedDict):
    """An answer as the worker writes it: ``result`` when ``ok``, else ``error``.

    ``id`` and ``op`` echo the command as received: a refused command's ``op`` may be any JSON value.
    """

    v: int
    id: object
    op: object
    host: str
    ok: bool
    answered_at: float
    worker: dict[str, object]
    result: NotRequired[Mapping[str, object]]
    error: NotRequired[errors.ErrorBody]


def make_command(host_id: str, op: str, args: Mapping[str, object] | None = None, *, timeout: float,
                 request_id: str | None = None, now: float | None = None) -> Command:
    now = time.time() if now is None else now
    return {"v": PROTOCOL_VERSION, "id": request_id or new_request_id(), "op": op, "args": dict(args or {}),
            "host": host_id, "created_at": now, "deadline": now + timeout,
            "sender": f"{socket.gethostname()}:{os.getpid()}"}


def make_answer(command: Mapping[str, object], host_id: str, *, result: Mapping[str, object] | None = None,
                error: errors.ErrorBody | None = None, worker: Mapping[str, object] | None = None) -> Answer:
    doc: Answer = {"v": PROTOCOL_VERSION, "id": command.get("id"), "op": command.get("op"), "host": host_id,
                   "ok": error is None, "answered_at": time.time(), "worker": dict(worker or {})}
    if error is None:
        doc["result"] = result if result is not None else {}
    else:
        doc["error"] = error
    return doc


def error_to_dict(exc: errors.GpuBridgeError) -> errors.ErrorBody:
    """The error's JSON body for an answer: like the HTTP body, plus the status (no ``host``: the
    producer names the host itself)."""
    body = exc.to_dict()
    body.pop("host", None)
    body["status"] = exc.status
    if isinstance(exc, errors.RateLimited):
        body["retry_after"] = exc.retry_after
    return body
