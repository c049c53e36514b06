"""Models as code, the Ansible side: the real playbooks/models.yml, role gpu_models and module
gpu_bridge_models, run by ansible-playbook against real GPU servers (gunicorn) in front of Ollama
emulators. What reached Ollama is read from the emulators' counters, never inferred from the output.

The emulators start with llama3.2:latest, qwen2.5:0.5b and hf.co/bartowski/Llama-3.2-1B-Instruct-
GGUF:Q4_K_M installed; tinyllama is in their registry only.
"""

from __future__ import annotations

import pytest
from models_play import GpuHost, run_models, start_gpu_host

from support.procs import free_port

pytestmark = pytest.mark.integration

HF = "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"
DECLARED = [{"name": "llama3.2:latest"}, {"name": "tinyllama"}, {"name": "qwen2.5:0.5b", "state": "absent"}]
SNAPSHOT = "llama3.2:latest-gpubridge-prev"


@pytest.fixture(scope="module")
def fleet():
    hosts = []
    try:
        for name in ("gpu-a", "gpu-b"):
            hosts.append(start_gpu_host(name))
        yield hosts
    finally:
        for host in hosts:
            host.stop()


@pytest.fixture
def gpu(fleet) -> GpuHost:
    """gpu-a alone, its emulator back at its startup state."""
    fleet[0].reset()
    return fleet[0]


@pytest.fixture
def both(fleet) -> list[GpuHost]:
    for host in fleet:
        host.reset()
    return fleet


# --- plan, apply, idempotence -------------------------------------------------------------------
def test_check_mode_shows_the_exact_plan_and_changes_nothing(gpu, tmp_path):
    before = gpu.installed()
    run = run_models(tmp_path, [gpu], DECLARED, check=True)
    assert run.rc == 0, run.output[-3000:]
    result = run.module("gpu-a")
    assert result["plan"] == [
        {"host": "gpu-a", "op": "delete", "model": "qwen2.5:0.5b", "reason": "declared absent"},
        {"host": "gpu-a", "op": "pull", "model": "tinyllama", "reason": "missing"},
    ]
    assert [(d["model"], d["kind"]) for d in result["drift"]] == [("qwen2.5:0.5b", "extra"), ("tinyllama", "missing")]
    assert result["changed"] is True and result["results"] == []
    stats = gpu.stats()
    print(f"check mode on a fresh host: {len(result['plan'])} actions planned; emulator: "
          f"{stats['pull_requests']} pulls, {stats['copies']} copies, {stats['loads']} loads")
    assert (stats["pull_requests"], stats["copies"], stats["loads"]) == (0, 0, 0)
    assert gpu.installed() == before


def test_diff_shows_the_plan_as_installed_versus_planned(gpu, tmp_path):
    digests = gpu.installed()
    run = run_models(tmp_path, [gpu], DECLARED, check=True, diff=True, text=True)
    assert run.rc == 0, run.output[-3000:]
    lines = run.output.splitlines()
    for expected in ("--- before: gpu-a: installed", "+++ after: gpu-a: planned",
                     f" llama3.2:latest {digests['llama3.2:latest'][:12]}",
                     f" {HF} {digests[HF][:12]} loaded",  # the emulator starts with its newest model in memory
                     f"-qwen2.5:0.5b {digests['qwen2.5:0.5b'][:12]}",
                     "+tinyllama:latest pulled"):
        assert expected in lines, f"{expected!r} not in the diff:\n{run.output}"
    assert "gpu-a: delete qwen2.5:0.5b, pull tinyllama (check mode: nothing was changed)" in run.output
    assert gpu.stats()["pull_requests"] == 0


def test_apply_converges_and_a_second_run_changes_nothing(gpu, tmp_path):
    first = run_models(tmp_path, [gpu], DECLARED)
    assert first.rc == 0, first.output[-3000:]
    assert first.changed("gpu-a") == 1
    assert [(r["op"], r["changed"]) for r in first.module("gpu-a")["results"]] == [("delete", True), ("pull", True)]
    held = gpu.installed()
    assert "tinyllama:latest" in held and "qwen2.5:0.5b" not in held and "llama3.2:latest" in held
    assert first.module("gpu-a")["results"][1]["digest_after"] == held["tinyllama:latest"]
    assert gpu.stats()["pulls_by_model"] == {"tinyllama:latest": 1}

    second = run_models(tmp_path, [gpu], DECLARED)
    again = run_models(tmp_path, [gpu], DECLARED, check=True)
    print(f"apply: changed={first.changed('gpu-a')}; second run: changed={second.changed('gpu-a')}, "
          f"check mode after: changed={again.changed('gpu-a')}")
    for run in (second, again):
        assert run.rc == 0 and run.changed("gpu-a") == 0
        assert run.module("gpu-a")["plan"] == [] and run.module("gpu-a")["drift"] == []
    assert gpu.stats()["pulls_by_model"] == {"tinyllama:latest": 1}
    assert gpu.installed() == held


def test_nothing_declared_changes_nothing(gpu, tmp_path):
    """A host without gpu_bridge_models (the default, []) and prune off: the module leaves it alone."""
    before = gpu.installed()
    run = run_models(tmp_path, [gpu], None)
    assert run.rc == 0 and run.changed("gpu-a") == 0 and run.module("gpu-a")["plan"] == []
    assert gpu.installed() == before


# --- bad declarations ---------------------------------------------------------------------------
@pytest.mark.parametrize(("models", "fragments"), [
    ([{"name": "llama3.2"}, {"name": "Bad Name!"}], ["gpu_bridge_models[1] of gpu-a: invalid model name 'Bad Name!'"]),
    ([{"name": "llama3.2"}, {"name": "tinyllama", "lodaed": True}],
     ["gpu_bridge_models[1] of gpu-a: unknown key(s) 'lodaed'; allowed: keep_alive, loaded, name, state"]),
    ([{"name": "llama3.2"}, {"name": "llama3.2:latest"}],
     ["gpu_bridge_models[1] of gpu-a: 'llama3.2:latest' is declared twice (first as 'llama3.2')"]),
    ([{"name": SNAPSHOT}], ["gpu_bridge_models[0] of gpu-a: 'llama3.2:latest-gpubridge-prev' is a snapshot name"]),
    ([{"name": "llama3.2", "state": "gone"}], ["gpu_bridge_models[0] of gpu-a: state must be 'present' or 'absent'"]),
    ([{"name": "qwen2.5:0.5b", "state": "absent", "loaded": True}],
     ["gpu_bridge_models[0] of gpu-a: a model declared absent cannot be loaded"]),
    ([{"state": "present"}], ["gpu_bridge_models[0] of gpu-a: model name is required"]),
    ([{"name": "llama3.2", "loaded": "yes"}], ["gpu_bridge_models[0] of gpu-a: loaded must be true or false"]),
    ([{"name": "llama3.2", "keep_alive": [1]}], ["gpu_bridge_models[0] of gpu-a: keep_alive must be a duration"]),
    ({"name": "llama3.2"}, ["gpu_bridge_models", "list"]),  # Ansible's argument spec: not a list
], ids=["bad-name", "unknown-key", "duplicate", "snapshot-name", "bad-state", "absent-and-loaded", "no-name",
        "loaded-not-bool", "bad-keep-alive", "not-a-list"])
def test_a_bad_declaration_fails_with_one_message_naming_the_entry(gpu, tmp_path, models, fragments):
    before = gpu.installed()
    run = run_models(tmp_path, [gpu], models)
    assert run.rc != 0 and run.failures("gpu-a") == 1
    message = run.failure("gpu-a")
    print(f"refused: {message}")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if isinstance(models, list):  # the module's own check: one line
        assert "\n" not in message
    assert "Traceback" not in run.output
    assert gpu.stats()["pull_requests"] == 0 and gpu.installed() == before


@pytest.mark.parametrize(("host_vars", "fragment"), [
    ({"gpu_models_token_file": "/nonexistent/api-token"}, "cannot read the API token /nonexistent/api-token"),
    ({"gpu_models_url": "http://127.0.0.1:{port}"}, "did not answer"),
    ({"gpu_models_token_file": "{wrong}"}, "HTTP 401"),
], ids=["no-token-file", "server-down", "wrong-token"])
def test_an_unusable_host_fails_with_one_clear_message(gpu, tmp_path, host_vars, fragment):
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token-0123456789abcdef\n")
    host_vars = {k: v.format(port=free_port(), wrong=wrong) for k, v in host_vars.items()}
    run = run_models(tmp_path, [gpu], DECLARED, host_vars={"gpu-a": host_vars})
    assert run.rc != 0
    message = run.failure("gpu-a")
    assert message.startswith("gpu-a: ") and fragment in message, message
    assert "\n" not in message and "Traceback" not in run.output
    assert "not-the-token" not in run.output


# --- update and rollback ------------------------------------------------------------------------
def test_an_update_keeps_the_old_build_and_rollback_restores_it_without_a_pull(gpu, tmp_path):
    declared = [{"name": "llama3.2:latest"}]
    old = gpu.installed()["llama3.2:latest"]
    new = gpu.publish("llama3.2:latest")["digest"]
    assert new != old

    plain = run_models(tmp_path, [gpu], declared)
    assert plain.changed("gpu-a") == 0 and gpu.installed()["llama3.2:latest"] == old, \
        "a new build is only taken with gpu_models_update"

    preview = run_models(tmp_path, [gpu], declared, check=True, extra={"gpu_models_update": True})
    assert preview.module("gpu-a")["plan"] == [{"host": "gpu-a", "op": "update", "model": "llama3.2:latest",
                                                "reason": "re-pull for a newer build (--update)",
                                                "snapshot": SNAPSHOT}]
    assert gpu.stats()["pull_requests"] == 0

    update = run_models(tmp_path, [gpu], declared, extra={"gpu_models_update": True})
    assert update.rc == 0, update.output[-3000:]
    (outcome,) = update.module("gpu-a")["results"]
    assert (outcome["changed"], outcome["digest_before"], outcome["digest_after"]) == (True, old, new)
    held = gpu.installed()
    assert held["llama3.2:latest"] == new and held[SNAPSHOT] == old
    assert not any(name.endswith("-gpubridge-next") for name in held), held
    assert gpu.stats()["pulls_by_model"] == {"llama3.2:latest": 1}

    pulls = gpu.stats()["pull_requests"]
    copies = gpu.stats()["copies"]
    preview = run_models(tmp_path, [gpu], declared, check=True, extra={"gpu_models_rollback": ["llama3.2"]})
    assert [(a["op"], a["model"]) for a in preview.module("gpu-a")["plan"]] == [("rollback", "llama3.2:latest")]
    assert preview.changed("gpu-a") == 1 and gpu.installed()["llama3.2:latest"] == new

    rollback = run_models(tmp_path, [gpu], declared, extra={"gpu_models_rollback": ["llama3.2"]})
    assert rollback.rc == 0, rollback.output[-3000:]
    assert rollback.changed("gpu-a") == 1
    stats = gpu.stats()
    print(f"update {old[:12]} -> {new[:12]}; rollback -> {gpu.installed()['llama3.2:latest'][:12]} with "
          f"{stats['pull_requests'] - pulls} pull requests, {stats['copies'] - copies} copies")
    assert gpu.installed()["llama3.2:latest"] == old
    assert stats["pull_requests"] == pulls, "a rollback must not pull"
    assert stats["copies"] > copies

    again = run_models(tmp_path, [gpu], declared, extra={"gpu_models_rollback": ["llama3.2"]})
    assert again.rc == 0 and again.changed("gpu-a") == 0 and again.module("gpu-a")["plan"] == []
    # prune keeps the snapshot of a declared model (the rollback stays possible)
    pruned = run_models(tmp_path, [gpu], declared, prune=True)
    assert pruned.rc == 0 and set(gpu.installed()) == {"llama3.2:latest", SNAPSHOT}


def test_rollback_without_a_snapshot_fails_before_anything_runs(gpu, tmp_path):
    before = gpu.installed()
    for check in (True, False):
        run = run_models(tmp_path, [gpu], DECLARED, check=check, extra={"gpu_models_rollback": ["llama3.2"]})
        assert run.rc != 0
        assert "no snapshot of llama3.2:latest (llama3.2:latest-gpubridge-prev)" in run.failure("gpu-a")
    assert gpu.installed() == before and gpu.stats()["copies"] == 0


def test_update_and_rollback_together_are_refused(gpu, tmp_path):
    run = run_models(tmp_path, [gpu], DECLARED, extra={"gpu_models_update": True, "gpu_models_rollback": ["llama3.2"]})
    assert run.rc != 0 and "cannot be used in the same run" in run.failure("gpu-a")
    assert gpu.stats()["pull_requests"] == 0


# --- prune --------------------------------------------------------------------------------------
def test_prune_off_deletes_nothing_undeclared_and_prune_on_deletes_it(gpu, tmp_path):
    declared = [{"name": "llama3.2:latest"}]
    off = run_models(tmp_path, [gpu], declared, prune=False)
    assert off.rc == 0 and off.changed("gpu-a") == 0
    assert set(gpu.installed()) == {"llama3.2:latest", "qwen2.5:0.5b", HF}

    preview = run_models(tmp_path, [gpu], declared, prune=True, check=True)
    assert preview.module("gpu-a")["plan"] == [
        {"host": "gpu-a", "op": "delete", "model": HF, "reason": "not declared (prune)"},
        {"host": "gpu-a", "op": "delete", "model": "qwen2.5:0.5b", "reason": "not declared (prune)"},
    ]
    assert set(gpu.installed()) == {"llama3.2:latest", "qwen2.5:0.5b", HF}

    on = run_models(tmp_path, [gpu], declared, prune=True)
    assert on.rc == 0 and on.changed("gpu-a") == 1
    assert set(gpu.installed()) == {"llama3.2:latest"}


# --- loaded models ------------------------------------------------------------------------------
def test_a_loaded_model_is_resident_after_apply_and_check_mode_reports_it_unloaded(gpu, tmp_path):
    declared = [{"name": "tinyllama", "loaded": True, "keep_alive": "1h"}]
    apply = run_models(tmp_path, [gpu], declared)
    assert apply.rc == 0, apply.output[-3000:]
    assert [a["op"] for a in apply.module("gpu-a")["plan"]] == ["pull", "load"]
    assert apply.module("gpu-a")["plan"][1]["keep_alive"] == "1h"
    assert "tinyllama:latest" in gpu.resident()
    assert run_models(tmp_path, [gpu], declared).changed("gpu-a") == 0

    gpu.unload("tinyllama:latest")
    assert "tinyllama:latest" not in gpu.resident()
    preview = run_models(tmp_path, [gpu], declared, check=True)
    result = preview.module("gpu-a")
    print(f"after an unload, check mode: drift {[d['kind'] for d in result['drift']]}, "
          f"plan {[a['op'] for a in result['plan']]}")
    assert [(d["model"], d["kind"]) for d in result["drift"]] == [("tinyllama", "not_loaded")]
    assert [(a["op"], a["model"]) for a in result["plan"]] == [("load", "tinyllama")]
    assert preview.changed("gpu-a") == 1 and "tinyllama:latest" not in gpu.resident()

    again = run_models(tmp_path, [gpu], declared)
    assert again.changed("gpu-a") == 1 and "tinyllama:latest" in gpu.resident()


# --- the canary batch ---------------------------------------------------------------------------
def test_an_update_runs_on_the_canary_first_then_on_the_others(both, tmp_path):
    declared = [{"name": "llama3.2:latest"}]
    new = {host.name: host.publish("llama3.2:latest")["digest"] for host in both}
    run = run_models(tmp_path, both, declared, extra={"gpu_models_update": True})
    assert run.rc == 0, run.output[-3000:]
    assert run.batches() == [["gpu-a"], ["gpu-b"]]
    (_, canary_done), (others_start, _) = run.batch_times()
    assert canary_done <= others_start, "the other hosts start once the canary batch is done"
    for host in both:
        assert host.installed()["llama3.2:latest"] == new[host.name]


def test_a_failing_canary_stops_the_run_before_the_other_hosts(both, tmp_path):
    canary, other = both
    canary.config(fail_after_bytes=0)
    run = run_models(tmp_path, both, [{"name": "tinyllama"}])
    assert run.rc != 0 and run.failures("gpu-a") == 1
    message = run.failure("gpu-a")
    print(f"canary failed: {message}")
    assert message.startswith("gpu-a: ") and "tinyllama" in message and "after 0 of 1 planned actions" in message
    assert not run.ran_on("gpu-b")
    assert other.stats()["pull_requests"] == 0 and "tinyllama:latest" not in other.installed()
