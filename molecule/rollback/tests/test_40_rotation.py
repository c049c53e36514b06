"""The GPU API token was rotated (playbooks/rotate_api_token.yml, in side_effect) while a listing
loop ran through the backend: no listing saw a refused token or failed."""

import json

import pytest

testinfra_hosts = ["prod_backends"]


def test_no_listing_failed_or_saw_a_refused_token_during_the_rotation(host, phase):
    if phase != "restored":
        pytest.skip("the rotation runs in side_effect (phase restored)")
    counts = json.loads(host.file("/run/rotation-loop.json").content_string)
    print(f"\nrotation loop: {counts['sent']} listings, status {counts['status']}, "
          f"{counts['unauthorized']} with a refused token, {counts['stale_hosts']} stale host answers, "
          f"{counts['backend_down']} refused while the backend restarted")
    assert counts["done"] is True
    assert counts["sent"] >= 50, counts  # the loop ran through the three steps
    assert counts["unauthorized"] == 0, counts["examples"]
    assert set(counts["status"]) == {"200"}, counts["examples"]


def test_the_backend_now_sends_the_new_token_and_keeps_the_old_as_fallback(host, phase):
    if phase != "restored":
        pytest.skip("the rotation runs in side_effect (phase restored)")
    lines = host.file("/etc/gpu-bridge/credentials/api-token").content_string.split()
    assert lines[0] == "rotated-lab-api-token-9f3c51e0b7a24d68" and len(lines) == 2


def test_gpu_hosts_accept_only_the_new_token(gpus, phase):
    if phase != "restored":
        pytest.skip("the rotation runs in side_effect (phase restored)")
    for gpu in gpus.values():
        tokens = gpu.file("/etc/gpu-bridge/credentials/api-token").content_string.split()
        assert tokens == ["rotated-lab-api-token-9f3c51e0b7a24d68"]
