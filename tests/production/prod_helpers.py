"""Helpers for tests/production: an in-process stand-in HTTP server, fake transports, GPU server
processes bound to any loopback address, the PostgreSQL server the session starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from werkzeug.serving import WSGIRequestHandler, make_server

from gpu_bridge.client.base import GpuTransport
from gpu_bridge.errors import GpuHostUnreachable, JobNotFound
from support.procs import VENV_BIN, QuickStopProcess, ServerProcess, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):  # quiet
        pass


class StandIn:
    """A Flask (or any WSGI) app served on 127.0.0.1 in a thread; ``.url``, ``.stop()``."""

    def __init__(self, app, host: str = "127.0.0.1"):
        self.server = make_server(host, 0, app, threaded=True, request_handler=_QuietHandler)
        self.port = self.server.server_port
        self.url = f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeTransport(GpuTransport):
    """An in-memory GPU host: models, jobs that advance when polled, switchable failures."""

    kind = "fake"

    def __init__(self, host, settings=None, *, models=None):
        super().__init__(host)
        self.models = list(models if models is not None else [
            {"name": "llama3.2:latest", "size": 2_000, "digest": "aa", "modified_at": "2025-05-05T00:37:44Z",
             "details": {"family": "llama"}}])
        self.jobs: dict[str, dict] = {}
        self.down = False
        self.delay = 0.0
        self.calls: list[tuple] = []
        self.request_ids: list[str | None] = []
        self.pull_steps = 2  # polls until a job succeeds

    def _enter(self, *call):
        from gpu_bridge.client.http import current_request_id

        self.calls.append(call)
        self.request_ids.append(current_request_id.get())
        if self.delay:
            time.sleep(self.delay)
        if self.down:
            raise GpuHostUnreachable(f"{self.host.label} refused the connection: is gpu-http-server.service running?",
                                     host=self.host.label)

    def health(self):
        self._enter("health")
        return {"status": "ok", "ollama": {"reachable": True, "version": "0.12.3"}}

    def list_models(self):
        self._enter("list_models")
        return list(self.models)

    def _job(self, model, state="queued"):
        job_id = f"job-{self.host.name}-{len(self.jobs) + 1}"
        job = {"id": job_id, "model": model, "state": state, "completed": 0, "total": 1000, "percent": 0.0,
               "status": "pulling manifest", "error": None, "error_code": None, "polls": 0}
        self.jobs[job_id] = job
        return job

    def start_pull(self, model):
        self._enter("start_pull", model)
        return dict(self._job(model))

    def pull_and_wait(self, model):
        self._enter("pull_and_wait", model)
        job = self._job(model, "succeeded")
        job.update(completed=1000, percent=100.0, status="success")
        self._install(model)
        return dict(job)

    def _install(self, model):
        if not any(m["name"] == model for m in self.models):
            self.models.append({"name": model, "size": 1000, "digest": "bb", "modified_at": "2025-06-01T00:00:00Z",
                                "details": {}})

    def get_job(self, job_id):
        self._enter("get_job", job_id)
        job = self.jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"{self.host.label}: job {job_id} not found", host=self.host.label)
        if job["state"] in ("queued", "running"):
            job["polls"] += 1
            if job["polls"] >= self.pull_steps:
                job.update(state="succeeded", completed=1000, percent=100.0, status="success")
                self._install(job["model"])
            else:
                job.update(state="running", completed=500, percent=50.0, status="pulling 8eeb52dfb3bb")
        return dict(job)

    def cancel_job(self, job_id):
        self._enter("cancel_job", job_id)
        job = self.jobs[job_id]
        job["state"] = "cancelled"
        return dict(job)

    def delete_model(self, model):
        self._enter("delete_model", model)
        from gpu_bridge.errors import ModelNotFound

        if not any(m["name"] == model for m in self.models):
            raise ModelNotFound(f"{self.host.label}: model '{model}' not found", host=self.host.label)
        self.models = [m for m in self.models if m["name"] != model]
        return {"deleted": model}


class FakeFactory:
    """``transport_factory`` for GpuFleet/create_app that remembers the fakes it made, by host name."""

    def __init__(self, **per_host_models):
        self.made: dict[str, FakeTransport] = {}
        self.per_host_models = per_host_models

    def __call__(self, host, settings):
        t = FakeTransport(host, settings, models=self.per_host_models.get(host.name))
        self.made[host.name] = t
        return t


# --- real processes --------------------------------------------------------------------------------------------
class HostServerProcess(QuickStopProcess):
    """A server listening on a given loopback address (support.procs assumes 127.0.0.1)."""

    def __init__(self, argv: list[str], port: int, *, host: str, **kw):
        super().__init__(argv, port, **kw)
        self.host = host

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def start_gunicorn_on(app_spec: str, env: dict, *, host: str = "127.0.0.1", port: int | None = None,
                      probe: str, name: str, threads: int = 4) -> HostServerProcess:
    """Like support.procs.start_gunicorn, but bound to any loopback address (127.0.0.2 for a second host)."""
    port = port or free_port()
    argv = [str(VENV_BIN / "gunicorn"), "--bind", f"{host}:{port}", "--workers", "1", "--worker-class", "gthread",
            "--threads", str(threads), "--timeout", "120", "--graceful-timeout", "3", "--no-control-socket", app_spec]
    return HostServerProcess(argv, port, host=host, env=env, probe=probe, name=name).start()


def gpu_bridge_cmd(*args: str) -> list[str]:
    return [str(VENV_BIN / "gpu-bridge"), *args]


# --- PostgreSQL ------------------------------------------------------------------------------------------------
def find_pg_bin() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    return candidates[0].parent if candidates else None


class PostgresServer:
    """A throw-away PostgreSQL cluster on 127.0.0.1:<free port>, run as the postgres user when we are root."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="gpu-bridge-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.as_root = os.geteuid() == 0

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = list(argv)
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def start(self) -> PostgresServer:
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o700)
        r = self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--no-sync")
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{r.stdout}\n{r.stderr}")
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} -c fsync=off"
        r = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w",
                      "-t", "60", "start")
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed:\n{r.stdout}\n{r.stderr}\n{self.output()}")
        wait_until(lambda: self._run(str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
                                     timeout=10).returncode == 0, 30, 0.1, what="PostgreSQL ready")
        return self

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def create_database(self, name: str) -> str:
        r = self._run(str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        if r.returncode != 0:
            raise RuntimeError(f"createdb {name} failed: {r.stderr}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


PYTHON = sys.executable


# --- a GPU side for the backend: N hosts over HTTP or NFS --------------------------------------------------------
TOKEN = "integration-gpu-token"
# Test-speed NFS channel settings (both sides): heartbeat every 0.2 s, poll every 5 ms.
NFS_FAST = {"GPU_BRIDGE_NFS_POLL_INTERVAL": "0.005", "GPU_BRIDGE_NFS_HEARTBEAT_INTERVAL": "0.2",
            "GPU_BRIDGE_NFS_MODELS_REFRESH": "0.5", "GPU_BRIDGE_NFS_REQUIRE_MOUNT": "false"}


def clean_env(**extra: str) -> dict:
    """os.environ without any GPU_BRIDGE_/GPU_INSTANCE_ variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_BRIDGE_", "GPU_INSTANCE_"))}
    env.update({k: str(v) for k, v in extra.items()})
    return env


class ProcessGroup:
    """A plain long-running subprocess (the NFS worker) with a log file."""

    def __init__(self, argv: list[str], env: dict, name: str):
        self.argv, self.env, self.name = argv, env, name
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class GpuSide:
    """``n`` GPU hosts named 127.0.0.1, 127.0.0.2, ... each with its own Ollama emulator, reached over
    ``transport``: "http" (a gunicorn GPU server per host, bound on that loopback address) or "nfs" (a
    ``gpu-bridge nfs-worker`` per host on a temp share prepared by ``gpu-bridge nfs-init``)."""

    def __init__(self, transport: str, n: int, tmp: Path):
        from support.procs import start_emulator

        self.transport, self.tmp = transport, tmp
        self.names = [f"127.0.0.{i + 1}" for i in range(n)]
        self.emulators = []
        self.servers: dict[str, object] = {}
        self.share = tmp / "share"
        self.ports: dict[str, int] = {}
        try:
            self.emulators = [start_emulator() for _ in range(n)]
            if transport == "nfs":
                self.share.mkdir(parents=True, exist_ok=True)
                r = subprocess.run(gpu_bridge_cmd("nfs-init"), env=clean_env(GPU_BRIDGE_NFS_ROOT=self.share),
                                   capture_output=True, text=True, timeout=30, check=False)
                assert r.returncode == 0, f"gpu-bridge nfs-init failed: {r.stdout}{r.stderr}"
            for name in self.names:
                self.start_host(name)
        except BaseException:
            self.stop()
            raise

    def emulator(self, name: str):
        return self.emulators[self.names.index(name)]

    def label(self, name: str) -> str:
        return f"{name}:{self.ports[name]}"

    @property
    def labels(self) -> list[str]:
        return [self.label(n) for n in self.names]

    def start_host(self, name: str, *, port: int | None = None, emulator_url: str | None = None) -> None:
        """Start (or restart) the GPU side of host ``name``."""
        if name not in self.ports:
            self.ports[name] = port or (free_port() if self.transport == "http" else 8001)
        ollama = emulator_url or self.emulator(name).url
        if self.transport == "http":
            env = clean_env(GPU_BRIDGE_OLLAMA_URL=ollama, GPU_BRIDGE_API_TOKEN=TOKEN,
                            GPU_BRIDGE_RATE_LIMIT_PER_MINUTE="0", GPU_BRIDGE_MIN_FREE_GB="0")
            self.servers[name] = start_gunicorn_on("gpu_bridge.gpu_server:create_app()", env, host=name,
                                                   port=self.ports[name], probe="/api/health", name=f"gpu-{name}")
        else:
            env = clean_env(GPU_BRIDGE_NFS_ROOT=self.share, GPU_BRIDGE_NFS_HOST_ID=name,
                            GPU_BRIDGE_OLLAMA_URL=ollama, **NFS_FAST)
            worker = ProcessGroup(gpu_bridge_cmd("nfs-worker"), env, f"nfs-worker-{name}")
            self.servers[name] = worker
            hb_env = clean_env(GPU_BRIDGE_NFS_ROOT=self.share, **NFS_FAST)
            # `gpu-bridge nfs-heartbeat` exits 0 once the worker's heartbeat counter advances.
            checker = subprocess.Popen(gpu_bridge_cmd("nfs-heartbeat", "--host-id", name, "--timeout", "30"),
                                       env=hb_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

            def ready():
                if not worker.alive():
                    checker.kill()
                    raise AssertionError(f"nfs-worker {name} exited:\n{worker.output()}")
                return checker.poll() is not None

            wait_until(ready, 35, 0.05, what=f"nfs-worker {name} heartbeat")
            out = checker.communicate()[0]
            assert checker.returncode == 0, f"nfs-heartbeat {name}: {out}\n{worker.output()}"

    def stop_host(self, name: str) -> None:
        server = self.servers.pop(name, None)
        if server is not None:
            server.stop()

    def backend_env(self, hosts: list[str] | None = None, **extra: str) -> dict:
        """Environment for a backend aimed at these hosts (``hosts``: GPU_INSTANCE_HOSTS entries)."""
        env = {"GPU_INSTANCE_HOSTS": ",".join(hosts or self.labels), "GPU_BRIDGE_API_TOKEN": TOKEN,
               "GPU_BRIDGE_TRANSPORT": self.transport, "GPU_BRIDGE_CACHE_MAX_AGE": "0",
               "GPU_BRIDGE_DATABASE_URL": f"sqlite:///{self.tmp}/backend-{free_port()}.db"}
        if self.transport == "nfs":
            env.update(NFS_FAST, GPU_BRIDGE_NFS_ROOT=str(self.share), GPU_BRIDGE_NFS_HOST_ID="production",
                       GPU_BRIDGE_NFS_COMMAND_TIMEOUT="10")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def dead_entry(self) -> str:
        """A GPU_INSTANCE_HOSTS entry for a host with nothing behind it."""
        return f"127.0.0.9:{free_port()}" if self.transport == "http" else "127.0.0.9"

    def output(self) -> str:
        return "\n".join(f"--- {n} ---\n{s.output()[-4000:]}" for n, s in self.servers.items())

    def stop(self) -> None:
        for name in list(self.servers):
            self.stop_host(name)
        for emu in self.emulators:
            emu.stop()


def start_backend(env: dict, *, port: int | None = None) -> ServerProcess:
    """``gpu-bridge serve-backend`` (gunicorn, one gthread worker) on 127.0.0.1:<port>."""
    port = port or free_port()
    return QuickStopProcess(gpu_bridge_cmd("serve-backend", "--bind", f"127.0.0.1:{port}", "--threads", "8"), port,
                            env=clean_env(**env), probe="/api/openapi.json", name="backend").start()
