"""What is in GPU memory, on the GPU server: /api/models/loaded, load and unload, against a real
Ollama emulator process whose VRAM model does the evicting, spilling and expiring (its clock is moved
forward with POST /_emulator/clock instead of sleeping). The metrics are read after scripted loads."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from gpu_server_helpers import AUTH, JOB_KEYS
from support.procs import emulator_control, wait_until

LOADED_KEYS = {"name", "model", "digest", "size", "size_vram", "cpu_spill", "context_length", "expires_at"}
STARTUP = "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"  # the emulator's newest model, loaded at start
QWEN = "qwen2.5:0.5b"


def loaded(client) -> dict[str, dict]:
    r = client.get("/api/models/loaded", headers=AUTH)
    assert r.status_code == 200, r.json
    return {m["name"]: m for m in r.json["models"]}


def load(client, name: str, body: dict | None = None, wait: bool = True):
    return client.post(f"/api/models/{name}/load" + ("?wait=true" if wait else ""), headers=AUTH, json=body)


def series(client, metric: str) -> dict[str, float]:
    text = client.get("/metrics", headers=AUTH).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf'^{metric}{{model="([^"]+)"}} (\S+)$', text, re.M)}


def test_loaded_lists_what_ollama_holds_with_the_documented_fields(client):
    models = loaded(client)
    assert list(models) == [STARTUP]
    entry = models[STARTUP]
    assert set(entry) == LOADED_KEYS
    assert entry["size_vram"] == entry["size"] > 0 and entry["cpu_spill"] is False
    assert entry["context_length"] == 4096 and len(entry["digest"]) == 64


def test_load_with_wait_answers_the_succeeded_load_job_and_the_model_is_resident(client, ollama):
    r = load(client, QWEN, {"keep_alive": "1h"})
    assert r.status_code == 200, r.json
    job = r.json
    assert JOB_KEYS <= set(job) and job["kind"] == "load" and job["keep_alive"] == 3600
    assert (job["state"], job["status"], job["model"]) == ("succeeded", "loaded", QWEN)
    assert r.headers["Location"] == f"/api/jobs/{job['id']}"
    entry = loaded(client)[QWEN]
    expires = datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", entry["expires_at"]))
    assert 3500 < (expires - datetime.now(UTC)).total_seconds() <= 3600
    assert emulator_control(ollama, "stats")["loads"] == 1


def test_load_without_wait_is_a_job_followed_under_api_jobs(client):
    r = load(client, QWEN, wait=False)
    assert r.status_code == 202 and r.json["kind"] == "load" and r.json["joined"] is False
    assert r.json["keep_alive"] is None  # Ollama's default

    def done():
        job = client.get(r.headers["Location"], headers=AUTH).json
        return job if job["state"] == "succeeded" else None

    wait_until(done, 10, what="load job succeeded")
    assert QWEN in loaded(client)
    # A load job is not a pull: health's pull counts and the pull metrics do not see it.
    assert client.get("/api/health").json["pulls"] == {"running": 0, "queued": 0}
    assert "gpu_bridge_pulls_finished_total{" not in client.get("/metrics", headers=AUTH).text


def test_unload_frees_the_model_and_unloading_again_is_no_error(client, ollama):
    for _ in range(2):
        r = client.post(f"/api/models/{STARTUP}/unload", headers=AUTH)
        assert (r.status_code, r.json) == (200, {"unloaded": STARTUP})
    assert loaded(client) == {}
    assert emulator_control(ollama, "stats")["unloads"] == 1


def test_keep_alive_expiry_on_the_emulator_clock(client, ollama):
    assert load(client, QWEN, {"keep_alive": "1m"}).status_code == 200
    emulator_control(ollama, "clock", {"advance": 59})
    assert QWEN in loaded(client)
    emulator_control(ollama, "clock", {"advance": 2})
    assert QWEN not in loaded(client)
    assert QWEN in emulator_control(ollama, "stats")["expired"]


def test_forever_stays_loaded_past_any_default(client, ollama):
    assert load(client, QWEN, {"keep_alive": "forever"}).json["keep_alive"] == -1
    emulator_control(ollama, "clock", {"advance": 10 * 365 * 24 * 3600})
    assert QWEN in loaded(client) and STARTUP not in loaded(client)  # the startup model's 5 minutes ran out


def test_a_load_that_does_not_fit_evicts_the_least_recently_used(client, ollama):
    # Room for one of the two (~620 MB each with the load overhead), not both.
    emulator_control(ollama, "config", {"vram_bytes": 1_000_000_000})
    assert load(client, QWEN).status_code == 200
    assert list(loaded(client)) == [QWEN]
    assert emulator_control(ollama, "stats")["evicted"] == [STARTUP]


def test_a_model_larger_than_the_vram_spills_to_system_memory(client, ollama):
    emulator_control(ollama, "config", {"vram_bytes": 300_000_000})
    assert load(client, QWEN).status_code == 200
    entry = loaded(client)[QWEN]
    assert entry["size_vram"] == 300_000_000 < entry["size"] and entry["cpu_spill"] is True


@pytest.mark.parametrize(("name", "body", "status", "code"), [
    ("tinyllama:latest", None, 404, "model_not_found"),  # in the registry, not installed: a load never pulls
    ("llama3:", None, 400, "invalid_model_name"),
    (QWEN, {"keep_alive": "10"}, 400, "invalid_request"),
    (QWEN, {"keep_alive": 0}, 400, "invalid_request"),
    (QWEN, {"keep_alive": "2000000h"}, 400, "invalid_request"),
    (QWEN, {"keep_alive": True}, 400, "invalid_request"),
    (QWEN, {"keep_alive": "1h", "pin": True}, 400, "invalid_request"),
    (QWEN, [1], 400, "invalid_request"),
])
def test_refused_loads_start_no_job(client, ollama, name, body, status, code):
    r = load(client, name, body)
    assert (r.status_code, r.json["code"]) == (status, code), r.json
    assert client.get("/api/jobs", headers=AUTH).json["jobs"] == []
    assert emulator_control(ollama, "stats")["loads"] == 0


def test_a_load_body_must_be_json(client):
    r = client.post(f"/api/models/{QWEN}/load", headers=AUTH, data="keep_alive=1h",
                    content_type="application/x-www-form-urlencoded")
    assert (r.status_code, r.json["code"]) == (415, "unsupported_media_type")


def test_unload_of_a_model_that_is_not_installed_is_404(client):
    r = client.post("/api/models/tinyllama:latest/unload", headers=AUTH)
    assert (r.status_code, r.json["code"]) == (404, "model_not_found")


def test_an_embedding_only_model_fails_its_load_with_a_clear_400(client, ollama):
    emulator_control(ollama, "config", {"installed": ["nomic-embed-text:latest"]})
    r = load(client, "nomic-embed-text")
    assert (r.status_code, r.json["code"]) == (400, "invalid_request")
    assert "embedding-only" in r.json["error"] and r.json["job"]["state"] == "failed"


def test_a_slow_load_can_be_cancelled_and_then_not_again(client, ollama):
    emulator_control(ollama, "config", {"load_seconds": 30})
    job = load(client, QWEN, wait=False).json
    r = client.delete(f"/api/jobs/{job['id']}", headers=AUTH)
    assert (r.status_code, r.json["state"], r.json["error_code"]) == (200, "cancelled", "cancelled")
    assert client.delete(f"/api/jobs/{job['id']}", headers=AUTH).status_code == 409
    assert QWEN not in loaded(client)


def test_metrics_follow_loads_spill_and_unloads(client, ollama):
    emulator_control(ollama, "config", {"vram_bytes": 1_000_000_000})
    assert load(client, QWEN).status_code == 200
    entry = loaded(client)[QWEN]

    def scraped():
        return series(client, "gpu_bridge_model_loaded") == {QWEN: 1.0}

    wait_until(scraped, 5, 0.1, what="metrics show qwen alone (their cache is 2 s)")
    assert series(client, "gpu_bridge_model_vram_bytes") == {QWEN: float(entry["size_vram"])}
    assert series(client, "gpu_bridge_model_cpu_spill") == {QWEN: 0.0}
    assert client.post(f"/api/models/{QWEN}/unload", headers=AUTH).status_code == 200
    wait_until(lambda: series(client, "gpu_bridge_model_loaded") == {}, 5, 0.1, what="the unloaded model's series gone")
    assert series(client, "gpu_bridge_model_vram_bytes") == {} == series(client, "gpu_bridge_model_cpu_spill")
    emulator_control(ollama, "config", {"vram_bytes": 300_000_000})
    assert load(client, QWEN).status_code == 200
    wait_until(lambda: series(client, "gpu_bridge_model_cpu_spill") == {QWEN: 1.0}, 5, 0.1, what="spill metric")
    assert series(client, "gpu_bridge_model_vram_bytes") == {QWEN: 300_000_000.0}


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("DELETE", f"/api/models/{QWEN}/load", "POST, OPTIONS"),  # not a delete of a model named "qwen2.5:0.5b/load"
    ("GET", f"/api/models/{QWEN}/unload", "POST, OPTIONS"),
    ("POST", "/api/models/loaded", "GET, HEAD, OPTIONS"),  # a model named "loaded" is pulled as loaded:latest
])
def test_the_loaded_routes_refuse_other_methods_and_advertise_their_own(client, ollama, method, path, allow):
    r = client.open(path, method=method, headers=AUTH)
    assert (r.status_code, r.json["code"], r.headers["Allow"]) == (405, "method_not_allowed", allow)
    assert client.options(path, headers=AUTH).headers["Allow"] == allow
    assert emulator_control(ollama, "stats")["pulls"] == 0


def test_a_null_keep_alive_is_refused_rather_than_taken_for_the_default(client):
    r = load(client, QWEN, {"keep_alive": None})
    assert (r.status_code, r.json["code"]) == (400, "invalid_request") and "leave it out" in r.json["error"]
