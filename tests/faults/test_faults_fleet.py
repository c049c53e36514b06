"""Faults of one GPU host among several, seen through the backend as deployed (gunicorn, real GPU
servers, the emulator), with the backend's real defaults for timeouts (30 s read) and the fan-out
deadline (2.5 s): the point is that a sick host no longer costs its read timeout.

- hung host (accepts TCP, never answers): every listing is back within the deadline + 0.5 s, the
  first one included, and the next ones at once (the host's pending call is known to be late); the
  host says ``reason: timeout`` and its models come from the cache, ``stale: true`` with their age;
- slow host (answers in 1 s, under the deadline): its fresh answer is used;
- token mismatch: ``reason: unauthorized`` with what to fix, and its breaker never opens;
- a pull with ``wait`` polls the job: it works although the GPU server refuses every ``?wait=true``.
"""

from __future__ import annotations

import time

import pytest
import requests
from fault_helpers import GPU_APP, gunicorn, start_backend, start_gpu_server
from faultproxy import FaultProxy

from support.procs import emulator_control

pytestmark = pytest.mark.integration

DEADLINE = 2.5
REAL_TIMEOUTS = {"GPU_BRIDGE_READ_TIMEOUT": "30", "GPU_BRIDGE_RETRIES": "2", "GPU_BRIDGE_CONNECT_TIMEOUT": "3",
                 "GPU_BRIDGE_BREAKER_THRESHOLD": "3", "GPU_BRIDGE_BREAKER_COOLDOWN": "15"}


@pytest.fixture
def two_hosts(module_emulator, tmp_path):
    """A backend in front of two GPU servers on one emulator; the second is behind a fault proxy."""
    emulator_control(module_emulator, "reset")
    good = start_gpu_server(module_emulator.url)
    sick = start_gpu_server(module_emulator.url)
    proxy = FaultProxy(("127.0.0.1", sick.port)).start()
    backend = start_backend(f"127.0.0.1:{good.port},127.0.0.1:{proxy.port}", tmp_path / "b.db", **REAL_TIMEOUTS)
    try:
        yield backend, proxy, f"127.0.0.1:{good.port}", f"127.0.0.1:{proxy.port}"
    finally:
        backend.stop()
        proxy.stop()
        sick.stop()
        good.stop()


def _listing(backend) -> tuple[float, dict]:
    started = time.monotonic()
    r = requests.get(f"{backend.url}/config/models", params={"refresh": "true"}, timeout=60)
    elapsed = time.monotonic() - started
    assert r.status_code == 200, r.text
    return elapsed, r.json()


def test_a_hung_host_costs_the_deadline_not_its_read_timeout(two_hosts):
    backend, proxy, good, sick = two_hosts
    _, before = _listing(backend)
    assert before["hosts"][sick]["ok"] and not before["stale"]  # both answered: the cache holds both
    proxy.set_mode("blackhole")
    times = []
    for _ in range(4):
        elapsed, body = _listing(backend)
        times.append(elapsed)
        status = body["hosts"][sick]
        assert status["ok"] is False and status["reason"] == "timeout", status
        assert status["stale"] is True and status["age_s"] >= 0 and status["cached_at"], status
        assert body["hosts"][good]["ok"] is True
        assert body["stale"] is True
        # The sick host's models are still listed (from the cache), under its label.
        assert all(sick in m["hosts"] and good in m["hosts"] for m in body["models"]), body["models"]
    assert max(times) < DEADLINE + 0.5, times  # the first call after the hang included
    # The hung host's one call is still pending (30 s read timeout): later listings know it is late
    # and do not wait for it again.
    assert times[0] >= DEADLINE - 0.1, times
    assert max(times[1:]) < 0.5, times


def test_a_slow_host_under_the_deadline_is_fresh(two_hosts):
    backend, proxy, good, sick = two_hosts
    proxy.set_mode("latency", latency=1.0)
    elapsed, body = _listing(backend)
    assert body["hosts"][sick]["ok"] is True and not body["stale"]
    assert 1.0 <= elapsed < DEADLINE, elapsed


def test_a_token_mismatch_is_a_configuration_error_not_a_down_host(module_emulator, tmp_path):
    right = start_gpu_server(module_emulator.url)
    other = gunicorn(GPU_APP, {"GPU_BRIDGE_API_TOKEN": "another-token-entirely", "GPU_BRIDGE_OLLAMA_URL":
                               module_emulator.url, "GPU_BRIDGE_MIN_FREE_GB": "0"}, probe="/api/health", name="gpu-2")
    backend = start_backend(f"127.0.0.1:{right.port},127.0.0.1:{other.port}", tmp_path / "b.db", **REAL_TIMEOUTS)
    label = f"127.0.0.1:{other.port}"
    try:
        for _ in range(5):  # more than the breaker's threshold of 3
            _, body = _listing(backend)
            status = body["hosts"][label]
            assert status["reason"] == "unauthorized" and "GPU_BRIDGE_API_TOKEN must match" in status["error"]
        health = requests.get(f"{backend.url}/health", timeout=30).json()
        assert health["gpu_hosts"][label]["breaker"]["state"] == "closed", health["gpu_hosts"][label]
    finally:
        backend.stop()
        other.stop()
        right.stop()


def test_a_waited_pull_polls_the_job_instead_of_holding_a_thread(module_emulator, tmp_path):
    emulator_control(module_emulator, "reset")
    gpu = start_gpu_server(module_emulator.url, GPU_BRIDGE_MAX_WAITING_PULLS="0")  # every ?wait=true: 429
    backend = start_backend(f"127.0.0.1:{gpu.port}", tmp_path / "b.db", **REAL_TIMEOUTS)
    try:
        r = requests.post(f"{backend.url}/config/pull-model", json={"model": "tinyllama", "wait": True}, timeout=60)
        assert r.status_code == 200, r.text
        result = next(iter(r.json()["results"].values()))
        assert result["ok"] is True and result["job"]["state"] == "succeeded", result
    finally:
        backend.stop()
        gpu.stop()
