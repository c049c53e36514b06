"""A token bucket for the routes that change state (pull, delete, cancel).

Its counter lives in this process's memory, which is exact because the GPU server runs as one
gunicorn worker process with threads (docs/architecture.md): with N workers each would hold its own
bucket and the effective limit would be N times the setting.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class TokenBucket:
    """``per_minute`` requests a minute on average, bursts up to ``per_minute``; 0 disables it."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens per second
        self._clock = clock
        self._tokens = self.capacity
        self._stamp = clock()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def acquire(self) -> int:
        """Take a token: 0 when allowed, else the whole seconds to wait (for ``Retry-After``)."""
        if not self.enabled:
            return 0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0
            return max(1, math.ceil((1.0 - self._tokens) / self.rate))
