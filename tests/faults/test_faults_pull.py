"""Ollama failing in the middle of a pull: stopped (SIGKILL / SIGTERM), or out of disk space.

backend (gunicorn) ─► GPU server (gunicorn) ─► Ollama emulator (its own process, restartable)

The pull ends ``failed`` with a clear error (code and message), the backend's pull status and
listings never answer 5xx meanwhile, and once Ollama is back a new pull succeeds.
"""

from __future__ import annotations

import signal
import time

import pytest
import requests
from fault_helpers import GPU_TOKEN, Tally, get, measure_recovery, start_backend, start_gpu_server, tally

from support.procs import emulator_control, free_port, start_emulator, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(tmp_path):
    """A fresh emulator on a fixed port (so it can be restarted there), a GPU server and a backend."""
    procs = {"ollama": start_emulator(port=free_port())}
    try:
        procs["gpu"] = start_gpu_server(procs["ollama"].url, GPU_BRIDGE_PULL_STALL_TIMEOUT="5")
        procs["backend"] = start_backend(f"127.0.0.1:{procs['gpu'].port}", tmp_path / "backend.db")
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def _pull(session: requests.Session, backend_url: str, model: str, t: Tally) -> str:
    r = session.post(f"{backend_url}/config/pull-model", json={"model": model}, timeout=10)
    t.record(r)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _status(session: requests.Session, backend_url: str, pull_id: str, t: Tally) -> dict:
    r = get(session, f"{backend_url}/config/pull-status/{pull_id}", t)
    assert r is not None and r.status_code == 200, None if r is None else r.text
    return r.json()


def _wait_done(session, backend_url, pull_id, t, timeout=15.0) -> dict:
    def done():
        status = _status(session, backend_url, pull_id, t)
        return status if status["done"] else None

    return wait_until(done, timeout, 0.02, what=f"pull {pull_id} to finish")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_ollama_stopped_mid_pull(stack, sig):
    ollama, backend = stack["ollama"], stack["backend"]
    label = f"127.0.0.1:{stack['gpu'].port}"
    t = tally(f"Ollama {sig.name} mid-pull")
    session = requests.Session()
    measure_recovery(lambda: get(session, f"{backend.url}/config/models", t).json()["source"] == "gpu")
    emulator_control(ollama, "config", {"pull_speed": 20e6})  # phi3:mini, 229 MB: ~11 s if left alone
    pull_id = _pull(session, backend.url, "phi3:mini", t)
    wait_until(lambda: _status(session, backend.url, pull_id, t)["completed"] > 10_000_000, 10, 0.02,
               what="pull progress")

    stopped_at = time.monotonic()
    ollama.signal(sig)
    ollama.proc.wait(10)
    status = _wait_done(session, backend.url, pull_id, t)
    detected = time.monotonic() - stopped_at
    job = status["results"][label]["job"]
    assert status["state"] == "failed" and job["state"] == "failed", status
    assert job["error_code"] in ("ollama_error", "ollama_unavailable"), job
    assert "Ollama" in job["error"] or "ollama" in job["error"], job["error"]
    assert job["completed"] > 10_000_000, job  # progress up to the failure is kept

    # While Ollama is down, listings come from the cache (200, stale) and never 5xx.
    r = get(session, f"{backend.url}/config/models", t)
    assert r.status_code == 200 and r.json()["stale"] is True, r.text

    # Ollama back on the same address: a new pull of the same model succeeds.
    stack["ollama"] = start_emulator("--pull-speed", "2e9", port=ollama.port)
    up_at = time.monotonic()
    measure_recovery(lambda: get(session, f"{backend.url}/config/models", t).json()["source"] == "gpu")
    t.recovery_s = time.monotonic() - up_at
    again = _wait_done(session, backend.url, _pull(session, backend.url, "phi3:mini", t), t)
    session.close()
    assert again["state"] == "succeeded", again

    t.notes.append(f"failure reported {detected:.2f} s after the stop: {job['error_code']}: {job['error'][:90]}")
    print(t.line())
    assert t.server_errors == 0 and t.transport_errors == 0, t.line()
    assert detected < 5.0


def test_no_space_left_on_device_mid_pull(stack):
    ollama, backend, gpu = stack["ollama"], stack["backend"], stack["gpu"]
    label = f"127.0.0.1:{gpu.port}"
    t = tally("Ollama 'no space left' mid-pull")
    limit = 40_000_000
    emulator_control(ollama, "config", {"pull_speed": 80e6, "fail_after_bytes": limit})
    session = requests.Session()

    pull_id = _pull(session, backend.url, "nomic-embed-text", t)
    status = _wait_done(session, backend.url, pull_id, t)
    job = status["results"][label]["job"]
    assert status["state"] == "failed", status
    assert job["state"] == "failed" and job["error_code"] == "insufficient_storage", job
    assert "no space left on device" in job["error"], job["error"]
    assert 0 < job["completed"] <= limit, job

    # The GPU server's own answer for a waiting pull: 507 with the failed job in the body.
    r = requests.post(f"{gpu.url}/api/models/nomic-embed-text?wait=true",
                      headers={"Authorization": f"Bearer {GPU_TOKEN}"}, timeout=20)
    t.record(r)
    assert r.status_code == 507, r.text
    assert r.json()["code"] == "insufficient_storage" and r.json()["job"]["state"] == "failed"

    # Space freed: the next pull resumes and succeeds.
    emulator_control(ollama, "config", {"fail_after_bytes": None, "pull_speed": 2e9})
    freed_at = time.monotonic()
    again = _wait_done(session, backend.url, _pull(session, backend.url, "nomic-embed-text", t), t)
    t.recovery_s = time.monotonic() - freed_at
    session.close()
    assert again["state"] == "succeeded", again

    t.notes.append(f"{job['error_code']}: {job['error'][:90]}")
    print(t.line())
    # 507 is the intended answer of the waiting pull above; nothing else may be a 5xx.
    assert t.server_errors == 1 and t.statuses.get(507) == 1 and t.transport_errors == 0, t.line()
