"""One log format for every gpu-bridge process: one JSON object per line on stderr.

The GPU server, the backend, the NFS worker and the CLI's daemons all call
``configure_logging(process)`` once at start, so journald (and whatever ships the journal) sees the
same fields from every service:

``time``
    UTC, ISO 8601 with milliseconds: ``2025-01-31T12:00:00.123Z``. Always the first field.
``level``
    ``debug``, ``info``, ``warning``, ``error`` or ``critical``.
``logger``
    the logger's name: ``gpu_bridge.gpu_server``, ``gpu_bridge.backend``, ``gpu_bridge.access`` (one
    line per HTTP request, see web.py), ``gpu_bridge.nfs_worker``...
``process``
    the service that wrote it: ``gpu-server``, ``backend``, ``nfs-worker``... (the name given to
    ``configure_logging``; two services in one Python process, as in tests, share the last one).
``message``
    the sentence for humans.
``request_id``
    when the line was written while serving an HTTP request: the request's ``X-Request-ID``.
extra fields
    a mapping logged as the message (``log.info(Fields(event="request", status=200))``) and
    ``extra={...}`` keyword fields are merged in; they never replace the five fields above.
``traceback``
    when an exception was logged.

No header, token or query string is ever put into a line by this module: what a line holds is what
the caller passed (the request log in web.py writes method, path, route, status, duration, request
id and peer address only).

Why our own formatter and not python-json-logger: it is thirty lines, and a dependency would have to
reach the air-gapped GPU hosts through the lock file and the wheelhouse for no gain in behaviour.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

PACKAGE_LOGGER = "gpu_bridge"
CORE_FIELDS = ("time", "level", "logger", "process", "message")
# The request being served by this thread (web.py sets and resets it around each request).
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("gpu_bridge_log_request_id",
                                                                                default=None)
# Attributes every LogRecord has: anything else on a record came from ``extra=`` and is a field.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class Fields(dict[str, Any]):
    """A log message made of fields. Its text is JSON, so a handler without our formatter (pytest's
    caplog, a host application's handler) still shows one parseable line rather than a Python repr."""

    def __str__(self) -> str:
        return json.dumps(self, default=str)


class JsonFormatter(logging.Formatter):
    """The one formatter of every process (fields in the module docstring)."""

    def __init__(self, process: str = "gpu-bridge") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {}
        if isinstance(record.msg, Mapping) and not record.args:
            fields.update(record.msg)
            message = str(fields.pop("message", fields.get("event", "")))
        else:
            message = record.getMessage()
        fields.update((k, v) for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES)
        request_id = current_request_id.get()
        if request_id is not None:
            fields.setdefault("request_id", request_id)
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(), "logger": record.name, "process": self.process, "message": message}
        entry.update((k, v) for k, v in fields.items() if k not in CORE_FIELDS)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(process: str, level: int = logging.INFO) -> None:
    """JSON lines on stderr for the ``gpu_bridge`` loggers, written as ``process``.

    Idempotent: a second call (a second app in one process) renames the process and adds nothing.
    When the host process already configured logging (a root handler: pytest, an embedding
    application), records propagate to it and no handler of ours is added. gunicorn configures only
    its own loggers, so under gunicorn our handler is installed.
    """
    package_log = logging.getLogger(PACKAGE_LOGGER)
    if package_log.level == logging.NOTSET:
        package_log.setLevel(level)
    for handler in package_log.handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.formatter.process = process
            return
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process))
    package_log.addHandler(handler)


__all__ = ["CORE_FIELDS", "Fields", "JsonFormatter", "configure_logging", "current_request_id"]
