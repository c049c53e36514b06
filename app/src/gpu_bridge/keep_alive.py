"""How long a loaded model stays in GPU memory: the ``keep_alive`` our API accepts, checked once.

Ollama reads ``keep_alive`` as a Go duration string (``"5m"``, ``"1h30m"``), a number of seconds, or
a negative value meaning "never unload". We accept the same, plus the word ``"forever"``, and turn it
into what is sent on: seconds as a number, ``-1`` for forever. The checks are stricter than Ollama's,
because a typo should be a clear 400 here rather than a model that stays loaded for 292 years:

* a string is ``"forever"``, ``"-1"``, or a duration in Go's units (``ns us µs ms s m h``) without a
  sign or spaces, exactly ``PATTERN``;
* a number is finite, not a boolean, and positive, or exactly ``-1`` (forever);
* zero is refused: ``keep_alive 0`` unloads at once, which is what the unload route is for;
* anything but forever is at most ``MAX_SECONDS`` (one year): a longer time is surely a mistake.

``None`` (absent) means Ollama's own default (``OLLAMA_KEEP_ALIVE``, 5 minutes unless set).
The GPU server, the NFS worker and the clients all call ``parse``, so each channel refuses the same
values with the same words.
"""

from __future__ import annotations

import math
import re

from .errors import InvalidRequest

FOREVER = -1
MAX_SECONDS = 365 * 24 * 3600
_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_UNIT = "(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h)"
# What a keep_alive string may be, exactly (the OpenAPI documents publish it): "forever", "-1", or a
# Go duration without sign. A match may still be refused for its length (zero, over a year).
# The lookahead (a digit other than 0) refuses zero durations ("0s", "0h0m") by the pattern itself.
PATTERN = rf"^(?:forever|-1|(?=[^1-9]*[1-9])(?:{_NUMBER}{_UNIT})+)$"
_PART = re.compile(rf"({_NUMBER})({_UNIT})")
_HINT = 'use a duration such as "30s", "5m" or "1h30m", a number of seconds, or "forever"'


def parse(value: object) -> float | int | None:
    """``value`` as Ollama's ``keep_alive``: seconds (an int when whole), ``FOREVER`` (-1), or None.

    Raises ``InvalidRequest`` naming the value and what would be accepted.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidRequest(f"keep_alive must be a string or a number, not {type(value).__name__}: {_HINT}")
    if isinstance(value, str):
        seconds = _duration(value)
        if seconds is None:
            return FOREVER
    else:
        if not math.isfinite(value):
            raise InvalidRequest(f"keep_alive {value} is not a finite number: {_HINT}")
        if value == FOREVER:
            return FOREVER
        seconds = float(value)
    if seconds <= 0:
        raise InvalidRequest(f"keep_alive {value!r} would unload the model at once (or is negative): to unload, use "
                             "the unload operation; to keep it loaded, " + _HINT.removeprefix("use "))
    if seconds > MAX_SECONDS:
        raise InvalidRequest(f"keep_alive {value!r} is longer than a year: use \"forever\" (or -1) to keep the "
                             "model loaded until it is unloaded")
    return int(seconds) if seconds == int(seconds) else seconds


def _duration(text: str) -> float | None:
    """A keep_alive string in seconds (``"1h30m"`` → 5400.0); None for forever."""
    shown = text if len(text) <= 40 else text[:40] + "..."
    if not re.fullmatch(PATTERN, text):
        if re.fullmatch(rf"(?:{_NUMBER}{_UNIT})+", text):
            raise InvalidRequest(f"keep_alive {shown!r} would unload the model at once: to unload, use the unload "
                                 "operation; to keep it loaded, " + _HINT.removeprefix("use "))
        if re.fullmatch(_NUMBER, text.strip()):
            raise InvalidRequest(f"keep_alive {shown!r} has no unit: write {text.strip()}s for seconds, or send "
                                 "a number")
        raise InvalidRequest(f"keep_alive {shown!r} is not a duration: {_HINT}")
    if text in ("forever", "-1"):
        return None
    return sum(float(number) * _UNITS[unit] for number, unit in _PART.findall(text))


def describe(keep_alive: float | int | None) -> str:
    """For people: ``"forever"``, ``"1h30m"``, ``"45s"``, or Ollama's default."""
    if keep_alive is None:
        return "Ollama's default (OLLAMA_KEEP_ALIVE)"
    if keep_alive < 0:
        return "forever"
    whole = int(keep_alive)
    if whole != keep_alive or whole < 60:
        return f"{keep_alive:g}s"
    hours, rest = divmod(whole, 3600)
    minutes, seconds = divmod(rest, 60)
    return "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (seconds, "s")) if n)


__all__ = ["FOREVER", "MAX_SECONDS", "PATTERN", "describe", "parse"]
