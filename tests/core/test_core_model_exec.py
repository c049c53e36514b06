"""model_exec: updates keep the replaced build, rollbacks copy it back without a pull."""

from __future__ import annotations

import pytest

from gpu_bridge import model_exec, reconcile
from gpu_bridge.errors import GpuBridgeError, ModelNotFound

OLD, NEW = "1" * 64, "2" * 64


class FakeOllama:
    """Ollama's semantics for these five calls: a copy shares the digest, a pull fetches the
    registry's current build of a tag, a delete of a missing name is ModelNotFound."""

    def __init__(self, models, registry, fail_pull=False):
        self.models = dict(models)
        self.registry = registry
        self.fail_pull = fail_pull
        self.calls = []

    def list_models(self):
        return [{"name": n, "digest": d} for n, d in self.models.items()]

    def copy(self, source, destination):
        self.calls.append(("copy", source, destination))
        if source not in self.models:
            raise ModelNotFound(f"model '{source}' not found")
        self.models[destination] = self.models[source]

    def pull(self, name):
        self.calls.append(("pull", name))
        if self.fail_pull:
            raise GpuBridgeError("pull failed: registry unreachable")
        self.models[name] = self.registry[name]

    def delete(self, name):
        self.calls.append(("delete", name))
        if self.models.pop(name, None) is None:
            raise ModelNotFound(f"model '{name}' not found")

    def load(self, name, keep_alive):
        self.calls.append(("load", name, keep_alive))


def update(name):
    return reconcile.Action("gpu-01", "update", name, "--update", snapshot=reconcile.snapshot_name(name))


def test_an_update_that_brings_a_new_build_keeps_the_old_one_as_the_snapshot():
    ollama = FakeOllama({"llama3.2:latest": OLD}, {"llama3.2:latest": NEW})
    out = model_exec.execute(update("llama3.2:latest"), ollama)
    assert (out.changed, out.digest_before, out.digest_after) == (True, OLD, NEW)
    assert ollama.models == {"llama3.2:latest": NEW, "llama3.2:latest-gpubridge-prev": OLD}  # staging removed


def test_an_update_without_a_new_build_changes_nothing_and_keeps_the_older_snapshot():
    ollama = FakeOllama({"llama3.2:latest": NEW, "llama3.2:latest-gpubridge-prev": OLD}, {"llama3.2:latest": NEW})
    out = model_exec.execute(update("llama3.2:latest"), ollama)
    assert not out.changed and out.detail == "already the registry's current build"
    assert ollama.models == {"llama3.2:latest": NEW, "llama3.2:latest-gpubridge-prev": OLD}


def test_a_failed_update_pull_removes_the_staging_copy_and_says_why():
    ollama = FakeOllama({"llama3.2:latest": OLD}, {}, fail_pull=True)
    with pytest.raises(GpuBridgeError, match="registry unreachable"):
        model_exec.execute(update("llama3.2:latest"), ollama)
    assert ollama.models == {"llama3.2:latest": OLD}


def test_rollback_copies_the_snapshot_back_without_any_pull():
    ollama = FakeOllama({"llama3.2:latest": NEW, "llama3.2:latest-gpubridge-prev": OLD}, {})
    out = model_exec.rollback("gpu-01", "llama3.2", ollama)
    assert (out.changed, out.digest_before, out.digest_after) == (True, NEW, OLD)
    assert not [c for c in ollama.calls if c[0] == "pull"]
    again = model_exec.rollback("gpu-01", "llama3.2", ollama)
    assert not again.changed and again.detail == "already at the snapshot's build"


def test_rollback_without_a_snapshot_is_a_clear_not_found():
    ollama = FakeOllama({"llama3.2:latest": NEW}, {})
    with pytest.raises(ModelNotFound, match="has no snapshot of llama3.2:latest .llama3.2:latest-gpubridge-prev."):
        model_exec.rollback("gpu-01", "llama3.2", ollama)


def test_a_copy_that_does_not_take_is_reported():
    class Lying(FakeOllama):
        def copy(self, source, destination):
            self.calls.append(("copy", source, destination))  # answers 200, changes nothing

    ollama = Lying({"llama3.2:latest": NEW, "llama3.2:latest-gpubridge-prev": OLD}, {})
    with pytest.raises(GpuBridgeError, match="did not take"):
        model_exec.rollback("gpu-01", "llama3.2:latest", ollama)


def test_delete_of_an_absent_model_is_not_a_change_and_pull_load_are():
    ollama = FakeOllama({}, {"qwen2.5:0.5b": NEW})
    assert not model_exec.execute(reconcile.Action("h", "delete", "phi3:mini", "prune"), ollama).changed
    pulled = model_exec.execute(reconcile.Action("h", "pull", "qwen2.5:0.5b", "missing"), ollama)
    assert pulled.changed and pulled.digest_after == NEW
    loaded = model_exec.execute(reconcile.Action("h", "load", "qwen2.5:0.5b", "declared", keep_alive="1h"), ollama)
    assert loaded.changed and ollama.calls[-1] == ("load", "qwen2.5:0.5b", "1h")
