#!/usr/bin/env python3
"""Ollama REST API emulator for tests and molecule hosts.

One file, Python 3.11 standard library only: it is copied onto Debian 12 test hosts and run as
``ollama.service`` (``python3 ollama_emulator.py --host 127.0.0.1 --port 11434``), and tests may
import it and call ``make_server(host, port, **knobs)``.

It follows the wire format in shared/notes/ollama-api.md ("the note"), quirks included, so our
adapter meets them in tests before it meets a real Ollama. Routes that are not Ollama's live under
``/_emulator/`` (JSON, no auth, no Host check):

    GET  /_emulator/stats    counters (requests, pulls, downloads started/cancelled/active, bytes
                             downloaded: a resumed download adds only the bytes it had not fetched)
    GET  /_emulator/config   the current knobs
    POST /_emulator/config   merge knobs (see KNOB_DEFAULTS) and the actions ``add_remote``/``installed``
    POST /_emulator/reset    back to the startup state (flags + --config-json), counters zeroed
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import re
import select
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

OLLAMA_VERSION = "0.12.3"
DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
TICK = 0.01  # download worker step; progress lines go out every progress_interval
MEDIA = "application/vnd.ollama.image."

# Every run-time knob with its default; flags and --config-json override these at startup.
KNOB_DEFAULTS: dict = {
    "latency_ms": 0,  # delay before answering every /api route
    "pull_speed": 400e6,  # virtual bytes per second of one download
    "progress_interval": 0.06,  # seconds between progress lines (real Ollama: ~60 ms)
    "verify_seconds": 0.3,  # silence after "verifying sha256 digest"
    "stall": False,  # True, a model name or a list of names: bytes stop, lines continue
    "fail_after_bytes": None,  # fail once a pull's completed bytes (all layers) reach this
    "fail_error": "write /root/.ollama/models/blobs/sha256-{digest}-partial: no space left on device",
    "tz_offset": "-07:00",  # offset in modified_at: "local", "Z" or "+HH:MM"/"-HH:MM"
}


class HttpError(Exception):
    """An error answered as ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(Exception):
    """The client closed its connection (real Ollama cancels the request's context)."""


# ---------------------------------------------------------------------------------------------
# Model names: host/namespace/model:tag (the note, "Model name grammar")
# ---------------------------------------------------------------------------------------------
_HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}")
_PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")  # model and tag


@dataclass(frozen=True)
class Name:
    host: str
    namespace: str
    model: str
    tag: str

    @property
    def key(self) -> str:
        """Matching is case-insensitive, so lookups use the lower-cased full name."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}".lower()

    @property
    def display(self) -> str:
        """The shortest form, as Ollama lists it: ``llama3.2:latest``, ``user/m:v1``, ``hf.co/o/r:t``."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"


def parse_name(text: object) -> Name | None:
    """Parse like Ollama's ParseName; None when the name is invalid.

    The tag splits at the last ``:`` only if it comes after the last ``/`` (so ``host:5000/ns/m``
    works). Empty parts, ``..``, spaces and non-ASCII fail the part patterns.
    """
    if not isinstance(text, str) or not text or not text.isascii():
        return None
    rest, tag = text, DEFAULT_TAG
    if text.rfind(":") > text.rfind("/"):
        rest, _, tag = text.rpartition(":")
    parts = rest.split("/")
    if len(parts) > 3:
        return None
    host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
    if len(parts) == 3:
        host, namespace, model = parts
    elif len(parts) == 2:
        namespace, model = parts
    else:
        model = parts[0]
    checks = ((host, _HOST_RE), (namespace, _NAMESPACE_RE), (model, _PART_RE), (tag, _PART_RE))
    if any(not regex.fullmatch(value) or ".." in value for value, regex in checks):
        return None
    return Name(host, namespace, model, tag)


# ---------------------------------------------------------------------------------------------
# Wire helpers
# ---------------------------------------------------------------------------------------------
def go_json(obj: object) -> str:
    """JSON as Go's encoding/json writes it: compact, and HTML-escaped (<, >, & become \\u003c...)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def go_quote(text: str) -> str:
    """Roughly Go's %q, used in ``name "X" is invalid``."""
    return json.dumps(text, ensure_ascii=False)


def _offset_minutes(setting: str, seconds: int) -> int:
    if setting == "local":
        offset = datetime.fromtimestamp(seconds).astimezone().utcoffset() or timedelta(0)
        return int(offset.total_seconds() // 60)
    if setting in ("Z", "+00:00", "-00:00"):
        return 0
    sign = -1 if setting.startswith("-") else 1
    hours, minutes = setting[1:].split(":")
    return sign * (int(hours) * 60 + int(minutes))


def rfc3339_nano(ns: int, tz_setting: str) -> str:
    """Go's time.RFC3339Nano (the note: nanoseconds and a local offset, e.g. ...44.706015396-07:00).

    Like Go it drops trailing zeros of the fraction and writes ``Z`` for a zero offset.
    """
    seconds, fraction = divmod(ns, 1_000_000_000)
    minutes = _offset_minutes(tz_setting, seconds)
    stamp = datetime.fromtimestamp(seconds, timezone(timedelta(minutes=minutes))).strftime("%Y-%m-%dT%H:%M:%S")
    if fraction:
        stamp += "." + f"{fraction:09d}".rstrip("0")
    if minutes == 0:
        return stamp + "Z"
    sign = "-" if minutes < 0 else "+"
    return stamp + f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def valid_tz_offset(value: object) -> bool:
    return isinstance(value, str) and (value in ("local", "Z") or bool(re.fullmatch(r"[+-]\d\d:\d\d", value)))


def _utc_ns(year: int, month: int, day: int, hour: int, minute: int, second: int, nanos: int) -> int:
    epoch = int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp())
    return epoch * 1_000_000_000 + nanos


# ---------------------------------------------------------------------------------------------
# Models: layers, specs, the default installed set and the remote catalog
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    digest: str  # 64 hex characters, no "sha256:" prefix
    size: int  # virtual bytes
    media_type: str

    @property
    def short(self) -> str:
        """The 12 hex characters in ``pulling 8eeb52dfb3bb``."""
        return self.digest[:12]


def layer(content_id: str, size: int, kind: str) -> Layer:
    """Equal content ids give equal digests, so models can share (cached) layers."""
    return Layer(hashlib.sha256(content_id.encode()).hexdigest(), size, MEDIA + kind)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # display name, always with a tag
    layers: tuple[Layer, ...]
    family: str = "llama"
    families: tuple[str, ...] | None = ("llama",)
    parameter_size: str = "1B"
    quantization_level: str = "Q4_K_M"
    capabilities: tuple[str, ...] = ("completion",)
    context_length: int | None = None  # a newer key in details; clients must ignore it

    @property
    def size(self) -> int:
        return sum(item.size for item in self.layers)

    @property
    def digest(self) -> str:
        """The manifest digest listed by /api/tags (hex without ``sha256:``, the note's quirk)."""
        manifest = self.name.lower() + "".join(item.digest for item in self.layers)
        return hashlib.sha256(manifest.encode()).hexdigest()

    def details(self) -> dict:
        out = {"parent_model": "", "format": "gguf", "family": self.family,
               "families": list(self.families) if self.families is not None else None,
               "parameter_size": self.parameter_size, "quantization_level": self.quantization_level}
        if self.context_length is not None:
            out["context_length"] = self.context_length
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "layers": [[x.digest, x.size, x.media_type] for x in self.layers],
                "family": self.family, "families": self.families, "parameter_size": self.parameter_size,
                "quantization_level": self.quantization_level, "capabilities": self.capabilities,
                "context_length": self.context_length}

    @classmethod
    def from_json(cls, data: dict) -> ModelSpec:
        families = data.get("families")
        return cls(name=data["name"], layers=tuple(Layer(*item) for item in data["layers"]),
                   family=data["family"], families=tuple(families) if families is not None else None,
                   parameter_size=data["parameter_size"], quantization_level=data["quantization_level"],
                   capabilities=tuple(data["capabilities"]), context_length=data.get("context_length"))


def _llama_params() -> Layer:
    return layer("shared/llama-params", 96, "params")  # the same bytes in several models: a cached layer


# Virtual sizes are tens to a few hundred MB: at the default 400e6 B/s a pull takes well under 2 s.
DEFAULT_CATALOG: tuple[ModelSpec, ...] = (
    ModelSpec("llama3.2:latest", (layer("llama3.2/model", 201_326_592, "model"),
                                  layer("llama3.2/template", 1_429, "template"), _llama_params()),
              parameter_size="3.2B", capabilities=("completion", "tools")),
    ModelSpec("qwen2.5:0.5b", (layer("qwen2.5:0.5b/model", 99_450_336, "model"),
                               layer("qwen2.5:0.5b/system", 68, "system")),
              family="qwen2", families=("qwen2",), parameter_size="494.03M", capabilities=("completion", "tools"),
              context_length=32768),
    ModelSpec("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
              (layer("hf-llama-1b/model", 80_769_446, "model"), layer("hf-llama-1b/template", 1_122, "template")),
              families=None, parameter_size="1.24B"),  # families null: the note's quirk
    ModelSpec("tinyllama:latest", (layer("tinyllama/model", 63_769_945, "model"),
                                   layer("tinyllama/template", 98, "template"), _llama_params()),
              parameter_size="1B", quantization_level="Q4_0"),
    ModelSpec("smollm:135m", (layer("smollm/model", 91_728_160, "model"), layer("smollm/template", 161, "template")),
              parameter_size="134.52M", quantization_level="Q4_0", context_length=2048),
    ModelSpec("phi3:mini", (layer("phi3/model", 229_064_576, "model"), layer("phi3/license", 1_084, "license"),
                            layer("phi3/params", 78, "params")),
              family="phi3", families=("phi3",), parameter_size="3.8B", quantization_level="Q4_0"),
    ModelSpec("nomic-embed-text:latest", (layer("nomic/model", 137_145_328, "model"),
                                          layer("nomic/license", 11_357, "license")),
              family="nomic-bert", families=("nomic-bert",), parameter_size="137M", quantization_level="F16",
              capabilities=("embedding",), context_length=2048),
)

# Installed at start, with fixed times (nine significant fraction digits, so the quirk is visible).
DEFAULT_INSTALLED: tuple[tuple[str, int], ...] = (
    ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", _utc_ns(2025, 6, 10, 9, 12, 5, 250130007)),
    ("llama3.2:latest", _utc_ns(2025, 5, 5, 0, 37, 44, 706015396)),
    ("qwen2.5:0.5b", _utc_ns(2025, 3, 1, 14, 2, 31, 123456789)),
)

_SYNTH_KINDS = ("model", "template", "params", "license", "system")


def synth_spec(name: Name, sizes: list[int]) -> ModelSpec:
    """A model added at run time (``add_remote`` / ``installed``): one layer per size."""
    letters = re.match(r"[a-z]+", name.model.lower())
    family = letters.group(0) if letters else "llama"
    layers = tuple(layer(f"{name.key}/{index}", size, _SYNTH_KINDS[min(index, len(_SYNTH_KINDS) - 1)])
                   for index, size in enumerate(sizes))
    return ModelSpec(name.display, layers, family=family, families=(family,))


# ---------------------------------------------------------------------------------------------
# Knobs
# ---------------------------------------------------------------------------------------------
def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_stall(value: object) -> bool:
    if isinstance(value, bool | str):
        return True
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


_KNOB_CHECKS = {
    "latency_ms": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "pull_speed": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (bytes per second)"),
    "progress_interval": (lambda v: _is_number(v) and v > 0, "a number > 0 (seconds)"),
    "verify_seconds": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (seconds)"),
    "stall": (_check_stall, "true/false, a model name or a list of names"),
    "fail_after_bytes": (lambda v: v is None or (_is_number(v) and v >= 0), "null or a number >= 0"),
    "fail_error": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "tz_offset": (valid_tz_offset, '"local", "Z" or "+HH:MM"'),
}
ACTIONS = ("add_remote", "installed")


def check_knobs(knobs: dict) -> None:
    """Raise HttpError 400 for an unknown knob or a bad value."""
    for key, value in knobs.items():
        if key in ACTIONS:
            continue
        if key not in _KNOB_CHECKS:
            raise HttpError(400, f"unknown knob {key!r}; known: {', '.join([*KNOB_DEFAULTS, *ACTIONS])}")
        check, expected = _KNOB_CHECKS[key]
        if not check(value):
            raise HttpError(400, f"knob {key!r} must be {expected}")


# ---------------------------------------------------------------------------------------------
# Downloads: one per model, shared by every pull of that model
# ---------------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    completed: list[int]
    error: str | None
    cancelled: bool


@dataclass
class Download:
    """The bytes of one model's layers, moved by a worker thread; each pull stream reads from it.

    Real Ollama shares downloads between concurrent pulls of a model and cancels one when no client
    waits any more; the partial files stay, so a later pull resumes (the note, "Pull stream").
    """

    state: EmulatorState
    spec: ModelSpec
    completed: list[int]
    waiters: int = 0
    error: str | None = None
    finished: bool = False
    cancel_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    @property
    def needs_bytes(self) -> bool:
        return any(done < item.size for done, item in zip(self.completed, self.spec.layers, strict=True))

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"download {self.spec.name}", daemon=True)
        self.thread.start()

    def snapshot(self) -> Snapshot:
        with self.state.lock:
            return Snapshot(list(self.completed), self.error, self.cancel_event.is_set())

    def _run(self) -> None:
        last = time.monotonic()
        try:
            for index, item in enumerate(self.spec.layers):
                while self.completed[index] < item.size and self.error is None:
                    if self.cancel_event.wait(TICK):
                        return
                    now = time.monotonic()
                    self._advance(index, now - last)
                    last = now
                if self.error is not None:
                    return
                self.state.blob_stored(self, item)
        finally:
            self.state.download_ended(self)

    def _advance(self, index: int, elapsed: float) -> None:
        """Move ``elapsed`` seconds' worth of bytes into layer ``index``, unless stalled or failing."""
        knobs = self.state.knobs
        if self.state.stalled(self.spec):
            return  # real Ollama keeps sending lines while bytes stop: completed just stays put
        item = self.spec.layers[index]
        new = min(item.size, self.completed[index] + int(knobs["pull_speed"] * elapsed))
        error = None
        limit = knobs["fail_after_bytes"]
        if limit is not None:
            others = sum(self.completed) - self.completed[index]
            if others + new >= limit:
                new = max(self.completed[index], min(new, int(limit) - others))
                error = knobs["fail_error"].replace("{digest}", item.digest)
        with self.state.lock:
            if self.cancel_event.is_set():
                return  # cancelled meanwhile (perhaps by a reset): leave the state alone
            self.state.stats["downloaded_bytes"] += max(0, new - self.completed[index])  # each byte fetched once
            self.completed[index] = new
            self.state.partials[item.digest] = new
            self.error = error


# ---------------------------------------------------------------------------------------------
# The emulator's state: knobs, catalog, installed models, blobs, downloads, counters
# ---------------------------------------------------------------------------------------------
@dataclass
class Installed:
    spec: ModelSpec
    modified_ns: int


class EmulatorState:
    def __init__(self, startup_knobs: dict | None = None, startup_config: dict | None = None,
                 state_file: str | None = None):
        self.lock = threading.RLock()
        self.startup_knobs = dict(startup_knobs or {})
        self.startup_config = dict(startup_config or {})
        check_knobs(self.startup_knobs)
        check_knobs(self.startup_config)
        self.state_file = state_file
        self.downloads: dict[str, Download] = {}
        self._restore_defaults()
        if state_file and os.path.exists(state_file):
            self._load(state_file)

    # --- defaults, reset, persistence ------------------------------------------------------
    def _restore_defaults(self) -> None:
        with self.lock:
            self.knobs = {**KNOB_DEFAULTS, **self.startup_knobs}
            self.catalog = {parse_name(spec.name).key: spec for spec in DEFAULT_CATALOG}
            self.installed = {}
            for name, modified_ns in DEFAULT_INSTALLED:
                key = parse_name(name).key
                self.installed[key] = Installed(self.catalog[key], modified_ns)
            self.blobs = {item.digest for entry in self.installed.values() for item in entry.spec.layers}
            self.partials: dict[str, int] = {}
            self.stats = {"requests": 0, "pull_requests": 0, "downloads_started": {}, "cancelled_downloads": 0,
                          "failed_downloads": 0, "completed_downloads": 0, "downloaded_bytes": 0}
            self.apply_config({key: value for key, value in self.startup_config.items() if key in ACTIONS},
                              save=False)
            self.knobs.update({key: value for key, value in self.startup_config.items() if key not in ACTIONS})

    def reset(self) -> None:
        """Cancel running downloads, then go back to the startup state; the state file follows."""
        with self.lock:
            for download in self.downloads.values():
                download.cancel_event.set()
            self.downloads = {}
            self._restore_defaults()
            self.save()

    def _load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            installed = {parse_name(item["spec"]["name"]).key: Installed(ModelSpec.from_json(item["spec"]),
                                                                          int(item["modified_ns"]))
                         for item in data["installed"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log(f"state file {path} unreadable ({exc}); starting with the default models")
            return
        self.installed = installed
        self.blobs = set(data.get("blobs", [])) | {x.digest for e in installed.values() for x in e.spec.layers}
        self.partials = {str(k): int(v) for k, v in data.get("partials", {}).items()}

    def save(self) -> None:
        """Write the state file atomically (temp file + rename), so a crash never leaves half a file."""
        if not self.state_file:
            return
        with self.lock:
            data = {"installed": [{"spec": e.spec.to_json(), "modified_ns": e.modified_ns}
                                  for e in self.installed.values()],
                    "blobs": sorted(self.blobs), "partials": self.partials}
            directory = os.path.dirname(os.path.abspath(self.state_file))
            fd, tmp = tempfile.mkstemp(prefix=".ollama-emulator-", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    json.dump(data, handle, indent=1)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, self.state_file)
            except OSError:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise

    # --- knobs and actions -----------------------------------------------------------------
    def apply_config(self, config: dict, save: bool = True) -> dict:
        check_knobs(config)
        add_remote = config.get("add_remote") or {}
        if not isinstance(add_remote, dict):
            raise HttpError(400, "add_remote must be an object: {name: total_bytes or [layer bytes, ...]}")
        with self.lock:
            for name, sizes in add_remote.items():
                spec = synth_spec(self._valid(name), _as_sizes(sizes))
                self.catalog[parse_name(spec.name).key] = spec
            if "installed" in config:
                self._replace_installed(config["installed"])
            self.knobs.update({key: value for key, value in config.items() if key not in ACTIONS})
            if save and "installed" in config:
                self.save()
            return dict(self.knobs)

    def _replace_installed(self, entries: object) -> None:
        """``installed``: names or ``{"name", "size"}``; listed in the given order (first = newest)."""
        if not isinstance(entries, list):
            raise HttpError(400, "installed must be a list of names or {\"name\", \"size\"} objects")
        now = time.time_ns()
        installed = {}
        for position, entry in enumerate(entries):
            name = self._valid(entry.get("name") if isinstance(entry, dict) else entry)
            spec = self.catalog.get(name.key)
            if spec is None or (isinstance(entry, dict) and "size" in entry):
                spec = synth_spec(name, _as_sizes(entry.get("size", 100_000_000) if isinstance(entry, dict)
                                                  else 100_000_000))
            installed[name.key] = Installed(spec, now - position * 1_000_001)
        self.installed = installed
        self.blobs = {item.digest for e in installed.values() for item in e.spec.layers}

    @staticmethod
    def _valid(text: object) -> Name:
        name = parse_name(text)
        if name is None:
            raise HttpError(400, f"invalid model name {text!r}")
        return name

    def stalled(self, spec: ModelSpec) -> bool:
        stall = self.knobs["stall"]
        if isinstance(stall, bool):
            return stall
        names = [stall] if isinstance(stall, str) else stall
        keys = {parsed.key for parsed in map(parse_name, names) if parsed is not None}
        return parse_name(spec.name).key in keys

    # --- models ------------------------------------------------------------------------------
    def list_installed(self) -> list[Installed]:
        with self.lock:
            return sorted(self.installed.values(), key=lambda entry: entry.modified_ns, reverse=True)

    def find_installed(self, name: Name) -> Installed | None:
        with self.lock:
            return self.installed.get(name.key)

    def remote(self, name: Name) -> ModelSpec | None:
        with self.lock:
            return self.catalog.get(name.key)

    def install(self, spec: ModelSpec) -> None:
        with self.lock:
            self.installed[parse_name(spec.name).key] = Installed(spec, time.time_ns())
            self.blobs.update(item.digest for item in spec.layers)
            self._save_quietly()  # mid-stream: a state-file problem must not break the pull

    def delete(self, name: Name) -> bool:
        """Remove a model and prune layers no other installed model uses (as Ollama does)."""
        with self.lock:
            if self.installed.pop(name.key, None) is None:
                return False
            self.blobs = {item.digest for e in self.installed.values() for item in e.spec.layers} | {
                digest for digest in self.blobs if digest in self._downloading_digests()}
            self.save()
            return True

    def _downloading_digests(self) -> set[str]:
        return {item.digest for d in self.downloads.values() for item in d.spec.layers}

    # --- downloads -----------------------------------------------------------------------------
    def join_download(self, spec: ModelSpec) -> Download:
        """Join the model's running download, or start one that resumes from partial bytes."""
        key = parse_name(spec.name).key
        while True:
            with self.lock:
                current = self.downloads.get(key)
                if current is None or current.finished:
                    return self._new_download(key, spec)
                if not current.cancel_event.is_set():
                    current.waiters += 1
                    return current
            current.thread.join(1.0)  # a cancelled one is ending: let it store its partial bytes first

    def _new_download(self, key: str, spec: ModelSpec) -> Download:
        completed = [item.size if item.digest in self.blobs else min(item.size, self.partials.get(item.digest, 0))
                     for item in spec.layers]
        download = Download(self, spec, completed, waiters=1)
        self.downloads[key] = download
        if download.needs_bytes:  # an all-cached pull moves no bytes and is not counted
            started = self.stats["downloads_started"]
            started[spec.name] = started.get(spec.name, 0) + 1
        download.start()
        return download

    def leave_download(self, download: Download) -> None:
        """A client stopped waiting; the last one to leave an unfinished download cancels it."""
        with self.lock:
            download.waiters -= 1
            if download.waiters <= 0 and not download.finished and not download.cancel_event.is_set():
                download.cancel_event.set()
                self.stats["cancelled_downloads"] += 1

    def blob_stored(self, download: Download, item: Layer) -> None:
        with self.lock:
            if download.cancel_event.is_set():
                return
            self.blobs.add(item.digest)
            self.partials.pop(item.digest, None)

    def download_ended(self, download: Download) -> None:
        with self.lock:
            download.finished = True
            key = parse_name(download.spec.name).key
            if self.downloads.get(key) is download:
                del self.downloads[key]
            if download.error is not None:
                self.stats["failed_downloads"] += 1
            elif not download.cancel_event.is_set():
                self.stats["completed_downloads"] += 1
            if download.cancel_event.is_set() or download.error is not None:
                self._save_quietly()  # partial bytes survive a restart, like partial blob files

    def _save_quietly(self) -> None:
        try:
            self.save()
        except OSError as exc:
            log(f"cannot write state file {self.state_file}: {exc}")

    def shutdown(self) -> None:
        with self.lock:
            for download in self.downloads.values():
                download.cancel_event.set()

    # --- counters ----------------------------------------------------------------------------
    def count(self, counter: str) -> None:
        with self.lock:
            self.stats[counter] += 1

    def stats_view(self) -> dict:
        with self.lock:
            active = [d for d in self.downloads.values() if not d.finished]
            return {**self.stats, "downloads_started": dict(self.stats["downloads_started"]),
                    "active_downloads": [d.spec.name for d in active],
                    "download_waiters": {d.spec.name: d.waiters for d in active},
                    "installed": [e.spec.name for e in self.list_installed()]}


def _as_sizes(value: object) -> list[int]:
    sizes = value if isinstance(value, list) else [value]
    if not sizes or not all(_is_number(size) and size > 0 for size in sizes):
        raise HttpError(400, "sizes must be a positive number of bytes or a list of them")
    return [int(size) for size in sizes]


# ---------------------------------------------------------------------------------------------
# Host check (the note: on loopback Ollama answers 403 to a Host header that is not local)
# ---------------------------------------------------------------------------------------------
def split_host(header: str) -> str:
    """The host part of a Host header: ``[::1]:11434`` -> ``::1``, ``localhost:11434`` -> ``localhost``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") == 1:
        return header.partition(":")[0]
    return header


def host_is_local(host: str) -> bool:
    """Ollama's allowedHostsMiddleware: loopback/private/unspecified IPs, localhost, hostname, local TLDs."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        return address.is_loopback or address.is_private or address.is_unspecified
    if host in ("", "localhost") or host == socket.gethostname().lower():
        return True
    return host.endswith((".localhost", ".local", ".internal"))


def is_loopback_bind(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------
def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress_line(item: Layer, completed: int) -> dict:
    """``total``/``completed`` are Go ``omitempty`` fields: they vanish while zero (the note)."""
    line: dict = {"status": f"pulling {item.short}", "digest": f"sha256:{item.digest}"}
    if item.size:
        line["total"] = item.size
    if completed:
        line["completed"] = completed
    return line


class Handler(BaseHTTPRequestHandler):
    server: EmulatorServer
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, like Go's net/http
    # Headers and body go out in separate writes; without TCP_NODELAY, Nagle + delayed ACK add ~40 ms
    # to every keep-alive answer, which Go (Ollama) never does.
    disable_nagle_algorithm = True

    # --- plumbing ----------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_DELETE = do_PUT = do_PATCH = do_OPTIONS = do_GET

    def log_request(self, code="-", size="-"):
        """Silenced: _dispatch logs one Gin-style line per request when it ends."""

    def send_response(self, code, message=None):
        self._status = code
        self.send_response_only(code, message)  # no Server header: Go sends none
        self.send_header("Date", self.date_time_string())

    @property
    def state(self) -> EmulatorState:
        return self.server.state

    def _dispatch(self) -> None:
        started = time.monotonic()
        self._status, self._chunked = 0, False
        path = urlsplit(self.path).path
        try:
            self._body = self._read_body()
            self._route(path)
        except HttpError as exc:
            self._json(exc.status, {"error": exc.message})
        except ClientGone:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - answer 500 like Gin's recovery middleware, keep serving
            log(f"internal error on {self.command} {path}: {exc!r}")
            self.close_connection = True
            if not self._status:
                self._json(500, {"error": f"internal emulator error: {exc}"})
        finally:
            elapsed_ms = (time.monotonic() - started) * 1000
            log(f"[GIN] {time.strftime('%Y/%m/%d - %H:%M:%S')} | {self._status or '-':>3} | {elapsed_ms:10.3f}ms "
                f"| {self.client_address[0]:>15} | {self.command:<7} \"{path}\"")

    def _route(self, path: str) -> None:
        control = path.startswith("/_emulator/")
        if not control:
            self.state.count("requests")
            if self.server.loopback and not host_is_local(split_host(self.headers.get("Host", ""))):
                self._send(403, b"", None)  # Gin's AbortWithStatus: no body
                return
        methods = ROUTES.get(path)
        if methods is None:
            self._text(404, "404 page not found")  # Gin's default, text/plain, not JSON (the note)
            return
        handler = methods.get(self.command)
        if handler is None:
            self._text(405, "405 method not allowed")
            return
        if path.startswith("/api/"):
            self._delay()
        handler(self)

    def _delay(self) -> None:
        latency = self.state.knobs["latency_ms"]
        if latency:
            time.sleep(latency / 1000)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _json_body(self, go_type: str) -> dict:
        """Gin's ShouldBindJSON: io.EOF becomes ``missing request body`` (the note)."""
        if not self._body.strip():
            raise HttpError(400, "missing request body")
        try:
            data = json.loads(self._body)
        except ValueError as exc:
            raise HttpError(400, f"invalid character in JSON body: {exc}") from None
        if not isinstance(data, dict):
            kind = {list: "array", str: "string", bool: "bool"}.get(type(data), "number")
            raise HttpError(400, f"json: cannot unmarshal {kind} into Go value of type api.{go_type}")
        return data

    def _send(self, status: int, body: bytes, content_type: str | None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, obj: object) -> None:
        self._send(status, go_json(obj).encode(), "application/json; charset=utf-8")

    def _text(self, status: int, text: str) -> None:
        self._send(status, text.encode(), "text/plain; charset=utf-8")

    # --- streaming -----------------------------------------------------------------------------
    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        if self.request_version == "HTTP/1.1":
            self._chunked = True
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True  # HTTP/1.0: the body ends when the connection closes
            self.send_header("Connection", "close")
        self.end_headers()

    def _write_line(self, obj: dict) -> None:
        data = (go_json(obj) + "\n").encode()
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            raise ClientGone from None

    def _end_stream(self) -> None:
        if self._chunked:
            try:
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                raise ClientGone from None

    def _client_gone(self) -> bool:
        """True when the peer closed: the socket reads as EOF (no request pipelines behind a pull)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _pause(self, seconds: float) -> None:
        """Sleep, but notice a closed connection within ~20 ms (that is what cancels a download)."""
        deadline = time.monotonic() + seconds
        while True:
            if self._client_gone():
                raise ClientGone
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.02))

    # --- Ollama routes -----------------------------------------------------------------------
    def root(self) -> None:
        self._text(200, "Ollama is running")

    def version(self) -> None:
        self._json(200, {"version": OLLAMA_VERSION})

    def tags(self) -> None:
        tz = self.state.knobs["tz_offset"]
        models = []
        for entry in self.state.list_installed():
            spec = entry.spec
            models.append({"name": spec.name, "model": spec.name, "modified_at": rfc3339_nano(entry.modified_ns, tz),
                           "size": spec.size, "digest": spec.digest, "details": spec.details(),
                           "capabilities": list(spec.capabilities)})  # a newer key: clients must ignore it
        self._json(200, {"models": models})

    def ps(self) -> None:
        """Pretend the most recently modified model is loaded (enough to exercise the shape)."""
        tz = self.state.knobs["tz_offset"]
        models = []
        for entry in self.state.list_installed()[:1]:
            spec = entry.spec
            expires = time.time_ns() + 4 * 60 * 1_000_000_000  # a loaded model expires after a keep-alive
            models.append({"name": spec.name, "model": spec.name, "size": spec.size + 1_073_741_824,
                           "digest": spec.digest, "details": spec.details(),
                           "expires_at": rfc3339_nano(expires, tz), "size_vram": spec.size + 1_073_741_824,
                           "context_length": spec.context_length or 4096})
        self._json(200, {"models": models})

    def show(self) -> None:
        body = self._json_body("ShowRequest")
        raw = body.get("model") or body.get("name") or ""
        if not raw:
            raise HttpError(400, "model is required")
        name = parse_name(raw)
        entry = self.state.find_installed(name) if name else None
        if entry is None:
            raise HttpError(404, f"model '{raw}' not found")
        spec = entry.spec
        self._json(200, {
            "license": "", "modelfile": f"# Modelfile generated by \"ollama show\"\nFROM {spec.name}\n",
            "parameters": "", "template": "{{ .Prompt }}", "details": spec.details(),
            "model_info": {"general.architecture": spec.family, "general.parameter_count": spec.size * 2,
                           f"{spec.family}.context_length": spec.context_length or 4096},
            "capabilities": list(spec.capabilities),
            "modified_at": rfc3339_nano(entry.modified_ns, self.state.knobs["tz_offset"]),
        })

    def delete(self) -> None:
        """200 with an EMPTY body on success: callers must not parse JSON (the note)."""
        body = self._json_body("DeleteRequest")
        raw = body.get("model") or body.get("name") or ""
        if not raw:
            raise HttpError(400, "model is required")
        name = parse_name(raw)
        if name is None:
            raise HttpError(400, f"name {go_quote(raw)} is invalid")
        if not self.state.delete(name):
            raise HttpError(404, f"model '{raw}' not found")
        self._send(200, b"", None)

    def pull(self) -> None:
        body = self._json_body("PullRequest")
        name = parse_name(body.get("model") or body.get("name") or "")
        if name is None:
            raise HttpError(400, "invalid model name")
        self.state.count("pull_requests")
        stream = body.get("stream") is not False  # Go *bool: absent or null means stream
        emit = self._write_line if stream else (lambda _line: None)
        if stream:
            self._start_stream()
        emit({"status": "pulling manifest"})
        error = self._run_pull(name, emit)
        if stream:
            emit({"error": error} if error else {"status": "success"})
            self._end_stream()
        elif error:
            self._json(500, {"error": error})  # stream:false turns the error line into a 500 (the note)
        else:
            self._json(200, {"status": "success"})

    def _run_pull(self, name: Name, emit) -> str | None:
        """The pull after ``pulling manifest``: layers, verify, manifest. Returns an error or None."""
        spec = self.state.remote(name)
        if spec is None:
            return "pull model manifest: file does not exist"
        error = self._follow_download(spec, emit)
        if error:
            return error
        emit({"status": "verifying sha256 digest"})
        self._pause(self.state.knobs["verify_seconds"])  # silence while hashing (the note)
        emit({"status": "writing manifest"})
        self.state.install(spec)
        emit({"status": "removing unused layers"})
        return None

    def _follow_download(self, spec: ModelSpec, emit) -> str | None:
        """Read the shared download every progress_interval; a finished layer is shown once, full."""
        download = self.state.join_download(spec)
        try:
            shown = 0  # layers whose final (completed == total) line went out
            while True:
                snap = download.snapshot()
                while shown < len(spec.layers) and snap.completed[shown] >= spec.layers[shown].size:
                    emit(_progress_line(spec.layers[shown], spec.layers[shown].size))
                    shown += 1
                if snap.error:
                    return snap.error
                if shown == len(spec.layers):
                    return None
                if snap.cancelled:
                    return "context canceled"  # reset or shutdown stopped the download
                emit(_progress_line(spec.layers[shown], snap.completed[shown]))
                self._pause(self.state.knobs["progress_interval"])
        finally:
            self.state.leave_download(download)

    # --- control routes ---------------------------------------------------------------------
    def control_stats(self) -> None:
        self._json(200, self.state.stats_view())

    def control_get_config(self) -> None:
        self._json(200, self.state.knobs)

    def control_config(self) -> None:
        self._json(200, self.state.apply_config(self._json_body("EmulatorConfig") if self._body.strip() else {}))

    def control_reset(self) -> None:
        self.state.reset()
        self._json(200, {"reset": True, "config": self.state.knobs})


# path -> method -> handler. HEAD mirrors GET where Ollama registers both.
ROUTES = {
    "/": {"GET": Handler.root, "HEAD": Handler.root},
    "/api/version": {"GET": Handler.version, "HEAD": Handler.version},
    "/api/tags": {"GET": Handler.tags, "HEAD": Handler.tags},
    "/api/ps": {"GET": Handler.ps},
    "/api/show": {"POST": Handler.show},
    "/api/pull": {"POST": Handler.pull},
    "/api/delete": {"DELETE": Handler.delete},
    "/_emulator/stats": {"GET": Handler.control_stats},
    "/_emulator/config": {"GET": Handler.control_get_config, "POST": Handler.control_config},
    "/_emulator/reset": {"POST": Handler.control_reset},
}


class EmulatorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, state: EmulatorState):
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.state = state
        self.loopback = is_loopback_bind(host)
        super().__init__((host, port), Handler)

    def shutdown(self) -> None:
        self.state.shutdown()
        super().shutdown()


def make_server(host: str = "127.0.0.1", port: int = 11434, *, state_file: str | None = None,
                config: dict | None = None, **knobs) -> EmulatorServer:
    """A bound server; call ``serve_forever()`` (in a thread, for tests) and ``shutdown()``.

    ``knobs`` are KNOB_DEFAULTS overrides (``pull_speed=1e9``); ``config`` takes the same JSON as
    ``POST /_emulator/config`` (actions included). Both are the state ``/_emulator/reset`` returns to.
    """
    return EmulatorServer(host, port, EmulatorState(knobs, config, state_file))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Ollama REST API emulator (tests only).")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=11434, help="port (default 11434; 0 picks a free one)")
    parser.add_argument("--pull-speed", type=float, default=KNOB_DEFAULTS["pull_speed"],
                        help="virtual bytes per second of a download (default 400e6)")
    parser.add_argument("--progress-interval", type=float, default=KNOB_DEFAULTS["progress_interval"],
                        help="seconds between progress lines (default 0.06)")
    parser.add_argument("--verify-seconds", type=float, default=KNOB_DEFAULTS["verify_seconds"],
                        help="silence after 'verifying sha256 digest' (default 0.3)")
    parser.add_argument("--latency-ms", type=float, default=KNOB_DEFAULTS["latency_ms"],
                        help="delay before answering every /api route (default 0)")
    parser.add_argument("--tz-offset", default=KNOB_DEFAULTS["tz_offset"],
                        help='offset in modified_at: "local", "Z" or "+HH:MM" (default -07:00)')
    parser.add_argument("--state-file", help="JSON file where installed models persist across restarts")
    parser.add_argument("--config-json", default="{}",
                        help="startup knobs and actions, same JSON as POST /_emulator/config")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = json.loads(args.config_json)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        knobs = {"pull_speed": args.pull_speed, "progress_interval": args.progress_interval,
                 "verify_seconds": args.verify_seconds, "latency_ms": args.latency_ms, "tz_offset": args.tz_offset}
        server = make_server(args.host, args.port, state_file=args.state_file, config=config, **knobs)
    except (ValueError, HttpError) as exc:
        log(f"ollama-emulator: error: bad configuration: {exc}")
        return 2
    except OSError as exc:
        log(f"ollama-emulator: error: cannot listen on {args.host}:{args.port}: {exc}")
        return 1

    def stop(signum, _frame):
        log(f"received {signal.Signals(signum).name}, shutting down")
        # shutdown() waits for serve_forever() to return, so it must run outside the serving thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    log(f"Listening on {host}:{port} (version {OLLAMA_VERSION}, emulator)")
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
