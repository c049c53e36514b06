"""Fault: many clients wait for pulls with ``?wait=true`` at once (each wait holds a gunicorn thread).

Before the cap, eight such waits filled the eight threads and ``/api/health`` timed out, so the
backend's breaker marked a healthy host down. Now at most GPU_BRIDGE_MAX_WAITING_PULLS wait; the
rest get 429 ``too_many_waits`` at once and start nothing, and health keeps answering.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests
from fault_helpers import GPU_TOKEN, start_gpu_server

from support.procs import emulator_control

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {GPU_TOKEN}"}
MODEL = "waitmodel:latest"


def test_sixteen_waiting_pulls_leave_health_answering(emulator):
    # One 4 MB model at 1 MB/s: every wait lasts about 4 s.
    emulator_control(emulator, "config", {"add_remote": {MODEL: 4_000_000}, "pull_speed": 1e6})
    gpu = start_gpu_server(emulator.url, GPU_BRIDGE_MAX_WAITING_PULLS="2")
    results: list[requests.Response] = []
    lock = threading.Lock()

    def wait_for_pull() -> None:
        r = requests.post(f"{gpu.url}/api/models/{MODEL}", params={"wait": "true"}, headers=AUTH, timeout=60)
        with lock:
            results.append(r)

    try:
        waiters = [threading.Thread(target=wait_for_pull) for _ in range(16)]
        for t in waiters:
            t.start()
        health_latencies = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # while the two admitted waits hold their threads
            started = time.monotonic()
            r = requests.get(f"{gpu.url}/api/health", timeout=5)
            assert r.status_code == 200
            health_latencies.append(time.monotonic() - started)
            time.sleep(0.1)
        for t in waiters:
            t.join(60)
        assert not any(t.is_alive() for t in waiters)
    finally:
        gpu.stop()

    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 200] + [429] * 14, statuses
    refused = [r for r in results if r.status_code == 429]
    assert all(r.json()["code"] == "too_many_waits" and r.headers["Retry-After"] == "5" for r in refused)
    assert "GPU_BRIDGE_MAX_WAITING_PULLS" in refused[0].json()["error"]
    assert max(health_latencies) < 1.0, health_latencies
    assert len(health_latencies) >= 10
    # The refused waits started nothing: one download of the model in all.
    assert sum(emulator_control(emulator, "stats")["downloads_started"].values()) == 1


def test_zero_waiting_pulls_refuses_every_wait_and_starts_nothing(emulator):
    gpu = start_gpu_server(emulator.url, GPU_BRIDGE_MAX_WAITING_PULLS="0")
    try:
        r = requests.post(f"{gpu.url}/api/models/tinyllama", params={"wait": "true"}, headers=AUTH, timeout=10)
        assert r.status_code == 429 and r.json()["code"] == "too_many_waits"
        assert requests.get(f"{gpu.url}/api/jobs", headers=AUTH, timeout=10).json()["jobs"] == []
        r = requests.post(f"{gpu.url}/api/models/tinyllama", headers=AUTH, timeout=10)
        assert r.status_code == 202  # without wait, as usual
    finally:
        gpu.stop()
