"""The processes a benchmark run starts, all on 127.0.0.1, and their memory (RSS of the process tree).

Servers run the way the roles deploy them: gunicorn with the units' settings module
(``gpu_bridge.gunicorn_conf``: one gthread worker process, the roles' default threads and timeouts, no
gunicorn access log, only the app's JSON request log; output captured to a log file here), deployed
defaults for every ``GPU_BRIDGE_*`` setting except where a measurement needs another (named at each
start).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from gpu_bridge import spool
from support.procs import EMULATOR, free_port, wait_until

VENV_BIN = Path(sys.executable).parent
TOKEN = "bench-gpu-token-7c1e9f2a4b6d8e0f"  # noqa: S105 - a throw-away token for loopback processes
GPU_APP = "gpu_bridge.gpu_server:create_app()"
BACKEND_APP = "gpu_bridge.backend:create_app()"


def clean_env(**extra) -> dict:
    """This environment without any GPU_BRIDGE_/GPU_INSTANCE_ variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_BRIDGE_", "GPU_INSTANCE_"))}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def tree_files(pid: int, name: str):
    """(pid, text of /proc/<pid>/<name>) for ``pid`` and all its descendants that are still there."""
    stack, seen = [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            text = Path(f"/proc/{current}/{name}").read_text()
        except OSError:
            continue
        yield current, text
        stack.extend(_children(current))


def tree_rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` and all its descendants, in KiB (None when the process is gone)."""
    total, found = 0, False
    for current, status in tree_files(pid, "status"):
        found = found or current == pid
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
                break
    return total if found else None


class Proc:
    """A subprocess in its own session with a log file; ``url`` when it serves HTTP."""

    def __init__(self, name: str, argv: list[str], env: dict, logdir: Path, port: int | None = None):
        self.name, self.argv, self.env, self.port = name, argv, env, port
        self.log_path = logdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Proc:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self, tail: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def wait_http(self, path: str, timeout: float = 30.0, headers: dict | None = None) -> Proc:
        def ready():
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.output()}")
            return requests.get(self.url + path, headers=headers, timeout=1).status_code < 500

        try:
            wait_until(ready, timeout, 0.05, what=f"{self.name} on {self.url}")
        except (AssertionError, RuntimeError) as exc:
            raise RuntimeError(f"{self.name} did not become ready: {exc}\n{self.output()}") from None
        return self

    def rss_kib(self) -> int | None:
        return tree_rss_kib(self.pid) if self.alive() else None

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        # gunicorn: SIGQUIT is its quick shutdown; the worker and the emulator take SIGTERM.
        sig = signal.SIGQUIT if "gunicorn" in self.argv[0] else signal.SIGTERM
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        except ProcessLookupError:
            pass


class Stack:
    """Starts and remembers processes; ``close()`` stops them all (also on errors and timeouts)."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-bridge-bench-"))
        self.procs: list[Proc] = []

    def _add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc.start()

    def emulator(self, name: str = "ollama-emulator", *flags: str) -> Proc:
        port = free_port()
        argv = [sys.executable, str(EMULATOR), "--host", "127.0.0.1", "--port", str(port), *flags]
        return self._add(Proc(name, argv, clean_env(), self.tmp, port))

    def process(self, name: str, argv: list[str], **env) -> Proc:
        return self._add(Proc(name, argv, clean_env(**env), self.tmp))

    def gunicorn(self, name: str, app: str, env: dict, *, threads: int | None = None) -> Proc:
        """gunicorn as the units start it: the settings module they read (gpu_bridge.gunicorn_conf), with
        the roles' defaults; only the port (and ``threads`` where a measurement varies it) set here."""
        port = free_port()
        argv = [str(VENV_BIN / "gunicorn"), "-c", "python:gpu_bridge.gunicorn_conf", app]
        env = {**env, "GPU_BRIDGE_GUNICORN_BIND": f"127.0.0.1:{port}", "GPU_BRIDGE_GUNICORN_PROC_NAME": name}
        if threads is not None:
            env["GPU_BRIDGE_GUNICORN_THREADS"] = threads
        return self._add(Proc(name, argv, clean_env(**env), self.tmp, port))

    def gpu_server(self, name: str, ollama_url: str, *, threads: int | None = None, **extra) -> Proc:
        env = {"GPU_BRIDGE_API_TOKEN": TOKEN, "GPU_BRIDGE_OLLAMA_URL": ollama_url, **extra}
        return self.gunicorn(name, GPU_APP, env, threads=threads)

    def backend(self, name: str, hosts: str, *, transport: str = "http", cache_max_age: float = 0.0,
                share: Path | None = None, **extra) -> Proc:
        env = {"GPU_INSTANCE_HOSTS": hosts, "GPU_BRIDGE_API_TOKEN": TOKEN, "GPU_BRIDGE_TRANSPORT": transport,
               "GPU_BRIDGE_CACHE_MAX_AGE": cache_max_age,
               "GPU_BRIDGE_DATABASE_URL": f"sqlite:///{self.tmp}/{name}.db", **extra}
        if transport == "nfs":
            env.update(GPU_BRIDGE_NFS_ROOT=share, GPU_BRIDGE_NFS_HOST_ID="production")
        return self.gunicorn(name, BACKEND_APP, env)

    def share(self) -> Path:
        root = self.tmp / "share"
        root.mkdir(exist_ok=True)
        spool.init_share(str(root))
        return root

    def nfs_worker(self, name: str, share: Path, host_id: str, ollama_url: str, **extra) -> Proc:
        env = clean_env(GPU_BRIDGE_NFS_ROOT=share, GPU_BRIDGE_NFS_HOST_ID=host_id, GPU_BRIDGE_OLLAMA_URL=ollama_url,
                        GPU_BRIDGE_NFS_REQUIRE_MOUNT="false", **extra)  # a temp directory is not a mount point
        return self._add(Proc(name, [str(VENV_BIN / "gpu-bridge"), "nfs-worker"], env, self.tmp))

    @staticmethod
    def wait_worker(proc: Proc, share: Path, host_id: str, timeout: float = 30.0) -> None:
        paths = spool.HostPaths(str(share), host_id)

        def ready():
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.output()}")
            doc = spool.read_json(paths.heartbeat)
            return doc is not None and doc.get("pid") == proc.pid and doc.get("state") == "running"

        wait_until(ready, timeout, 0.05, what=f"{proc.name} heartbeat")

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop(timeout=5)
            except Exception:  # noqa: BLE001 - keep stopping the others
                print(f"bench: could not stop {proc.name}", file=sys.stderr)
        self.procs.clear()


def auth() -> dict:
    return {"Authorization": f"Bearer {TOKEN}"}


def monotonic_ms() -> float:
    return time.monotonic() * 1000
