"""The models-as-code engine (gpu_bridge.reconcile): declared × observed → drift and a plan."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_bridge import reconcile as rc
from gpu_bridge.errors import InvalidRequest

D1, D2, D3 = "a" * 64, "b" * 64, "c" * 64


def obs(host, models=None, loaded=None, error=None):
    listing = [{"name": n, "digest": d} for n, d in (models or {}).items()]
    o = rc.Observed.from_listing(host, listing, None if loaded is None else [{"name": n} for n in loaded])
    o.error = error
    return o


def spec(host, models, prune=False, group="gpu"):
    return rc.parse_spec(host, models, prune=prune, group=group)


# --- the declared state ---------------------------------------------------------------------------
@pytest.mark.parametrize("raw, message", [
    ("llama3", "must be a list"),
    ([{"name": "bad name"}], "gpu_bridge_models[0] of gpu-01: invalid model name"),
    ([{"name": "llama3", "stat": "absent"}], "unknown key(s) 'stat'"),
    ([{"name": "llama3", "state": "gone"}], "state must be 'present' or 'absent'"),
    ([{"name": "llama3", "loaded": "yes"}], "loaded must be true or false"),
    ([{"name": "llama3", "state": "absent", "loaded": True}], "cannot be loaded"),
    ([{"name": "llama3"}, {"name": "llama3:latest"}], "declared twice (first as 'llama3')"),
    ([{"name": "llama3:latest-gpubridge-prev"}], "is a snapshot name"),
    ([{"name": "llama3", "keep_alive": True}], "keep_alive must be a duration"),
    ([42], "must be a mapping with a 'name'"),
])
def test_bad_declarations_say_which_entry_and_what_to_fix(raw, message):
    with pytest.raises(InvalidRequest) as err:
        rc.parse_spec("gpu-01", raw)
    assert message in err.value.message


def test_prune_must_be_a_boolean():
    with pytest.raises(InvalidRequest, match="gpu_bridge_models_prune of gpu-01 must be true or false"):
        rc.parse_spec("gpu-01", [], prune="yes")


def test_names_match_as_ollama_matches_them():
    s = spec("gpu-01", ["llama3.2", {"name": "registry.ollama.ai/library/qwen2.5:0.5b"}])
    o = obs("gpu-01", {"llama3.2:latest": D1, "qwen2.5:0.5b": D2})
    assert rc.detect_drift([s], {"gpu-01": o}) == []
    assert rc.plan([s], {"gpu-01": o}) == []


# --- drift and plan -------------------------------------------------------------------------------
def test_missing_extra_and_absent_on_a_fresh_fleet():
    specs = [spec("gpu-01", [{"name": "llama3.2:latest"}, {"name": "qwen2.5:0.5b", "state": "absent"}]),
             spec("gpu-02", [{"name": "llama3.2:latest"}], prune=True)]
    observed = {"gpu-01": obs("gpu-01", {"qwen2.5:0.5b": D1, "phi3:mini": D2}),
                "gpu-02": obs("gpu-02", {"phi3:mini": D2})}
    drift = [(d.host, d.model, d.kind) for d in rc.detect_drift(specs, observed)]
    assert drift == [("gpu-01", "llama3.2:latest", "missing"), ("gpu-01", "qwen2.5:0.5b", "extra"),
                     ("gpu-02", "llama3.2:latest", "missing"), ("gpu-02", "phi3:mini", "extra")]
    actions = [(a.host, a.op, a.model) for a in rc.plan(specs, observed)]
    # gpu-01 has prune off: phi3 stays; deletes run before pulls on each host.
    assert actions == [("gpu-01", "delete", "qwen2.5:0.5b"), ("gpu-01", "pull", "llama3.2:latest"),
                       ("gpu-02", "delete", "phi3:mini"), ("gpu-02", "pull", "llama3.2:latest")]


def test_diverged_digests_in_a_group_are_drift_and_update_resolves_them():
    specs = [spec("gpu-01", ["llama3.2"]), spec("gpu-02", ["llama3.2"]), spec("gpu-03", ["llama3.2"], group="other")]
    observed = {"gpu-01": obs("gpu-01", {"llama3.2:latest": D1}), "gpu-02": obs("gpu-02", {"llama3.2:latest": D2}),
                "gpu-03": obs("gpu-03", {"llama3.2:latest": D3})}
    drift = rc.detect_drift(specs, observed)
    assert [(d.host, d.kind) for d in drift] == [("gpu-01", "diverged"), ("gpu-02", "diverged")]
    assert "gpu-01=aaaaaaaaaaaa, gpu-02=bbbbbbbbbbbb" in drift[0].detail
    assert rc.plan(specs, observed) == []  # nothing is re-pulled unless asked
    updates = rc.plan(specs, observed, update=True)
    assert [(a.host, a.op, a.snapshot) for a in updates] == [
        (h, "update", "llama3.2:latest-gpubridge-prev") for h in ("gpu-01", "gpu-02", "gpu-03")]


def test_loaded_models_are_planned_after_their_pull_and_reported_when_not_resident():
    s = spec("gpu-01", [{"name": "llama3.2", "loaded": True, "keep_alive": "forever"}, "qwen2.5:0.5b"])
    fresh = rc.plan([s], {"gpu-01": obs("gpu-01", {}, loaded=[])})
    assert [(a.op, a.model, a.keep_alive) for a in fresh] == [
        ("pull", "llama3.2", None), ("pull", "qwen2.5:0.5b", None), ("load", "llama3.2", "forever")]
    installed = obs("gpu-01", {"llama3.2:latest": D1, "qwen2.5:0.5b": D2}, loaded=[])
    assert [d.kind for d in rc.detect_drift([s], {"gpu-01": installed})] == ["not_loaded"]
    resident = obs("gpu-01", {"llama3.2:latest": D1, "qwen2.5:0.5b": D2}, loaded=["llama3.2:latest"])
    assert rc.detect_drift([s], {"gpu-01": resident}) == []


def test_unknown_residency_is_not_drift_but_still_loads():
    s = spec("gpu-01", [{"name": "llama3.2", "loaded": True}])
    o = obs("gpu-01", {"llama3.2:latest": D1})  # an old GPU server without /api/models/loaded
    assert rc.detect_drift([s], {"gpu-01": o}) == []
    assert [a.op for a in rc.plan([s], {"gpu-01": o})] == ["load"]


def test_unreachable_hosts_are_drift_and_get_no_action():
    specs = [spec("gpu-01", ["llama3.2"]), spec("gpu-02", ["llama3.2"])]
    observed = {"gpu-01": obs("gpu-01", error="connection refused")}
    drift = rc.detect_drift(specs, observed)
    assert [(d.host, d.kind, d.detail) for d in drift] == [
        ("gpu-01", "unreachable", "connection refused"), ("gpu-02", "unreachable", "no state was read")]
    assert rc.plan(specs, observed) == []


def test_prune_keeps_the_snapshot_of_a_declared_model_and_removes_orphans():
    s = spec("gpu-01", ["llama3.2"], prune=True)
    o = obs("gpu-01", {"llama3.2:latest": D1, "llama3.2:latest-gpubridge-prev": D2,
                       "phi3:mini-gpubridge-prev": D3})
    assert [(a.op, a.model) for a in rc.plan([s], {"gpu-01": o})] == [("delete", "phi3:mini-gpubridge-prev")]


def test_snapshot_names_stay_valid_and_distinct_for_long_tags():
    a = rc.snapshot_name("hf.co/org/repo:" + "q" * 80)
    b = rc.snapshot_name("hf.co/org/repo:" + "q" * 79 + "r")
    assert a != b and rc.is_snapshot(a) and rc.is_snapshot(b)
    assert len(a.rsplit(":", 1)[1]) == 80
    assert rc.snapshot_name("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M") == \
        "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M-gpubridge-prev"
    assert not rc.is_snapshot("llama3.2") and not rc.is_snapshot("not a name")


def test_canary_batches():
    assert rc.canary_batches(["a", "b", "c"], 1) == [["a"], ["b", "c"]]
    assert rc.canary_batches(["a", "b"], 0) == [["a", "b"]]
    assert rc.canary_batches(["a", "b"], 5) == [["a", "b"]]
    assert rc.canary_batches([], 1) == []
    with pytest.raises(InvalidRequest, match="--canary must be 0 or more"):
        rc.canary_batches(["a"], -1)


# --- properties -----------------------------------------------------------------------------------
MODEL_NAMES = ["llama3.2:latest", "qwen2.5:0.5b", "phi3:mini", "hf.co/org/repo:Q4_K_M", "gemma:2b"]
DIGESTS = [D1, D2, D3]
entry = st.builds(lambda n, absent, loaded: {"name": n, "state": "absent" if absent else "present",
                                              "loaded": loaded and not absent},
                  st.sampled_from(MODEL_NAMES), st.booleans(), st.booleans())
host_models = st.dictionaries(st.sampled_from(MODEL_NAMES), st.sampled_from(DIGESTS), max_size=5)


def _unique(entries):
    seen, out = set(), []
    for e in entries:
        if e["name"] not in seen:
            seen.add(e["name"])
            out.append(e)
    return out


@settings(max_examples=200, deadline=None)
@given(declared=st.lists(entry, max_size=5).map(_unique), prune=st.booleans(),
       held=st.lists(host_models, min_size=1, max_size=3), update=st.booleans(),
       registry_digest=st.sampled_from(DIGESTS))
def test_applying_the_plan_converges_and_a_second_plan_is_empty(declared, prune, held, update, registry_digest):
    """After a plan is carried out, there is no drift (besides nothing), and planning again finds
    nothing to do: the property `apply` and the Ansible module's idempotence rest on."""
    hosts = [f"gpu-{i:02d}" for i in range(len(held))]
    specs = [spec(h, declared, prune=prune) for h in hosts]
    observed = {h: obs(h, m, loaded=[]) for h, m in zip(hosts, held, strict=True)}
    actions = rc.plan(specs, observed, update=update)
    registry = {rc.model_key(n): registry_digest for n in MODEL_NAMES}
    after = {h: rc.apply_to(observed[h], actions, registry=registry) for h in hosts}
    remaining = rc.detect_drift(specs, after)
    # Without --update a model already installed keeps its digest, so divergence may remain; nothing else.
    assert all(d.kind == "diverged" for d in remaining) and (not update or not remaining)
    assert rc.plan(specs, after) == []
