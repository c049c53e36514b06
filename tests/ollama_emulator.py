#!/usr/bin/env python3
"""Ollama REST API emulator for tests and molecule hosts.

One file, Python 3.11 standard library only: it is copied onto Debian 12 test hosts and run as
``ollama.service`` (``python3 ollama_emulator.py --host 127.0.0.1 --port 11434``), and tests may
import it and call ``make_server(host, port, **knobs)``.

It follows the wire format in shared/notes/ollama-api.md ("the note"), quirks included, so our
adapter meets them in tests before it meets a real Ollama. Where the note is silent the emulator
follows Ollama's server/routes.go, server/sched.go and api/types.go; tests/emulator drives every route
through the official ``ollama`` Python client so the two cannot drift apart.

Ollama routes: ``/``, ``/api/version``, ``/api/tags``, ``/api/show``, ``/api/pull``, ``/api/delete``,
``/api/copy``, ``/api/ps``, ``/api/generate`` and ``/api/chat`` (an empty prompt / no messages loads a
model, ``keep_alive: 0`` unloads it; a prompt gets a canned answer). Loaded models live in a VRAM
model: a per-host budget (``vram_bytes``), Ollama's eviction when a load does not fit, CPU spill
(``size_vram < size``) for a model larger than the whole budget, and ``keep_alive`` expiry on the
emulator's clock, which tests can move forward instead of sleeping.

Routes that are not Ollama's live under ``/_emulator/`` (JSON, no auth, no Host check):

    GET  /_emulator/stats    counters (requests, pulls and pulls_by_model, downloads started/cancelled/
                             active, bytes downloaded: a resumed download adds only the bytes it had not
                             fetched, copies, loads, unloads, evicted and expired model names)
    GET  /_emulator/config   the current knobs
    POST /_emulator/config   merge knobs (see KNOB_DEFAULTS) and the actions ``add_remote``/``installed``/
                             ``publish``/``loaded``
    POST /_emulator/publish  {"model", "digest"?, "size"?}: the registry gets a new build of that tag, so
                             a later pull downloads a new digest (installed copies keep the old one)
    GET  /_emulator/clock    the emulator's clock (keep_alive expiry runs on it)
    POST /_emulator/clock    {"advance": seconds}: move it forward (models whose keep_alive ran out unload)
    POST /_emulator/reset    back to the startup state (flags + --config-json), counters zeroed, clock real

``python3 ollama_emulator.py publish MODEL [--digest D] [--url URL]`` asks a running emulator to publish
(for hosts without curl, e.g. the molecule GPU hosts).
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import math
import os
import re
import select
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
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
    # The VRAM model (loaded models, /api/ps). 0 bytes of VRAM means a CPU-only host: nothing is
    # evicted for room and every model reports size_vram 0.
    "vram_bytes": 24 * 1024**3,  # one 24 GiB GPU
    "max_loaded_models": 3,  # OLLAMA_MAX_LOADED_MODELS' default for one GPU
    "load_overhead_bytes": 512 * 1024**2,  # KV cache and graph: /api/ps sizes exceed /api/tags sizes
    "load_seconds": 0,  # time a load takes before its answer (real loads take seconds to minutes)
    "default_keep_alive": "5m",  # OLLAMA_KEEP_ALIVE: a duration string or seconds, negative = forever
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
# keep_alive durations (api.Duration's UnmarshalJSON, on Go's time.ParseDuration)
# ---------------------------------------------------------------------------------------------
FOREVER_NS = 2**63 - 1  # math.MaxInt64: what a negative keep_alive becomes
_GO_UNITS = {"ns": 1, "us": 1_000, "\u00b5s": 1_000, "\u03bcs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
             "m": 60_000_000_000, "h": 3_600_000_000_000}
_DURATION_PART = re.compile(r"(\d*)(?:\.(\d*))?([^\d.]*)")


def go_parse_duration(text: str) -> int:
    """Go's time.ParseDuration in nanoseconds: ``"5m"``, ``"1h30m"``, ``"1.5s"``, ``"-1m"``, ``"0"``.

    Errors carry Go's wording (``time: invalid duration "x"``): Ollama answers them as a 400.
    """
    quoted = go_quote(text)
    body, sign = text, 1
    if body[:1] in ("-", "+"):
        sign, body = (-1 if body[0] == "-" else 1), body[1:]
    if body == "0":
        return 0
    if not body:
        raise ValueError(f"time: invalid duration {quoted}")
    total, position = 0, 0
    while position < len(body):
        match = _DURATION_PART.match(body, position)
        assert match is not None  # every group may be empty: it always matches
        whole, fraction, unit = match.group(1), match.group(2), match.group(3)
        if not whole and not fraction:
            raise ValueError(f"time: invalid duration {quoted}")
        if not unit:
            raise ValueError(f"time: missing unit in duration {quoted}")
        if unit not in _GO_UNITS:
            raise ValueError(f"time: unknown unit {go_quote(unit)} in duration {quoted}")
        scale = _GO_UNITS[unit]
        total += int(whole or "0") * scale
        if fraction:
            total += int(fraction) * scale // 10 ** len(fraction)
        position = match.end()
    return min(sign * total, FOREVER_NS)


_GO_TYPES = {bool: "bool", list: "[]interface {}", dict: "map[string]interface {}"}


def keep_alive_ns(value: object) -> int:
    """A keep_alive as Ollama reads it: seconds (a number) or a duration string; negative = forever.

    Raises ValueError with Ollama's message for anything else.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):  # Python's json reads NaN and Infinity; Go's rejects them
            raise ValueError(f"invalid keep_alive {value}")
        return FOREVER_NS if value < 0 else min(int(value * 1_000_000_000), FOREVER_NS)
    if isinstance(value, str):
        duration = go_parse_duration(value)
        return FOREVER_NS if duration < 0 else duration
    raise ValueError(f"Unsupported type: '{_GO_TYPES.get(type(value), type(value).__name__)}'")


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
    manifest_digest: str | None = None  # set by a copy (same manifest, same digest) or a publish

    @property
    def size(self) -> int:
        return sum(item.size for item in self.layers)

    @property
    def digest(self) -> str:
        """The manifest digest listed by /api/tags (hex without ``sha256:``, the note's quirk)."""
        if self.manifest_digest:
            return self.manifest_digest
        manifest = self.name.lower() + "".join(item.digest for item in self.layers)
        return hashlib.sha256(manifest.encode()).hexdigest()

    @property
    def runner_key(self) -> str:
        """Ollama keys a loaded runner by the model blob's path, so a copy shares its original's runner."""
        weights = [item.digest for item in self.layers if item.media_type == MEDIA + "model"]
        return weights[0] if weights else self.digest

    def details(self, with_context: bool = True) -> dict:
        """``with_context``: /api/tags and /api/show carry details.context_length when known; /api/ps
        never does (its context_length is the runner's, at the top level)."""
        out = {"parent_model": "", "format": "gguf", "family": self.family,
               "families": list(self.families) if self.families is not None else None,
               "parameter_size": self.parameter_size, "quantization_level": self.quantization_level}
        if with_context and self.context_length is not None:
            out["context_length"] = self.context_length
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "layers": [[x.digest, x.size, x.media_type] for x in self.layers],
                "family": self.family, "families": self.families, "parameter_size": self.parameter_size,
                "quantization_level": self.quantization_level, "capabilities": self.capabilities,
                "context_length": self.context_length, "manifest_digest": self.manifest_digest}

    @classmethod
    def from_json(cls, data: dict) -> ModelSpec:
        families = data.get("families")
        return cls(name=data["name"], layers=tuple(Layer(*item) for item in data["layers"]),
                   family=data["family"], families=tuple(families) if families is not None else None,
                   parameter_size=data["parameter_size"], quantization_level=data["quantization_level"],
                   capabilities=tuple(data["capabilities"]), context_length=data.get("context_length"),
                   manifest_digest=data.get("manifest_digest"))


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


def _finite(value: object) -> bool:
    """A number that int() can take: Python's json reads NaN and Infinity, which Go's rejects."""
    return _is_number(value) and math.isfinite(value)  # type: ignore[arg-type]


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
    "vram_bytes": (lambda v: _finite(v) and v >= 0, "a number >= 0 (bytes; 0 = no GPU)"),
    "max_loaded_models": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "load_overhead_bytes": (lambda v: _finite(v) and v >= 0, "a number >= 0 (bytes)"),
    "load_seconds": (lambda v: _finite(v) and v >= 0, "a number >= 0 (seconds)"),
    "default_keep_alive": (lambda v: _valid_keep_alive(v), 'a duration ("5m", "1h") or seconds; negative = forever'),
}
ACTIONS = ("add_remote", "installed", "publish", "loaded")


def _valid_keep_alive(value: object) -> bool:
    try:
        keep_alive_ns(value)
    except ValueError:
        return False
    return True


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


@dataclass
class Loaded:
    """A model in memory, as ``/api/ps`` shows it. Times are on the emulator's clock."""

    spec: ModelSpec
    size: int  # weights + overhead: larger than the /api/tags size, as in real Ollama
    size_vram: int  # < size: the rest spilled to system memory (CPU)
    context_length: int
    keep_alive_ns: int
    expires_ns: int
    last_used_ns: int

    @property
    def eviction_order(self) -> tuple[int, int]:
        """Ollama's sched.go unloads the shortest keep_alive first (a forever model last); it breaks
        ties by blob path, which is arbitrary to a user: here the least recently used goes first."""
        return (self.keep_alive_ns, self.last_used_ns)


HEX64_RE = re.compile(r"[0-9a-f]{64}")
DEFAULT_CONTEXT = 4096  # Ollama's default num_ctx, capped by what the model was trained for


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
            self.builds: dict[str, int] = {}  # published builds per tag (the catalog's original is build 1)
            self.loaded: dict[str, Loaded] = {}  # by runner key
            self.clock_offset_ns = 0
            self.stats = self._zero_stats()
            # Knobs first: the actions (a ``loaded`` list) may depend on vram_bytes and friends.
            self.knobs.update({key: value for key, value in self.startup_config.items() if key not in ACTIONS})
            self.apply_config({key: value for key, value in self.startup_config.items()
                               if key in ACTIONS and key != "loaded"}, save=False)
            self._startup_memory()
            self.stats = self._zero_stats()  # the startup state is not something a test did

    @staticmethod
    def _zero_stats() -> dict:
        return {"requests": 0, "pull_requests": 0, "pulls": 0, "pulls_by_model": {}, "downloads_started": {},
                "cancelled_downloads": 0, "failed_downloads": 0, "completed_downloads": 0, "downloaded_bytes": 0,
                "copies": 0, "loads": 0, "unloads": 0, "evicted": [], "expired": []}

    def _startup_memory(self) -> None:
        """What is loaded at start: the startup ``loaded`` list, else the newest installed model, as if
        a user had just used it (so ``/api/ps`` is not empty on a fresh emulator, as tests expect)."""
        self.loaded = {}
        if "loaded" in self.startup_config:
            self._replace_loaded(self.startup_config["loaded"])
            return
        newest = self.list_installed()[:1]
        if newest:
            self._place(newest[0].spec, self.now_ns(), None)

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
            catalog = [ModelSpec.from_json(item) for item in data.get("catalog", [])]
            builds = {str(k): int(v) for k, v in data.get("builds", {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log(f"state file {path} unreadable ({exc}); starting with the default models")
            return
        self.installed = installed
        self.blobs = set(data.get("blobs", [])) | {x.digest for e in installed.values() for x in e.spec.layers}
        self.partials = {str(k): int(v) for k, v in data.get("partials", {}).items()}
        self.catalog.update({parse_name(spec.name).key: spec for spec in catalog})  # published builds survive
        self.builds = builds
        self._startup_memory()  # memory does not survive a restart: the startup set, from the loaded models

    def save(self) -> None:
        """Write the state file atomically (temp file + rename), so a crash never leaves half a file."""
        if not self.state_file:
            return
        with self.lock:
            data = {"installed": [{"spec": e.spec.to_json(), "modified_ns": e.modified_ns}
                                  for e in self.installed.values()],
                    "blobs": sorted(self.blobs), "partials": self.partials,
                    "catalog": [spec.to_json() for spec in self._changed_catalog()], "builds": self.builds}
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
            if "publish" in config:
                self._publish_all(config["publish"])
            if "loaded" in config:
                self._replace_loaded(config["loaded"])
            if save and ("installed" in config or "publish" in config):
                self.save()
            return dict(self.knobs)

    def _publish_all(self, entries: object) -> None:
        """``publish``: ``{name: digest or null}``, one new build per name (see ``publish``)."""
        if not isinstance(entries, dict):
            raise HttpError(400, "publish must be an object: {name: digest or null}")
        for name, digest in entries.items():
            self.publish(name, digest)

    def _replace_loaded(self, entries: object) -> None:
        """``loaded``: installed names or ``{"name", "keep_alive"}``, loaded in order (evictions apply)."""
        if not isinstance(entries, list):
            raise HttpError(400, 'loaded must be a list of names or {"name", "keep_alive"} objects')
        wanted = []
        for entry in entries:
            name = self._valid(entry.get("name") if isinstance(entry, dict) else entry)
            installed = self.installed.get(name.key)
            if installed is None:
                raise HttpError(400, f"loaded: {name.display} is not installed")
            keep_alive = entry.get("keep_alive") if isinstance(entry, dict) else None
            try:
                wanted.append((installed.spec, None if keep_alive is None else keep_alive_ns(keep_alive)))
            except ValueError as exc:
                raise HttpError(400, f"loaded: {name.display}: keep_alive: {exc}") from None
        self.loaded = {}
        for spec, keep_alive in wanted:
            self._place(spec, self.now_ns(), keep_alive)

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

    def copy(self, source: Name, destination: Name) -> bool:
        """Ollama's CopyModel writes the source's manifest under a new name: same layers, same digest."""
        with self.lock:
            entry = self.installed.get(source.key)
            if entry is None:
                return False
            spec = replace(entry.spec, name=destination.display, manifest_digest=entry.spec.digest)
            self.installed[destination.key] = Installed(spec, time.time_ns())  # a new manifest file: newest
            self.stats["copies"] += 1
            self.save()
            return True

    def publish(self, raw_name: object, digest: object = None, size: object = None) -> dict:
        """The registry gets build N+1 of a tag: a new weights layer, so a new manifest digest.

        Builds are numbered per tag and their layers derive from the name and number, so every host
        that publishes the same tag the same number of times sees the same digest (one registry).
        ``digest`` pins the new manifest digest; ``size`` sets the new weights layer's bytes.
        """
        name = self._valid(raw_name)
        if digest is not None and not (isinstance(digest, str) and HEX64_RE.fullmatch(digest)):
            raise HttpError(400, "digest must be 64 lowercase hex characters, without sha256:")
        weights_size = _as_sizes(size)[0] if size is not None else None
        with self.lock:
            old = self.catalog.get(name.key)
            base = old or synth_spec(name, [weights_size or 100_000_000])
            build = self.builds.get(name.key, 1) + 1
            content = f"{name.key}/build{build}" if digest is None else f"{name.key}/digest/{digest}"
            weights = [item for item in base.layers if item.media_type == MEDIA + "model"]
            new = layer(content, weights_size or (weights[0].size if weights else 100_000_000), "model")
            rest = tuple(item for item in base.layers if item.media_type != MEDIA + "model")
            spec = replace(base, layers=(new, *rest), manifest_digest=digest)
            self.catalog[name.key] = spec
            self.builds[name.key] = build
            return {"model": spec.name, "digest": spec.digest, "previous_digest": old.digest if old else None,
                    "build": build}

    def _changed_catalog(self) -> list[ModelSpec]:
        """Catalog entries that are not the built-in ones (published builds, add_remote): persisted."""
        defaults = {parse_name(spec.name).key: spec for spec in DEFAULT_CATALOG}
        return [spec for key, spec in self.catalog.items() if defaults.get(key) != spec]

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

    # --- loaded models: the VRAM model ---------------------------------------------------------
    def now_ns(self) -> int:
        """The emulator's clock: wall time plus what tests advanced it by (keep_alive runs on it)."""
        return time.time_ns() + self.clock_offset_ns

    def advance_clock(self, seconds: float) -> list[str]:
        """Move the clock forward; returns the models whose keep_alive ran out meanwhile."""
        with self.lock:
            self.clock_offset_ns += int(seconds * 1_000_000_000)
            return self._expire_due()

    def _expire_due(self) -> list[str]:
        """Unload what has expired. Real Ollama uses timers; checking on every read looks the same."""
        now = self.now_ns()
        gone = [entry for entry in self.loaded.values() if entry.expires_ns <= now]
        for entry in gone:
            del self.loaded[entry.spec.runner_key]
            self.stats["expired"].append(entry.spec.name)
        return [entry.spec.name for entry in gone]

    def is_loaded(self, spec: ModelSpec) -> bool:
        with self.lock:
            self._expire_due()
            return spec.runner_key in self.loaded

    def load_model(self, spec: ModelSpec, keep_alive: int | None) -> Loaded:
        """Load (or touch) a model; ``keep_alive`` None keeps a loaded model's own, else the default."""
        with self.lock:
            self._expire_due()
            if spec.runner_key not in self.loaded:
                self.stats["loads"] += 1
            return self._place(spec, self.now_ns(), keep_alive)

    def _place(self, spec: ModelSpec, now: int, keep_alive: int | None) -> Loaded:
        entry = self.loaded.get(spec.runner_key)
        if entry is None:
            entry = self._make_room_and_load(spec, now)
            if keep_alive is None:
                keep_alive = keep_alive_ns(self.knobs["default_keep_alive"])
        if keep_alive is not None:
            entry.keep_alive_ns = keep_alive
        entry.last_used_ns = now
        entry.expires_ns = now + entry.keep_alive_ns  # forever: now + MaxInt64 ns, year 2318, like Go
        return entry

    def _make_room_and_load(self, spec: ModelSpec, now: int) -> Loaded:
        """sched.go: evict until the model fits whole in VRAM (and under max_loaded_models); one larger
        than the whole budget evicts everything, then loads partly on the CPU (size_vram < size)."""
        need = spec.size + int(self.knobs["load_overhead_bytes"])
        budget = int(self.knobs["vram_bytes"])

        def crowded() -> bool:
            if len(self.loaded) >= self.knobs["max_loaded_models"]:
                return True
            return budget > 0 and need > budget - self._vram_used()

        while self.loaded and crowded():
            victim = min(self.loaded.values(), key=lambda entry: entry.eviction_order)
            del self.loaded[victim.spec.runner_key]
            self.stats["evicted"].append(victim.spec.name)
        size_vram = max(0, min(need, budget - self._vram_used()))
        context = min(DEFAULT_CONTEXT, spec.context_length or DEFAULT_CONTEXT)
        entry = Loaded(spec, need, size_vram, context, 0, now, now)
        self.loaded[spec.runner_key] = entry
        return entry

    def _vram_used(self) -> int:
        return sum(entry.size_vram for entry in self.loaded.values())

    def unload_model(self, spec: ModelSpec) -> bool:
        """keep_alive 0: Ollama's expireRunner. Unloading what is not loaded is no error."""
        with self.lock:
            self._expire_due()
            if self.loaded.pop(spec.runner_key, None) is None:
                return False
            self.stats["unloads"] += 1
            return True

    def loaded_models(self) -> list[Loaded]:
        """As /api/ps lists them: the longest time left first (ties by name, for stable tests)."""
        with self.lock:
            self._expire_due()
            return sorted(self.loaded.values(), key=lambda entry: (-entry.expires_ns, entry.spec.name))

    # --- counters ----------------------------------------------------------------------------
    def count(self, counter: str) -> None:
        with self.lock:
            self.stats[counter] += 1

    def count_pull(self) -> None:
        """Every POST /api/pull, even one with no body, so "zero pulls reached Ollama" means zero requests."""
        self.count("pulls")

    def count_pull_model(self, model: Name | str) -> None:
        """Per model as /api/tags names it (``LLAMA3.2`` counts as ``llama3.2:latest``); a model the
        registry lacks under its display name; an invalid name as sent."""
        with self.lock:
            if isinstance(model, Name):
                installed = self.installed.get(model.key)
                known = self.catalog.get(model.key) or (installed.spec if installed else None)
                model = known.name if known else model.display
            by_model = self.stats["pulls_by_model"]
            by_model[model] = by_model.get(model, 0) + 1

    def stats_view(self) -> dict:
        with self.lock:
            active = [d for d in self.downloads.values() if not d.finished]
            loaded = self.loaded_models()
            return {**self.stats, "downloads_started": dict(self.stats["downloads_started"]),
                    "pulls_by_model": dict(self.stats["pulls_by_model"]),
                    "evicted": list(self.stats["evicted"]), "expired": list(self.stats["expired"]),
                    "active_downloads": [d.spec.name for d in active],
                    "download_waiters": {d.spec.name: d.waiters for d in active},
                    "installed": [e.spec.name for e in self.list_installed()],
                    "loaded": [entry.spec.name for entry in loaded],
                    "vram_used_bytes": sum(entry.size_vram for entry in loaded)}


def _as_sizes(value: object) -> list[int]:
    sizes = value if isinstance(value, list) else [value]
    if not sizes or not all(_finite(size) and size > 0 for size in sizes):
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
CANNED_ANSWER = "This is the Ollama emulator: no model runs here."


def _json_kind(value: object) -> str:
    """The JSON kind Go names in ``json: cannot unmarshal KIND into ...``."""
    return {bool: "bool", str: "string", list: "array", dict: "object"}.get(type(value), "number")


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
        """api.ProcessModelResponse, in its field order; expires_at in local time like Go's time.Now()."""
        tz = self.state.knobs["tz_offset"]
        models = [{"name": entry.spec.name, "model": entry.spec.name, "size": entry.size,
                   "digest": entry.spec.digest, "details": entry.spec.details(with_context=False),
                   "expires_at": rfc3339_nano(entry.expires_ns, tz), "size_vram": entry.size_vram,
                   "context_length": entry.context_length}
                  for entry in self.state.loaded_models()]
        self._json(200, {"models": models})

    def copy(self) -> None:
        """200 with an EMPTY body, like delete. Note the 404 quotes the name with ", not ' (Go's %q)."""
        body = self._json_body("CopyRequest")
        source_raw = self._string_field(body, "source", "CopyRequest")
        destination_raw = self._string_field(body, "destination", "CopyRequest")
        source = parse_name(source_raw)
        if source is None:
            raise HttpError(400, f"source {go_quote(source_raw)} is invalid")
        destination = parse_name(destination_raw)
        if destination is None:
            raise HttpError(400, f"destination {go_quote(destination_raw)} is invalid")
        if not self.state.copy(source, destination):
            raise HttpError(404, f"model {go_quote(source_raw)} not found")
        self._send(200, b"", None)

    # --- generate and chat: load, unload, a canned answer ---------------------------------------
    def generate(self) -> None:
        """routes.go GenerateHandler. An empty model is a 404 here (a 400 on /api/chat): Ollama's quirk."""
        body = self._json_body("GenerateRequest")
        raw = self._string_field(body, "model", "GenerateRequest")
        prompt = self._string_field(body, "prompt", "GenerateRequest")
        keep_alive = self._keep_alive(body)
        if not raw.strip():
            raise HttpError(404, f"model '{raw}' not found")
        spec = self._installed_for_inference(raw)
        if not prompt and keep_alive == 0:
            self.state.unload_model(spec)
            self._json(200, {"model": raw, "created_at": self._created_at(), "response": "", "done": True,
                             "done_reason": "unload"})
            return
        if "completion" not in spec.capabilities:
            raise HttpError(400, f"{go_quote(raw)} does not support generate")
        self._load(spec, keep_alive)
        if not prompt:  # a load answers one JSON object even when streaming was asked for
            self._json(200, {"model": raw, "created_at": self._created_at(), "response": "", "done": True,
                             "done_reason": "load"})
            return
        self._canned_answer(body, raw, chat=False)

    def chat(self) -> None:
        """routes.go ChatHandler: no messages loads, no messages + keep_alive 0 unloads."""
        body = self._json_body("ChatRequest")
        raw = self._string_field(body, "model", "ChatRequest")
        messages = body.get("messages")
        if messages is not None and not isinstance(messages, list):
            raise HttpError(400, f"json: cannot unmarshal {_json_kind(messages)} into Go struct field "
                                 "ChatRequest.messages of type []api.Message")
        keep_alive = self._keep_alive(body)
        if not raw.strip():
            raise HttpError(400, "model is required")
        spec = self._installed_for_inference(raw)
        if not messages and keep_alive == 0:
            self.state.unload_model(spec)
            self._json(200, {"model": raw, "created_at": self._created_at(),
                             "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "unload"})
            return
        if "completion" not in spec.capabilities:
            raise HttpError(400, f"{go_quote(raw)} does not support chat")
        self._load(spec, keep_alive)
        if not messages:
            self._json(200, {"model": raw, "created_at": self._created_at(),
                             "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"})
            return
        self._canned_answer(body, raw, chat=True)

    def _installed_for_inference(self, raw: str) -> ModelSpec:
        name = parse_name(raw.strip())
        if name is None:
            raise HttpError(400, "invalid model name")
        entry = self.state.find_installed(name)
        if entry is None:
            raise HttpError(404, f"model '{raw}' not found")
        return entry.spec

    def _keep_alive(self, body: dict) -> int | None:
        """None when absent or null (Go leaves the *Duration nil); bad values are Gin binding errors."""
        value = body.get("keep_alive")
        if value is None:
            return None
        try:
            return keep_alive_ns(value)
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None

    def _load(self, spec: ModelSpec, keep_alive: int | None) -> None:
        seconds = self.state.knobs["load_seconds"]
        if seconds and not self.state.is_loaded(spec):
            self._pause(seconds)  # a client that gives up cancels the load, as in Ollama
        self.state.load_model(spec, keep_alive)

    def _created_at(self) -> str:
        return rfc3339_nano(self.state.now_ns(), "Z")  # time.Now().UTC()

    def _canned_answer(self, body: dict, raw: str, chat: bool) -> None:
        """No model runs here: one fixed answer, streamed as a fragment plus a final object, or whole."""
        stream = body.get("stream") is not False

        def part(text: str, done: bool) -> dict:
            key, value = ("message", {"role": "assistant", "content": text}) if chat else ("response", text)
            return {"model": raw, "created_at": self._created_at(), key: value, "done": done}

        fragment = part(CANNED_ANSWER, False)
        final = {**part("" if stream else CANNED_ANSWER, True), "done_reason": "stop"}
        if not chat:
            final["context"] = [1, 2, 3]
        final.update({"total_duration": 1_000_000, "load_duration": 100_000, "prompt_eval_count": 1,
                      "prompt_eval_duration": 100_000, "eval_count": len(CANNED_ANSWER.split()),
                      "eval_duration": 500_000})
        if not stream:
            self._json(200, final)
            return
        self._start_stream()
        self._write_line(fragment)
        self._write_line(final)
        self._end_stream()

    def _string_field(self, body: dict, key: str, go_type: str) -> str:
        value = body.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise HttpError(400, f"json: cannot unmarshal {_json_kind(value)} into Go struct field "
                                 f"{go_type}.{key} of type string")
        return value

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
        self.state.count_pull()
        body = self._json_body("PullRequest")
        raw = body.get("model") or body.get("name") or ""
        name = parse_name(raw)
        self.state.count_pull_model(name if name else str(raw))
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

    def control_publish(self) -> None:
        body = self._json_body("PublishRequest")
        unknown = sorted(set(body) - {"model", "digest", "size"})
        if unknown:
            raise HttpError(400, f"unknown field(s) {', '.join(unknown)}; known: model, digest, size")
        result = self.state.publish(body.get("model"), body.get("digest"), body.get("size"))
        self.state.save()
        self._json(200, result)

    def control_clock(self) -> None:
        expired: list[str] = []
        if self.command == "POST":
            advance = self._json_body("ClockRequest").get("advance")
            if not isinstance(advance, int | float) or not _finite(advance) or advance < 0:
                raise HttpError(400, "advance must be a number of seconds >= 0 (the clock never goes back)")
            expired = self.state.advance_clock(advance)
        self._json(200, {"now": rfc3339_nano(self.state.now_ns(), self.state.knobs["tz_offset"]),
                         "offset_seconds": self.state.clock_offset_ns / 1e9, "expired": expired})


# path -> method -> handler. HEAD mirrors GET where Ollama registers both.
ROUTES = {
    "/": {"GET": Handler.root, "HEAD": Handler.root},
    "/api/version": {"GET": Handler.version, "HEAD": Handler.version},
    "/api/tags": {"GET": Handler.tags, "HEAD": Handler.tags},
    "/api/ps": {"GET": Handler.ps},
    "/api/show": {"POST": Handler.show},
    "/api/pull": {"POST": Handler.pull},
    "/api/delete": {"DELETE": Handler.delete},
    "/api/copy": {"POST": Handler.copy},
    "/api/generate": {"POST": Handler.generate},
    "/api/chat": {"POST": Handler.chat},
    "/_emulator/stats": {"GET": Handler.control_stats},
    "/_emulator/config": {"GET": Handler.control_get_config, "POST": Handler.control_config},
    "/_emulator/reset": {"POST": Handler.control_reset},
    "/_emulator/publish": {"POST": Handler.control_publish},
    "/_emulator/clock": {"GET": Handler.control_clock, "POST": Handler.control_clock},
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
    parser.add_argument("--vram-bytes", default=os.environ.get("OLLAMA_EMULATOR_VRAM_BYTES"),
                        help="VRAM budget in bytes, 0 = no GPU (default $OLLAMA_EMULATOR_VRAM_BYTES or 24 GiB)")
    parser.add_argument("--max-loaded-models", default=os.environ.get("OLLAMA_MAX_LOADED_MODELS"),
                        help="models in memory at once (default $OLLAMA_MAX_LOADED_MODELS or 3)")
    parser.add_argument("--keep-alive", default=os.environ.get("OLLAMA_KEEP_ALIVE"),
                        help='default keep_alive: "5m", seconds, negative = forever (default $OLLAMA_KEEP_ALIVE or 5m)')
    parser.add_argument("--state-file", help="JSON file where installed models persist across restarts")
    parser.add_argument("--config-json", default="{}",
                        help="startup knobs and actions, same JSON as POST /_emulator/config")
    return parser.parse_args(argv)


def memory_knobs(args: argparse.Namespace) -> dict:
    """The VRAM flags (or their environment variables, as a systemd drop-in sets them) as knobs.

    Like OLLAMA_KEEP_ALIVE, a keep-alive of bare digits means seconds. Raises ValueError when bad.
    """
    knobs: dict = {}
    if args.vram_bytes not in (None, ""):
        knobs["vram_bytes"] = int(float(args.vram_bytes))
    if args.max_loaded_models not in (None, ""):
        knobs["max_loaded_models"] = int(args.max_loaded_models)
    if args.keep_alive not in (None, ""):
        keep_alive = args.keep_alive.strip()
        knobs["default_keep_alive"] = int(keep_alive) if re.fullmatch(r"-?\d+", keep_alive) else keep_alive
        keep_alive_ns(knobs["default_keep_alive"])
    return knobs


def publish_main(argv: list[str]) -> int:
    """``publish MODEL [--digest D] [--size BYTES] [--url URL]``: POST /_emulator/publish to a running emulator."""
    parser = argparse.ArgumentParser(prog="ollama_emulator.py publish",
                                     description="Publish a new build of a tag in a running emulator's registry.")
    parser.add_argument("model", help="the tag, e.g. llama3.2:latest")
    parser.add_argument("--digest", help="pin the new manifest digest (64 hex characters)")
    parser.add_argument("--size", type=int, help="bytes of the new weights layer")
    parser.add_argument("--url", default="http://127.0.0.1:11434", help="the emulator (default %(default)s)")
    args = parser.parse_args(argv)
    body = {"model": args.model, **({"digest": args.digest} if args.digest else {}),
            **({"size": args.size} if args.size is not None else {})}
    request = urllib.request.Request(args.url.rstrip("/") + "/_emulator/publish", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except ValueError:
            pass
        log(f"ollama-emulator publish: error: {detail} (HTTP {exc.code})")
    except (urllib.error.URLError, OSError) as exc:
        log(f"ollama-emulator publish: error: cannot reach the emulator at {args.url}: {exc}")
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["publish"]:
        return publish_main(argv[1:])
    args = parse_args(argv)
    try:
        config = json.loads(args.config_json)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        knobs = {"pull_speed": args.pull_speed, "progress_interval": args.progress_interval,
                 "verify_seconds": args.verify_seconds, "latency_ms": args.latency_ms, "tz_offset": args.tz_offset,
                 **memory_knobs(args)}
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
