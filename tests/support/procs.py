"""Real processes on loopback for integration tests: the Ollama emulator, gunicorn servers.

Readiness is polled with a deadline (never a fixed sleep): a process is ready when its probe URL
answers, and a process that exits early fails the test with its output.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
EMULATOR = REPO / "tests" / "ollama_emulator.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; raise AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last error at the deadline
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")


class ServerProcess:
    """A subprocess serving HTTP on 127.0.0.1:<port>; output goes to a temp log file.

    ``stop()`` sends ``stop_signal`` to the process group, then SIGKILL after the timeout. Subclasses
    set SIGQUIT for gunicorn's quick shutdown where a graceful drain (~2 s) buys a test nothing.
    """

    stop_signal = signal.SIGTERM

    def __init__(self, argv: list[str], port: int, *, env: dict | None = None, probe: str = "/",
                 name: str = "server", ready_timeout: float = 20.0):
        self.argv, self.port, self.probe, self.name = argv, port, probe, name
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout = ready_timeout
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")
            return requests.get(self.url + self.probe, timeout=1).status_code < 500

        try:
            wait_until(ready, self.ready_timeout, what=f"{self.name} on port {self.port}")
        except (AssertionError, RuntimeError):
            self.stop()
            raise AssertionError(f"{self.name} did not become ready:\n{self.output()}") from None
        return self

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(self.stop_signal)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(5)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc:
            self.proc.wait(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def start_emulator(*flags: str, port: int | None = None) -> ServerProcess:
    port = port or free_port()
    argv = [sys.executable, str(EMULATOR), "--host", "127.0.0.1", "--port", str(port), *flags]
    return ServerProcess(argv, port, probe="/", name="ollama-emulator").start()


def emulator_control(emulator: ServerProcess, action: str, body: dict | None = None) -> dict:
    """``config`` / ``reset`` / ``stats`` on the emulator's control routes."""
    if action == "stats":
        r = requests.get(f"{emulator.url}/_emulator/stats", timeout=5)
    else:
        r = requests.post(f"{emulator.url}/_emulator/{action}", json=body or {}, timeout=5)
    r.raise_for_status()
    return r.json() if r.content else {}


class QuickStopProcess(ServerProcess):
    """gunicorn's quick shutdown (SIGQUIT to the process group): tests need no graceful drain, and a
    graceful stop costs ~2 s per process."""

    stop_signal = signal.SIGQUIT


def start_gunicorn(app_spec: str, env: dict, *, probe: str, name: str, threads: int = 8,
                   port: int | None = None, process_class: type[ServerProcess] = ServerProcess) -> ServerProcess:
    """gunicorn as deployed: one gthread worker process, e.g. ``gpu_bridge.gpu_server:create_app()``."""
    port = port or free_port()
    argv = [str(VENV_BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "1",
            "--worker-class", "gthread", "--threads", str(threads), "--timeout", "120",
            "--graceful-timeout", "5", "--no-control-socket", app_spec]
    return process_class(argv, port, env=env, probe=probe, name=name).start()
