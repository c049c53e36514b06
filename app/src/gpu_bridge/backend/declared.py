"""The declared models of every GPU host, as the backend reads them (``GPU_BRIDGE_DECLARED_MODELS_FILE``).

The prod_backend role writes the file from the inventory (``gpu_bridge_models`` and
``gpu_bridge_models_prune`` of each host in the GPU group, after Ansible's group/host precedence)::

    {"hosts": {"gpu-01:8001": {"group": "gpu_servers", "prune": false,
                               "models": [{"name": "llama3.2:latest"}, {"name": "qwen2.5:0.5b", "state": "absent"}]}}}

A host key is a GPU host's label (``name:port``) or bare name, as ``GPU_INSTANCE_HOSTS`` lists it; each
host's entries are checked by ``reconcile.parse_spec``, the same rules as the Ansible module's. Any
mistake is one ``InvalidDeclaredState`` naming the file and the place: the backend still serves
everything else, and ``/config/drift`` answers 503 with that message until the file is fixed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .. import names, reconcile
from ..client.fleet import GpuFleet
from ..errors import GpuBridgeError

MAX_FILE_BYTES = 4 * 1024 * 1024  # far above any fleet's declaration; bounds what a broken file costs
_HOST_KEYS = frozenset({"group", "models", "prune"})


class InvalidDeclaredState(GpuBridgeError):
    """The declared-models file is missing, unreadable or wrong: no drift can be computed."""

    status = 503
    code = "declared_state_invalid"


class DriftNotConfigured(GpuBridgeError):
    """No declaration on this backend: nothing to compare with (a 404, this backend has no such
    document; a 503 would call a deliberate setting a failure)."""

    status = 404
    code = "drift_not_configured"


@dataclass(frozen=True)
class DeclaredState:
    """The checked declaration: one ``HostSpec`` per declared GPU host, by fleet label."""

    path: str
    specs: tuple[reconcile.HostSpec, ...]
    stamp: tuple[int, int]  # (mtime_ns, size) when read: a rewrite by the role is read again


def file_stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def load(path: str, fleet: GpuFleet) -> DeclaredState:
    """Read and check the file; ``InvalidDeclaredState`` saying what to fix otherwise."""
    where = f"GPU_BRIDGE_DECLARED_MODELS_FILE {path}"
    stamp = file_stamp(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise InvalidDeclaredState(f"{where}: cannot read it: {exc.strerror} (the prod_backend role writes it "
                                   "from the inventory's gpu_bridge_models)") from None
    if len(raw) > MAX_FILE_BYTES:
        raise InvalidDeclaredState(f"{where}: larger than {MAX_FILE_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidDeclaredState(f"{where}: not valid JSON: {exc}") from None
    hosts = doc.get("hosts") if isinstance(doc, dict) else None
    if not isinstance(hosts, dict):
        raise InvalidDeclaredState(f'{where}: must be a JSON object {{"hosts": {{"<GPU host>": {{"models": '
                                   '[...], "prune": false, "group": "..."}}}}}}')
    specs: dict[str, reconcile.HostSpec] = {}
    for key, entry in hosts.items():
        label = _label(fleet, key, where)
        if label in specs:
            raise InvalidDeclaredState(f"{where}: GPU host {label} is declared twice (as {key!r} too)")
        specs[label] = _host_spec(label, key, entry, where)
    return DeclaredState(path, tuple(specs[label] for label in sorted(specs)), stamp or (0, 0))


def _label(fleet: GpuFleet, key: str, where: str) -> str:
    matches = [lbl for lbl, slot in fleet.slots.items() if key in (lbl, slot.host.name)]
    if len(matches) != 1:
        known = ", ".join(fleet.labels)
        raise InvalidDeclaredState(f"{where}: {key!r} is not one of this backend's GPU hosts ({known}, from "
                                   "GPU_INSTANCE_HOSTS)" if not matches else
                                   f"{where}: {key!r} names several GPU hosts ({', '.join(matches)}): use name:port")
    return matches[0]


def _host_spec(label: str, key: str, entry: object, where: str) -> reconcile.HostSpec:
    at = f"{where}: hosts[{key!r}]"
    if not isinstance(entry, dict):
        raise InvalidDeclaredState(f"{at} must be an object with 'models' (and 'prune', 'group')")
    unknown = sorted(set(entry) - _HOST_KEYS, key=str)
    if unknown:
        raise InvalidDeclaredState(f"{at}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                                   f"{', '.join(sorted(_HOST_KEYS))}")
    group = entry.get("group", "all")
    if not isinstance(group, str) or not group:
        raise InvalidDeclaredState(f"{at}: group must be a non-empty string (the inventory group), not {group!r}")
    try:
        return reconcile.parse_spec(label, _display_names(entry.get("models")), prune=entry.get("prune", False),
                                    group=group, where=f"{at}.models")
    except GpuBridgeError as exc:
        raise InvalidDeclaredState(exc.message if exc.message.startswith(where) else f"{where}: {exc.message}") \
            from None


def _display_names(models: object) -> object:
    """Entries with each valid name in Ollama's display form (``llama3.2`` -> ``llama3.2:latest``), so
    drift items and metric labels name a model one way whatever spelling the inventory used; anything
    else is left for parse_spec to refuse with its message."""
    if not isinstance(models, list):
        return models
    out: list[object] = []
    for entry in models:
        if isinstance(entry, str) and reconcile.valid_name(entry):
            entry = names.parse(entry).display
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str) and reconcile.valid_name(entry["name"]):
            entry = {**entry, "name": names.parse(entry["name"]).display}
        out.append(entry)
    return out


__all__ = ["MAX_FILE_BYTES", "DeclaredState", "DriftNotConfigured", "InvalidDeclaredState", "file_stamp", "load"]
