"""What is in GPU memory across the fleet, through a real backend in front of two real GPU hosts (over
HTTP and over NFS): /config/loaded with a host down, /config/load-model and /config/unload-model, and
`gpu-bridge models ps|load|unload` as a subprocess (output and exit codes)."""

from __future__ import annotations

import json

import pytest
import requests
from conftest import run_cli
from prod_helpers import TOKEN

from support.procs import emulator_control

pytestmark = pytest.mark.integration

STARTUP = "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"  # each emulator's model loaded at start
QWEN = "qwen2.5:0.5b"


def get(backend, path):
    return requests.get(backend.url + path, timeout=30)


def post(backend, path, body):
    return requests.post(backend.url + path, json=body, timeout=120)


def by_host(body: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in body["models"]:
        out.setdefault(m["host"], []).append(m["name"])
    return out


def test_loaded_is_aggregated_over_the_fleet_and_follows_load_and_unload(gpu_side, backend):
    a, b = gpu_side.labels
    body = get(backend, "/config/loaded").json()
    assert body["source"] == "gpu" and body["stale"] is False and set(body["hosts"]) == {a, b}
    assert by_host(body) == {a: [STARTUP], b: [STARTUP]}
    assert {"host", "name", "size", "size_vram", "cpu_spill", "context_length", "expires_at"} <= set(body["models"][0])

    r = post(backend, "/config/load-model", {"model": "qwen2.5:0.5b", "keep_alive": "1h", "hosts": [b]})
    assert r.status_code == 200, r.json()
    assert r.json()["keep_alive"] == 3600 and list(r.json()["results"]) == [b]
    job = r.json()["results"][b]["job"]
    assert (job["kind"], job["state"]) == ("load", "succeeded")
    assert by_host(get(backend, "/config/loaded").json()) == {a: [STARTUP], b: sorted([STARTUP, QWEN])}

    r = post(backend, "/config/unload-model", {"model": STARTUP})
    assert r.status_code == 200 and {lbl: res["unloaded"] for lbl, res in r.json()["results"].items()} == {
        a: STARTUP, b: STARTUP}
    assert by_host(get(backend, "/config/loaded").json()) == {b: [QWEN]}
    actions = [e["action"] for e in get(backend, "/config/audit").json()["entries"][:2]]
    assert actions == ["unload", "load"]


def test_load_refusals_have_the_pull_and_delete_shapes(gpu_side, backend):
    r = post(backend, "/config/load-model", {"model": QWEN, "keep_alive": "10"})
    assert (r.status_code, r.json()["code"]) == (400, "invalid_request") and "has no unit" in r.json()["error"]
    r = post(backend, "/config/load-model", {"model": "tinyllama:latest"})
    assert (r.status_code, r.json()["code"]) == (404, "model_not_found")
    assert set(r.json()["hosts"]) == set(gpu_side.labels) and "not installed" in r.json()["error"]
    r = post(backend, "/config/unload-model", {"model": QWEN, "hosts": ["no-such-host"]})
    assert (r.status_code, r.json()["code"]) == (400, "invalid_request")
    for emu in gpu_side.emulators:
        assert emulator_control(emu, "stats")["loads"] == 0


def test_one_host_down_the_loaded_view_keeps_its_last_answer_marked_stale(gpu_side, backends):
    a, b = gpu_side.labels
    backend = backends(gpu_side.backend_env())
    assert by_host(get(backend, "/config/loaded").json()) == {a: [STARTUP], b: [STARTUP]}
    gpu_side.stop_host("127.0.0.2")
    try:
        r = get(backend, "/config/loaded")
        body = r.json()
        assert r.status_code == 200 and body["stale"] is True and body["source"] == "gpu"
        assert body["hosts"][a]["ok"] is True
        assert body["hosts"][b]["ok"] is False and body["hosts"][b]["stale"] is True
        assert body["hosts"][b]["age_s"] >= 0 and body["hosts"][b]["cached_at"]
        assert [(m["host"], m.get("stale", False)) for m in body["models"]] == [(a, False), (b, True)]
        r = post(backend, "/config/load-model", {"model": QWEN})
        assert r.status_code == 200 and r.json()["partial"] is True and r.json()["results"][b]["ok"] is False
        r = run_cli("models", "ps", "--url", backend.url)
        assert r.returncode == 0 and "warning" in r.stderr and "last answer" in r.stderr
    finally:
        gpu_side.start_host("127.0.0.2")


def test_a_host_that_never_answered_has_no_entries_and_all_down_is_an_error(gpu_side, backends):
    a = gpu_side.labels[0]
    dead_entry = gpu_side.dead_entry()
    dead = dead_entry if ":" in dead_entry else f"{dead_entry}:8001"
    body = get(backends(gpu_side.backend_env([a, dead_entry])), "/config/loaded").json()
    assert body["stale"] is True and body["hosts"][dead]["code"] == "gpu_unreachable"
    assert {m["host"] for m in body["models"]} == {a}
    r = get(backends(gpu_side.backend_env([dead_entry])), "/config/loaded")
    assert r.status_code == 503 and r.json()["code"] == "gpu_unreachable" and dead in r.json()["error"]


def test_cli_models_ps_load_unload_through_the_backend(gpu_side, backend):
    a, b = gpu_side.labels
    r = run_cli("models", "load", QWEN, "--keep-alive", "forever", "--host", a, "--url", backend.url)
    assert (r.returncode, r.stdout) == (0, f"loaded {QWEN} on {a} (keep_alive forever)\n"), r.stderr
    r = run_cli("models", "ps", "--url", backend.url)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["HOST", "NAME", "SIZE", "VRAM", "SPILL", "CONTEXT", "EXPIRES", "(UTC)"]
    qwen = next(line for line in lines if QWEN in line).split()
    assert qwen[0] == a and qwen[-1] == "forever" and qwen[-2] == "4096" and qwen[-3] == "-"
    r = run_cli("models", "ps", "--json", "--url", backend.url)
    assert {(m["host"], m["name"]) for m in json.loads(r.stdout)["models"]} == {(a, STARTUP), (a, QWEN), (b, STARTUP)}
    r = run_cli("models", "unload", QWEN, "--url", backend.url)
    assert (r.returncode, r.stdout) == (0, f"unloaded {QWEN} on {a}, {b}\n"), r.stderr


def test_cli_load_errors_are_one_line_with_exit_1(gpu_side, backend):
    r = run_cli("models", "load", QWEN, "--keep-alive", "10x", "--url", backend.url)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("gpu-bridge: error: --keep-alive '10x' is not a duration")
    r = run_cli("models", "load", "tinyllama", "--url", backend.url)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("gpu-bridge: error: loading tinyllama:latest failed on every GPU host")
    r = run_cli("models", "unload", "tinyllama", "--url", backend.url)
    assert r.returncode == 1 and "not installed" in r.stderr and r.stderr.count("\n") == 1


def test_cli_spill_shows_the_share_in_system_memory(gpu_side, backend):
    a = gpu_side.labels[0]
    emulator_control(gpu_side.emulator("127.0.0.1"), "config", {"vram_bytes": 300_000_000})
    r = run_cli("models", "load", QWEN, "--host", a, "--url", backend.url)
    assert r.returncode == 0, r.stderr
    row = next(line for line in run_cli("models", "ps", "--url", backend.url).stdout.splitlines() if QWEN in line)
    assert "53% CPU" in row and "300.0 MB" in row


def test_cli_straight_to_a_gpu_server(gpu_side):
    if gpu_side.transport != "http":
        pytest.skip("a GPU server URL is an HTTP thing")
    gpu = gpu_side.servers["127.0.0.2"]
    env = {"GPU_BRIDGE_API_TOKEN": TOKEN}
    r = run_cli("models", "load", QWEN, "--keep-alive", "90", "--url", gpu.url, env=env)
    assert (r.returncode, r.stdout) == (0, f"loaded {QWEN} on 127.0.0.2:{gpu.port} (keep_alive 1m30s)\n"), r.stderr
    r = run_cli("models", "ps", "--url", gpu.url, env=env)
    assert r.stdout.splitlines()[0].split()[:2] == ["NAME", "SIZE"] and QWEN in r.stdout
    r = run_cli("models", "load", QWEN, "--host", "x", "--url", gpu.url, env=env)
    assert (r.returncode, r.stderr) == (1, "gpu-bridge: error: --host only works through a backend (this URL is a "
                                           "GPU server)\n")
    r = run_cli("models", "unload", QWEN, "--url", gpu.url, env=env)
    assert (r.returncode, r.stdout) == (0, f"unloaded {QWEN} on 127.0.0.2:{gpu.port}\n")
