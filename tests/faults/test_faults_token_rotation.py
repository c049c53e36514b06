"""Fault: the API token changes while production runs (a rotation, or a half-finished deployment).

GPU servers accept every token of their token file (one per line); the backend sends the first of
its own and, when a host refuses it, tries the others and keeps the one that host accepts. The
rotation order (README, "Rotating the API token"): GPU hosts accept old + new, backends send new (old kept as
the fallback), GPU hosts drop old. At every step every host must keep answering: a request loop
through the backend counts listings that failed or marked a host unauthorized, and must count 0.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests
from fault_helpers import BACKEND_APP, GPU_APP, gunicorn

from support.procs import free_port, wait_until

pytestmark = pytest.mark.integration

OLD = "old-token-0123456789abcdef0123456789"
NEW = "new-token-fedcba9876543210fedcba9876"


def _gpu(emulator_url: str, token_file, port: int | None = None):
    env = {"GPU_BRIDGE_API_TOKEN_FILE": str(token_file), "GPU_BRIDGE_OLLAMA_URL": emulator_url,
           "GPU_BRIDGE_MIN_FREE_GB": "0", "GPU_BRIDGE_RATE_LIMIT_PER_MINUTE": "0"}
    return gunicorn(GPU_APP, env, probe="/api/health", name="gpu-server", port=port)


def _backend(hosts: str, db, token_file):
    env = {"GPU_INSTANCE_HOSTS": hosts, "GPU_BRIDGE_API_TOKEN_FILE": str(token_file),
           "GPU_BRIDGE_TRANSPORT": "http", "GPU_BRIDGE_DATABASE_URL": f"sqlite:///{db}",
           "GPU_BRIDGE_BACKEND_BIND": "127.0.0.1:8000", "GPU_BRIDGE_CACHE_MAX_AGE": "0"}
    return gunicorn(BACKEND_APP, env, probe="/api/openapi.json", name="backend")


class Loop:
    """Listings through the backend until stopped; counts the answers that are not a clean success."""

    def __init__(self, url: str):
        self.url, self.stop_event = url, threading.Event()
        self.sent = self.failed = self.backend_restarting = 0
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with requests.Session() as s:
            for _ in range(100_000):  # bounded; stopped long before
                if self.stop_event.is_set():
                    return
                try:
                    r = s.get(self.url, timeout=30)
                except requests.ConnectionError:
                    self.backend_restarting += 1  # step 2 restarts the backend itself: not a token failure
                    time.sleep(0.05)
                    continue
                self.sent += 1
                bad = [lbl for lbl, h in r.json().get("hosts", {}).items() if not h.get("ok")]
                if r.status_code != 200 or bad:
                    self.failed += 1
                    self.failures.append(f"{r.status_code} {bad} {r.text[:200]}")

    def answered(self, more: int = 3) -> None:
        """Wait (bounded) until the loop got ``more`` answers: each step is seen by some requests."""
        target = self.sent + more
        wait_until(lambda: self.sent >= target, 30, what=f"{more} more listings through the backend")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def test_rotation_in_three_steps_fails_no_request(module_emulator, tmp_path):
    gpu_tokens = [tmp_path / "gpu-a-token", tmp_path / "gpu-b-token"]
    backend_token = tmp_path / "backend-token"
    for f in gpu_tokens:
        f.write_text(OLD + "\n")
    backend_token.write_text(OLD + "\n")
    ports = [free_port(), free_port()]
    gpus = [_gpu(module_emulator.url, f, p) for f, p in zip(gpu_tokens, ports, strict=True)]
    hosts = ",".join(f"127.0.0.1:{p}" for p in ports)
    backend = _backend(hosts, tmp_path / "b.db", backend_token)
    url = f"{backend.url}/config/models?refresh=true"

    def restart_gpu(i: int) -> None:
        # A GPU server reads its tokens at start (systemd credentials are fixed for a run): restart it
        # on the same port, as the role does, one host at a time.
        gpus[i].stop()
        gpus[i] = _gpu(module_emulator.url, gpu_tokens[i], ports[i])

    try:
        with Loop(url) as loop:
            # Step 1: every GPU host accepts old and new; the backend still sends old.
            loop.answered()
            for i, f in enumerate(gpu_tokens):
                f.write_text(f"{NEW}\n{OLD}\n")
                restart_gpu(i)
                loop.answered()
            # Step 2: the backend sends new first and keeps old as its fallback.
            backend_token.write_text(f"{NEW}\n{OLD}\n")
            backend.stop()
            backend = _backend(hosts, tmp_path / "b.db", backend_token)
            loop.url = f"{backend.url}/config/models?refresh=true"
            loop.answered()
            # Step 3: GPU hosts drop old.
            for i, f in enumerate(gpu_tokens):
                f.write_text(NEW + "\n")
                restart_gpu(i)
                loop.answered()
        # The loop ran through each restart of a GPU host: the other host answered, the restarting
        # one from the cache (stale); what must never happen is a refused token.
        unauthorized = [f for f in loop.failures if "unauthorized" in f]
        assert unauthorized == [], unauthorized[:3]
        r = requests.get(loop.url, timeout=30).json()
        assert all(h["ok"] for h in r["hosts"].values()), r["hosts"]
    finally:
        backend.stop()
        for g in gpus:
            g.stop()


def test_a_backend_with_old_and_new_tokens_reaches_hosts_on_either(module_emulator, tmp_path):
    old_only, new_only = tmp_path / "old", tmp_path / "new"
    old_only.write_text(OLD + "\n")
    new_only.write_text("# comment lines and blank lines are skipped\n\n" + NEW + "\n")
    backend_token = tmp_path / "backend-token"
    backend_token.write_text(f"{NEW}\n{OLD}\n")
    a, b = _gpu(module_emulator.url, old_only), _gpu(module_emulator.url, new_only)
    backend = _backend(f"127.0.0.1:{a.port},127.0.0.1:{b.port}", tmp_path / "b.db", backend_token)
    try:
        for _ in range(3):
            r = requests.get(f"{backend.url}/config/models?refresh=true", timeout=30).json()
            assert all(h["ok"] for h in r["hosts"].values()), r["hosts"]
        # A token that neither line matches is still refused, and says so.
        backend_token.write_text("neither-of-them-0000000000000000000\nnor-this-one-11111111111111111111\n")
        backend.stop()
        backend = _backend(f"127.0.0.1:{a.port}", tmp_path / "b2.db", backend_token)
        r = requests.get(f"{backend.url}/config/models?refresh=true", timeout=30)
        host = next(iter(r.json()["hosts"].values()))
        assert host["reason"] == "unauthorized" and "all 2 tokens rejected" in host["error"], host
    finally:
        backend.stop()
        a.stop()
        b.stop()


def test_a_gpu_server_accepts_each_listed_token_and_nothing_else(module_emulator, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"{NEW}\n{OLD}\n")
    gpu = _gpu(module_emulator.url, token_file)
    try:
        for token, status in ((NEW, 200), (OLD, 200), (NEW[:-1], 401), (NEW + OLD, 401), ("", 401)):
            r = requests.get(f"{gpu.url}/api/models", headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert r.status_code == status, (token, r.status_code)
    finally:
        gpu.stop()
