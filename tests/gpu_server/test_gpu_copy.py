"""``POST /api/copy`` on the GPU server (models as code: snapshots and rollbacks without a download).

The contract the Ansible module and the backend rely on: ``{"source", "destination"}`` in,
``{"source", "destination", "digest"}`` out, the digest being the source's; both names by the
grammar and not the allow-list; a missing source is 404 ``model_not_found``; JSON only; rate-limited.
"""

from __future__ import annotations

import pytest

from gpu_server_helpers import AUTH
from support.procs import emulator_control

OUTSIDE = "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"  # installed in the emulator


def _digests(client) -> dict[str, str]:
    return {m["name"]: m["digest"] for m in client.get("/api/models", headers=AUTH).get_json()["models"]}


def test_copy_answers_the_copys_digest_and_downloads_nothing(client, ollama):
    r = client.post("/api/copy", headers=AUTH, json={"source": "llama3.2", "destination": "llama3.2:kept"})
    assert r.status_code == 200, r.get_json()
    listed = _digests(client)
    assert r.get_json() == {"source": "llama3.2:latest", "destination": "llama3.2:kept",
                            "digest": listed["llama3.2:latest"]}
    assert listed["llama3.2:kept"] == listed["llama3.2:latest"]
    stats = emulator_control(ollama, "stats")
    assert stats["pulls"] == 0 and stats["copies"] == 1


def test_the_allow_list_does_not_apply_to_a_copy(make_app, ollama):
    client = make_app(ollama.url, GPU_BRIDGE_ALLOWED_REGISTRIES="registry.ollama.ai",
                      GPU_BRIDGE_RATE_LIMIT_PER_MINUTE=0).test_client()
    r = client.post("/api/copy", headers=AUTH, json={"source": OUTSIDE, "destination": "kept:one"})
    assert r.status_code == 200, r.get_json()


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"source": "nosuchmodel:latest", "destination": "x:y"}, 404, "model_not_found"),
    ({"source": "llama3.2:latest", "destination": "x:"}, 400, "invalid_model_name"),
    ({"source": "a..b", "destination": "x:y"}, 400, "invalid_model_name"),
    ({"destination": "x:y"}, 400, "invalid_request"),
    ({"source": "llama3.2:latest", "destination": 7}, 400, "invalid_request"),
    ([1, 2], 400, "invalid_request"),
])
def test_bad_copies_are_4xx_with_a_code(client, body, status, code):
    r = client.post("/api/copy", headers=AUTH, json=body)
    assert (r.status_code, r.get_json()["code"]) == (status, code), r.get_json()


def test_copy_takes_json_only_and_the_token(client):
    r = client.post("/api/copy", headers=AUTH, data="source=llama3.2", content_type="application/x-www-form-urlencoded")
    assert (r.status_code, r.get_json()["code"]) == (415, "unsupported_media_type")
    r = client.post("/api/copy", json={"source": "llama3.2", "destination": "x:y"})
    assert r.status_code == 401


def test_copy_is_rate_limited_like_other_changes(make_app, ollama):
    client = make_app(ollama.url, GPU_BRIDGE_RATE_LIMIT_PER_MINUTE=1).test_client()
    body = {"source": "llama3.2", "destination": "llama3.2:kept"}
    assert client.post("/api/copy", headers=AUTH, json=body).status_code == 200
    r = client.post("/api/copy", headers=AUTH, json=body)
    assert (r.status_code, r.get_json()["code"]) == (429, "rate_limited") and r.headers["Retry-After"]
