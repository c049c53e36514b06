"""Tokens never reach a log line: gunicorn processes as deployed (access log and error log on, our JSON
request log), authenticated and refused requests on both services, then every captured line is searched."""

from __future__ import annotations

import json

import pytest
import requests
from hostile_helpers import ADMIN_TOKEN, GPU_TOKEN, backend_config, gpu_config, gunicorn

from gpu_bridge.logs import CORE_FIELDS
from support.procs import emulator_control, wait_until

pytestmark = pytest.mark.integration

# Wrong tokens a caller might send: they could be real secrets of something else, so they must not be logged either.
NEAR_MISSES = [GPU_TOKEN + "x", GPU_TOKEN[:-1], ADMIN_TOKEN[::-1], "wrong-but-secret-5Fh2Kq9Z"]


def _fragments(secret: str, size: int = 12) -> set[str]:
    """The secret and every ``size``-character slice of it (a truncated token in a log is a leak too)."""
    return {secret} | {secret[i:i + size] for i in range(0, len(secret) - size + 1)}


def test_tokens_never_appear_in_logs(module_emulator, tmp_path):
    emulator_control(module_emulator, "reset")
    gpu = gunicorn("gpu_bridge.gpu_server:create_app()", gpu_config(module_emulator.url), probe="/api/health",
                   name="gpu-server")
    backend = None
    try:
        backend = gunicorn("gpu_bridge.backend:create_app()",
                           backend_config(f"127.0.0.1:{gpu.port}", tmp_path / "backend.db"),
                           probe="/api/openapi.json", name="backend")
        good_gpu = {"Authorization": f"Bearer {GPU_TOKEN}"}
        good_admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        s = requests.Session()

        # GPU server: authenticated calls...
        assert s.get(f"{gpu.url}/api/models", headers=good_gpu, timeout=10).status_code == 200
        r = s.post(f"{gpu.url}/api/models/tinyllama", headers=good_gpu, timeout=10)
        assert r.status_code == 202
        assert s.get(f"{gpu.url}/api/jobs/{r.json()['id']}", headers=good_gpu, timeout=10).status_code == 200
        assert s.delete(f"{gpu.url}/api/models/no-such-model", headers=good_gpu, timeout=10).status_code == 404
        assert s.get(f"{gpu.url}/metrics", headers=good_gpu, timeout=10).status_code == 200
        # ... and refused ones, with near-misses and the wrong service's token.
        for token in [*NEAR_MISSES, ADMIN_TOKEN]:
            for scheme in ("Bearer", "bearer", "Basic", ""):
                headers = {"Authorization": f"{scheme} {token}".strip()}
                assert s.get(f"{gpu.url}/api/models", headers=headers, timeout=10).status_code == 401
                assert s.post(f"{gpu.url}/api/models/x", headers=headers, timeout=10).status_code == 401

        # Backend: admin calls (which make it call the GPU server with the GPU token) and refused ones.
        r = s.post(f"{backend.url}/config/pull-model", json={"model": "smollm:135m"}, headers=good_admin, timeout=10)
        assert r.status_code == 202, r.text
        status_url = f"{backend.url}/config/pull-status/{r.json()['id']}"
        wait_until(lambda: s.get(status_url, timeout=10).json()["done"], 15, 0.05, what="pull to finish")
        r = s.post(f"{backend.url}/config/delete-model", json={"model": "smollm:135m"}, headers=good_admin,
                   timeout=10)
        assert r.status_code == 200, r.text
        assert s.get(f"{backend.url}/config/models", timeout=10).status_code == 200
        assert s.get(f"{backend.url}/health", timeout=10).status_code == 200
        for token in [*NEAR_MISSES, GPU_TOKEN]:
            headers = {"Authorization": f"Bearer {token}"}
            r = s.post(f"{backend.url}/config/pull-model", json={"model": "x"}, headers=headers, timeout=10)
            assert r.status_code == 401
        s.close()
    finally:
        if backend is not None:
            backend.graceful_stop()
        gpu.graceful_stop()

    logs = {"gpu-server": gpu.output(), "backend": backend.output()}
    # Not vacuous: the request lines, 401s included, are in the logs we search.
    assert '"status": 401' in logs["gpu-server"] and '"/api/models"' in logs["gpu-server"], logs["gpu-server"][-2000:]
    assert '"status": 401' in logs["backend"] and "/config/pull-model" in logs["backend"], logs["backend"][-2000:]
    # One format on both (gpu_bridge/logs.py): every line of ours starts with the same fields, the
    # service named; gunicorn's own lines (its access and error log) are the only other lines.
    for name, text in logs.items():
        ours = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert ours and all(list(entry)[:len(CORE_FIELDS)] == list(CORE_FIELDS) for entry in ours), ours[:3]
        assert {entry["process"] for entry in ours} == {name}
        assert any(entry["logger"] == "gpu_bridge.access" and entry["status"] == 401 for entry in ours)
    leaks = []
    for secret in [GPU_TOKEN, ADMIN_TOKEN, *NEAR_MISSES]:
        for name, text in logs.items():
            for number, line in enumerate(text.splitlines(), 1):
                found = [f for f in _fragments(secret) if f in line]
                if found:
                    leaks.append(f"{name} log line {number} contains {found[0]!r}: {line[:200]}")
    assert not leaks, "\n".join(leaks)
