"""GpuFleet over fake transports: merging, selection, parallel fan-out, breakers, host preference."""

from __future__ import annotations

import time

import pytest
from prod_helpers import FakeFactory

from gpu_bridge.client.fleet import GpuFleet, merge_models, summarize
from gpu_bridge.client.http import current_request_id
from gpu_bridge.config import BackendSettings
from gpu_bridge.errors import ConfigError, InvalidModelName, InvalidRequest, NoHealthyHost

A, B = "10.0.0.1:8001", "10.0.0.2:8001"


def fleet_for(env: dict | None = None, **models):
    env = {"GPU_INSTANCE_HOSTS": "10.0.0.1,10.0.0.2", "GPU_BRIDGE_BREAKER_THRESHOLD": "2",
           "GPU_BRIDGE_BREAKER_COOLDOWN": "60", **(env or {})}
    factory = FakeFactory(**models)
    return GpuFleet(BackendSettings.from_env(env), factory), factory


def test_no_hosts_is_a_config_error():
    with pytest.raises(ConfigError, match="GPU_INSTANCE_HOSTS"):
        GpuFleet(BackendSettings.from_env({}), FakeFactory())


def test_seed_single_host_variable_still_works():
    fleet, _ = fleet_for({"GPU_INSTANCE_HOSTS": "", "GPU_INSTANCE_HOST": "gpu-01"})
    assert fleet.labels == ["gpu-01:8001"]


def test_listing_merges_and_says_which_hosts_have_each_model():
    fleet, fakes = fleet_for()
    fakes.made["10.0.0.2"].models.append({"name": "qwen2.5:0.5b", "size": 5, "digest": "cc"})
    listing = fleet.list_models()
    by_name = {m["name"]: m for m in listing["models"]}
    assert by_name["llama3.2:latest"]["hosts"] == [A, B]
    assert by_name["qwen2.5:0.5b"]["hosts"] == [B]
    assert listing["hosts"][A]["ok"] and listing["hosts"][B]["ok"]


def test_listing_reports_a_dead_host_and_keeps_the_others():
    fleet, fakes = fleet_for()
    fakes.made["10.0.0.2"].down = True
    listing = fleet.list_models()
    assert listing["hosts"][B] == {"ok": False, "error": f"{B} refused the connection: is gpu-http-server.service "
                                                        "running?", "code": "gpu_unreachable", "status": 503,
                                 "reason": "unreachable"}
    assert [m["hosts"] for m in listing["models"]] == [[A]]
    assert set(listing["per_host"]) == {A}


def test_breaker_opens_and_a_dead_host_costs_no_waiting():
    fleet, fakes = fleet_for()
    dead = fakes.made["10.0.0.2"]
    dead.down = True
    dead.delay = 0.3
    fleet.list_models()
    fleet.list_models()
    assert fleet.status()[B]["breaker"]["state"] == "open"
    calls = len(dead.calls)
    started = time.monotonic()
    listing = fleet.list_models()
    assert time.monotonic() - started < 0.2
    assert len(dead.calls) == calls, "an open breaker must not reach the host"
    assert listing["hosts"][B]["code"] == "gpu_circuit_open"


def test_pull_goes_to_every_host_in_parallel():
    fleet, fakes = fleet_for()
    for t in fakes.made.values():
        t.delay = 0.3
    started = time.monotonic()
    results = fleet.pull("tinyllama")
    assert time.monotonic() - started < 0.55, "hosts are called in parallel"
    assert set(results) == {A, B}
    assert all(r["ok"] and r["job"]["model"] == "tinyllama:latest" for r in results.values())


def test_pull_on_a_chosen_subset_by_name_or_label():
    fleet, fakes = fleet_for()
    assert list(fleet.pull("tinyllama", ["10.0.0.2"])) == [B]
    assert list(fleet.delete("llama3.2", [A])) == [A]
    assert fakes.made["10.0.0.1"].calls[-1] == ("delete_model", "llama3.2:latest")
    with pytest.raises(InvalidRequest, match="unknown GPU host 'gpu-99': known hosts are 10.0.0.1:8001, 10.0.0.2:8001"):
        fleet.pull("tinyllama", ["gpu-99"])


def test_invalid_name_fails_before_any_host_is_called():
    fleet, fakes = fleet_for()
    with pytest.raises(InvalidModelName):
        fleet.pull("../etc")
    assert all(not t.calls for t in fakes.made.values())


def test_per_host_results_and_summary():
    fleet, fakes = fleet_for()
    fakes.made["10.0.0.1"].down = True
    results = fleet.delete("llama3.2")
    assert results[B] == {"ok": True, "deleted": "llama3.2:latest"}
    assert results[A]["code"] == "gpu_unreachable"
    s = summarize(results)
    assert s["partial"] and s["ok"] == [B] and s["failed"] == [A]
    assert summarize({A: results[A]})["status"] == 503
    mixed = {A: {"ok": False, "status": 503, "code": "gpu_unreachable"},
             B: {"ok": False, "status": 504, "code": "gpu_timeout"}}
    assert summarize(mixed)["status"] == 502 and summarize(mixed)["code"] == "gpu_hosts_failed"


def test_model_not_found_does_not_count_against_the_breaker():
    fleet, _ = fleet_for()
    for _ in range(4):
        fleet.delete("ghost")
    assert all(s["breaker"]["state"] == "closed" for s in fleet.status().values())


def test_request_id_travels_into_worker_threads():
    fleet, fakes = fleet_for()
    token = current_request_id.set("rid-42")
    try:
        fleet.list_models()
    finally:
        current_request_id.reset(token)
    assert all(t.request_ids[-1] == "rid-42" for t in fakes.made.values())


def test_single_host_operations_prefer_a_healthy_host():
    fleet, fakes = fleet_for()
    fakes.made["10.0.0.1"].down = True
    label, models = fleet.call_any("list_models")
    assert label == B and models
    fleet.list_models()  # second failure: A's breaker opens
    assert fleet.preferred()[0] == B
    fakes.made["10.0.0.2"].down = True
    with pytest.raises(NoHealthyHost, match="no GPU host could serve"):
        fleet.call_any("list_models")


def test_health_reports_breaker_and_latency():
    fleet, fakes = fleet_for()
    fakes.made["10.0.0.2"].down = True
    health = fleet.health()
    assert health[A]["ok"] is True and health[A]["latency_ms"] is not None
    assert health[B]["ok"] is False and health[B]["code"] == "gpu_unreachable"
    assert health[B]["breaker"]["state"] == "closed"


def test_merge_marks_differing_digests():
    merged = merge_models({A: [{"name": "m:1", "digest": "x"}], B: [{"name": "M:1", "digest": "y"}, {"bad": 1}]})
    assert merged == [{"name": "m:1", "size": None, "digest": "x", "modified_at": None, "details": None,
                       "hosts": [A, B], "digests": {A: "x", B: "y"}, "diverged": True, "snapshot": False,
                       "digest_differs": True}]


def test_merge_shows_each_hosts_digest_and_marks_snapshots():
    merged = merge_models({A: [{"name": "m:1", "digest": "x"}, {"name": "m:1-gpubridge-prev", "digest": "w"}],
                           B: [{"name": "m:1", "digest": "x"}]})
    same, snapshot = merged
    assert (same["digests"], same["diverged"], same["snapshot"]) == ({A: "x", B: "x"}, False, False)
    assert "digest_differs" not in same
    assert (snapshot["hosts"], snapshot["snapshot"], snapshot["diverged"]) == ([A], True, False)
