"""Ollama's wire format, normalised: what ``/api/tags``, ``/api/ps`` and pull-stream lines become
before anything above the adapter sees them (exact keys in each function's docstring), and Ollama's
timestamps. Pure functions, no I/O: the adapter (``ollama.py``) calls them, and so may anything that
reads a stored entry again (``parse_timestamp``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

# A JSON object, as the adapter hands normalised entries on: they travel unchanged into HTTP bodies,
# the spool's models.json and job snapshots, whose code treats them as JSON. Each normaliser's
# docstring gives the exact keys; the values are plain JSON (str, int, list, nested objects).
JsonDict = dict[str, Any]

_DETAIL_KEYS = ("parent_model", "format", "family", "families", "parameter_size", "quantization_level")
_TIMESTAMP = re.compile(r"^(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:?\d{2})?$")


# --- normalisation ------------------------------------------------------------------------------
def as_int(value: object) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value == value:
        return int(value)
    return 0


def as_str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _normalise_details(raw: object) -> JsonDict:
    """``details`` with exactly the six known keys (strings, ``families`` a list of strings)."""
    fields: Mapping[str, object] = raw if isinstance(raw, dict) else {}
    families = fields.get("families")
    return {
        "parent_model": as_str(fields.get("parent_model")),
        "format": as_str(fields.get("format")),
        "family": as_str(fields.get("family")),
        # null in Ollama's JSON for some models: always a list here
        "families": [f for f in families if isinstance(f, str)] if isinstance(families, list) else [],
        "parameter_size": as_str(fields.get("parameter_size")),
        "quantization_level": as_str(fields.get("quantization_level")),
    }


def normalise_model(raw: Mapping[str, object]) -> JsonDict:
    """One ``/api/tags`` entry → ``{name, size, digest, modified_at, details}`` (unknown keys dropped)."""
    name = raw.get("name") or raw.get("model") or ""
    return {
        "name": as_str(name),
        "size": as_int(raw.get("size")),
        "digest": as_str(raw.get("digest")),
        "modified_at": as_str(raw.get("modified_at")),  # as given: nanoseconds and offset kept
        "details": _normalise_details(raw.get("details")),
    }


def normalise_running(raw: Mapping[str, object]) -> JsonDict:
    """One ``/api/ps`` entry → ``{name, size, size_vram, digest, expires_at, details}``."""
    model = normalise_model(raw)
    return {
        "name": model["name"],
        "size": model["size"],
        "size_vram": as_int(raw.get("size_vram")),
        "digest": model["digest"],
        "expires_at": as_str(raw.get("expires_at")),
        "details": model["details"],
    }


def normalise_progress(raw: Mapping[str, object]) -> JsonDict:
    """One pull-stream line → ``{"status", ["digest", "total", "completed"]}``.

    Ollama omits ``completed``/``total`` while they are zero; layer lines always get both here.
    """
    event: JsonDict = {"status": as_str(raw.get("status"))}
    digest = raw.get("digest")
    if isinstance(digest, str) and digest:
        event["digest"] = digest
    if "digest" in event or "total" in raw or "completed" in raw:
        event["total"] = as_int(raw.get("total"))
        event["completed"] = as_int(raw.get("completed"))
    return event


def parse_timestamp(value: str | None) -> datetime | None:
    """Ollama's RFC 3339 timestamp (nanoseconds, local offset) → aware datetime; None if unparsable."""
    if not value:
        return None
    match = _TIMESTAMP.match(value.strip())
    if not match:
        return None
    base, fraction, offset = match.groups()
    micros = (fraction or ".0")[1:7].ljust(6, "0")  # nanoseconds truncated to microseconds
    offset = offset or "Z"
    if offset == "Z":
        offset = "+00:00"
    elif ":" not in offset:
        offset = f"{offset[:3]}:{offset[3:]}"
    try:
        parsed = datetime.fromisoformat(f"{base.replace(' ', 'T')}.{micros}{offset}")
    except ValueError:
        return None
    return parsed
