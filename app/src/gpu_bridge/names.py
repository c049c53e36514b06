"""Ollama's model-name grammar: ``host/namespace/model:tag``.

Mirrors Ollama's own parser (see shared notes): defaults host ``registry.ollama.ai``, namespace
``library``, tag ``latest``; the tag splits at the last ``:`` only if it follows the last ``/``.
Anything the grammar rejects is refused before it can reach Ollama or a file name on the share.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidModelName, RegistryNotAllowed

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 350 + 1 + 80 + 1 + 80 + 1 + 80

_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,79}$")
_MODEL = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")
_TAG = _MODEL

_HOST_RE = r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}"
_NAMESPACE_RE = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}"
_MODEL_RE = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"
# End of input, the same in ECMA-262 (OpenAPI) and Python: "$" would also match before a final
# newline in Python, so a schema checked with Python's re would admit "llama3\n".
_END = r"(?![\s\S])"


def name_pattern(hosts: tuple[str, ...] | list[str] | None = None) -> str:
    """The grammar as one regular expression (for the OpenAPI documents): exactly what ``parse``
    accepts; with ``hosts``, a three-part name's registry must be one of them (any case), as in
    ``validate``. Checked against ``parse`` by tests/core/test_core_names.py."""
    if hosts is None:
        return rf"^(?!.*\.\.)(?:(?:{_HOST_RE}/)?{_NAMESPACE_RE}/)?{_MODEL_RE}(?::{_MODEL_RE})?{_END}"
    allowed = [h.strip() for h in hosts if h.strip() and _HOST.match(h.strip())]
    host = "(?:" + "|".join("".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else ("\\." if c == "." else c)
                                    for c in h) for h in allowed) + ")"
    if DEFAULT_HOST not in {h.lower() for h in allowed}:
        # One- and two-part names mean registry.ollama.ai: refused unless it is allowed.
        return rf"^(?!.*\.\.){host}/{_NAMESPACE_RE}/{_MODEL_RE}(?::{_MODEL_RE})?{_END}" if allowed else r"^(?!)"
    return rf"^(?!.*\.\.)(?:(?:{host}/)?{_NAMESPACE_RE}/)?{_MODEL_RE}(?::{_MODEL_RE})?{_END}"


NAME_PATTERN = name_pattern()


@dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str
    # How the caller spelled it (minus a defaulted tag): the form Ollama lists, e.g.
    # "llama3.2:latest" or "hf.co/org/repo:Q4_K_M".
    display: str

    @property
    def full(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def __str__(self) -> str:
        return self.display


_PART_RULES = {  # what -> (pattern, max length, characters allowed)
    "registry host": (_HOST, 350, "letters, digits and _ . : -"),
    "namespace": (_NAMESPACE, 80, "letters, digits and _ -"),
    "model": (_MODEL, 80, "letters, digits and _ . -"),
    "tag": (_TAG, 80, "letters, digits and _ . -"),
}
SHOW_LIMIT = 40


def shorten(text: str, limit: int = SHOW_LIMIT, *, with_length: bool = True) -> str:
    """``text`` quoted and cut to ``limit`` characters (plus its length when cut): names in one-line errors."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}..." + (f" ({len(text)} characters)" if with_length else "")


def _part_problem(value: str, what: str, whole: str) -> str | None:
    pattern, limit, allowed = _PART_RULES[what]
    if pattern.match(value) and value not in (".", "..") and ".." not in value:
        return None
    if len(value) > limit:
        about = "" if value == whole else f" {shorten(value, with_length=False)}"
        return f"the {what} part{about} has {len(value)} characters: at most {limit} are allowed"
    if value in (".", "..") or ".." in value:
        return f"the {what} part may not be '.' or contain '..'"
    about = "" if value == whole else f" {shorten(value)}"
    return f"the {what} part{about} must start with a letter, digit or _ and hold only {allowed}"


def parse(name: object) -> ModelName:
    """Parse and validate; raise ``InvalidModelName`` with a reason otherwise (the name shown once, shortened)."""
    if not isinstance(name, str) or not name:
        raise InvalidModelName("model name is required (a non-empty string such as 'llama3.2:latest')")
    shown = shorten(name)
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidModelName(f"invalid model name {shown}: at most {MAX_NAME_LENGTH} characters are allowed")
    if not name.isascii() or not name.isprintable() or any(c.isspace() for c in name):
        raise InvalidModelName(f"invalid model name {shown}: only ASCII letters, digits and _ - . : / are allowed")

    rest, tag = name, None
    colon, slash = name.rfind(":"), name.rfind("/")
    if colon > slash:
        rest, tag = name[:colon], name[colon + 1:]
        if not tag:
            raise InvalidModelName(f"invalid model name {shown}: empty tag after ':'")
    parts = rest.split("/")
    if any(p == "" for p in parts):
        raise InvalidModelName(f"invalid model name {shown}: empty part between '/'")
    if len(parts) > 3:
        raise InvalidModelName(f"invalid model name {shown}: at most host/namespace/model:tag")
    if len(parts) == 3:
        host, namespace, model = parts
    elif len(parts) == 2:
        host, (namespace, model) = DEFAULT_HOST, parts
    else:
        host, namespace, model = DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]

    for value, what in ((host, "registry host"), (namespace, "namespace"), (model, "model"),
                        (tag or DEFAULT_TAG, "tag")):
        problem = _part_problem(value, what, name)
        if problem:
            raise InvalidModelName(f"invalid model name {shown}: {problem}")
    display = name if tag is not None else f"{name}:{DEFAULT_TAG}"
    return ModelName(host=host, namespace=namespace, model=model, tag=tag or DEFAULT_TAG, display=display)


def validate(name: object, allowed_registries: tuple[str, ...] | list[str] | None = None) -> ModelName:
    """Parse, then check the registry host against an allow-list (case-insensitive)."""
    parsed = parse(name)
    if allowed_registries is not None:
        allowed = {h.strip().lower() for h in allowed_registries if h.strip()}
        if parsed.host.lower() not in allowed:
            raise RegistryNotAllowed(
                f"registry {parsed.host!r} is not allowed; allowed: {', '.join(sorted(allowed))} "
                "(set GPU_BRIDGE_ALLOWED_REGISTRIES to change)")
    return parsed


def same_model(a: str, b: str) -> bool:
    """True when two spellings name the same model (``llama3`` == ``llama3:latest``)."""
    try:
        return parse(a).full.lower() == parse(b).full.lower()
    except InvalidModelName:
        return False
