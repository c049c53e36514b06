"""Models as code on the deployed GPU hosts: the real playbooks/models.yml, run from the controller
against this scenario's inventory (gpu_bridge_models in inventory/models.yml), judged by what each
host's Ollama (the emulator) holds and counted.

The steps build on each other and run in file order, after every other check of the scenario (this
file changes the GPU hosts' models, hence test_90). They start from fresh emulators (reset: the
startup models, counters at zero) and reset them again at the end. Each step prints its figures
(past pytest's capture).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from molecule_support import OLLAMA_URL, http

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests" / "ansible"))
from models_play import PlayRun, run_playbook  # noqa: E402

UPDATED = "llama3.2:latest"  # declared, installed from the start
SNAPSHOT = "llama3.2:latest-gpubridge-prev"
LOADED = "phi3:mini"  # declared loaded: true, pulled by the first apply
ABSENT = "qwen2.5:0.5b"  # declared absent
UNDECLARED = "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"  # installed, not declared; prune off
PLAN = [  # the first plan of every GPU host: deletes, then pulls, then preloads
    ("delete", ABSENT, "declared absent"),
    ("pull", LOADED, "missing"),
    ("load", LOADED, "declared loaded"),
]


class Proof:
    """The playbook runs of this file, their inventory and the time they took."""

    def __init__(self, inventory: str, gpus: dict, say):
        self.inventory, self.gpus, self.say = inventory, gpus, say
        self.runs, self.seconds = 0, 0.0
        self.old: dict[str, str] = {}  # each host's digest of UPDATED before the update

    def run(self, **kwargs) -> PlayRun:
        start = time.monotonic()
        # molecule's environment: its ansible.cfg (roles path, interpreter, docker connection)
        result = run_playbook(self.inventory, dict(os.environ), timeout=300, **kwargs)
        self.runs += 1
        self.seconds += time.monotonic() - start
        return result


def emulator(gpu, method: str, path: str, body=None) -> dict:
    r = http(gpu, method, OLLAMA_URL + path, body)
    assert r["status"] == 200, f"{method} {path}: {r}"
    return r["body"] if isinstance(r["body"], dict) else {}


def installed(gpu) -> dict[str, str]:
    return {m["name"]: m["digest"] for m in emulator(gpu, "GET", "/api/tags")["models"]}


def resident(gpu) -> set[str]:
    return {m["name"] for m in emulator(gpu, "GET", "/api/ps")["models"]}


def stats(gpu) -> dict:
    return emulator(gpu, "GET", "/_emulator/stats")


@pytest.fixture(scope="module")
def say(request):
    """print() past pytest's capture: the figures belong in molecule's output."""
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def out(line: str) -> None:
        with capture.global_and_fixture_disabled():
            print(f"[models as code] {line}", flush=True)

    return out


@pytest.fixture(scope="module")
def proof(request, gpus, say):
    # molecule passes its inventory directory (its hosts, the group_vars/host_vars links, models.yml)
    inventory = Path(request.config.option.ansible_inventory)
    if not inventory.is_dir():
        inventory = inventory.parent
    for gpu in gpus.values():
        emulator(gpu, "POST", "/_emulator/reset")
    record = Proof(str(inventory), gpus, say)
    yield record
    say(f"{record.runs} runs of playbooks/models.yml took {record.seconds:.0f} s")
    for gpu in gpus.values():  # the emulators' startup models again, for whatever runs next
        emulator(gpu, "POST", "/_emulator/reset")


def names_of(proof: Proof) -> list[str]:
    return sorted(proof.gpus)


# --- (a) check mode on the fresh fleet --------------------------------------------------------------
def test_check_mode_on_the_fresh_fleet_shows_the_plan_and_changes_nothing(proof):
    before = {name: installed(gpu) for name, gpu in proof.gpus.items()}
    run = proof.run(check=True)
    assert run.rc == 0, run.why()
    for name, gpu in proof.gpus.items():
        plan = [(a["op"], a["model"], a["reason"]) for a in run.module(name)["plan"]]
        counters = stats(gpu)
        proof.say(f"(a) {name} check mode: plan {plan}; emulator: {counters['pull_requests']} pulls, "
                  f"{counters['copies']} copies, {counters['loads']} loads")
        assert plan == PLAN
        assert run.module(name)["plan"][2]["keep_alive"] == "1h"
        assert (counters["pull_requests"], counters["copies"], counters["loads"]) == (0, 0, 0)
        assert installed(gpu) == before[name]


# --- (b) apply, (c) a second run, (f) prune off, (g) loaded ------------------------------------------
def test_apply_converges_both_gpu_hosts_canary_first(proof):
    run = proof.run()
    assert run.rc == 0, run.why()
    hosts = names_of(proof)
    assert run.batches() == [hosts[:1], hosts[1:]]
    for name, gpu in proof.gpus.items():
        held = installed(gpu)
        proof.say(f"(b) {name} after apply: changed={run.changed(name)}, holds {sorted(held)}")
        assert run.changed(name) == 1
        assert UPDATED in held and f"{LOADED}" in held and ABSENT not in held
        assert stats(gpu)["pulls_by_model"] == {LOADED: 1}


def test_a_second_run_reports_zero_changed(proof):
    run = proof.run()
    assert run.rc == 0, run.why()
    changed = {name: run.changed(name) for name in proof.gpus}
    proof.say(f"(c) second run: changed {changed}")
    assert set(changed.values()) == {0}
    for name in proof.gpus:
        assert run.module(name)["plan"] == [] and run.module(name)["drift"] == []


def test_prune_off_keeps_the_undeclared_model(proof):
    for name, gpu in proof.gpus.items():
        proof.say(f"(f) {name}: undeclared {UNDECLARED} still installed: {UNDECLARED in installed(gpu)}")
        assert UNDECLARED in installed(gpu)


def test_the_loaded_model_is_resident_on_every_gpu_host(proof):
    for name, gpu in proof.gpus.items():
        in_memory = resident(gpu)
        proof.say(f"(g) {name} in GPU memory: {sorted(in_memory)}")
        assert LOADED in in_memory


# --- (d) a new build, canary first; (e) rollback without a pull --------------------------------------
def test_a_new_build_is_rolled_out_canary_first_and_the_old_one_kept(proof):
    old = proof.old = {name: installed(gpu)[UPDATED] for name, gpu in proof.gpus.items()}
    new = {name: emulator(gpu, "POST", "/_emulator/publish", {"model": UPDATED})["digest"]
           for name, gpu in proof.gpus.items()}
    plain = proof.run()
    assert plain.rc == 0, plain.why()
    assert {plain.changed(name) for name in proof.gpus} == {0}, "a new build is taken only with gpu_models_update"

    preview = proof.run(check=True, extra={"gpu_models_update": True})
    for name in proof.gpus:
        assert [(a["op"], a["model"], a.get("snapshot")) for a in preview.module(name)["plan"]] == [
            ("update", UPDATED, SNAPSHOT), ("update", LOADED, "phi3:mini-gpubridge-prev")]

    run = proof.run(extra={"gpu_models_update": True})
    assert run.rc == 0, run.why()
    hosts = names_of(proof)
    assert run.batches() == [hosts[:1], hosts[1:]]
    (_, canary_done), (others_start, _) = run.batch_times()
    proof.say(f"(d) update: canary {hosts[0]} batch done {canary_done}, then {hosts[1:]} from {others_start}")
    assert canary_done <= others_start
    for name, gpu in proof.gpus.items():
        outcome = next(r for r in run.module(name)["results"] if r["model"] == UPDATED)
        held = installed(gpu)
        proof.say(f"(d) {name}: {UPDATED} {old[name][:12]} -> {held[UPDATED][:12]}, "
                  f"snapshot {held.get(SNAPSHOT, 'none')[:12]}")
        assert (outcome["digest_before"], outcome["digest_after"]) == (old[name], new[name])
        assert held[UPDATED] == new[name] and held[SNAPSHOT] == old[name]
        assert not any(model.endswith("-gpubridge-next") for model in held)


def test_rollback_restores_the_previous_digest_with_zero_pulls(proof):
    before = {name: stats(gpu) for name, gpu in proof.gpus.items()}
    run = proof.run(extra={"gpu_models_rollback": [UPDATED]})
    assert run.rc == 0, run.why()
    for name, gpu in proof.gpus.items():
        after = stats(gpu)
        held = installed(gpu)
        pulls = after["pull_requests"] - before[name]["pull_requests"]
        copies = after["copies"] - before[name]["copies"]
        proof.say(f"(e) {name} rollback: {UPDATED} now {held[UPDATED][:12]} (snapshot {held[SNAPSHOT][:12]}); "
                  f"{pulls} pull requests, {copies} copies reached the emulator")
        assert held[UPDATED] == held[SNAPSHOT] == proof.old[name]
        assert pulls == 0
        assert copies >= 1
    again = proof.run(extra={"gpu_models_rollback": [UPDATED]})
    assert again.rc == 0 and {again.changed(name) for name in proof.gpus} == {0}


# --- (g) an unloaded model is reported, and loaded again ---------------------------------------------
def test_check_mode_reports_the_unloaded_model_and_apply_loads_it(proof):
    name, gpu = sorted(proof.gpus.items())[-1]
    emulator(gpu, "POST", "/api/generate", {"model": LOADED, "keep_alive": 0})
    assert LOADED not in resident(gpu)
    preview = proof.run(check=True)
    drift = [(d["model"], d["kind"]) for d in preview.module(name)["drift"]]
    proof.say(f"(g) {name} after an unload, check mode: drift {drift}")
    assert drift == [(LOADED, "not_loaded")]
    assert [(a["op"], a["model"]) for a in preview.module(name)["plan"]] == [("load", LOADED)]
    assert LOADED not in resident(gpu)
    for other in proof.gpus:
        if other != name:
            assert preview.module(other)["plan"] == []

    run = proof.run()
    assert run.rc == 0 and run.changed(name) == 1
    for each in proof.gpus.values():
        assert LOADED in resident(each)
