"""The Ollama emulator's wire format, quirks and fault knobs, against a real emulator process.

What is asserted here is what shared/notes/ollama-api.md says real Ollama does; the adapter's tests
rely on the emulator behaving this way.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from datetime import datetime

import pytest
import requests

from support.procs import emulator_control, start_emulator, wait_until

pytestmark = pytest.mark.integration

DEFAULT_MODELS = ["hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", "llama3.2:latest", "qwen2.5:0.5b"]
NANO_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}[+-]\d\d:\d\d")
HEX64 = re.compile(r"[0-9a-f]{64}")
AFTER_LAYERS = ["verifying sha256 digest", "writing manifest", "removing unused layers", "success"]


@pytest.fixture(scope="module")
def emu():
    proc = start_emulator("--progress-interval", "0.02", "--verify-seconds", "0.1")
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def fresh(emu):
    emulator_control(emu, "reset")


def config(emu, **knobs) -> dict:
    return emulator_control(emu, "config", knobs)


def stats(emu) -> dict:
    return emulator_control(emu, "stats")


def tag_names(emu) -> list[str]:
    return [m["name"] for m in requests.get(f"{emu.url}/api/tags", timeout=5).json()["models"]]


class PullStream:
    """A streamed pull read on a thread; ``lines`` holds (arrival time, parsed line)."""

    def __init__(self, emu, model: str):
        self.session = requests.Session()
        self.response = self.session.post(f"{emu.url}/api/pull", json={"model": model}, stream=True, timeout=10)
        self.lines: list[tuple[float, dict]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for raw in self.response.iter_lines():
                if raw:
                    self.lines.append((time.monotonic(), json.loads(raw)))
        except (requests.RequestException, AttributeError, ValueError):
            pass  # closed by close()

    def progress(self) -> list[dict]:
        return [line for _, line in self.lines if "digest" in line]

    def wait_progress(self, predicate, what: str) -> dict:
        return wait_until(lambda: next((p for p in reversed(self.progress()) if predicate(p)), None), 10, what=what)

    def finish(self) -> list[dict]:
        self.thread.join(10)
        assert not self.thread.is_alive(), "the pull stream did not end"
        return [line for _, line in self.lines]

    def close(self):
        self.response.close()
        self.session.close()


def pull_lines(emu, model: str) -> tuple[requests.Response, list[dict]]:
    with requests.post(f"{emu.url}/api/pull", json={"model": model}, stream=True, timeout=10) as r:
        return r, [json.loads(raw) for raw in r.iter_lines() if raw]


def stamp_ns(text: str) -> int:
    """RFC 3339 with up to nine fraction digits (datetime alone keeps only six)."""
    m = re.fullmatch(r"(.+T\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", text)
    assert m, text
    offset = "+00:00" if m[3] == "Z" else m[3]
    return int(datetime.fromisoformat(m[1] + offset).timestamp()) * 10**9 + int((m[2] or "").ljust(9, "0"))


# --- plain routes ----------------------------------------------------------------------------
def test_root_and_version(emu):
    r = requests.get(emu.url + "/", timeout=5)
    assert (r.status_code, r.text) == (200, "Ollama is running")
    assert r.headers["Content-Type"].startswith("text/plain")
    head = requests.head(emu.url + "/", timeout=5)
    assert head.status_code == 200 and head.content == b""
    version = requests.get(emu.url + "/api/version", timeout=5).json()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version["version"])


def test_tags_shape_and_quirks(emu):
    models = requests.get(emu.url + "/api/tags", timeout=5).json()["models"]
    assert [m["name"] for m in models] == DEFAULT_MODELS
    for m in models:
        assert m["name"] == m["model"]
        assert ":" in m["name"].rsplit("/", 1)[-1], "names always carry a tag"
        assert HEX64.fullmatch(m["digest"]), "digest is bare hex, no sha256: prefix"
        assert isinstance(m["size"], int) and m["size"] > 0
        assert NANO_STAMP.fullmatch(m["modified_at"]), m["modified_at"]
        assert {"parent_model", "format", "family", "families", "parameter_size",
                "quantization_level"} <= set(m["details"])
        assert "capabilities" in m  # a newer key clients must ignore
    assert any(m["details"]["families"] is None for m in models)
    assert any("context_length" in m["details"] for m in models)
    stamps = [stamp_ns(m["modified_at"]) for m in models]
    assert stamps == sorted(stamps, reverse=True), "most recently modified first"


def test_tz_offset_knob(emu):
    config(emu, tz_offset="Z")
    models = requests.get(emu.url + "/api/tags", timeout=5).json()["models"]
    assert all(re.fullmatch(r".+\.\d{9}Z", m["modified_at"]) for m in models)


def test_unknown_path_and_wrong_method_are_text(emu):
    r = requests.get(emu.url + "/api/nothing", timeout=5)
    assert (r.status_code, r.text) == (404, "404 page not found")
    assert r.headers["Content-Type"].startswith("text/plain")
    for method, path in (("GET", "/api/pull"), ("DELETE", "/api/tags"), ("POST", "/api/delete")):
        r = requests.request(method, emu.url + path, timeout=5)
        assert (r.status_code, r.text) == (405, "405 method not allowed"), (method, path)
        assert r.headers["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize("host, status", [
    ("evil.example.com", 403), ("8.8.8.8:11434", 403), ("localhost:{port}", 200), ("127.0.0.1:{port}", 200),
    ("[::1]:{port}", 200), ("10.1.2.3", 200), ("192.168.1.20:{port}", 200), ("gpu1.internal", 200),
    ("box.local", 200),
])
def test_host_header_check_on_loopback(emu, host, status):
    r = requests.get(emu.url + "/api/tags", headers={"Host": host.format(port=emu.port)}, timeout=5)
    assert r.status_code == status
    if status == 403:
        assert r.content == b""


def test_latency_knob_delays_api_routes(emu):
    config(emu, latency_ms=300)
    started = time.monotonic()
    requests.get(emu.url + "/api/version", timeout=5).raise_for_status()
    assert time.monotonic() - started >= 0.3


def test_show_and_ps(emu):
    r = requests.post(emu.url + "/api/show", json={"model": "llama3.2"}, timeout=5)
    assert r.status_code == 200 and r.json()["details"]["family"] == "llama"
    r = requests.post(emu.url + "/api/show", json={"model": "nope:1b"}, timeout=5)
    assert (r.status_code, r.json()) == (404, {"error": "model 'nope:1b' not found"})
    loaded = requests.get(emu.url + "/api/ps", timeout=5).json()["models"]
    assert loaded and {"name", "model", "size", "digest", "details", "expires_at", "size_vram"} <= set(loaded[0])


# --- delete ------------------------------------------------------------------------------------
def test_delete_answers_empty_200_then_404(emu):
    r = requests.delete(emu.url + "/api/delete", json={"model": "qwen2.5:0.5b"}, timeout=5)
    assert (r.status_code, r.content) == (200, b"")
    assert "qwen2.5:0.5b" not in tag_names(emu)
    r = requests.delete(emu.url + "/api/delete", json={"model": "qwen2.5:0.5b"}, timeout=5)
    assert (r.status_code, r.json()) == (404, {"error": "model 'qwen2.5:0.5b' not found"})


def test_delete_matches_case_insensitively_and_without_tag(emu):
    r = requests.delete(emu.url + "/api/delete", json={"model": "LLAMA3.2"}, timeout=5)
    assert (r.status_code, r.content) == (200, b"")
    assert "llama3.2:latest" not in tag_names(emu)


@pytest.mark.parametrize("body, error", [
    ({"model": "bad name"}, 'name "bad name" is invalid'),
    ({"model": "../../etc/passwd"}, 'name "../../etc/passwd" is invalid'),
    ({}, "model is required"),
    (None, "missing request body"),
])
def test_delete_rejects_bad_requests_with_400(emu, body, error):
    r = requests.delete(emu.url + "/api/delete", json=body, timeout=5)
    assert (r.status_code, r.json()) == (400, {"error": error})


# --- pull --------------------------------------------------------------------------------------
def test_pull_stream_lines_and_order(emu):
    config(emu, pull_speed=150e6)
    started = time.monotonic()
    stream = PullStream(emu, "tinyllama")
    lines = stream.finish()
    assert stream.response.status_code == 200
    assert stream.response.headers["Content-Type"] == "application/x-ndjson"
    assert lines[0] == {"status": "pulling manifest"}
    assert [line.get("status") for line in lines[-4:]] == AFTER_LAYERS

    progress = lines[1:-4]
    order: list[str] = []
    for line in progress:
        assert set(line) <= {"status", "digest", "total", "completed"}
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", line["digest"])
        assert line["status"] == "pulling " + line["digest"][7:19]
        if not order or order[-1] != line["digest"]:
            assert line["digest"] not in order, "layers come one after the other"
            order.append(line["digest"])
    assert len(order) == 3
    for digest in order:
        done = [line.get("completed", 0) for line in progress if line["digest"] == digest]
        assert done == sorted(done), "completed never goes back"
        last = [line for line in progress if line["digest"] == digest][-1]
        assert last["completed"] == last["total"]
    assert len([line for line in progress if line["digest"] == order[0]]) >= 5, "a line every interval"
    # tinyllama shares its params layer with the installed llama3.2: a cached layer shows once, full.
    cached = [line for line in progress if line["digest"] == order[2]]
    assert len(cached) == 1 and cached[0]["completed"] == cached[0]["total"]

    times = {line.get("status"): at for at, line in stream.lines}
    assert times["writing manifest"] - times["verifying sha256 digest"] >= 0.09, "verify is silent"
    assert time.monotonic() - started < 5
    assert tag_names(emu)[0] == "tinyllama:latest", "a pulled model lists first"
    assert stats(emu)["downloads_started"] == {"tinyllama:latest": 1}


def test_pull_of_installed_model_shows_each_layer_once(emu):
    r, lines = pull_lines(emu, "LLAMA3.2")
    assert r.status_code == 200
    progress = [line for line in lines if "digest" in line]
    assert len({line["digest"] for line in progress}) == len(progress) == 3
    assert all(line["completed"] == line["total"] for line in progress)
    assert [line["status"] for line in lines[-4:]] == AFTER_LAYERS
    assert tag_names(emu).count("llama3.2:latest") == 1
    assert stats(emu)["downloads_started"] == {}, "nothing to download"


def test_unknown_model_is_an_error_line_under_200(emu):
    r, lines = pull_lines(emu, "nosuchmodel:7b")
    assert r.status_code == 200
    assert lines == [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]


@pytest.mark.parametrize("body, error", [
    ({"model": "bad name"}, "invalid model name"),
    ({"model": "a/../b"}, "invalid model name"),
    ({"model": ""}, "invalid model name"),
    (None, "missing request body"),
])
def test_pull_rejects_bad_requests_with_400(emu, body, error):
    r = requests.post(emu.url + "/api/pull", json=body, timeout=5)
    assert (r.status_code, r.json()) == (400, {"error": error})


def test_pull_accepts_old_name_field(emu):
    r = requests.post(emu.url + "/api/pull", json={"name": "smollm:135m", "stream": False}, timeout=10)
    assert (r.status_code, r.json()) == (200, {"status": "success"})


def test_pull_without_stream_answers_once(emu):
    r = requests.post(emu.url + "/api/pull", json={"model": "smollm:135m", "stream": False}, timeout=10)
    assert (r.status_code, r.json()) == (200, {"status": "success"})
    assert tag_names(emu)[0] == "smollm:135m"
    r = requests.post(emu.url + "/api/pull", json={"model": "nosuchmodel", "stream": False}, timeout=10)
    assert (r.status_code, r.json()) == (500, {"error": "pull model manifest: file does not exist"})
    config(emu, fail_after_bytes=1000)
    r = requests.post(emu.url + "/api/pull", json={"model": "phi3:mini", "stream": False}, timeout=10)
    assert r.status_code == 500 and r.json()["error"].endswith("no space left on device")


def test_fail_after_bytes_ends_with_an_error_line(emu):
    config(emu, fail_after_bytes=30_000_000, pull_speed=300e6)
    r, lines = pull_lines(emu, "smollm:135m")
    assert r.status_code == 200
    assert re.fullmatch(r"write /root/\.ollama/models/blobs/sha256-[0-9a-f]{64}-partial: no space left on device",
                        lines[-1]["error"])
    assert all(line.get("status") != "success" for line in lines)
    assert max(line.get("completed", 0) for line in lines) <= 30_000_000
    assert "smollm:135m" not in tag_names(emu)
    assert stats(emu)["failed_downloads"] == 1


def test_stall_keeps_lines_coming_while_completed_stops(emu):
    config(emu, pull_speed=50e6, stall="smollm:135m")
    stream = PullStream(emu, "smollm:135m")
    try:
        wait_until(lambda: len(stream.progress()) >= 5, 5, what="progress lines while stalled at zero")
        assert all("completed" not in p and p["total"] > 0 for p in stream.progress()), "zero completed is omitted"

        config(emu, stall=False)
        moving = stream.wait_progress(lambda p: p.get("completed", 0) > 0, "bytes to move")
        config(emu, stall=True)
        seen = len(stream.progress())
        wait_until(lambda: len(stream.progress()) >= seen + 8, 5, what="progress lines while stalled")
        frozen = [p["completed"] for p in stream.progress()[seen + 2:]]  # the first lines may predate the stall
        assert len(frozen) >= 5 and len(set(frozen)) == 1 and frozen[0] >= moving["completed"]

        config(emu, stall=False, pull_speed=2e9)
        lines = stream.finish()
        assert lines[-1] == {"status": "success"}
    finally:
        stream.close()


def test_concurrent_pulls_share_one_download(emu):
    config(emu, pull_speed=100e6)
    first = PullStream(emu, "smollm:135m")
    second = third = None
    try:
        first.wait_progress(lambda p: p.get("completed", 0) > 0, "the first pull to start moving bytes")
        second = PullStream(emu, "smollm:135m")
        third = PullStream(emu, "SMOLLM:135M")
        wait_until(lambda: stats(emu)["download_waiters"].get("smollm:135m") == 3, 5, what="three waiters")
        third.close()  # another client still waits: the download goes on
        assert first.finish()[-1] == {"status": "success"}
        second_lines = second.finish()
        assert second_lines[-1] == {"status": "success"}
        assert second_lines[1].get("completed", 0) > 0, "the second pull joined the running download"
    finally:
        for stream in (first, second, third):
            if stream:
                stream.close()
    counters = stats(emu)
    assert counters["downloads_started"] == {"smollm:135m": 1}
    assert counters["cancelled_downloads"] == 0
    assert counters["pull_requests"] == 3


def test_disconnect_cancels_and_a_later_pull_resumes(emu):
    config(emu, pull_speed=50e6)
    stream = PullStream(emu, "smollm:135m")
    try:
        reached = stream.wait_progress(lambda p: p.get("completed", 0) >= 20_000_000, "20 MB")["completed"]
    finally:
        stream.close()
    wait_until(lambda: (s := stats(emu))["cancelled_downloads"] == 1 and not s["active_downloads"], 5,
               what="the abandoned download to be cancelled")
    assert "smollm:135m" not in tag_names(emu)

    config(emu, pull_speed=1e9)
    r, lines = pull_lines(emu, "smollm:135m")
    assert lines[-1] == {"status": "success"}
    assert lines[1]["completed"] >= reached, "resumed from the partial bytes"
    assert stats(emu)["downloads_started"] == {"smollm:135m": 2}


# --- control routes ----------------------------------------------------------------------------
def test_add_remote_and_installed(emu):
    config(emu, add_remote={"example/tiny:v1": 5_000_000, "hf.co/org/repo:Q8_0": [1_000_000, 500]})
    r = requests.post(emu.url + "/api/pull", json={"model": "example/tiny:v1", "stream": False}, timeout=10)
    assert r.json() == {"status": "success"}
    assert tag_names(emu)[0] == "example/tiny:v1"
    config(emu, installed=["smollm:135m", {"name": "custom:1b", "size": 1234}])
    models = requests.get(emu.url + "/api/tags", timeout=5).json()["models"]
    assert [(m["name"], m["size"]) for m in models][1] == ("custom:1b", 1234)
    assert models[0]["name"] == "smollm:135m"


def test_config_rejects_unknown_knobs_and_bad_values(emu):
    for body in ({"no_such_knob": 1}, {"pull_speed": "fast"}, {"progress_interval": 0}):
        r = requests.post(emu.url + "/_emulator/config", json=body, timeout=5)
        assert r.status_code == 400 and "error" in r.json()


def test_reset_restores_startup_state(emu):
    startup = requests.get(emu.url + "/_emulator/config", timeout=5).json()
    assert startup["progress_interval"] == 0.02 and startup["verify_seconds"] == 0.1  # from the flags
    config(emu, latency_ms=5, stall=True, fail_after_bytes=1)
    requests.delete(emu.url + "/api/delete", json={"model": "qwen2.5:0.5b"}, timeout=5)
    emulator_control(emu, "reset")
    assert requests.get(emu.url + "/_emulator/config", timeout=5).json() == startup
    assert tag_names(emu) == DEFAULT_MODELS
    counters = stats(emu)
    assert counters["downloads_started"] == {} and counters["pull_requests"] == 0
    assert counters["cancelled_downloads"] == 0 and counters["active_downloads"] == []


# --- the process -------------------------------------------------------------------------------
def test_state_file_survives_restart_and_sigterm_exits_0(tmp_path):
    state_file = tmp_path / "state.json"
    flags = ("--state-file", str(state_file), "--config-json", '{"verify_seconds": 0}')
    proc = start_emulator(*flags)
    try:
        assert requests.get(proc.url + "/_emulator/config", timeout=5).json()["verify_seconds"] == 0
        r = requests.post(proc.url + "/api/pull", json={"model": "smollm:135m", "stream": False}, timeout=10)
        assert r.json() == {"status": "success"}
        assert json.loads(state_file.read_text())["installed"]
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(5) == 0
        assert re.search(r'\| 200 \|.*POST +"/api/pull"', proc.output()), "one log line per request"
    finally:
        proc.stop()
    with start_emulator(*flags) as again:
        assert tag_names(again)[0] == "smollm:135m"
    assert not list(tmp_path.glob(".ollama-emulator-*")), "no temp files left behind"


def test_make_server_runs_in_process():
    import ollama_emulator

    server = ollama_emulator.make_server("127.0.0.1", 0, verify_seconds=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        assert requests.get(f"http://{host}:{port}/", timeout=5).text == "Ollama is running"
    finally:
        server.shutdown()
        server.server_close()
    thread.join(5)
    assert not thread.is_alive()
