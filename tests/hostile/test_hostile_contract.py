"""The published API contract, checked the way a user of the API would: ``st run --checks all``
(every schemathesis check, all phases including the stateful one) against the live processes:
the Ollama emulator, the GPU server under gunicorn, the backend under gunicorn in front of it.

0 failures are allowed. The accepted exceptions are listed, with their reasons, in
tests/contract/schemathesis.toml and nowhere else.

CI runs a fixed seed. Another seed and more examples, e.g. a random seed and 500 examples:

    CONTRACT_SEED=random CONTRACT_EXAMPLES=500 scripts/test -- tests/hostile/test_hostile_contract.py -s
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from pathlib import Path

import pytest
from hostile_helpers import ADMIN_TOKEN, GPU_TOKEN, backend_config, gpu_config

from support.procs import VENV_BIN, QuickStopProcess, emulator_control, free_port

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).resolve().parents[1] / "contract" / "schemathesis.toml"
EXAMPLES = int(os.environ.get("CONTRACT_EXAMPLES", "100"))
_SEED = os.environ.get("CONTRACT_SEED", "20261129")
SEED = random.randrange(2**31) if _SEED == "random" else int(_SEED)


def _gunicorn(app: str, env: dict, probe: str, name: str) -> QuickStopProcess:
    """As deployed: one gthread worker process; request lines up to gunicorn's maximum (8190), so a
    percent-encoded over-long name reaches the app (a JSON 400) instead of gunicorn's HTML 414."""
    port = free_port()
    argv = [str(VENV_BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "1", "--worker-class", "gthread",
            "--threads", "8", "--limit-request-line", "8190", "--no-control-socket", app]
    return QuickStopProcess(argv, port, env=env, probe=probe, name=name).start()


@pytest.fixture(scope="module")
def live(module_emulator, tmp_path_factory):
    emulator_control(module_emulator, "reset")
    emulator_control(module_emulator, "config", {"pull_speed": 5e9, "verify_seconds": 0})
    gpu = _gunicorn("gpu_bridge.gpu_server:create_app()", gpu_config(module_emulator.url), "/api/health", "gpu")
    backend = None
    try:
        backend = _gunicorn("gpu_bridge.backend:create_app()",
                            backend_config(f"127.0.0.1:{gpu.port}", tmp_path_factory.mktemp("contract") / "b.db",
                                           bind="127.0.0.1:8000"), "/health", "backend")
        yield gpu, backend
    finally:
        if backend is not None:
            backend.stop()
        gpu.stop()


def _st_run(url: str, token: str, tmp_path: Path) -> tuple[int, str]:
    argv = [str(VENV_BIN / "st"), "--no-color", "--config-file", str(CONFIG), "run", f"{url}/api/openapi.json",
            # Every check runs by default; naming them with --checks would override the config file's
            # accepted exceptions (CLI options take precedence over it, the stateful phase included).
            "--max-examples", str(EXAMPLES), "--seed", str(SEED),
            "--header", f"Authorization: Bearer {token}", "--request-timeout", "30",
            "--report", "junit", "--report-dir", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("service", ["gpu", "backend"])
def test_st_run_all_checks_against_the_live_server_finds_nothing(live, service, tmp_path):
    gpu, backend = live
    url, token = (gpu.url, GPU_TOKEN) if service == "gpu" else (backend.url, ADMIN_TOKEN)
    rc, out = _st_run(url, token, tmp_path)
    summary = out[out.rfind("SUMMARY"):] if "SUMMARY" in out else out[-3000:]
    print(f"\n{service}: st run --checks all --max-examples {EXAMPLES} --seed {SEED}\n{summary}")
    assert rc == 0, f"st run found failures (seed {SEED}):\n{out[-12000:]}"
    # Every phase ran (a phase that was skipped would hide its failures), the stateful one included.
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert re.search(rf"✅ {phase}", out), (phase, summary)
    generated = re.search(r"(\d+) generated, (\d+) passed", out)
    assert generated and int(generated.group(1)) > 100, summary
