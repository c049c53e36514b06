"""Carry out one host's part of a models-as-code plan (reconcile.py) through a small ``ModelOps``.

The same steps whoever drives them: the Ansible module (``gpu_bridge_models``, on the GPU host,
through the local GPU server) and ``gpu-bridge models apply|rollback`` (through the backend, one host
at a time). Each transport only says how to list, copy, pull (and wait), delete and load.

An update keeps the build it replaces, without a second download:

1. copy NAME → its staging name (``…-gpubridge-next``): the current blobs stay referenced while the
   pull runs (Ollama prunes unreferenced layers after a pull);
2. pull NAME and wait;
3. digest changed: copy staging → the snapshot (``…-gpubridge-prev``), so the snapshot always holds
   the build before the last update that changed something; unchanged: the old snapshot stays;
4. delete the staging copy (also when the pull failed).

A rollback copies the snapshot back over NAME (no pull) and checks that NAME now has the
snapshot's digest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from . import names, reconcile
from .errors import GpuBridgeError, ModelNotFound


class ModelOps(Protocol):
    """What a transport must offer for one host. Every method raises a GpuBridgeError on failure."""

    def list_models(self) -> list[dict[str, object]]: ...

    def copy(self, source: str, destination: str) -> None: ...

    def pull(self, name: str) -> None:
        """Pull and return once it finished (raise when it failed)."""

    def delete(self, name: str) -> None: ...

    def load(self, name: str, keep_alive: str | int | None) -> None: ...


@dataclass(frozen=True)
class Outcome:
    action: reconcile.Action
    changed: bool
    detail: str
    digest_before: str | None = None
    digest_after: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {**self.action.to_dict(), "changed": self.changed, "detail": self.detail,
                "digest_before": self.digest_before, "digest_after": self.digest_after}


def digest_of(ops: ModelOps, name: str) -> str | None:
    """The digest ``name`` has on the host now (None: not installed)."""
    key = reconcile.model_key(name)
    for entry in ops.list_models():
        listed = entry.get("name")
        if isinstance(listed, str) and reconcile.model_key(listed) == key:
            return _digest(entry)
    return None


def execute(action: reconcile.Action, ops: ModelOps) -> Outcome:
    """Run one action; ``changed`` is False when the host already was as wanted (e.g. an update that
    found no newer build)."""
    if action.op == "delete":
        try:
            ops.delete(action.model)
        except ModelNotFound:
            return Outcome(action, False, "already absent")
        return Outcome(action, True, "deleted")
    if action.op == "pull":
        ops.pull(action.model)
        return Outcome(action, True, "pulled", None, digest_of(ops, action.model))
    if action.op == "load":
        ops.load(action.model, action.keep_alive)
        return Outcome(action, True, "loaded")
    if action.op == "update":
        return _update(action, ops)
    raise ValueError(f"unknown plan operation {action.op!r}")


def _update(action: reconcile.Action, ops: ModelOps) -> Outcome:
    before = digest_of(ops, action.model)
    if before is None:  # removed since the plan was made: a plain pull
        ops.pull(action.model)
        return Outcome(action, True, "pulled (was not installed)", None, digest_of(ops, action.model))
    staging = reconcile.staging_name(action.model)
    ops.copy(action.model, staging)
    try:
        ops.pull(action.model)
        after = digest_of(ops, action.model)
        if after == before:
            return Outcome(action, False, "already the registry's current build", before, after)
        ops.copy(staging, reconcile.snapshot_name(action.model))
        return Outcome(action, True, f"updated; the previous build is kept as {reconcile.snapshot_name(action.model)}",
                       before, after)
    finally:
        _quiet(lambda: ops.delete(staging))


def rollback(host: str, name: str, ops: ModelOps) -> Outcome:
    """Put the snapshot of ``name`` back (a copy, no pull) and verify the digest."""
    name = names.parse(name).display  # what Ollama lists: llama3.2 -> llama3.2:latest
    snapshot = reconcile.snapshot_name(name)
    action = reconcile.Action(host, "rollback", name, f"copy {snapshot} back", snapshot=snapshot)
    listing = {reconcile.model_key(str(m.get("name"))): m for m in ops.list_models()
               if isinstance(m.get("name"), str) and reconcile.valid_name(str(m["name"]))}
    snap = listing.get(reconcile.model_key(snapshot))
    if snap is None:
        raise ModelNotFound(f"{host} has no snapshot of {name} ({snapshot}): nothing to roll back to; a "
                            "snapshot is made by `models apply --update` when an update changes the build")
    want = _digest(snap)
    before = _digest(listing.get(reconcile.model_key(name)))
    if before is not None and before == want:
        return Outcome(action, False, "already at the snapshot's build", before, before)
    ops.copy(snapshot, name)
    after = digest_of(ops, name)
    if after != want:
        raise GpuBridgeError(f"rollback of {name} on {host} did not take: digest {str(after)[:12]} after copying "
                             f"{snapshot} ({str(want)[:12]})")
    return Outcome(action, True, f"rolled back to {str(want)[:12]} from {snapshot}", before, after)


def _digest(entry: dict[str, object] | None) -> str | None:
    digest = entry.get("digest") if entry is not None else None
    return digest if isinstance(digest, str) else None


def _quiet(step: Callable[[], None]) -> None:
    try:
        step()
    except GpuBridgeError:
        pass  # the staging copy is also removed by the next update, and is never reported as drift
