"""ollama.py against the emulator (a real HTTP process) and its pure normalisation/mapping helpers."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from gpu_bridge import ollama
from gpu_bridge.errors import (
    InsufficientStorage,
    InvalidModelName,
    InvalidRequest,
    ModelNotFound,
    OllamaError,
    OllamaTimeout,
    OllamaUnavailable,
)
from gpu_bridge.ollama import OllamaAdapter
from support.procs import emulator_control, free_port, wait_until


@pytest.fixture
def adapter(ollama):
    with OllamaAdapter(ollama.url, connect_timeout=1.0, read_timeout=5.0) as a:
        yield a


# --- against the emulator --------------------------------------------------------------------------
def test_version(adapter):
    assert adapter.version()[0].isdigit()


def test_list_models_is_normalised(adapter):
    models = {m["name"]: m for m in adapter.list_models()}
    assert {"llama3.2:latest", "qwen2.5:0.5b", "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"} <= set(models)
    for model in models.values():
        assert set(model) == {"name", "size", "digest", "modified_at", "details"}  # capabilities dropped
        assert set(model["details"]) == {"parent_model", "format", "family", "families", "parameter_size",
                                         "quantization_level"}  # context_length dropped
        assert isinstance(model["size"], int) and model["size"] > 0
        assert not model["digest"].startswith("sha256:")
        assert isinstance(model["details"]["families"], list)
    assert models["hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"]["details"]["families"] == []  # was null
    stamp = models["llama3.2:latest"]["modified_at"]
    assert stamp.endswith("-07:00") and len(stamp.split(".")[1]) > 6  # nanoseconds kept as given
    assert ollama.parse_timestamp(stamp).tzinfo is not None


def test_ps_is_normalised(adapter):
    running = adapter.ps()
    assert running and set(running[0]) == {"name", "size", "size_vram", "digest", "expires_at", "details"}


def test_pull_yields_progress_and_ends_with_success(adapter):
    events = list(adapter.pull("tinyllama"))
    assert events[0] == {"status": "pulling manifest"}
    assert events[-1] == {"status": "success"}
    layers = [e for e in events if "digest" in e]
    assert layers and all(isinstance(e["completed"], int) and isinstance(e["total"], int) for e in layers)
    assert any(e["status"] == "verifying sha256 digest" for e in events)
    assert "tinyllama:latest" in [m["name"] for m in adapter.list_models()]


def test_pull_of_unknown_model_is_model_not_found_under_http_200(adapter):
    with pytest.raises(ModelNotFound) as info:
        list(adapter.pull("no-such-model:v9"))
    assert "does not exist" in info.value.message
    assert info.value.status == 404


def test_pull_out_of_disk_is_insufficient_storage(adapter, ollama):
    emulator_control(ollama, "config", {"fail_after_bytes": 1000})
    with pytest.raises(InsufficientStorage) as info:
        list(adapter.pull("smollm:135m"))
    assert "no space left on device" in info.value.message


def test_pull_of_a_name_ollama_rejects_is_invalid_model_name(adapter):
    with pytest.raises(InvalidModelName):
        list(adapter.pull("bad name"))


def test_delete_returns_none_on_empty_200_and_404_is_model_not_found(adapter):
    assert adapter.delete("qwen2.5:0.5b") is None
    assert "qwen2.5:0.5b" not in [m["name"] for m in adapter.list_models()]
    with pytest.raises(ModelNotFound) as info:
        adapter.delete("qwen2.5:0.5b")
    assert "not installed" in info.value.message


def test_text_plain_404_is_not_mistaken_for_a_missing_model(ollama):
    with OllamaAdapter(ollama.url + "/not-ollama") as a:
        with pytest.raises(OllamaError) as info:
            a.version()
    assert not isinstance(info.value, ModelNotFound)
    assert "route" in info.value.message


def test_connection_refused_is_unavailable_and_fast():
    a = OllamaAdapter(f"http://127.0.0.1:{free_port()}", connect_timeout=2.0)
    started = time.monotonic()
    with pytest.raises(OllamaUnavailable) as info:
        a.list_models()
    assert time.monotonic() - started < 2.0
    assert info.value.status == 503 and "not reachable" in info.value.message


def test_slow_answer_is_a_timeout(ollama):
    emulator_control(ollama, "config", {"latency_ms": 1500})
    with OllamaAdapter(ollama.url, read_timeout=0.2) as a:
        started = time.monotonic()
        with pytest.raises(OllamaTimeout):
            a.list_models()
        assert time.monotonic() - started < 1.4
        with pytest.raises(OllamaTimeout):  # the per-call read timeout overrides the default
            a.version(read_timeout=0.1)


def test_cancel_wakes_a_read_blocked_in_the_silent_verify_phase(adapter, ollama):
    emulator_control(ollama, "config", {"verify_seconds": 30})
    cancel, verifying = threading.Event(), threading.Event()
    threading.Thread(target=lambda: verifying.wait(10) and cancel.set(), daemon=True).start()
    started, statuses = time.monotonic(), []
    for event in adapter.pull("tinyllama", cancel=cancel):  # returns (no raise) once cancelled
        statuses.append(event["status"])
        if event["status"] == "verifying sha256 digest":
            verifying.set()
    assert statuses[-1] == "verifying sha256 digest"
    assert time.monotonic() - started < 10  # not the 30 s of silence
    stats = wait_until(lambda: (s := emulator_control(ollama, "stats"))["active_downloads"] == [] and s,
                       what="emulator to see the closed stream")
    assert "tinyllama:latest" not in stats["installed"]


def test_cancel_during_download_stops_it_in_ollama(adapter, ollama):
    emulator_control(ollama, "config", {"stall": True})
    cancel = threading.Event()
    seen = 0
    for event in adapter.pull("smollm:135m", cancel=cancel):
        seen += "digest" in event
        if seen == 3:
            cancel.set()
    assert seen == 3
    wait_until(lambda: emulator_control(ollama, "stats")["cancelled_downloads"] == 1, what="download cancelled")


def test_stream_read_timeout_is_a_timeout(adapter, ollama):
    emulator_control(ollama, "config", {"verify_seconds": 30})
    with pytest.raises(OllamaTimeout):
        list(adapter.pull("tinyllama", read_timeout=0.3))


def test_pre_set_cancel_sends_nothing(adapter, ollama):
    cancel = threading.Event()
    cancel.set()
    assert list(adapter.pull("tinyllama", cancel=cancel)) == []
    assert emulator_control(ollama, "stats")["pull_requests"] == 0


# --- pure helpers ----------------------------------------------------------------------------------
def test_normalise_progress_fills_omitted_zeroes_and_drops_unknown_keys():
    assert ollama.normalise_progress({"status": "pulling abc", "digest": "sha256:abc", "total": 5, "x": 1}) == {
        "status": "pulling abc", "digest": "sha256:abc", "total": 5, "completed": 0}
    assert ollama.normalise_progress({"status": "verifying sha256 digest"}) == {"status": "verifying sha256 digest"}


def test_normalise_model_tolerates_nulls_and_missing_keys():
    model = ollama.normalise_model({"model": "m:1", "size": None, "details": {"families": None, "new": 1}, "z": 2})
    assert model == {"name": "m:1", "size": 0, "digest": "", "modified_at": "",
                     "details": {"parent_model": "", "format": "", "family": "", "families": [],
                                 "parameter_size": "", "quantization_level": ""}}


@pytest.mark.parametrize(("text", "expected"), [
    ("2025-05-04T17:37:44.706015396-07:00",
     datetime(2025, 5, 4, 17, 37, 44, 706015, tzinfo=timezone(timedelta(hours=-7)))),
    ("2025-06-10T09:12:05.25Z", datetime(2025, 6, 10, 9, 12, 5, 250000, tzinfo=UTC)),
    ("2025-06-10T09:12:05+0200", datetime(2025, 6, 10, 9, 12, 5, tzinfo=timezone(timedelta(hours=2)))),
    ("yesterday", None), ("", None), (None, None),
])
def test_parse_timestamp(text, expected):
    assert ollama.parse_timestamp(text) == expected


@pytest.mark.parametrize(("message", "status", "json_body", "expected", "code"), [
    ("pull model manifest: file does not exist", None, True, ModelNotFound, "model_not_found"),
    ("pull model manifest: file does not exist", 500, True, ModelNotFound, "model_not_found"),
    ("write /x-partial: no space left on device", None, True, InsufficientStorage, "insufficient_storage"),
    ("model 'x' not found", 404, True, ModelNotFound, "model_not_found"),
    ("404 page not found", 404, False, OllamaError, "ollama_error"),
    ("invalid model name", 400, True, InvalidModelName, "invalid_model_name"),
    ('name "a b" is invalid', 400, True, InvalidModelName, "invalid_model_name"),
    ("model is required", 400, True, InvalidRequest, "invalid_request"),
    ("", 403, False, OllamaError, "ollama_error"),
    ("something broke", 500, True, OllamaError, "ollama_error"),
    ("context canceled", None, True, OllamaError, "ollama_error"),
])
def test_map_error(message, status, json_body, expected, code):
    error = ollama.map_error(message, status=status, model="x", json_body=json_body)
    assert type(error) is expected
    assert error.code == code
