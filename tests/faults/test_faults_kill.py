"""The GPU server killed with SIGKILL while the backend is under load, then started again.

Listings never answer 5xx (the cached list, ``stale: true``, while the host is down), the backend's
health names the dead host, a pull that was running on it ends with a clear error once the host is
back (it forgot the job), and fresh listings return within seconds of the restart.
"""

from __future__ import annotations

import time

import pytest
import requests
from fault_helpers import ListingLoad, measure_recovery, start_backend, start_gpu_server, tally

from support.procs import emulator_control, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(module_emulator, tmp_path):
    emulator_control(module_emulator, "reset")
    servers = {"gpu": start_gpu_server(module_emulator.url)}
    try:
        servers["backend"] = start_backend(f"127.0.0.1:{servers['gpu'].port}", tmp_path / "backend.db")
        yield module_emulator, servers
    finally:
        for server in servers.values():
            server.stop()
        emulator_control(module_emulator, "reset")


def test_gpu_server_sigkill_under_load(stack):
    emulator, servers = stack
    backend, gpu = servers["backend"], servers["gpu"]
    label = f"127.0.0.1:{gpu.port}"
    url = f"{backend.url}/config/models"
    t = tally("GPU server SIGKILL under load")
    session = requests.Session()

    measure_recovery(lambda: session.get(url, timeout=5).json()["source"] == "gpu")
    # A pull in flight on the host that will die (slow: ~10 s for tinyllama at 6 MB/s).
    emulator_control(emulator, "config", {"pull_speed": 6e6})
    r = session.post(f"{backend.url}/config/pull-model", json={"model": "tinyllama"}, timeout=10)
    assert r.status_code == 202, r.text
    pull_id = r.json()["id"]
    status_url = f"{backend.url}/config/pull-status/{pull_id}"
    wait_until(lambda: session.get(status_url, timeout=5).json()["completed"] > 0, 10, what="pull progress")

    load = ListingLoad(url, t, threads=3).start()
    try:
        wait_until(lambda: load.count(lambda a: a[2] == "gpu") >= 10, 10, what="fresh listings under load")
        killed_at = time.monotonic()
        gpu.kill()  # SIGKILL to gunicorn's whole process group
        wait_until(lambda: load.count(lambda a: a[0] > killed_at and a[2] == "cache") >= 10, 10,
                   what="stale listings while the host is down")

        health = session.get(f"{backend.url}/health", timeout=10)
        assert health.status_code == 200
        assert health.json()["status"] == "degraded" and health.json()["gpu_hosts"][label]["ok"] is False

        during = session.get(status_url, timeout=10)
        t.record(during)
        assert during.status_code == 200, during.text
        assert during.json()["state"] == "running"  # not finished: the host is only unreachable
        assert during.json()["results"][label]["ok"] is False and during.json()["results"][label]["code"]

        servers["gpu"] = gpu = start_gpu_server(emulator.url, port=gpu.port)  # same address, empty job table
        up_at = time.monotonic()
        wait_until(lambda: load.count(lambda a: a[0] > up_at and a[2] == "gpu") >= 1, 10,
                   what="a fresh listing after the restart")
        first_fresh = min(a[0] for a in load.answers if a[0] > up_at and a[2] == "gpu")
        t.recovery_s = first_fresh - up_at
        outage = up_at - killed_at
    finally:
        load.stop()

    # The restarted host forgot the job: the pull ends with a clear error instead of running forever.
    def pull_done():
        r = session.get(status_url, timeout=10)
        t.record(r)
        return r.json() if r.status_code == 200 and r.json()["done"] else None

    status = wait_until(pull_done, 10, 0.1, what="pull reported failed")
    session.close()
    job = status["results"][label]["job"]
    assert status["state"] == "failed"
    assert job["state"] == "failed" and job["error_code"] == "job_not_found" and job["error"], job

    stale = load.count(lambda a: a[2] == "cache")
    t.notes.append(f"host down {outage:.1f} s, {stale} stale answers; pull: {job['error_code']}")
    print(t.line())
    assert t.server_errors == 0 and t.transport_errors == 0, t.line()
    assert t.recovery_s < 5.0, t.line()
