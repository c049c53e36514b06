"""Models as code end to end, on real processes: two GPU hosts (gunicorn GPU servers, or NFS workers,
each with its own Ollama emulator), a backend reading a declared-models file, and ``gpu-bridge`` as a
subprocess (not a terminal).

- ``/config/drift``: missing, extra (declared absent; not declared with prune), diverged (a new build
  pulled on one host of a group), unreachable; the ``gpu_bridge_model_drift`` series come and go;
- a declared-models file that is broken: 503 with the reason; none configured: 404; never a 500;
- the CLI: ``drift`` and ``plan`` exit 0 / 1 / 2; ``apply`` converges and the next plan is empty, and
  with prune off nothing undeclared is deleted; ``apply --update --canary 1`` rolls a new build out
  canary first, and stops at a canary failure with the other host untouched; ``rollback`` restores the
  previous digest with zero pulls reaching the emulators.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests
from conftest import run_cli

from gpu_bridge import reconcile
from support.procs import emulator_control

pytestmark = pytest.mark.integration

FAST = {"pull_speed": 2e9, "verify_seconds": 0}
OUTSIDE = "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"  # installed at the emulators' start


@pytest.fixture
def fleet(gpu_side, backends, tmp_path):
    """``fleet(declared, hosts=None) -> backend``: a backend over the two GPU hosts (or ``hosts``) whose
    declared-models file holds ``declared`` ({label: host entry}); checks only on request."""
    for emu in gpu_side.emulators:
        emulator_control(emu, "config", FAST)

    def start(declared: dict | str | None, hosts: list[str] | None = None):
        env = {"GPU_BRIDGE_DRIFT_INTERVAL": "0"}
        if declared is not None:
            path = tmp_path / "declared-models.json"
            path.write_text(declared if isinstance(declared, str) else json.dumps({"hosts": declared}))
            env["GPU_BRIDGE_DECLARED_MODELS_FILE"] = str(path)
        return backends(gpu_side.backend_env(hosts, **env))

    return start


def both(gpu_side, models, *, prune=False, group="gpu"):
    return {label: {"group": group, "models": models, "prune": prune} for label in gpu_side.labels}


def drift_of(backend, **params) -> dict:
    r = requests.get(backend.url + "/config/drift", params={"refresh": "true", **params}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def kinds(report) -> set[tuple[str, str, str]]:
    return {(d["host"], d["model"], d["kind"]) for d in report["drift"]}


def digests(gpu_side, name: str) -> dict[str, str | None]:
    """Each emulator's digest of ``name`` (asked directly: what the hosts really hold)."""
    out = {}
    for label, emu in zip(gpu_side.labels, gpu_side.emulators, strict=True):
        tags = requests.get(emu.url + "/api/tags", timeout=10).json()["models"]
        out[label] = next((m["digest"] for m in tags if m["name"] == name), None)
    return out


def drift_series(backend) -> set[tuple[str, str, str]]:
    text = requests.get(backend.url + "/metrics", timeout=10).text
    return {(h, m, k) for h, k, m in re.findall(r'^gpu_bridge_model_drift\{host="([^"]+)",kind="([^"]+)",'
                                                r'model="([^"]+)"\} 1\.0$', text, re.M)}


def cli(backend, *args, timeout=120):
    return run_cli(*args, "--url", backend.url, timeout=timeout)


# --- /config/drift ---------------------------------------------------------------------------------------------
def test_drift_names_missing_extra_and_unreachable_hosts(gpu_side, fleet):
    a, b = gpu_side.labels
    dead = gpu_side.dead_entry()
    dead_label = dead if ":" in dead else f"{dead}:8001"
    declared = {a: {"group": "gpu", "prune": True, "models": [{"name": "llama3.2:latest"}, {"name": "tinyllama"}]},
                b: {"group": "gpu", "models": ["llama3.2", {"name": "qwen2.5:0.5b", "state": "absent"}]},
                dead: {"models": ["llama3.2"]}}
    backend = fleet(declared, hosts=[*gpu_side.labels, dead])
    report = drift_of(backend)
    assert report["in_sync"] is False
    assert kinds(report) == {(a, "tinyllama:latest", "missing"), (a, OUTSIDE, "extra"), (a, "qwen2.5:0.5b", "extra"),
                             (b, "qwen2.5:0.5b", "extra"), (dead_label, "*", "unreachable")}
    assert report["hosts"][dead_label]["ok"] is False and report["hosts"][dead_label]["error"]
    # Prune is on for a only: b's undeclared hf.co model is no drift; the plan fixes a and b.
    assert {(p["host"], p["op"], p["model"]) for p in report["plan"]} == {
        (a, "pull", "tinyllama:latest"), (a, "delete", OUTSIDE), (a, "delete", "qwen2.5:0.5b"),
        (b, "delete", "qwen2.5:0.5b")}
    assert drift_series(backend) == kinds(report)
    r = cli(backend, "models", "drift")
    assert r.returncode == 2, r.stdout + r.stderr  # a host could not be read: the answer is incomplete
    assert r.stdout.splitlines()[0].split() == ["HOST", "MODEL", "KIND", "DETAIL"]


def test_a_new_build_on_one_host_of_a_group_is_diverged_and_the_series_go_away(gpu_side, fleet):
    a, b = gpu_side.labels
    backend = fleet(both(gpu_side, ["llama3.2:latest"]))
    assert drift_of(backend)["in_sync"] is True and drift_series(backend) == set()
    for emu in gpu_side.emulators:
        emulator_control(emu, "publish", {"model": "llama3.2:latest"})
    assert drift_of(backend)["in_sync"] is True  # a registry build is no drift until some host pulls it
    r = cli(backend, "models", "pull", "llama3.2", "--host", a)
    assert r.returncode == 0, r.stderr
    report = drift_of(backend)
    assert kinds(report) == {(a, "llama3.2:latest", "diverged"), (b, "llama3.2:latest", "diverged")}
    assert drift_series(backend) == kinds(report)
    listing = requests.get(backend.url + "/config/models", params={"refresh": "true"}, timeout=10).json()
    entry = next(m for m in listing["models"] if m["name"] == "llama3.2:latest")
    assert entry["diverged"] is True and entry["digests"] == digests(gpu_side, "llama3.2:latest")
    r = cli(backend, "models", "list")
    row = next(line for line in r.stdout.splitlines() if line.startswith("llama3.2:latest "))
    assert "DIVERGED" in row and all(f"{h}={d[:12]}" in row for h, d in entry["digests"].items()), row
    # The same build everywhere again: the drift and its series are gone.
    assert cli(backend, "models", "pull", "llama3.2", "--host", b).returncode == 0
    assert drift_of(backend)["in_sync"] is True and drift_series(backend) == set()


def test_drift_is_answered_from_the_last_observation_and_says_how_old_it_is(gpu_side, fleet):
    backend = fleet(both(gpu_side, ["llama3.2:latest", "smollm:135m"]))
    first = drift_of(backend)
    assert {d["kind"] for d in first["drift"]} == {"missing"}
    assert cli(backend, "models", "pull", "smollm:135m").returncode == 0
    cached = requests.get(backend.url + "/config/drift", timeout=10).json()
    assert cached["checked_at"] == first["checked_at"] and cached["age_s"] >= 0 and not cached["in_sync"]
    assert drift_of(backend)["in_sync"] is True  # ?refresh=true observes again


@pytest.mark.parametrize(("content", "status", "code"), [
    ("{not json", 503, "declared_state_invalid"),
    (json.dumps({"hosts": {"gpu-99": {"models": []}}}), 503, "declared_state_invalid"),
    (json.dumps({"hosts": {"127.0.0.1": {"models": [{"name": "llama3:"}]}}}), 503, "declared_state_invalid"),
    (None, 404, "drift_not_configured"),
])
def test_an_unusable_or_absent_declaration_is_answered_with_the_reason(gpu_side, fleet, content, status, code):
    backend = fleet(content)
    for path in ("/config/drift", "/config/plan"):
        r = requests.get(backend.url + path, timeout=10)
        assert (r.status_code, r.json()["code"]) == (status, code), r.text
    assert requests.get(backend.url + "/config/models", timeout=10).status_code == 200  # the rest still works
    r = cli(backend, "models", "drift")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("gpu-bridge: error: "), r.stderr
    if content is not None:
        assert "GPU_BRIDGE_DECLARED_MODELS_FILE" in r.stderr and "Traceback" not in backend.output()


def test_a_declaration_rewritten_by_the_role_is_read_again(gpu_side, fleet, tmp_path):
    backend = fleet(both(gpu_side, ["llama3.2:latest"]))
    assert drift_of(backend)["in_sync"] is True
    path = Path(tmp_path / "declared-models.json")
    path.write_text(json.dumps({"hosts": both(gpu_side, ["llama3.2:latest", "phi3:mini"])}))
    assert {d["model"] for d in drift_of(backend)["drift"]} == {"phi3:mini"}


# --- the CLI: plan, apply, rollback --------------------------------------------------------------------------------
def test_apply_converges_the_next_plan_is_empty_and_prune_off_deletes_nothing(gpu_side, fleet):
    a, b = gpu_side.labels
    backend = fleet(both(gpu_side, ["llama3.2:latest", "tinyllama"]))
    r = cli(backend, "models", "plan")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{a} (group gpu):" in r.stdout and "  + pull   tinyllama:latest  (missing)" in r.stdout, r.stdout
    assert r.stdout.splitlines()[-1].startswith("Plan: 2 to pull, 0 to delete, 0 to update, 0 to load."), r.stdout

    r = cli(backend, "models", "apply")  # not a terminal: nothing without --yes
    assert r.returncode == 2 and "pass --yes" in r.stderr, r.stdout + r.stderr
    assert digests(gpu_side, "tinyllama:latest") == {a: None, b: None}

    r = cli(backend, "models", "apply", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Applied: 2 changed, 0 already as declared, on 2 host(s); drift now: none." in r.stdout, r.stdout
    assert all(digests(gpu_side, "tinyllama:latest").values())
    r = cli(backend, "models", "plan")
    assert r.returncode == 0, r.stdout + r.stderr
    for label in (a, b):
        assert f"{label} (group gpu): in the declared state" in r.stdout, r.stdout
    assert cli(backend, "models", "drift").returncode == 0
    # Prune is off: what was installed and not declared is still there.
    for name in (OUTSIDE, "qwen2.5:0.5b"):
        assert all(digests(gpu_side, name).values()), name
    r = cli(backend, "models", "apply", "--yes")
    assert r.returncode == 0 and "Applied" not in r.stdout, r.stdout


def test_update_rolls_out_canary_first_and_rollback_needs_no_download(gpu_side, fleet):
    a, b = gpu_side.labels
    backend = fleet(both(gpu_side, ["llama3.2:latest"]))
    old = digests(gpu_side, "llama3.2:latest")
    for emu in gpu_side.emulators:
        emulator_control(emu, "publish", {"model": "llama3.2:latest"})
    r = cli(backend, "models", "plan", "--update")
    assert r.returncode == 1 and "  ~ update llama3.2:latest" in r.stdout, r.stdout
    r = cli(backend, "models", "apply", "--update", "--canary", "1", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines.index(f"batch 1 of 2 (canary): {a}") < lines.index(f"batch 2 of 2: {b}"), r.stdout
    new = digests(gpu_side, "llama3.2:latest")
    assert new[a] == new[b] and new[a] != old[a]
    snapshot = reconcile.snapshot_name("llama3.2:latest")
    assert digests(gpu_side, snapshot) == old
    listing = requests.get(backend.url + "/config/models", params={"refresh": "true"}, timeout=10).json()
    assert next(m for m in listing["models"] if m["name"] == snapshot)["snapshot"] is True
    assert cli(backend, "models", "drift", "--refresh").returncode == 0  # snapshots are never drift

    pulls_before = [emulator_control(emu, "stats")["pulls"] for emu in gpu_side.emulators]
    r = cli(backend, "models", "rollback", "llama3.2", "--host", a, "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [f"{a}: rolled back to {old[a][:12]} from {snapshot}",
                                     "drift now: 2 item(s) (`gpu-bridge models drift`)."]
    assert digests(gpu_side, "llama3.2:latest") == {a: old[a], b: new[b]}
    assert [emulator_control(emu, "stats")["pulls"] for emu in gpu_side.emulators] == pulls_before
    # One host of the group on another build now: drift says so until the next update.
    r = cli(backend, "models", "drift", "--refresh")
    assert r.returncode == 1 and "diverged" in r.stdout, r.stdout


def test_a_canary_failure_stops_the_rollout_before_the_other_hosts(gpu_side, fleet):
    a, b = gpu_side.labels
    backend = fleet(both(gpu_side, ["llama3.2:latest"]))
    old = digests(gpu_side, "llama3.2:latest")
    for emu in gpu_side.emulators:
        emulator_control(emu, "publish", {"model": "llama3.2:latest"})
    emulator_control(gpu_side.emulator(gpu_side.names[0]), "config", {"fail_after_bytes": 1})
    r = cli(backend, "models", "apply", "--update", "--canary", "1", "--yes")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.startswith(f"gpu-bridge: error: apply stopped: update llama3.2:latest on {a} failed: ")
    assert r.stderr.rstrip().endswith(f"0 of 2 action(s) done; not touched: {b}") and r.stderr.count("\n") == 1
    assert f"batch 2 of 2: {b}" not in r.stdout
    assert digests(gpu_side, "llama3.2:latest") == old
    assert emulator_control(gpu_side.emulators[1], "stats")["pulls"] == 0
    # The staging copy the failed update made is gone again.
    assert digests(gpu_side, reconcile.staging_name("llama3.2:latest"))[a] is None


def test_rollback_without_a_snapshot_and_commands_aimed_at_a_gpu_server(gpu_side, fleet):
    backend = fleet(both(gpu_side, ["llama3.2:latest"]))
    r = cli(backend, "models", "rollback", "llama3.2", "--yes")
    assert r.returncode == 2 and "no GPU host holds a snapshot of llama3.2:latest" in r.stderr, r.stderr
    if gpu_side.transport == "http":
        gpu = gpu_side.servers[gpu_side.names[0]]
        r = run_cli("models", "plan", "--url", gpu.url, env={"GPU_BRIDGE_API_TOKEN": "x" * 32})
        assert r.returncode == 2 and "work through a backend" in r.stderr, r.stderr


def test_a_model_declared_loaded_is_drift_until_apply_loads_it(gpu_side, fleet):
    """Residency comes from the GPU servers' loaded-models listing: a fresh emulator has only its
    newest model (the hf.co one) in memory, so llama3.2 declared loaded is not_loaded on both."""
    a, b = gpu_side.labels
    backend = fleet(both(gpu_side, [{"name": "llama3.2:latest", "loaded": True, "keep_alive": "1h"}]))
    report = drift_of(backend)
    assert kinds(report) == {(a, "llama3.2:latest", "not_loaded"), (b, "llama3.2:latest", "not_loaded")}
    assert all(h["residency_known"] for h in report["hosts"].values())
    r = cli(backend, "models", "plan")
    assert r.returncode == 1 and "  > load   llama3.2:latest  (declared loaded; keep_alive 1h)" in r.stdout, r.stdout
    r = cli(backend, "models", "apply", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert drift_of(backend)["in_sync"] is True
