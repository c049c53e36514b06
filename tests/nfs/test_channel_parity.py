"""One behaviour table, two front doors: the GPU server's HTTP routes and the NFS worker's spool
commands must give the same outcome (and the same error code) for the same operation, because both
are thin layers over one ``GpuService`` (gpu_service.py).

HTTP: the real GPU server app on Flask's test client. NFS: a real ``gpu-bridge nfs-worker`` process,
fed raw spool commands (no production-side transport, whose own checks would answer before the worker
is asked). Each channel has its own Ollama emulator, reset before every row, and the same settings: the
allow-list is narrowed to ``registry.ollama.ai``, so the emulator's installed ``hf.co/...`` model comes
from a registry that is no longer allowed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from gpu_bridge import spool
from gpu_bridge.gpu_server import create_app
from support.procs import emulator_control, start_emulator, wait_until

pytestmark = pytest.mark.integration

HOST = "gpu-parity"
TOKEN = "parity-token-0123456789"
OUTSIDE = "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"  # installed in the emulator, registry not allowed
SETTINGS = {"GPU_BRIDGE_ALLOWED_REGISTRIES": "registry.ollama.ai", "GPU_BRIDGE_MIN_FREE_GB": "0"}
SLOW_PULLS = {"pull_speed": 1e6}  # tinyllama (~64 MB) takes about a minute: still running when cancelled


@dataclass
class Outcome:
    ok: bool
    code: str | None  # the error code; None on success
    result: dict[str, Any]  # the success body, or the error body


class HttpChannel:
    name = "http"

    def __init__(self, client) -> None:
        self.client = client

    def call(self, op: str, **args: str) -> Outcome:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        model = quote(args.get("model", ""), safe="/:")
        job_id = quote(args.get("job_id", ""), safe="")
        method, path = {"list": ("GET", "/api/models"), "pull": ("POST", f"/api/models/{model}"),
                        "delete": ("DELETE", f"/api/models/{model}"), "job": ("GET", f"/api/jobs/{job_id}"),
                        "cancel": ("DELETE", f"/api/jobs/{job_id}"), "health": ("GET", "/api/health"),
                        "copy": ("POST", "/api/copy"), "loaded": ("GET", "/api/models/loaded"),
                        "load": ("POST", f"/api/models/{model}/load"),
                        "unload": ("POST", f"/api/models/{model}/unload")}[op]
        if op == "copy":  # the one operation with a JSON body
            response = self.client.post("/api/copy", headers=auth, json=args)
        elif op == "load":  # keep_alive travels in the body
            body = {"keep_alive": args["keep_alive"]} if "keep_alive" in args else None
            response = self.client.post(path, headers=auth, json=body)
        else:
            response = self.client.open(path, method=method, headers=auth)
        body = response.get_json()
        assert isinstance(body, dict), (op, response.status_code, response.data[:300])
        if response.status_code < 400:
            return Outcome(True, None, body)
        return Outcome(False, body["code"], body)


class NfsChannel:
    name = "nfs"

    def __init__(self, paths: spool.HostPaths) -> None:
        self.paths = paths

    def call(self, op: str, **args: str) -> Outcome:
        command = spool.make_command(HOST, op, args, timeout=15)
        spool.send_command(self.paths, command)
        answer = spool.wait_answer(self.paths, command["id"], time.monotonic() + 15)
        assert answer is not None, f"no answer to {op} {args}"
        if answer["ok"]:
            return Outcome(True, None, answer["result"])
        return Outcome(False, answer["error"]["code"], answer["error"])


@pytest.fixture(scope="module")
def emulators():
    procs = {"http": start_emulator(), "nfs": start_emulator()}
    yield procs
    for proc in procs.values():
        proc.stop()


@pytest.fixture
def channels(emulators, tmp_path, workers):
    for proc in emulators.values():
        emulator_control(proc, "reset")
    app = create_app({"GPU_BRIDGE_API_TOKEN": TOKEN, "GPU_BRIDGE_OLLAMA_URL": emulators["http"].url,
                      "GPU_BRIDGE_RATE_LIMIT_PER_MINUTE": "0", **SETTINGS})
    app.testing = True
    root = tmp_path / "share"
    root.mkdir()
    assert spool.init_share(str(root)) is True
    worker = workers(root, HOST, emulators["nfs"].url, **SETTINGS)
    yield {"http": HttpChannel(app.test_client()), "nfs": NfsChannel(worker.paths)}
    app.extensions["gpu_bridge"].close()


def both(channels, op: str, **args: str) -> dict[str, Outcome]:
    return {name: channel.call(op, **args) for name, channel in channels.items()}


def assert_same(outcomes: dict[str, Outcome], ok: bool, code: str | None) -> None:
    got = {name: (o.ok, o.code) for name, o in outcomes.items()}
    assert got == {"http": (ok, code), "nfs": (ok, code)}, {n: o.result for n, o in outcomes.items()}


# --- the table: operation, arguments, expected outcome (same on both channels) -------------------
ROWS = [
    ("pull of a name outside the allow-list", "pull", {"model": OUTSIDE}, False, "registry_not_allowed"),
    ("pull of a name the grammar refuses", "pull", {"model": "llama3:"}, False, "invalid_model_name"),
    ("pull of a name with '..'", "pull", {"model": "a..b"}, False, "invalid_model_name"),
    ("delete of a model Ollama does not have", "delete", {"model": "nosuchmodel:latest"}, False, "model_not_found"),
    ("delete of a name the grammar refuses", "delete", {"model": "llama3:"}, False, "invalid_model_name"),
    ("job of an unknown id", "job", {"job_id": "no-such-job"}, False, "job_not_found"),
    ("cancel of an unknown id", "cancel", {"job_id": "no-such-job"}, False, "job_not_found"),
    ("copy of a model Ollama does not have", "copy", {"source": "nosuchmodel:latest", "destination": "x:kept"},
     False, "model_not_found"),
    ("copy to a name the grammar refuses", "copy", {"source": "llama3.2:latest", "destination": "x:"},
     False, "invalid_model_name"),
    ("load of a model that is not installed", "load", {"model": "tinyllama:latest"}, False, "model_not_found"),
    ("load of a name the grammar refuses", "load", {"model": "llama3:"}, False, "invalid_model_name"),
    ("load with a keep_alive without unit", "load", {"model": "llama3.2:latest", "keep_alive": "10"},
     False, "invalid_request"),
    ("load with a zero keep_alive", "load", {"model": "llama3.2:latest", "keep_alive": "0s"}, False, "invalid_request"),
    ("load with a keep_alive over a year", "load", {"model": "llama3.2:latest", "keep_alive": "9000h"},
     False, "invalid_request"),
    ("unload of a model that is not installed", "unload", {"model": "tinyllama:latest"}, False, "model_not_found"),
    ("unload of a name the grammar refuses", "unload", {"model": "llama3:"}, False, "invalid_model_name"),
]


@pytest.mark.parametrize(("what", "op", "args", "ok", "code"), ROWS, ids=[row[0] for row in ROWS])
def test_refusals_are_the_same_on_both_channels(channels, what, op, args, ok, code):
    assert_same(both(channels, op, **args), ok, code)


def test_list_is_the_same_on_both_channels(channels):
    outcomes = both(channels, "list")
    assert_same(outcomes, True, None)
    listed = {name: sorted(m["name"] for m in o.result["models"]) for name, o in outcomes.items()}
    assert listed["http"] == listed["nfs"] and "llama3.2:latest" in listed["http"] and OUTSIDE in listed["http"]


def test_delete_of_a_model_from_a_registry_outside_the_allow_list_is_allowed(channels):
    """The delete rule (gpu_service.py): deleting fetches nothing, so the grammar applies and the
    allow-list does not; an operator who narrowed the allow-list can still remove old models."""
    outcomes = both(channels, "delete", model=OUTSIDE)
    assert_same(outcomes, True, None)
    assert [o.result for o in outcomes.values()] == [{"deleted": OUTSIDE}] * 2
    for name, o in both(channels, "list").items():
        assert OUTSIDE not in [m["name"] for m in o.result["models"]], name


def test_copy_shares_the_digest_and_ignores_the_allow_list_on_both_channels(channels):
    """Copying fetches nothing: a model from a registry outside the allow-list can be copied, and
    the answer names the copy's digest, the source's (models as code's snapshots rely on it)."""
    outcomes = both(channels, "copy", source=OUTSIDE, destination="kept:snapshot")
    assert_same(outcomes, True, None)
    for name, o in outcomes.items():
        listed = {m["name"]: m["digest"] for m in channels[name].call("list").result["models"]}
        assert o.result == {"source": OUTSIDE, "destination": "kept:snapshot", "digest": listed[OUTSIDE]}, name
        assert listed["kept:snapshot"] == listed[OUTSIDE], name


def test_pull_of_an_allowed_name_starts_a_job_the_same_way(channels):
    outcomes = both(channels, "pull", model="tinyllama")
    assert_same(outcomes, True, None)
    for name, o in outcomes.items():
        assert o.result["model"] == "tinyllama:latest" and o.result["joined"] is False, (name, o.result)
        assert o.result["state"] in ("queued", "running", "succeeded"), (name, o.result)
    # Each channel's job id answers `job` until the pull succeeds, the same way.
    for name, channel in channels.items():
        job_id = outcomes[name].result["id"]

        def finished(channel=channel, job_id=job_id):
            outcome = channel.call("job", job_id=job_id)
            assert outcome.ok, outcome.result
            return outcome.result["state"] == "succeeded"

        wait_until(finished, 30, what=f"{name} pull succeeded")


def test_cancel_of_a_running_pull_then_of_a_finished_one(channels, emulators):
    for proc in emulators.values():
        emulator_control(proc, "config", SLOW_PULLS)
    started = both(channels, "pull", model="tinyllama")
    assert_same(started, True, None)
    cancelled = {name: channel.call("cancel", job_id=started[name].result["id"]) for name, channel in channels.items()}
    assert_same(cancelled, True, None)
    for name, o in cancelled.items():
        assert (o.result["state"], o.result["error_code"]) == ("cancelled", "cancelled"), (name, o.result)
    again = {name: channel.call("cancel", job_id=started[name].result["id"]) for name, channel in channels.items()}
    assert_same(again, False, "conflict")


def test_health_reports_the_same_fields_and_status_rule(channels):
    outcomes = both(channels, "health")
    assert_same(outcomes, True, None)
    http, nfs = outcomes["http"].result, outcomes["nfs"].result
    assert set(http) == set(nfs) == {"status", "version", "uptime_seconds", "ollama", "gpu", "pulls"}
    assert set(http["pulls"]) == set(nfs["pulls"]) == {"running", "queued"}
    for body in (http, nfs):
        assert body["ollama"]["reachable"] is True
        # One rule for both: ok only when Ollama answers and a GPU is available.
        assert body["status"] == ("ok" if body["gpu"]["available"] else "degraded")
    assert http["gpu"]["available"] == nfs["gpu"]["available"]


def _loaded(channel) -> dict[str, dict]:
    outcome = channel.call("loaded")
    assert outcome.ok, outcome.result
    return {m["name"]: m for m in outcome.result["models"]}


def _finished(channel, job_id: str) -> dict:
    def done():
        outcome = channel.call("job", job_id=job_id)
        assert outcome.ok, outcome.result
        return outcome.result if outcome.result["state"] not in ("queued", "running") else None

    return wait_until(done, 30, what=f"{channel.name} job {job_id} finished")


def test_load_then_unload_is_the_same_on_both_channels(channels):
    started = both(channels, "load", model="qwen2.5:0.5b", keep_alive="forever")
    assert_same(started, True, None)
    for name, channel in channels.items():
        job = started[name].result
        assert (job["kind"], job["model"], job["keep_alive"]) == ("load", "qwen2.5:0.5b", -1), (name, job)
        done = _finished(channel, job["id"])
        assert (done["state"], done["status"]) == ("succeeded", "loaded"), (name, done)
        entry = _loaded(channel)["qwen2.5:0.5b"]
        assert set(entry) == {"name", "model", "digest", "size", "size_vram", "cpu_spill", "context_length",
                              "expires_at"}, name
        assert entry["cpu_spill"] is False and entry["size_vram"] == entry["size"] > 0, (name, entry)
        assert entry["expires_at"].startswith("23"), (name, entry)  # forever: about 292 years ahead
    unloaded = both(channels, "unload", model="qwen2.5:0.5b")
    assert_same(unloaded, True, None)
    assert [o.result for o in unloaded.values()] == [{"unloaded": "qwen2.5:0.5b"}] * 2
    for name, channel in channels.items():
        assert "qwen2.5:0.5b" not in _loaded(channel), name
    # Unloading what is not loaded is no error, on both.
    assert_same(both(channels, "unload", model="qwen2.5:0.5b"), True, None)


def test_load_of_an_embedding_only_model_fails_its_job_the_same_way(channels, emulators):
    for proc in emulators.values():
        emulator_control(proc, "config", {"installed": ["llama3.2:latest", "nomic-embed-text:latest"]})
    started = both(channels, "load", model="nomic-embed-text")
    assert_same(started, True, None)
    for name, channel in channels.items():
        done = _finished(channel, started[name].result["id"])
        assert (done["state"], done["error_code"]) == ("failed", "invalid_request"), (name, done)
        assert "embedding-only" in done["error"], (name, done)
