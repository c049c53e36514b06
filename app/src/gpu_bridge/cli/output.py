"""How ``gpu-bridge`` shows things to people: tables, sizes, durations, UTC times, host labels, warnings,
and a pull's live progress. Nothing here talks to a server.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TextIO


def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover


def human_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0 or seconds > 360000:
        return "--:--"
    whole = int(round(seconds))
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


_FRACTION = re.compile(r"(\.\d+)")


def utc_time(value: object) -> str:
    """An ISO 8601 time (Ollama's local time with offset, nanoseconds; the backend's ``...Z``) as
    ``YYYY-MM-DD HH:MM:SS`` in UTC: the one convention every table uses (their headers say "UTC").
    A time without an offset is taken as UTC; anything unparseable is shown as it came."""
    if not isinstance(value, str) or not value.strip():
        return ""
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    text = _FRACTION.sub(lambda m: m.group(1)[:7], text, count=1)  # Python parses at most microseconds
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return value
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


# A host label (name:port) said twice: "gpu-01:8001: gpu-01:8001 refused ..." (a per-host message already
# names its host, and a summary prefixes the host again).
_TWICE = re.compile(r"(?<![\w.\-])([A-Za-z0-9_.\-]+:\d+): \1(?![\w.\-])")


def host_message(label: str, message: object) -> str:
    """``label: message``, unless the message already starts with the host's label."""
    text = once(str(message or "failed"))
    return text if text.startswith(label) else f"{label}: {text}"


def once(text: str) -> str:
    """``text`` with each doubled host label said once."""
    return _TWICE.sub(r"\1", text)


def table(rows: list[list[str]], headers: list[str], out: TextIO) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip(), file=out)


def warn(message: str) -> None:
    print(f"gpu-bridge: warning: {message}", file=sys.stderr)


class Progress:
    """A pull's progress: a live ``\\r`` bar on a terminal, plain lines (every ~10 % or status change) otherwise."""

    def __init__(self, label: str, out: TextIO | None = None, *, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, hosts: int = 1):
        self.label = label
        # Several hosts pull the same model: the byte figures are their sum, and say so.
        self.scope = f" across {hosts} hosts" if hosts > 1 else ""
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.clock = clock
        self.started = clock()
        self.rate: float | None = None
        self._last: tuple[float, int] | None = None
        self._decile = -1
        self._status: str | None = None
        self._width = 0

    def update(self, completed: int | None, total: int | None, status: str | None = None) -> None:
        now = self.clock()
        completed = int(completed or 0)
        total = int(total or 0)
        if self._last is not None:
            dt, db = now - self._last[0], completed - self._last[1]
            if dt >= 0.2 and db >= 0:
                sample = db / dt
                self.rate = sample if self.rate is None else 0.3 * sample + 0.7 * self.rate
                self._last = (now, completed)
        else:
            self._last = (now, completed)
        percent = 100.0 * completed / total if total else None
        if self.tty:
            self._draw(completed, total, percent, status)
        else:
            self._line(completed, total, percent, status)

    def _eta(self, completed: int, total: int) -> float | None:
        if not total or not self.rate:
            return None
        return max(0, total - completed) / self.rate

    def _draw(self, completed: int, total: int, percent: float | None, status: str | None) -> None:
        columns = shutil.get_terminal_size((100, 20)).columns
        if percent is None:
            bar, pct = "[" + " " * 20 + "]", "   ?%"
        else:
            filled = int(20 * min(percent, 100.0) / 100)
            bar, pct = "[" + "#" * filled + "-" * (20 - filled) + "]", f"{percent:5.1f}%"
        speed = f"{human_bytes(self.rate)}/s" if self.rate else "--/s"
        text = (f"{self.label} {bar} {pct}  {human_bytes(completed)}/{human_bytes(total) if total else '?'}"
                f"{self.scope}  "
                f"{speed}  ETA {human_duration(self._eta(completed, total))}  {status or ''}").rstrip()
        text = text[: max(10, columns - 1)]
        pad = " " * max(0, self._width - len(text))
        self.out.write("\r" + text + pad)
        self.out.flush()
        self._width = len(text)

    def _line(self, completed: int, total: int, percent: float | None, status: str | None) -> None:
        decile = int(percent // 10) if percent is not None else -1
        if decile <= self._decile and status == self._status:
            return
        self._decile = max(decile, self._decile)
        self._status = status
        parts = [f"{self.label}:"]
        if percent is not None:
            parts.append(f"{percent:.0f}% ({human_bytes(completed)} of {human_bytes(total)}{self.scope})")
        if self.rate:
            parts.append(f"{human_bytes(self.rate)}/s")
        if status:
            parts.append(status)
        print(" ".join(parts), file=self.out, flush=True)

    def finish(self, message: str | None = None) -> None:
        if self.tty and self._width:
            self.out.write("\n")
        if message:
            print(message, file=self.out, flush=True)
