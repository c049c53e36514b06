"""The gunicorn settings of both services, in one place, and a way to run an app under them.

Three launch paths read :func:`gunicorn_options`, so what is tested and measured is what runs:

* the systemd units: ``gunicorn -c python:gpu_bridge.gunicorn_conf APP`` (that module is this
  function's result as module globals), with the deployed values in the unit's environment;
* ``gpu-bridge serve-gpu`` / ``serve-backend``: :func:`run_gunicorn`, with ``--bind`` and
  ``--threads`` from the command line;
* ``scripts/bench``: the first path, with the roles' default values.

One worker process on purpose: jobs, rate limits, breakers and metrics live in its memory (see
docs/architecture.md, "Why one gunicorn process with threads"). The ``GPU_BRIDGE_GUNICORN_*`` settings
configure the server process, not the app: they are declared here, with config.py's ``Setting`` types,
and the README's "gunicorn (both services)" table gives them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from gunicorn.app.base import BaseApplication

from .config_fields import IntSetting, OptionalStrSetting, StrSetting
from .errors import ConfigError

# The defaults are the roles' (gpu_http_server_threads / _timeout / _graceful_timeout and prod_backend_*);
# tests/core/test_core_serve.py keeps them in step.
BIND = OptionalStrSetting("GPU_BRIDGE_GUNICORN_BIND", None, "HOST:PORT or unix:/PATH; unset: systemd's socket")
THREADS = IntSetting("GPU_BRIDGE_GUNICORN_THREADS", 8, "threads of the one worker process", minimum=1)
TIMEOUT = IntSetting("GPU_BRIDGE_GUNICORN_TIMEOUT", 60, "seconds of silence before the worker is restarted",
                     minimum=1)
GRACEFUL_TIMEOUT = IntSetting("GPU_BRIDGE_GUNICORN_GRACEFUL_TIMEOUT", 30,
                              "seconds a stop or restart waits for requests in flight")
PROC_NAME = StrSetting("GPU_BRIDGE_GUNICORN_PROC_NAME", "gpu-bridge", "the process name gunicorn logs")
DEFAULT_THREADS = THREADS.default

# What no deployment changes.
FIXED_OPTIONS: dict[str, Any] = {
    "workers": 1,
    "worker_class": "gthread",
    # No gunicorn access log: the app writes one JSON line per request, without query strings (a token a
    # client put in a URL is never logged) and without successful health checks unless asked.
    "accesslog": None,
    "errorlog": "-",
    "loglevel": "info",
    # gunicorn >= 24 opens ~/.gunicorn/gunicorn.ctl by default: shared by every gunicorn on the host and
    # blocked by ProtectHome=. systemd starts, stops and reloads the services, not that socket.
    "control_socket_disable": True,
    # gunicorn's longest request line (default 4094): a model name at the grammar's limit, fully
    # percent-encoded, must reach the app and get its JSON 400, not gunicorn's HTML 414.
    "limit_request_line": 8190,
}

_BIND = re.compile(r"^(unix:/.+|(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]*):\d{1,5})$")


def gunicorn_options(env: Mapping[str, str], *, bind: str | None = None, threads: int | None = None,
                     timeout: int | None = None) -> dict[str, Any]:
    """gunicorn's settings: the fixed ones, then the deployed ones from ``env`` (``GPU_BRIDGE_GUNICORN_*``),
    then the explicit arguments. Without a bind address here gunicorn uses the sockets systemd passes
    (socket activation) or its own default. A malformed value raises ``ConfigError`` naming it."""
    options = dict(FIXED_OPTIONS)
    bind = bind or BIND.read(env)
    if bind:
        if not _BIND.match(bind):
            raise ConfigError(f"bind address {bind!r} must be HOST:PORT (e.g. 127.0.0.1:8001) or unix:/PATH")
        options["bind"] = [bind]
    options["threads"] = threads if threads is not None else THREADS.read(env)
    if options["threads"] < 1:
        raise ConfigError(f"threads must be >= 1, not {options['threads']}")
    # gthread keeps long requests (a ?wait=true pull) alive; the timeout only guards a hung worker.
    options["timeout"] = timeout if timeout is not None else TIMEOUT.read(env)
    # How long a stop or restart waits for requests in flight (the units' TimeoutStopSec= adds to it).
    options["graceful_timeout"] = GRACEFUL_TIMEOUT.read(env)
    options["proc_name"] = PROC_NAME.read(env)
    return options


class _Embedded(BaseApplication):
    def __init__(self, factory: Callable[[], Any], options: dict[str, Any]):
        self._factory = factory
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._factory()


def run_gunicorn(factory: Callable[[], Any], bind: str, *, threads: int | None = None,
                 timeout: int | None = None, proc_name: str | None = None) -> None:
    """Serve ``factory()`` on ``bind`` until SIGTERM/SIGINT, with the units' settings."""
    options = gunicorn_options(os.environ, bind=bind, threads=threads, timeout=timeout)
    if proc_name:
        options["proc_name"] = proc_name
    _Embedded(factory, options).run()
