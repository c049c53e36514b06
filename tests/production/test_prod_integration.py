"""Real processes: Ollama emulators, GPU servers under gunicorn (127.0.0.1 and 127.0.0.2) or NFS
workers on a temp share, the backend under gunicorn, the CLI as a subprocess. Every backend test runs
once per transport (``transport`` fixture: http, nfs)."""

from __future__ import annotations

import json
import time

import pytest
import requests
from conftest import run_cli
from prod_helpers import TOKEN, GpuSide, start_gunicorn_on

from gpu_bridge.backend.db import LATEST
from gpu_bridge.client.http import HttpTransport
from gpu_bridge.config import ClientSettings, GpuHost
from support.procs import emulator_control, free_port, wait_until

pytestmark = pytest.mark.integration


def get(backend, path, **kw):
    return requests.get(backend.url + path, timeout=kw.pop("timeout", 30), **kw)


def post(backend, path, body, **kw):
    return requests.post(backend.url + path, json=body, timeout=kw.pop("timeout", 60), **kw)


def follow(backend, pull_id: str, timeout: float = 30) -> dict:
    def done():
        status = get(backend, f"/config/pull-status/{pull_id}").json()
        return status if status["done"] else None

    return wait_until(done, timeout, 0.1, what=f"pull {pull_id} to finish")


# --- the shared stack ------------------------------------------------------------------------------------------
def test_listing_merges_models_across_hosts(gpu_side, backend):
    a, b = gpu_side.labels
    emulator_control(gpu_side.emulator("127.0.0.2"), "config", {"installed": ["llama3.2:latest", "smollm:135m"]})
    # The NFS worker refreshes models.json on its own schedule: wait for the change to show.
    body = wait_until(lambda: (r := get(backend, "/config/models").json()) and
                      any(m["name"] == "smollm:135m" for m in r["models"]) and r, 10, 0.1, what="listing")
    assert body["source"] == "gpu" and body["stale"] is False
    hosts = {m["name"]: m["hosts"] for m in body["models"]}
    assert hosts["llama3.2:latest"] == [a, b]
    assert hosts["smollm:135m"] == [b]
    assert hosts["qwen2.5:0.5b"] == [a]
    assert body["hosts"][a]["ok"] and body["hosts"][b]["ok"]


def test_pull_followed_to_completion_through_the_backend(gpu_side, backend):
    a, b = gpu_side.labels
    r = post(backend, "/config/pull-model", {"model": "tinyllama"}, headers={"X-Request-ID": "it-pull-1"})
    assert r.status_code == 202, r.text
    assert r.headers["X-Request-ID"] == "it-pull-1"
    started = r.json()
    assert set(started["results"]) == {a, b} and all(x["ok"] for x in started["results"].values())
    assert r.headers["Location"] == f"/config/pull-status/{started['id']}"
    final = follow(backend, started["id"])
    assert final["state"] == "succeeded" and final["percent"] == 100.0
    assert final["completed"] == final["total"] > 60_000_000
    assert all(x["job"]["state"] == "succeeded" for x in final["results"].values())
    listing = wait_until(lambda: (m := {x["name"]: x for x in get(backend, "/config/models").json()["models"]})
                         and "tinyllama:latest" in m and m, 10, 0.1, what="tinyllama listed")
    assert listing["tinyllama:latest"]["hosts"] == [a, b]
    audit = get(backend, "/config/audit").json()["entries"]
    assert audit[0]["action"] == "pull" and audit[0]["model"] == "tinyllama:latest"
    assert audit[0]["outcome"] == "ok" and audit[0]["request_id"] == "it-pull-1"
    if gpu_side.transport == "http":  # the request id reached the GPU hosts
        assert "it-pull-1" in gpu_side.servers["127.0.0.1"].output()


def test_delete_through_the_backend_and_not_found(gpu_side, backend):
    a, b = gpu_side.labels
    r = post(backend, "/config/delete-model", {"model": "qwen2.5:0.5b", "hosts": ["127.0.0.1"]})
    assert r.status_code == 200, r.text
    assert r.json()["results"] == {a: {"ok": True, "deleted": "qwen2.5:0.5b"}}
    r = post(backend, "/config/delete-model", {"model": "qwen2.5:0.5b", "hosts": [a]})
    assert r.status_code == 404
    assert r.json()["code"] == "model_not_found" and r.json()["hosts"] == [a]
    r = post(backend, "/config/delete-model", {"model": "never-installed"})
    assert r.status_code == 404
    assert r.json()["code"] == "model_not_found" and set(r.json()["hosts"]) == {a, b}


def test_backend_input_errors_are_json(gpu_side, backend):
    r = requests.post(backend.url + "/config/pull-model", data="{oops", timeout=10,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"
    r = post(backend, "/config/pull-model", {"model": "../../etc/passwd"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_model_name"
    r = post(backend, "/config/pull-model", {"model": "tinyllama", "hosts": ["gpu-99"]})
    assert r.status_code == 400 and "unknown GPU host 'gpu-99'" in r.json()["error"]
    r = requests.post(backend.url + "/config/pull-model", data=b"x" * 100_000, timeout=10)
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    r = get(backend, "/nope")
    assert r.status_code == 404 and r.headers["Content-Type"] == "application/json"


def test_cli_pull_shows_progress_lines_when_not_a_tty(gpu_side, backend):
    for emu in gpu_side.emulators:  # ~2.5 s per pull, so progress is visible
        emulator_control(emu, "config", {"pull_speed": 25e6})
    r = run_cli("models", "pull", "tinyllama", "--url", backend.url, timeout=90)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "\r" not in r.stdout
    progress = [line for line in lines if line.startswith("pulling tinyllama:latest:")]
    percents = [int(line.split(": ")[1].split("%")[0]) for line in progress if "% (" in line]
    # One line per ~10 % (a new layer's size can move the total, so the figure is not strictly monotonic).
    assert len(set(percents)) >= 3, r.stdout
    assert percents[-1] == 100 and len(progress) <= 25
    assert any("MB of " in line for line in progress)
    assert lines[-1] == f"pulled tinyllama:latest on {', '.join(gpu_side.labels)}"
    assert r.stderr == ""

    r = run_cli("models", "list", "--url", backend.url)
    assert r.returncode == 0
    row = next(line for line in r.stdout.splitlines() if line.startswith("tinyllama:latest"))
    assert ", ".join(gpu_side.labels) in row
    r = run_cli("models", "list", "--url", backend.url, "--json")
    assert any(m["name"] == "tinyllama:latest" for m in json.loads(r.stdout)["models"])

    r = run_cli("jobs", "--url", backend.url, "--json")
    pull_id = json.loads(r.stdout)["pulls"][0]["id"]
    r = run_cli("jobs", pull_id, "--url", backend.url)
    assert r.returncode == 0 and f"pull {pull_id} of tinyllama:latest: succeeded 100.0%" in r.stdout

    r = run_cli("health", "--url", backend.url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(f"backend {backend.url}: ok")


def test_cancel_a_running_pull_with_the_cli(gpu_side, backend):
    for emu in gpu_side.emulators:  # bytes stop moving for this model: the pull runs until cancelled
        emulator_control(emu, "config", {"stall": "smollm:135m"})
    r = post(backend, "/config/pull-model", {"model": "smollm:135m"})
    assert r.status_code == 202, r.text
    pull_id = r.json()["id"]
    wait_until(lambda: get(backend, f"/config/pull-status/{pull_id}").json()["state"] == "running", 10, 0.1,
               what="pull running")
    r = run_cli("jobs", pull_id, "--cancel", "--url", backend.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"pull {pull_id} of smollm:135m: cancelled")
    status = get(backend, f"/config/pull-status/{pull_id}").json()
    assert status["state"] == "cancelled" and status["done"] is True
    assert all(x["job"]["state"] == "cancelled" for x in status["results"].values())
    assert get(backend, "/config/audit").json()["entries"][0]["action"] == "cancel"


def test_cli_errors_are_one_line(gpu_side, backend):
    r = run_cli("models", "pull", "a b", "--url", backend.url)
    assert r.returncode == 1
    assert r.stderr.startswith("gpu-bridge: error: invalid model name") and r.stderr.count("\n") == 1
    r = run_cli("models", "delete", "never-installed", "--url", backend.url)
    assert r.returncode == 1 and r.stderr.startswith("gpu-bridge: error: deleting never-installed:latest failed")
    dead = f"http://127.0.0.1:{free_port()}"
    r = run_cli("models", "list", "--url", dead)
    assert r.returncode == 1
    assert r.stderr == (f"gpu-bridge: error: cannot reach the backend at {dead} (connection refused): is "
                        "gpu-bridge-backend.service running? (set --url or GPU_BRIDGE_URL)\n")


def test_backend_log_is_json_per_request_and_never_holds_tokens(gpu_side, backend):
    get(backend, "/config/models", headers={"X-Request-ID": "log-check-1"})
    lines = [json.loads(x) for x in backend.output().splitlines() if x.startswith("{")]
    entry = next(x for x in lines if x.get("request_id") == "log-check-1")
    assert entry["event"] == "request" and entry["path"] == "/config/models" and entry["status"] == 200
    assert TOKEN not in backend.output()


# --- failure cases (own backends) ------------------------------------------------------------------------------
def test_one_of_two_hosts_down_still_answers_and_names_it(gpu_side, backends):
    a = gpu_side.labels[0]
    dead_entry = gpu_side.dead_entry()
    dead = dead_entry if ":" in dead_entry else f"{dead_entry}:8001"
    backend = backends(gpu_side.backend_env([a, dead_entry]))
    started = time.monotonic()
    r = get(backend, "/config/models")
    assert time.monotonic() - started < 2
    body = r.json()
    assert r.status_code == 200 and body["source"] == "gpu"
    assert body["hosts"][a]["ok"] is True
    assert body["hosts"][dead]["ok"] is False and body["hosts"][dead]["code"] == "gpu_unreachable"
    assert dead in body["hosts"][dead]["error"]
    assert all(m["hosts"] == [a] for m in body["models"])
    r = post(backend, "/config/pull-model", {"model": "smollm:135m"})
    assert r.status_code == 202 and r.json()["partial"] is True
    assert r.json()["results"][dead]["ok"] is False
    health = get(backend, "/health").json()
    assert health["status"] == "degraded" and health["gpu_hosts"][dead]["ok"] is False
    assert health["transport"] == gpu_side.transport


def test_all_hosts_down_serves_the_cache_stale_within_a_second(transport, tmp_path, backends):
    side = GpuSide(transport, 2, tmp_path)
    try:
        backend = backends(side.backend_env())
        fresh = get(backend, "/config/models").json()
        assert fresh["source"] == "gpu"
        for name in side.names:
            side.stop_host(name)
        timings = []

        def stale():
            started = time.monotonic()
            body = get(backend, "/config/models").json()
            timings.append(time.monotonic() - started)
            return body if body.get("stale") else None

        body = wait_until(stale, 10, 0.05, what="stale listing")
        assert max(timings) < 1.0, timings
        assert body["source"] == "cache"
        assert [m["name"] for m in body["models"]] == [m["name"] for m in fresh["models"]]
        assert all(not h["ok"] for h in body["hosts"].values())
        started = time.monotonic()
        again = get(backend, "/config/models").json()
        assert time.monotonic() - started < 1.0 and again["stale"] is True
    finally:
        side.stop()


def test_slow_host_hits_the_timeout_and_says_so(gpu_side, backends):
    a, b = gpu_side.labels
    if gpu_side.transport == "http":
        env = gpu_side.backend_env(GPU_BRIDGE_READ_TIMEOUT="0.5", GPU_BRIDGE_RETRIES="1")
    else:
        env = gpu_side.backend_env(GPU_BRIDGE_NFS_COMMAND_TIMEOUT="0.5")
    backend = backends(env)
    emulator_control(gpu_side.emulator("127.0.0.2"), "config", {"latency_ms": 2000})
    try:
        started = time.monotonic()
        r = post(backend, "/config/delete-model", {"model": "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
                                                   "hosts": ["127.0.0.2"]})
        assert time.monotonic() - started < 1.8
        assert r.status_code == 504, r.text
        body = r.json()
        assert body["hosts"] == [b] and body["results"][b]["code"] == "gpu_timeout"
        assert "0.5 s" in body["error"] and b in body["error"]
        if gpu_side.transport == "http":
            listing = get(backend, "/config/models").json()  # GET: read retries, then classified once
            assert listing["hosts"][a]["ok"] is True
            assert listing["hosts"][b]["code"] == "gpu_timeout"
            assert "within 0.5 s (read timeout, GPU_BRIDGE_READ_TIMEOUT)" in listing["hosts"][b]["error"]
    finally:
        emulator_control(gpu_side.emulator("127.0.0.2"), "config", {"latency_ms": 0})


def test_breaker_opens_then_half_opens_and_closes(gpu_side, tmp_path, backends):
    a = gpu_side.labels[0]
    dead_entry = gpu_side.dead_entry()
    name = dead_entry.split(":")[0]
    dead = dead_entry if ":" in dead_entry else f"{dead_entry}:8001"
    backend = backends(gpu_side.backend_env([a, dead_entry], GPU_BRIDGE_BREAKER_THRESHOLD="2",
                                            GPU_BRIDGE_BREAKER_COOLDOWN="1"))
    for _ in range(2):
        assert get(backend, "/config/models").json()["hosts"][dead]["code"] == "gpu_unreachable"
    breaker = get(backend, "/health").json()["gpu_hosts"][dead]["breaker"]
    assert breaker["state"] == "open" and breaker["consecutive_failures"] == 2
    started = time.monotonic()
    body = get(backend, "/config/models").json()
    assert time.monotonic() - started < 0.5
    assert body["hosts"][dead]["code"] == "gpu_circuit_open"

    # Bring the host up; after the cool-down one trial call goes through and closes the breaker.
    side = gpu_side
    if side.transport == "http":
        port = int(dead_entry.split(":")[1])
        env = {"GPU_BRIDGE_OLLAMA_URL": side.emulators[0].url, "GPU_BRIDGE_API_TOKEN": TOKEN,
               "GPU_BRIDGE_RATE_LIMIT_PER_MINUTE": "0"}
        from prod_helpers import clean_env

        revived = start_gunicorn_on("gpu_bridge.gpu_server:create_app()", clean_env(**env), host=name, port=port,
                                    probe="/api/health", name="gpu-revived")
    else:
        side.start_host(name, emulator_url=side.emulators[0].url)
        revived = side.servers.pop(name)
    try:
        body = wait_until(lambda: (x := get(backend, "/config/models").json())["hosts"][dead]["ok"] and x,
                          10, 0.2, what="breaker to close")
        assert body["hosts"][dead]["ok"] is True
        assert get(backend, "/health").json()["gpu_hosts"][dead]["breaker"]["state"] == "closed"
    finally:
        revived.stop()


def test_wrong_token_is_surfaced_as_gpu_unauthorized(gpu_side, backends):
    if gpu_side.transport != "http":
        pytest.skip("the NFS channel has no token (the share's permissions are its access control)")
    backend = backends(gpu_side.backend_env(GPU_BRIDGE_API_TOKEN="not-the-token"))
    r = get(backend, "/config/models")
    assert r.status_code == 502
    body = r.json()
    assert body["code"] == "gpu_unauthorized"
    for label in gpu_side.labels:
        assert body["hosts"][label]["error"] == f"token rejected by {label}: GPU_BRIDGE_API_TOKEN must match the " \
                                                "GPU host's"
    assert "not-the-token" not in backend.output()


# --- transport-independent ---------------------------------------------------------------------------------------
@pytest.mark.postgres
def test_backend_on_postgresql_keeps_cache_and_audit(gpu_side, postgres, backends):
    if gpu_side.transport != "http":
        pytest.skip("database behaviour does not depend on the transport (covered with http)")
    url = postgres.create_database(f"gb_integration_{free_port()}")
    backend = backends(gpu_side.backend_env(GPU_BRIDGE_DATABASE_URL=url))
    assert get(backend, "/health").json()["db"] == {"ok": True, "dialect": "postgresql",
                                                         "schema_version": LATEST}
    assert get(backend, "/config/models").json()["source"] == "gpu"
    r = post(backend, "/config/pull-model", {"model": "smollm:135m", "wait": True})
    assert r.status_code == 200 and all(x["ok"] for x in r.json()["results"].values())
    backend.stop()
    # Same database, GPU hosts now refusing us: the cached list comes back from PostgreSQL, marked stale.
    again = backends(gpu_side.backend_env(GPU_BRIDGE_DATABASE_URL=url, GPU_BRIDGE_API_TOKEN="wrong"))
    body = get(again, "/config/models").json()
    assert body["stale"] is True and body["source"] == "cache"
    assert {m["name"] for m in body["models"]} >= {"llama3.2:latest", "qwen2.5:0.5b"}
    audit = get(again, "/config/audit").json()["entries"]
    assert audit[0]["action"] == "pull" and audit[0]["model"] == "smollm:135m" and audit[0]["outcome"] == "ok"


def test_cli_straight_to_a_gpu_server(gpu_side):
    if gpu_side.transport != "http":
        pytest.skip("a GPU server URL is an HTTP thing")
    gpu = gpu_side.servers["127.0.0.2"]
    emulator_control(gpu_side.emulator("127.0.0.2"), "config", {"pull_speed": 40e6})
    env = {"GPU_BRIDGE_API_TOKEN": TOKEN}
    r = run_cli("models", "list", "--url", gpu.url, env=env)
    assert r.returncode == 0 and "llama3.2:latest" in r.stdout
    r = run_cli("models", "pull", "smollm:135m", "--url", gpu.url, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f"pulled smollm:135m on 127.0.0.2:{gpu.port}"
    assert any("%" in line for line in r.stdout.splitlines()[:-1])
    r = run_cli("jobs", "--url", gpu.url, "--json", env=env)
    assert json.loads(r.stdout)["jobs"][0]["model"] == "smollm:135m"
    r = run_cli("models", "list", "--url", gpu.url, env={"GPU_BRIDGE_API_TOKEN": "wrong"})
    assert r.returncode == 1
    assert r.stderr == (f"gpu-bridge: error: token rejected by 127.0.0.2:{gpu.port}: GPU_BRIDGE_API_TOKEN must "
                        "match the GPU host's\n")
    r = run_cli("health", "--url", gpu.url, env=env)
    assert r.stdout.startswith(f"GPU server {gpu.url}: ")
    assert "ollama: reachable" in r.stdout


def test_http_transport_reuses_its_connection(gpu_side):
    if gpu_side.transport != "http":
        pytest.skip("HTTP connection reuse")
    gpu = gpu_side.servers["127.0.0.1"]
    host = GpuHost("127.0.0.1", gpu.port)
    t = HttpTransport(host, ClientSettings(hosts=(host,), api_token=TOKEN))
    try:
        for _ in range(5):
            t.list_models()
        pools = [t.session.get_adapter(t.base_url).poolmanager.pools[k]
                 for k in t.session.get_adapter(t.base_url).poolmanager.pools.keys()]
        assert len(pools) == 1
        assert pools[0].num_connections == 1 and pools[0].num_requests == 5
    finally:
        t.close()


def test_non_loopback_backend_without_admin_token_refuses_to_start(tmp_path):
    from prod_helpers import clean_env

    r = run_cli("serve-backend", "--bind", f"0.0.0.0:{free_port()}",
                env=clean_env(GPU_INSTANCE_HOSTS="127.0.0.1", GPU_BRIDGE_DATABASE_URL=f"sqlite:///{tmp_path}/x.db"),
                timeout=30)
    assert r.returncode == 1
    assert r.stderr.startswith("gpu-bridge: error: GPU_BRIDGE_BACKEND_BIND=0.0.0.0:") and "TOKEN_FILE" in r.stderr
