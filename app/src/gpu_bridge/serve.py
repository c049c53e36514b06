"""Run a Flask app under gunicorn the way the systemd units do (gthread, one worker process).

One worker process on purpose: jobs, rate limits and metrics live in memory (see
docs/architecture.md, "Why one gunicorn process with threads").
"""

from __future__ import annotations

from collections.abc import Callable

from gunicorn.app.base import BaseApplication


class _Embedded(BaseApplication):
    def __init__(self, factory: Callable, options: dict):
        self._factory = factory
        self._options = options
        super().__init__()

    def load_config(self):
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self):
        return self._factory()


def run_gunicorn(factory: Callable, bind: str, *, threads: int = 8, timeout: int = 60) -> None:
    """Serve ``factory()`` on ``bind`` until SIGTERM/SIGINT."""
    options = {
        "bind": bind,
        "workers": 1,
        "worker_class": "gthread",
        "threads": threads,
        # gthread keeps long requests (a ?wait=true pull) alive; timeout only guards a hung worker.
        "timeout": timeout,
        "graceful_timeout": 10,
        "accesslog": None,  # our own JSON request log replaces gunicorn's access log
        "errorlog": "-",
        "loglevel": "info",
        # gunicorn >= 24 opens ~/.gunicorn/gunicorn.ctl by default: shared by every gunicorn on the
        # host and blocked by ProtectHome=. We manage the process with systemd, not that socket.
        "control_socket_disable": True,
        # gunicorn's longest request line (default 4094): a model name at the grammar's limit, fully
        # percent-encoded, must reach the app and get its JSON 400, not gunicorn's HTML 414.
        "limit_request_line": 8190,
    }
    _Embedded(factory, options).run()
