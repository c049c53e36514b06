"""Is a host's worker alive? Judged from its heartbeat counter on the reader's own clock.

Liveness without comparing clocks: the worker rewrites ``heartbeat.json`` with a counter every
``heartbeat_interval`` (the interval is in the file). A reader that has watched the counter not move
for 3 intervals calls the worker down. A reader that has only just started has no history yet: it
takes the file's mtime (set by the NFS server) as a provisional hint, and otherwise waits for the
counter to move (see ``HeartbeatMonitor``). The production transport asks before each command and
while it waits; ``gpu-bridge nfs-heartbeat`` asks once (``wait_heartbeat_advance``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import errors
from .files import JsonObject, read_json, read_json_with_mtime

DEAD_AFTER_BEATS = 3  # heartbeat counter unchanged for this many intervals: the worker is down
CLOCK_SKEW_ALLOWANCE = 2.0  # seconds, only for the provisional mtime hint of a fresh reader


@dataclass(frozen=True)
class Liveness:
    alive: bool | None  # None: not known yet (a fresh reader with no history and no usable hint)
    age: float | None  # seconds since the counter was last seen to change (or the mtime hint)
    counter: int | None
    doc: JsonObject | None
    reason: str = ""

    def describe(self) -> str:
        if self.doc is None:
            return "it has no heartbeat file (the worker never ran here, or the share is not mounted)"
        if self.doc.get("state") == "stopped":
            return "its worker stopped cleanly (heartbeat says stopped)"
        age = f"{self.age:.0f} s ago" if self.age is not None else "at an unknown time"
        if self.alive:
            return f"its worker heartbeat is alive (last change {age})"
        return f"its worker heartbeat is stale (last change {age})"


class HeartbeatMonitor:
    """Judges a worker alive or down from its heartbeat counter, measured on the reader's own clock.

    Alive: the counter (with the worker's boot id) was seen to change less than 3 intervals ago.
    Down: it has been watched for 3 intervals without a change, or the worker wrote ``stopped``.
    A reader without history uses the heartbeat's mtime (the NFS server's clock) as a provisional
    hint, allowing ``CLOCK_SKEW_ALLOWANCE``; when the hint does not say "fresh", the answer is
    ``None`` until the counter moves or 3 intervals pass (``wait_known``).
    Not thread-safe by itself: ``client.nfs`` guards it with a lock.
    """

    def __init__(self, path: str, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.path = path
        self._clock, self._wall = clock, wall
        self._key: tuple[object, object] | None = None  # (boot, counter) as written: compared, never used
        self._first_seen: float | None = None
        self._last_change: float | None = None
        self._doc: JsonObject | None = None
        self._mtime: float | None = None

    def observe(self) -> JsonObject | None:
        try:
            got = read_json_with_mtime(self.path)
        except (errors.ChannelError, OSError):
            got = None  # mid-replace oddities or I/O error: judge by what we knew
        now = self._clock()
        if got is None:
            self._doc = None
            return None
        doc, mtime = got
        key = (doc.get("boot"), doc.get("counter"))
        if self._key is None:
            self._first_seen = now
        elif key != self._key:
            self._last_change = now
        self._key, self._doc, self._mtime = key, doc, mtime
        return doc

    def interval(self) -> float:
        value = (self._doc or {}).get("interval")
        return float(value) if isinstance(value, int | float) and value > 0 else 2.0

    def state(self) -> Liveness:
        doc = self._doc
        if doc is None:
            return Liveness(False, None, None, None, "no heartbeat file")
        raw_counter = doc.get("counter")
        counter = raw_counter if isinstance(raw_counter, int) else None
        now = self._clock()
        limit = DEAD_AFTER_BEATS * self.interval()
        if doc.get("state") == "stopped":
            return Liveness(False, None, counter, doc, "stopped")
        if self._last_change is not None:
            age = now - self._last_change
            return Liveness(age < limit, age, counter, doc)
        watched = now - (self._first_seen or now)
        hint = self._wall() - self._mtime if self._mtime is not None else None
        if watched >= limit:
            age = max(watched, hint) if hint is not None else watched
            return Liveness(False, age, counter, doc)
        if hint is not None and -CLOCK_SKEW_ALLOWANCE <= hint < limit + CLOCK_SKEW_ALLOWANCE:
            return Liveness(True, max(hint, 0.0), counter, doc, "provisional (mtime)")
        return Liveness(None, hint, counter, doc)

    def check(self) -> Liveness:
        self.observe()
        return self.state()

    def wait_known(self, *, poll: float = 0.05, budget: float | None = None) -> Liveness:
        """``check()`` until the answer is alive or down (at most 3 intervals)."""
        live = self.check()
        end = self._clock() + (budget if budget is not None else DEAD_AFTER_BEATS * self.interval() + poll)
        while live.alive is None and self._clock() < end:
            time.sleep(poll)
            live = self.check()
        return live


def wait_heartbeat_advance(path: str, timeout: float, *,
                           poll: float = 0.05) -> tuple[bool, JsonObject | None, JsonObject | None]:
    """(advanced, first doc, last doc): did (boot, counter) change within ``timeout`` seconds?"""
    first = _read_quiet(path)
    end = time.monotonic() + timeout
    last = first
    while time.monotonic() < end:
        time.sleep(min(poll, max(0.0, end - time.monotonic())))
        last = _read_quiet(path)
        if last is not None and (first is None or (last.get("boot"), last.get("counter"))
                                 != (first.get("boot"), first.get("counter"))):
            if last.get("state") != "stopped":
                return True, first, last
    return False, first, last


def _read_quiet(path: str) -> JsonObject | None:
    """The heartbeat, or None while it is absent or half-visible; a refused read is not "absent"."""
    try:
        return read_json(path)
    except PermissionError:
        raise
    except (errors.ChannelError, OSError):
        return None
