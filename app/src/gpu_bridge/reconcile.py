"""Models as code: the declared models of each GPU host × what each host holds → drift and a plan.

Pure (no I/O, no clock): the backend (``GET /config/drift``, the drift metric), the CLI
(``gpu-bridge models plan|apply|drift``) and the Ansible module (``gpu_bridge_models``) all call this
module, so the three can never disagree about what "in the declared state" means.

The declared state of one host is the inventory's ``gpu_bridge_models`` list (plus
``gpu_bridge_models_prune``) for that host, after Ansible's group/host precedence::

    - name: llama3.2:latest                    # state: present is the default
      loaded: true                              # keep it in GPU memory (issue 18)
      keep_alive: 1h                            # how long a preload stays ("forever" = -1)
    - name: qwen2.5:0.5b
      state: absent

Models are matched by their full name, case-insensitively (``llama3.2`` == ``llama3.2:latest`` ==
``registry.ollama.ai/library/llama3.2:latest``), exactly as Ollama matches them.

Drift kinds (one ``Drift`` per host and model):

* ``missing``: declared present, not installed.
* ``extra``: installed although declared ``absent``, or (with prune) not declared at all.
* ``diverged``: the same declared name has different digests on hosts of one group (two builds of
  ``llama3.2:latest`` answer differently); fixed by ``apply --update``, which re-pulls the tag on
  every host of the group so all of them hold the registry's current build.
* ``not_loaded``: declared ``loaded: true``, installed, not resident in GPU memory.
* ``unreachable``: the host's state could not be read; nothing is planned for it.

Snapshots: before an update re-pulls a tag, the current build is copied (Ollama's ``/api/copy``,
blobs shared, no download) to ``snapshot_name(name)``, one per model, which ``models rollback``
copies back. Snapshots are never ``extra``: prune removes one only when its model is no longer
declared present.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from . import names
from .errors import InvalidModelName, InvalidRequest

PRESENT, ABSENT = "present", "absent"
STATES = (PRESENT, ABSENT)
DRIFT_KINDS = ("missing", "extra", "diverged", "not_loaded", "unreachable")
# The order a host's actions run in: deletes free disk first, pulls before loads of the same model.
OPS = ("delete", "pull", "update", "load")
SNAPSHOT_SUFFIX = "-gpubridge-prev"
# Holds the current build while an update pulls (so Ollama's pruning keeps its blobs); renamed to the
# snapshot only when the pull brought a different digest, removed afterwards either way.
STAGING_SUFFIX = "-gpubridge-next"
_TAG_LIMIT = 80  # names.py: a tag has at most 80 characters
_ENTRY_KEYS = frozenset({"name", "state", "loaded", "keep_alive"})


def model_key(name: str) -> str:
    """The identity Ollama uses for a name: host/namespace/model:tag, lower case."""
    return names.parse(name).full.lower()


def _suffixed(name: str, suffix: str) -> str:
    parsed = names.parse(name)
    tag = parsed.tag + suffix
    if len(tag) > _TAG_LIMIT:
        digest = hashlib.sha256(parsed.full.lower().encode()).hexdigest()[:8]
        tag = f"{parsed.tag[:_TAG_LIMIT - len(suffix) - 9]}-{digest}{suffix}"
    base = parsed.display.rsplit(":", 1)[0]
    return f"{base}:{tag}"


def snapshot_name(name: str) -> str:
    """Where the previous build of ``name`` is kept: the tag plus ``-gpubridge-prev`` (in the same
    namespace, so it lists beside its model). A tag too long for the suffix is shortened and given a
    hash of the whole name, so two long tags never share a snapshot."""
    return _suffixed(name, SNAPSHOT_SUFFIX)


def staging_name(name: str) -> str:
    """Where an update parks the current build while it pulls (see STAGING_SUFFIX)."""
    return _suffixed(name, STAGING_SUFFIX)


def is_snapshot(name: str) -> bool:
    """A name gpu-bridge manages for rollback (a snapshot, or an update's staging copy)."""
    try:
        return names.parse(name).tag.endswith((SNAPSHOT_SUFFIX, STAGING_SUFFIX))
    except InvalidModelName:
        return False


@dataclass(frozen=True)
class Declared:
    """One entry of ``gpu_bridge_models``."""

    name: str
    state: str = PRESENT
    loaded: bool = False
    keep_alive: str | int | None = None

    @property
    def key(self) -> str:
        return model_key(self.name)


@dataclass(frozen=True)
class HostSpec:
    """The declared state of one GPU host."""

    host: str
    models: tuple[Declared, ...] = ()
    prune: bool = False
    group: str = "all"


@dataclass(frozen=True)
class Installed:
    name: str
    digest: str | None = None


@dataclass
class Observed:
    """What one host holds: installed models by key, and (when known) the keys resident in memory."""

    host: str
    models: dict[str, Installed] = field(default_factory=dict)
    loaded: frozenset[str] | None = None
    error: str | None = None

    @classmethod
    def from_listing(cls, host: str, models: Iterable[Mapping[str, object]],
                     loaded: Iterable[Mapping[str, object]] | None = None) -> Observed:
        """From ``/api/models`` entries (``name``, ``digest``) and ``/api/models/loaded`` entries."""
        held: dict[str, Installed] = {}
        for entry in models:
            name, digest = entry.get("name"), entry.get("digest")
            if isinstance(name, str):
                try:
                    held[model_key(name)] = Installed(name, digest if isinstance(digest, str) else None)
                except InvalidModelName:
                    continue  # Ollama listed something our grammar refuses: it cannot be declared either
        resident = None
        if loaded is not None:
            resident = frozenset(model_key(n) for e in loaded if isinstance(n := e.get("name"), str)
                                 and valid_name(n))
        return cls(host, held, resident)


@dataclass(frozen=True)
class Drift:
    host: str
    model: str
    kind: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"host": self.host, "model": self.model, "kind": self.kind, "detail": self.detail}


@dataclass(frozen=True)
class Action:
    """One step of a plan. ``update`` copies the current build to ``snapshot`` first, then pulls."""

    host: str
    op: str
    model: str
    reason: str
    snapshot: str | None = None
    keep_alive: str | int | None = None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"host": self.host, "op": self.op, "model": self.model, "reason": self.reason}
        if self.snapshot is not None:
            out["snapshot"] = self.snapshot
        if self.keep_alive is not None:
            out["keep_alive"] = self.keep_alive
        return out


def valid_name(name: str) -> bool:
    try:
        names.parse(name)
    except InvalidModelName:
        return False
    return True


# --- the declared state ---------------------------------------------------------------------------
def parse_spec(host: str, raw: object, *, prune: object = False, group: str = "all",
               where: str = "gpu_bridge_models") -> HostSpec:
    """Check one host's ``gpu_bridge_models`` (a list of mappings) and return it; ``InvalidRequest``
    with the entry's position and what to fix otherwise. The same grammar as the API checks names."""
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise InvalidRequest(f"{where} of {host} must be a list of {{name: ...}} entries, not {type(raw).__name__}")
    if not isinstance(prune, bool):
        raise InvalidRequest(f"gpu_bridge_models_prune of {host} must be true or false, not {prune!r}")
    seen: dict[str, str] = {}
    models = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}] of {host}"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict):
            raise InvalidRequest(f"{at} must be a mapping with a 'name', not {type(entry).__name__}")
        unknown = sorted(set(entry) - _ENTRY_KEYS, key=str)
        if unknown:
            raise InvalidRequest(f"{at}: unknown key(s) {', '.join(map(repr, unknown))}; "
                                 f"allowed: {', '.join(sorted(_ENTRY_KEYS))}")
        name, state = entry.get("name"), entry.get("state", PRESENT)
        try:
            key = model_key(name)  # type: ignore[arg-type]  # parse() checks the type and says so
        except InvalidModelName as exc:
            raise InvalidRequest(f"{at}: {exc.message}") from None
        if is_snapshot(str(name)):
            raise InvalidRequest(f"{at}: {name!r} is a snapshot name (tag ending {SNAPSHOT_SUFFIX!r}); "
                                 "snapshots are managed by gpu-bridge and cannot be declared")
        if state not in STATES:
            raise InvalidRequest(f"{at}: state must be 'present' or 'absent', not {state!r}")
        loaded, keep_alive = entry.get("loaded", False), entry.get("keep_alive")
        if not isinstance(loaded, bool):
            raise InvalidRequest(f"{at}: loaded must be true or false, not {loaded!r}")
        if loaded and state == ABSENT:
            raise InvalidRequest(f"{at}: a model declared absent cannot be loaded")
        if keep_alive is not None and (isinstance(keep_alive, bool) or not isinstance(keep_alive, str | int)):
            raise InvalidRequest(f"{at}: keep_alive must be a duration such as '1h', 'forever' or seconds")
        if key in seen:
            raise InvalidRequest(f"{at}: {name!r} is declared twice (first as {seen[key]!r})")
        seen[key] = str(name)
        models.append(Declared(str(name), state, loaded, keep_alive))
    return HostSpec(host, tuple(models), prune, group)


# --- drift ----------------------------------------------------------------------------------------
def _divergence(specs: Sequence[HostSpec], observed: Mapping[str, Observed]) -> dict[tuple[str, str], str]:
    """(host, key) -> detail, for declared models whose digests differ across the hosts of a group."""
    by_group: dict[tuple[str, str], dict[str, str]] = {}
    for spec in specs:
        obs = observed.get(spec.host)
        if obs is None or obs.error is not None:
            continue
        for d in spec.models:
            held = obs.models.get(d.key)
            if d.state == PRESENT and held is not None and held.digest:
                by_group.setdefault((spec.group, d.key), {})[spec.host] = held.digest
    out: dict[tuple[str, str], str] = {}
    for (group, key), digests in by_group.items():
        if len(set(digests.values())) > 1:
            shown = ", ".join(f"{h}={dg[:12]}" for h, dg in sorted(digests.items()))
            for host in digests:
                out[(host, key)] = f"digests differ across group {group}: {shown}"
    return out


def detect_drift(specs: Sequence[HostSpec], observed: Mapping[str, Observed]) -> list[Drift]:
    """Every way the fleet differs from its declared state, sorted by host, then model."""
    drift: list[Drift] = []
    diverged = _divergence(specs, observed)
    for spec in specs:
        obs = observed.get(spec.host)
        if obs is None or obs.error is not None:
            reason = obs.error if obs is not None and obs.error else "no state was read"
            drift.append(Drift(spec.host, "*", "unreachable", reason))
            continue
        declared = {d.key: d for d in spec.models}
        for d in spec.models:
            held = obs.models.get(d.key)
            if d.state == ABSENT:
                if held is not None:
                    drift.append(Drift(spec.host, d.name, "extra", "installed, declared absent"))
                continue
            if held is None:
                drift.append(Drift(spec.host, d.name, "missing", "declared present, not installed"))
                continue
            if (spec.host, d.key) in diverged:
                drift.append(Drift(spec.host, d.name, "diverged", diverged[(spec.host, d.key)]))
            if d.loaded and obs.loaded is not None and d.key not in obs.loaded:
                drift.append(Drift(spec.host, d.name, "not_loaded", "declared loaded, not in GPU memory"))
        if spec.prune:
            for key, held in obs.models.items():
                if key not in declared and not _kept_snapshot(held.name, declared):
                    drift.append(Drift(spec.host, held.name, "extra", "installed, not declared (prune is on)"))
    return sorted(drift, key=lambda d: (d.host, d.model.lower(), d.kind))


def _kept_snapshot(name: str, declared: Mapping[str, Declared]) -> bool:
    """A snapshot stays while its model is declared present (prune never takes the rollback away)."""
    if not is_snapshot(name):
        return False
    key = model_key(name)
    return any(d.state == PRESENT and key in (model_key(snapshot_name(d.name)), model_key(staging_name(d.name)))
               for d in declared.values())


# --- the plan -------------------------------------------------------------------------------------
def plan(specs: Sequence[HostSpec], observed: Mapping[str, Observed], *, update: bool = False) -> list[Action]:
    """The actions that bring every reachable host to its declared state, in the order to run them.

    ``update``: re-pull every declared-present model that is installed (new registry builds; also
    what resolves ``diverged``), each preceded by a snapshot copy. Without it, an installed model is
    left as it is. Unreachable hosts get no action (their drift says why)."""
    actions: list[Action] = []
    for spec in sorted(specs, key=lambda s: s.host):
        obs = observed.get(spec.host)
        if obs is None or obs.error is not None:
            continue
        declared = {d.key: d for d in spec.models}
        host_actions: list[Action] = []
        for d in spec.models:
            held = obs.models.get(d.key)
            if d.state == ABSENT:
                if held is not None:
                    host_actions.append(Action(spec.host, "delete", held.name, "declared absent"))
                continue
            if held is None:
                host_actions.append(Action(spec.host, "pull", d.name, "missing"))
            elif update:
                host_actions.append(Action(spec.host, "update", d.name, "re-pull for a newer build (--update)",
                                           snapshot=snapshot_name(d.name)))
            if d.loaded and (held is None or obs.loaded is None or d.key not in obs.loaded):
                host_actions.append(Action(spec.host, "load", d.name, "declared loaded",
                                           keep_alive=d.keep_alive))
        if spec.prune:
            for key, held in sorted(obs.models.items()):
                if key not in declared and not _kept_snapshot(held.name, declared):
                    host_actions.append(Action(spec.host, "delete", held.name, "not declared (prune)"))
        actions.extend(sorted(host_actions, key=lambda a: OPS.index(a.op)))  # stable: declaration order kept
    return actions


def apply_to(observed: Observed, actions: Iterable[Action], *, registry: Mapping[str, str]) -> Observed:
    """What a host holds after ``actions`` succeed, when a pull of a name yields ``registry[key]``'s
    digest: the model of the executor that tests (and ``--check`` previews) use."""
    models = dict(observed.models)
    loaded = set(observed.loaded or ())
    for a in actions:
        if a.host != observed.host:
            continue
        key = model_key(a.model)
        if a.op == "delete":
            models.pop(key, None)
            loaded.discard(key)
        elif a.op in ("pull", "update"):
            if a.op == "update" and a.snapshot and key in models:
                models[model_key(a.snapshot)] = Installed(a.snapshot, models[key].digest)
            models[key] = Installed(a.model, registry.get(key))
        elif a.op == "load":
            loaded.add(key)
    return Observed(observed.host, models, frozenset(loaded) if observed.loaded is not None else None)


def canary_batches(hosts: Sequence[str], canary: int) -> list[list[str]]:
    """``canary`` hosts first (alone in their batch), then all the others; 0 = one batch."""
    if canary < 0:
        raise InvalidRequest(f"--canary must be 0 or more, not {canary}")
    ordered = list(dict.fromkeys(hosts))
    if canary == 0 or canary >= len(ordered):
        return [ordered] if ordered else []
    return [ordered[:canary], ordered[canary:]]


def counts(actions: Iterable[Action]) -> dict[str, int]:
    out = dict.fromkeys(OPS, 0)
    for a in actions:
        out[a.op] += 1
    return out
