"""Every Ollama route of the emulator, driven through the official ``ollama`` Python client.

The client's typed responses are the closest thing here to the real server's contract: each test
checks that the emulator fills every field the client models for that answer (where real Ollama
always sends it) with the type the client expects, and that errors reach the caller the way the client
reports real Ollama's (``ResponseError`` with the status, -1 for an error line inside a 200 stream).
``test_every_ollama_route_is_covered`` fails when the emulator grows a route this file does not drive.
"""

from __future__ import annotations

from datetime import datetime

import ollama
import ollama_emulator
import pytest
from pydantic import BaseModel

from support.procs import emulator_control, free_port, start_emulator

pytestmark = pytest.mark.integration

# The routes this file drives; the client has no method for "/" and "/api/version", so those two
# go through its own HTTP transport (the same headers, base URL and error mapping).
COVERED = {"/", "/api/version", "/api/tags", "/api/show", "/api/pull", "/api/delete", "/api/copy", "/api/ps",
           "/api/generate", "/api/chat"}


@pytest.fixture(scope="module")
def emu():
    proc = start_emulator("--progress-interval", "0.02", "--verify-seconds", "0")
    yield proc
    proc.stop()


@pytest.fixture
def client(emu):
    emulator_control(emu, "reset")
    with ollama.Client(host=emu.url, timeout=10) as c:
        yield c


def assert_complete(answer: BaseModel, *, optional: set[str] = frozenset()) -> None:
    """Every field the client's type declares was in the emulator's JSON (``optional`` excepted)."""
    missing = set(type(answer).model_fields) - answer.model_fields_set - optional
    assert not missing, f"{type(answer).__name__} lacks {sorted(missing)}"


def test_every_ollama_route_is_covered():
    assert {path for path in ollama_emulator.ROUTES if not path.startswith("/_emulator/")} == COVERED


def test_root_and_version_through_the_clients_transport(client):
    assert client._request_raw("GET", "/").text == "Ollama is running"
    assert client._request_raw("GET", "/api/version").json() == {"version": ollama_emulator.OLLAMA_VERSION}


def test_list(client):
    listing = client.list()
    assert [m.model for m in listing.models] == ["hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
                                                 "llama3.2:latest", "qwen2.5:0.5b"]
    for model in listing.models:
        assert_complete(model)
        assert_complete(model.details)
        assert isinstance(model.modified_at, datetime) and model.modified_at.utcoffset() is not None
        assert model.size > 0 and len(model.digest) == 64
    assert listing.models[0].details.families is None, "families may be null: the client allows it"


def test_show(client):
    shown = client.show("llama3.2")
    assert_complete(shown)
    assert shown.details.family == "llama" and "completion" in shown.capabilities
    assert shown.modelinfo["general.architecture"] == "llama"
    with pytest.raises(ollama.ResponseError) as info:
        client.show("nope:1b")
    assert (info.value.status_code, info.value.error) == (404, "model 'nope:1b' not found")


def test_pull_streamed(client):
    events = list(client.pull("tinyllama", stream=True))
    assert events[0].status == "pulling manifest" and events[-1].status == "success"
    layers = [e for e in events if e.digest]
    assert layers and all(e.status == "pulling " + e.digest[7:19] for e in layers)
    assert all(isinstance(e.total, int) and e.total > 0 for e in layers)
    finished = [e for e in layers if e.completed == e.total]
    assert len({e.digest for e in finished}) == 3, "every layer ends complete"
    assert "tinyllama:latest" in [m.model for m in client.list().models]


def test_pull_whole(client):
    assert client.pull("smollm:135m").status == "success"
    with pytest.raises(ollama.ResponseError) as info:
        client.pull("nosuchmodel")
    assert (info.value.status_code, info.value.error) == (500, "pull model manifest: file does not exist")


def test_pull_error_inside_a_200_stream(client):
    stream = client.pull("nosuchmodel", stream=True)
    assert next(stream).status == "pulling manifest"
    with pytest.raises(ollama.ResponseError) as info:
        next(stream)
    assert (info.value.status_code, info.value.error) == (-1, "pull model manifest: file does not exist")


def test_pull_of_a_bad_name_is_a_400(client):
    with pytest.raises(ollama.ResponseError) as info:
        client.pull("bad name")
    assert (info.value.status_code, info.value.error) == (400, "invalid model name")


def test_delete(client):
    assert client.delete("qwen2.5:0.5b").status == "success"  # an empty 200 body: the client never parses it
    with pytest.raises(ollama.ResponseError) as info:
        client.delete("qwen2.5:0.5b")
    assert (info.value.status_code, info.value.error) == (404, "model 'qwen2.5:0.5b' not found")


def test_copy(client):
    assert client.copy("llama3.2", "snapshots/llama3.2:prev").status == "success"
    digests = {m.model: m.digest for m in client.list().models}
    assert digests["snapshots/llama3.2:prev"] == digests["llama3.2:latest"]
    with pytest.raises(ollama.ResponseError) as info:
        client.copy("nope:1b", "x:1")
    assert (info.value.status_code, info.value.error) == (404, 'model "nope:1b" not found')


def test_ps(client):
    (entry,) = client.ps().models
    assert_complete(entry)
    assert_complete(entry.details)
    assert isinstance(entry.expires_at, datetime) and entry.expires_at.utcoffset() is not None
    assert 0 < entry.size_vram <= entry.size and entry.context_length == 4096
    assert entry.digest == {m.model: m.digest for m in client.list().models}[entry.model]


def test_generate_loads_and_unloads(client):
    loaded = client.generate("qwen2.5:0.5b", keep_alive="10m")
    assert_complete(loaded, optional=set(ollama.GenerateResponse.model_fields) - {
        "model", "created_at", "response", "done", "done_reason"})
    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
    assert "qwen2.5:0.5b" in [m.model for m in client.ps().models]

    streamed = list(client.generate("qwen2.5:0.5b", keep_alive=-1, stream=True))
    assert [part.done_reason for part in streamed] == ["load"], "a load is one object, streamed or not"
    forever = next(m for m in client.ps().models if m.model == "qwen2.5:0.5b")
    assert forever.expires_at.year > 2300

    unloaded = client.generate("qwen2.5:0.5b", keep_alive=0)
    assert (unloaded.done, unloaded.done_reason) == (True, "unload")
    assert "qwen2.5:0.5b" not in [m.model for m in client.ps().models]


def test_generate_answers_a_prompt(client):
    whole = client.generate("llama3.2", "hello")
    assert whole.response == ollama_emulator.CANNED_ANSWER and whole.done_reason == "stop"
    assert whole.eval_count and whole.total_duration
    parts = list(client.generate("llama3.2", "hello", stream=True))
    assert "".join(part.response for part in parts) == ollama_emulator.CANNED_ANSWER
    assert [part.done for part in parts] == [False, True]


def test_generate_of_an_unknown_model_is_a_404(client):
    with pytest.raises(ollama.ResponseError) as info:
        client.generate("nope:7b", keep_alive="5m")
    assert (info.value.status_code, info.value.error) == (404, "model 'nope:7b' not found")


def test_generate_rejects_a_bad_keep_alive(client):
    with pytest.raises(ollama.ResponseError) as info:
        client.generate("llama3.2", keep_alive="5 minutes")
    assert (info.value.status_code, info.value.error) == (400, 'time: unknown unit " minutes" in duration "5 minutes"')


def test_chat_loads_answers_and_unloads(client):
    loaded = client.chat("qwen2.5:0.5b", messages=[], keep_alive="1h")
    assert (loaded.done_reason, loaded.message.role, loaded.message.content) == ("load", "assistant", "")
    answer = client.chat("qwen2.5:0.5b", messages=[{"role": "user", "content": "hi"}])
    assert answer.message.content == ollama_emulator.CANNED_ANSWER and answer.done_reason == "stop"
    parts = list(client.chat("qwen2.5:0.5b", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(part.message.content for part in parts) == ollama_emulator.CANNED_ANSWER
    assert client.chat("qwen2.5:0.5b", keep_alive=0).done_reason == "unload"
    assert "qwen2.5:0.5b" not in [m.model for m in client.ps().models]


def test_a_refused_connection_is_the_builtin_connection_error():
    with ollama.Client(host=f"http://127.0.0.1:{free_port()}", timeout=2) as client, \
            pytest.raises(ConnectionError):
        client.list()
