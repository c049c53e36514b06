"""Real ``gpu-bridge nfs-worker`` processes on a shared temp directory, and their audit logs.

A worker is ready when its heartbeat file names its pid with state ``running`` (polled with a
deadline, never a fixed sleep).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

from gpu_bridge import spool
from gpu_bridge.client.nfs import NfsTransport
from gpu_bridge.config import BackendSettings, ClientSettings, GpuHost, NfsSettings
from support.procs import VENV_BIN, wait_until

HERE = Path(__file__).resolve().parent
PRODUCER = HERE / "producer.py"

# Fast settings for tests: the worker polls every 5 ms; heartbeat every 0.2 s (down after 0.6 s).
FAST = {"GPU_BRIDGE_NFS_POLL_INTERVAL": "0.005", "GPU_BRIDGE_NFS_HEARTBEAT_INTERVAL": "0.2",
        "GPU_BRIDGE_NFS_MODELS_REFRESH": "1.0", "GPU_BRIDGE_NFS_REQUIRE_MOUNT": "false"}


def worker_env(root: str | os.PathLike, host_id: str, ollama_url: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_BRIDGE_")}
    env.update(FAST)
    env.update({"GPU_BRIDGE_NFS_ROOT": str(root), "GPU_BRIDGE_NFS_HOST_ID": host_id,
                "GPU_BRIDGE_OLLAMA_URL": ollama_url})
    env.update(extra)
    return env


class WorkerProcess:
    def __init__(self, root, host_id: str, ollama_url: str, *, audit: bool = True, **extra_env: str):
        self.root, self.host_id = str(root), host_id
        self.paths = spool.HostPaths(self.root, host_id)
        self.audit_path = Path(tempfile.mkstemp(prefix=f"nfs-audit-{host_id}-", suffix=".jsonl")[1])
        env_extra = dict(extra_env)
        if audit:
            env_extra["GPU_BRIDGE_NFS_AUDIT_LOG"] = str(self.audit_path)
        self.env = worker_env(root, host_id, ollama_url, **env_extra)
        self.log = tempfile.NamedTemporaryFile(prefix=f"nfs-worker-{host_id}-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: subprocess.Popen | None = None

    def start(self, *, wait: bool = True) -> WorkerProcess:
        self.proc = subprocess.Popen([str(VENV_BIN / "gpu-bridge"), "nfs-worker"], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"nfs-worker exited with {self.proc.returncode}:\n{self.output()}")
            doc = spool.read_json(self.paths.heartbeat)
            return doc is not None and doc.get("pid") == self.proc.pid and doc.get("state") == "running"

        wait_until(ready, timeout, what=f"nfs-worker {self.host_id} heartbeat")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc:
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def audit(self) -> list[dict]:
        text = self.audit_path.read_text() if self.audit_path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def audit_counts(self, event: str) -> Counter:
        return Counter(e["id"] for e in self.audit() if e["event"] == event)

    def wait_audit(self, event: str, distinct: int, timeout: float = 10.0) -> Counter:
        """The audit line is written just after the answer is published: let it land."""
        def enough():
            counts = self.audit_counts(event)
            return counts if len(counts) >= distinct else None

        return wait_until(enough, timeout, what=f"{distinct} {event!r} audit lines")


def transport(root, host_name: str, **nfs_overrides) -> NfsTransport:
    """A production-side transport with test-speed polling (command timeout 10 s unless given)."""
    nfs = NfsSettings(root=str(root), host_id="production", poll_interval=0.005, heartbeat_interval=0.2,
                      command_timeout=nfs_overrides.pop("command_timeout", 10.0), **nfs_overrides)
    settings = BackendSettings(client=ClientSettings(transport="nfs", pull_timeout=30.0), nfs=nfs)
    return NfsTransport(GpuHost(host_name), settings)

