"""The emulator's copy, publish, pull counters and loaded models (the VRAM model), on the wire.

What real Ollama answers comes from its server/routes.go, server/sched.go and api/types.go; the
official client's view of the same routes is in test_emulator_client.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime

import ollama_emulator
import pytest
import requests

from support.procs import EMULATOR, emulator_control, start_emulator, wait_until

pytestmark = pytest.mark.integration

GB = 1_000_000_000
UTC_NANO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")
LOAD_KEYS = ["model", "created_at", "response", "done", "done_reason"]
PS_KEYS = ["name", "model", "size", "digest", "details", "expires_at", "size_vram", "context_length"]


@pytest.fixture(scope="module")
def emu():
    proc = start_emulator("--progress-interval", "0.02", "--verify-seconds", "0")
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def fresh(emu):
    emulator_control(emu, "reset")


@pytest.fixture
def gpu(emu):
    """A 10 GB GPU, nothing loaded, four 4 GB models and one of 20 GB; sizes in ps equal tags sizes."""
    config(emu, vram_bytes=10 * GB, load_overhead_bytes=0, loaded=[],
           installed=[{"name": n, "size": 4 * GB} for n in ("a:1", "b:1", "c:1", "d:1")]
           + [{"name": "big:1", "size": 20 * GB}])
    return emu


def config(emu, **knobs) -> dict:
    return emulator_control(emu, "config", knobs)


def stats(emu) -> dict:
    return emulator_control(emu, "stats")


def tags(emu) -> dict[str, dict]:
    return {m["name"]: m for m in requests.get(emu.url + "/api/tags", timeout=5).json()["models"]}


def ps(emu) -> list[dict]:
    return requests.get(emu.url + "/api/ps", timeout=5).json()["models"]


def loaded(emu) -> list[str]:
    return sorted(m["name"] for m in ps(emu))


def generate(emu, **body) -> requests.Response:
    return requests.post(emu.url + "/api/generate", json=body, timeout=10)


def load(emu, model: str, keep_alive=None) -> dict:
    body = {"model": model} if keep_alive is None else {"model": model, "keep_alive": keep_alive}
    r = generate(emu, **body)
    assert r.status_code == 200, r.text
    return r.json()


def advance(emu, seconds: float) -> dict:
    return emulator_control(emu, "clock", {"advance": seconds})


def seconds_left(entry: dict) -> float:
    expires = entry["expires_at"]
    stamp = re.sub(r"\.(\d{6})\d*", r".\1", expires)  # datetime keeps microseconds only
    clock_now = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return clock_now - time.time()


def copy(emu, body) -> requests.Response:
    return requests.post(emu.url + "/api/copy", json=body, timeout=5)


# --- copy --------------------------------------------------------------------------------------
def test_copy_answers_empty_200_and_shares_the_digest(emu):
    r = copy(emu, {"source": "llama3.2", "destination": "snapshots/llama3.2:prev"})
    assert (r.status_code, r.content, r.headers.get("Content-Type")) == (200, b"", None)
    models = tags(emu)
    assert models["snapshots/llama3.2:prev"]["digest"] == models["llama3.2:latest"]["digest"]
    assert models["snapshots/llama3.2:prev"]["size"] == models["llama3.2:latest"]["size"]
    assert next(iter(models)) == "snapshots/llama3.2:prev", "a copy writes a new manifest: newest first"
    assert stats(emu)["copies"] == 1


def test_copy_overwrites_the_destination(emu):
    assert copy(emu, {"source": "qwen2.5:0.5b", "destination": "llama3.2"}).status_code == 200
    models = tags(emu)
    assert models["llama3.2:latest"]["digest"] == models["qwen2.5:0.5b"]["digest"]


@pytest.mark.parametrize("body, status, error", [
    ({"source": "nope:1b", "destination": "x:1"}, 404, 'model "nope:1b" not found'),  # %q: double quotes
    ({"source": "bad name", "destination": "x:1"}, 400, 'source "bad name" is invalid'),
    ({"source": "llama3.2", "destination": "../etc"}, 400, 'destination "../etc" is invalid'),
    ({"destination": "x:1"}, 400, 'source "" is invalid'),
    ({"source": 7, "destination": "x:1"}, 400,
     "json: cannot unmarshal number into Go struct field CopyRequest.source of type string"),
    (None, 400, "missing request body"),
])
def test_copy_rejects_bad_requests(emu, body, status, error):
    r = copy(emu, body)
    assert (r.status_code, r.json()) == (status, {"error": error})
    assert stats(emu)["copies"] == 0


def test_a_copy_keeps_the_layers_when_the_original_is_deleted(emu):
    """Blobs are content-addressed: pulling the same build back moves no bytes while a copy holds them."""
    copy(emu, {"source": "llama3.2", "destination": "snapshots/llama3.2:prev"})
    requests.delete(emu.url + "/api/delete", json={"model": "llama3.2"}, timeout=5).raise_for_status()
    r = requests.post(emu.url + "/api/pull", json={"model": "llama3.2", "stream": False}, timeout=10)
    assert r.json() == {"status": "success"}
    assert stats(emu)["downloads_started"] == {}
    assert stats(emu)["downloaded_bytes"] == 0


# --- publish and the pull counter -----------------------------------------------------------------
def test_publish_gives_a_later_pull_a_new_digest(emu):
    before = tags(emu)["llama3.2:latest"]["digest"]
    published = emulator_control(emu, "publish", {"model": "llama3.2"})
    assert published["model"] == "llama3.2:latest" and published["previous_digest"] == before
    assert published["build"] == 2 and re.fullmatch(r"[0-9a-f]{64}", published["digest"])
    assert published["digest"] != before
    assert tags(emu)["llama3.2:latest"]["digest"] == before, "what is installed keeps its build"

    r = requests.post(emu.url + "/api/pull", json={"model": "llama3.2:latest", "stream": False}, timeout=10)
    assert r.json() == {"status": "success"}
    assert tags(emu)["llama3.2:latest"]["digest"] == published["digest"]
    counters = stats(emu)
    assert counters["downloads_started"] == {"llama3.2:latest": 1}
    assert counters["downloaded_bytes"] == 201_326_592, "only the new weights; template and params are cached"


def test_publish_is_the_same_build_on_every_host(emu):
    """One registry: the Nth publish of a tag has one digest, so two hosts that pull it agree."""
    first = emulator_control(emu, "publish", {"model": "qwen2.5:0.5b"})
    third = emulator_control(emu, "publish", {"model": "qwen2.5:0.5b"})
    assert third["build"] == 3 and third["previous_digest"] == first["digest"] != third["digest"]
    with start_emulator("--config-json", '{"publish": {"qwen2.5:0.5b": null}}') as other_host:
        r = requests.post(other_host.url + "/api/pull", json={"model": "qwen2.5:0.5b", "stream": False}, timeout=10)
        assert r.json() == {"status": "success"}
        assert tags(other_host)["qwen2.5:0.5b"]["digest"] == first["digest"]


def test_publish_pins_a_digest_and_can_add_a_tag(emu):
    digest = "ab" * 32
    assert emulator_control(emu, "publish", {"model": "new/model:v2", "digest": digest, "size": 1000}) == {
        "model": "new/model:v2", "digest": digest, "previous_digest": None, "build": 2}
    r = requests.post(emu.url + "/api/pull", json={"model": "new/model:v2", "stream": False}, timeout=10)
    assert r.json() == {"status": "success"}
    assert (tags(emu)["new/model:v2"]["digest"], tags(emu)["new/model:v2"]["size"]) == (digest, 1000)


@pytest.mark.parametrize("body, error", [
    ({"model": "bad name"}, "invalid model name 'bad name'"),
    ({"model": "llama3.2", "digest": "sha256:" + "ab" * 32}, "digest must be 64 lowercase hex"),
    ({"model": "llama3.2", "size": -1}, "sizes must be a positive number"),
    ({"model": "llama3.2", "tag": "x"}, "unknown field(s) tag"),
    (None, "missing request body"),
])
def test_publish_rejects_bad_requests(emu, body, error):
    r = requests.post(emu.url + "/_emulator/publish", json=body, timeout=5)
    assert r.status_code == 400 and r.json()["error"].startswith(error)


def test_publish_survives_a_restart_with_a_state_file(tmp_path):
    flags = ("--state-file", str(tmp_path / "state.json"))
    with start_emulator(*flags) as first:
        published = emulator_control(first, "publish", {"model": "tinyllama"})
    with start_emulator(*flags) as again:
        r = requests.post(again.url + "/api/pull", json={"model": "tinyllama", "stream": False}, timeout=10)
        assert r.json() == {"status": "success"}
        assert tags(again)["tinyllama:latest"]["digest"] == published["digest"]
        assert emulator_control(again, "publish", {"model": "tinyllama"})["build"] == 3


def test_publish_from_the_command_line(emu):
    done = subprocess.run([sys.executable, str(EMULATOR), "publish", "llama3.2", "--url", emu.url],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert '"build":2' in done.stdout
    bad = subprocess.run([sys.executable, str(EMULATOR), "publish", "llama3.2", "--digest", "xyz", "--url", emu.url],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "ollama-emulator publish: error: digest must be 64 lowercase hex characters, without sha256: (HTTP 400)"]


def test_pull_counter_counts_every_pull_request(emu):
    requests.post(emu.url + "/api/pull", json={"model": "smollm:135m", "stream": False}, timeout=10)
    requests.post(emu.url + "/api/pull", json={"model": "SMOLLM:135m", "stream": False}, timeout=10)
    requests.post(emu.url + "/api/pull", json={"model": "nosuch", "stream": False}, timeout=10)
    requests.post(emu.url + "/api/pull", json={"model": "bad name"}, timeout=10)
    requests.post(emu.url + "/api/pull", timeout=10)  # no body: still a pull that reached Ollama
    counters = stats(emu)
    assert counters["pulls"] == 5
    assert counters["pulls_by_model"] == {"smollm:135m": 2, "nosuch:latest": 1, "bad name": 1}


def test_nothing_but_a_pull_counts_as_one(emu):
    copy(emu, {"source": "llama3.2", "destination": "snap/llama3.2:1"})
    load(emu, "llama3.2")
    emulator_control(emu, "publish", {"model": "llama3.2"})
    requests.post(emu.url + "/api/show", json={"model": "llama3.2"}, timeout=5)
    requests.delete(emu.url + "/api/delete", json={"model": "snap/llama3.2:1"}, timeout=5)
    assert (stats(emu)["pulls"], stats(emu)["pulls_by_model"]) == (0, {})


# --- loading and unloading ---------------------------------------------------------------------
def test_a_fresh_emulator_has_the_newest_model_loaded(emu):
    assert [m["name"] for m in ps(emu)] == [next(iter(tags(emu)))]


def test_load_answers_one_json_object_even_when_streaming(gpu):
    for stream in (True, False, None):
        body = {"model": "a:1"} if stream is None else {"model": "a:1", "stream": stream}
        r = generate(gpu, **body)
        assert r.status_code == 200 and r.headers["Content-Type"] == "application/json; charset=utf-8"
        answer = r.json()
        assert list(answer) == LOAD_KEYS
        assert answer["model"] == "a:1" and answer["response"] == "" and answer["done"] is True
        assert answer["done_reason"] == "load"
        assert UTC_NANO.fullmatch(answer["created_at"]), answer["created_at"]
    assert stats(gpu)["loads"] == 1, "loading a loaded model only touches it"


def test_ps_wire_format(gpu):
    load(gpu, "a:1", "10m")
    (entry,) = ps(gpu)
    assert list(entry) == PS_KEYS
    assert entry["name"] == entry["model"] == "a:1"
    assert entry["digest"] == tags(gpu)["a:1"]["digest"]
    assert entry["size"] == entry["size_vram"] == 4 * GB
    assert entry["context_length"] == 4096
    assert set(entry["details"]) == {"parent_model", "format", "family", "families", "parameter_size",
                                     "quantization_level"}
    assert re.fullmatch(r".+\.\d{1,9}-07:00", entry["expires_at"]), "local time, like Go's time.Now()"
    assert 590 < seconds_left(entry) <= 600


def test_ps_size_includes_the_load_overhead(emu):
    config(emu, loaded=["qwen2.5:0.5b"])
    (entry,) = ps(emu)
    assert entry["size"] == tags(emu)["qwen2.5:0.5b"]["size"] + 512 * 1024**2
    assert entry["context_length"] == 4096 and "context_length" not in entry["details"]


def test_least_recently_used_is_evicted_when_a_load_does_not_fit(gpu):
    load(gpu, "a:1")
    load(gpu, "b:1")
    load(gpu, "a:1")  # a used again: b is now the least recently used
    load(gpu, "c:1")
    assert loaded(gpu) == ["a:1", "c:1"]
    assert stats(gpu)["evicted"] == ["b:1"]
    load(gpu, "d:1")
    assert loaded(gpu) == ["c:1", "d:1"] and stats(gpu)["evicted"] == ["b:1", "a:1"]


def test_a_shorter_keep_alive_is_evicted_before_an_older_model(gpu):
    """Ollama's sched.go orders by keep_alive first; recency only breaks ties."""
    load(gpu, "a:1", "1h")
    load(gpu, "b:1", "10m")
    load(gpu, "c:1", "1h")
    assert loaded(gpu) == ["a:1", "c:1"] and stats(gpu)["evicted"] == ["b:1"]


def test_forever_models_are_evicted_last(gpu):
    load(gpu, "a:1", -1)  # the least recently used, but forever outlasts any keep_alive
    load(gpu, "b:1", "1h")
    load(gpu, "c:1", "2h")
    assert loaded(gpu) == ["a:1", "c:1"] and stats(gpu)["evicted"] == ["b:1"]


def test_max_loaded_models_evicts_even_when_memory_is_free(gpu):
    config(gpu, vram_bytes=1000 * GB, max_loaded_models=2)
    for model in ("a:1", "b:1", "c:1"):
        load(gpu, model)
    assert loaded(gpu) == ["b:1", "c:1"] and stats(gpu)["evicted"] == ["a:1"]


def test_a_model_larger_than_the_gpu_spills_to_the_cpu(gpu):
    load(gpu, "a:1")
    load(gpu, "b:1")
    load(gpu, "big:1")
    (entry,) = ps(gpu)
    assert entry["name"] == "big:1"
    assert (entry["size"], entry["size_vram"]) == (20 * GB, 10 * GB), "size_vram < size: CPU spill"
    assert sorted(stats(gpu)["evicted"]) == ["a:1", "b:1"], "everything else goes first"
    load(gpu, "a:1")
    assert loaded(gpu) == ["a:1"], "the spilled model held the whole GPU"


def test_a_cpu_only_host_reports_no_vram_and_evicts_only_by_count(gpu):
    config(gpu, vram_bytes=0)
    for model in ("a:1", "big:1", "b:1"):
        load(gpu, model)
    assert loaded(gpu) == ["a:1", "b:1", "big:1"]
    assert all(entry["size_vram"] == 0 for entry in ps(gpu))


def test_keep_alive_expires_on_the_emulator_clock(gpu):
    load(gpu, "a:1", "1m")
    load(gpu, "b:1", 600)  # a number is seconds
    assert 50 < seconds_left(ps(gpu)[1]) <= 60
    assert [m["name"] for m in ps(gpu)] == ["b:1", "a:1"], "the longest time left first"
    assert advance(gpu, 59)["expired"] == []
    assert advance(gpu, 2)["expired"] == ["a:1"]
    assert loaded(gpu) == ["b:1"]
    assert stats(gpu)["expired"] == ["a:1"]


def test_keep_alive_expires_in_real_time_too(gpu):
    load(gpu, "a:1", 0.3)
    assert loaded(gpu) == ["a:1"]
    wait_until(lambda: not ps(gpu), 5, what="a 0.3 s keep_alive to run out")


def test_the_default_keep_alive_is_five_minutes(gpu):
    load(gpu, "a:1")
    assert 290 < seconds_left(ps(gpu)[0]) <= 300
    assert advance(gpu, 301)["expired"] == ["a:1"]


def test_a_load_without_keep_alive_keeps_the_models_own(gpu):
    load(gpu, "a:1", "1h")
    advance(gpu, 1800)
    load(gpu, "a:1")  # no keep_alive: Ollama keeps the runner's duration and restarts its timer
    assert 3500 < seconds_left(ps(gpu)[0]) - 1800 <= 3600


@pytest.mark.parametrize("keep_alive", [-1, "-1m", "-5s"])
def test_a_negative_keep_alive_keeps_a_model_loaded_forever(gpu, keep_alive):
    load(gpu, "a:1", keep_alive)
    assert int(ps(gpu)[0]["expires_at"][:4]) > 2300, "now + MaxInt64 ns (292 years), as Go adds it"
    advance(gpu, 10 * 365 * 86400)
    assert loaded(gpu) == ["a:1"]


@pytest.mark.parametrize("keep_alive", [0, "0", "0s", 0.0])
def test_keep_alive_zero_unloads_now(gpu, keep_alive):
    load(gpu, "a:1")
    r = generate(gpu, model="a:1", keep_alive=keep_alive)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json; charset=utf-8"
    answer = r.json()
    assert list(answer) == LOAD_KEYS and answer["done_reason"] == "unload" and answer["done"] is True
    assert ps(gpu) == []
    assert stats(gpu)["unloads"] == 1


def test_unloading_what_is_not_loaded_is_still_200(gpu):
    assert load(gpu, "c:1", 0)["done_reason"] == "unload"
    assert stats(gpu)["unloads"] == 0


def test_chat_without_messages_loads_and_unloads(gpu):
    r = requests.post(gpu.url + "/api/chat", json={"model": "a:1", "messages": []}, timeout=5)
    assert r.status_code == 200
    assert r.json() | {"created_at": "-"} == {"model": "a:1", "created_at": "-", "message": {
        "role": "assistant", "content": ""}, "done": True, "done_reason": "load"}
    assert loaded(gpu) == ["a:1"]
    r = requests.post(gpu.url + "/api/chat", json={"model": "a:1", "keep_alive": 0}, timeout=5)
    assert r.json()["done_reason"] == "unload" and ps(gpu) == []


@pytest.mark.parametrize("route, body, status, error", [
    ("generate", {"model": "nope:7b"}, 404, "model 'nope:7b' not found"),
    ("generate", {"model": "nope", "keep_alive": 0}, 404, "model 'nope' not found"),
    ("chat", {"model": "nope"}, 404, "model 'nope' not found"),
    ("generate", {"model": ""}, 404, "model '' not found"),  # generate's quirk
    ("chat", {"model": ""}, 400, "model is required"),
    ("generate", {"model": "bad name"}, 400, "invalid model name"),
    ("chat", {"model": "a/../b"}, 400, "invalid model name"),
    ("generate", {"model": "nomic-embed-text"}, 400, '"nomic-embed-text" does not support generate'),
    ("chat", {"model": "nomic-embed-text"}, 400, '"nomic-embed-text" does not support chat'),
    ("generate", {"model": "llama3.2", "keep_alive": "10"}, 400, 'time: missing unit in duration "10"'),
    ("generate", {"model": "llama3.2", "keep_alive": "soon"}, 400, 'time: invalid duration "soon"'),
    ("generate", {"model": "llama3.2", "keep_alive": "1d"}, 400, 'time: unknown unit "d" in duration "1d"'),
    ("chat", {"model": "llama3.2", "keep_alive": True}, 400, "Unsupported type: 'bool'"),
    ("generate", {"model": 3}, 400,
     "json: cannot unmarshal number into Go struct field GenerateRequest.model of type string"),
    ("chat", {"model": "llama3.2", "messages": "hi"}, 400,
     "json: cannot unmarshal string into Go struct field ChatRequest.messages of type []api.Message"),
    ("generate", None, 400, "missing request body"),
])
def test_bad_loads_are_clear_errors(emu, route, body, status, error):
    config(emu, installed=["llama3.2:latest", "nomic-embed-text:latest"], loaded=[])
    r = requests.post(f"{emu.url}/api/{route}", json=body, timeout=5)
    assert (r.status_code, r.json()) == (status, {"error": error})
    assert ps(emu) == []


def test_an_embedding_model_can_still_be_unloaded(emu):
    config(emu, installed=["nomic-embed-text:latest"], loaded=["nomic-embed-text"])
    assert load(emu, "nomic-embed-text", 0)["done_reason"] == "unload"
    assert ps(emu) == []


def test_a_copy_shares_its_originals_runner(emu):
    """Ollama keys runners by the weights blob: loading a copy of a loaded model loads nothing new."""
    config(emu, loaded=["llama3.2"])
    copy(emu, {"source": "llama3.2", "destination": "snap/llama3.2:prev"})
    load(emu, "snap/llama3.2:prev")
    assert [m["name"] for m in ps(emu)] == ["llama3.2:latest"]
    assert stats(emu)["loads"] == 0


def test_load_seconds_delays_only_a_real_load(gpu):
    config(gpu, load_seconds=0.3)
    started = time.monotonic()
    load(gpu, "a:1")
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    load(gpu, "a:1")
    assert time.monotonic() - started < 0.25, "already loaded"


def test_a_prompt_gets_a_canned_answer_streamed_or_whole(gpu):
    with requests.post(gpu.url + "/api/generate", json={"model": "a:1", "prompt": "hi"}, stream=True,
                       timeout=5) as r:
        assert r.headers["Content-Type"] == "application/x-ndjson"
        lines = [json.loads(raw) for raw in r.iter_lines() if raw]
    assert [line["done"] for line in lines] == [False, True]
    assert lines[0]["response"] == ollama_emulator.CANNED_ANSWER and lines[1]["done_reason"] == "stop"
    whole = generate(gpu, model="a:1", prompt="hi", stream=False).json()
    assert whole["response"] == ollama_emulator.CANNED_ANSWER and whole["eval_count"] > 0
    chat = requests.post(gpu.url + "/api/chat", json={"model": "b:1", "stream": False, "messages": [
        {"role": "user", "content": "hi"}]}, timeout=5).json()
    assert chat["message"] == {"role": "assistant", "content": ollama_emulator.CANNED_ANSWER}
    assert loaded(gpu) == ["a:1", "b:1"], "answering loads the model"


# --- control routes and startup options -------------------------------------------------------
def test_loaded_action_and_bad_memory_knobs(emu):
    r = requests.post(emu.url + "/_emulator/config", json={"loaded": ["tinyllama"]}, timeout=5)
    assert (r.status_code, r.json()) == (400, {"error": "loaded: tinyllama:latest is not installed"})
    for body in ({"vram_bytes": -1}, {"max_loaded_models": 0}, {"default_keep_alive": "10"},
                 {"loaded": [{"name": "llama3.2", "keep_alive": "x"}]}):
        r = requests.post(emu.url + "/_emulator/config", json=body, timeout=5)
        assert r.status_code == 400 and "error" in r.json(), body


@pytest.mark.parametrize("body", [{"advance": -1}, {"advance": "1h"}, {}])
def test_the_clock_never_goes_back(emu, body):
    r = requests.post(emu.url + "/_emulator/clock", json=body, timeout=5)
    assert r.status_code == 400 and r.json()["error"].startswith("advance must be")


def test_reset_puts_the_clock_and_memory_back(gpu):
    advance(gpu, 3600)
    emulator_control(gpu, "reset")
    clock = requests.get(gpu.url + "/_emulator/clock", timeout=5).json()
    assert clock["offset_seconds"] == 0 and clock["expired"] == []
    assert len(ps(gpu)) == 1


def test_memory_flags_and_their_environment_variables(monkeypatch):
    monkeypatch.setenv("OLLAMA_EMULATOR_VRAM_BYTES", "8e9")
    monkeypatch.setenv("OLLAMA_KEEP_ALIVE", "600")
    monkeypatch.delenv("OLLAMA_MAX_LOADED_MODELS", raising=False)
    args = ollama_emulator.parse_args(["--max-loaded-models", "2"])
    assert ollama_emulator.memory_knobs(args) == {"vram_bytes": 8 * GB, "max_loaded_models": 2,
                                                  "default_keep_alive": 600}


def test_startup_memory_flags_apply(tmp_path):
    with start_emulator("--vram-bytes", "0", "--keep-alive", "-1",
                        "--config-json", '{"loaded": ["qwen2.5:0.5b", "llama3.2"]}') as proc:
        entries = ps(proc)
        assert sorted(m["name"] for m in entries) == ["llama3.2:latest", "qwen2.5:0.5b"]
        assert all(m["size_vram"] == 0 and int(m["expires_at"][:4]) > 2300 for m in entries)


def test_a_bad_startup_keep_alive_is_one_line_and_exit_2():
    done = subprocess.run([sys.executable, str(EMULATOR), "--port", "0", "--keep-alive", "10x"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        'ollama-emulator: error: bad configuration: time: unknown unit "x" in duration "10x"']


@pytest.mark.parametrize("path, raw", [
    ("/api/generate", '{"model": "llama3.2", "keep_alive": Infinity}'),
    ("/api/generate", '{"model": "llama3.2", "keep_alive": NaN}'),
    ("/_emulator/clock", '{"advance": Infinity}'),
    ("/_emulator/publish", '{"model": "llama3.2", "size": Infinity}'),
    ("/_emulator/config", '{"vram_bytes": Infinity}'),
])
def test_non_finite_numbers_are_400_not_500(emu, path, raw):
    """Go's JSON has no NaN or Infinity; Python's reads them, so each number is checked."""
    r = requests.post(emu.url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=5)
    assert r.status_code == 400 and "error" in r.json()
