"""Latency sampling (closed loop, N concurrent clients), percentiles, and an RSS sampler."""

from __future__ import annotations

import http.client
import ipaddress
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# A client is a callable doing one request and returning True when it succeeded. A factory makes one
# client per thread (own connection), and ``close`` releases it.
Client = Callable[[], bool]


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"benchmark traffic stays on 127.0.0.0/8, not {url}")


def percentile(values: list[float], pct: float) -> float:
    """Linear interpolation between closest ranks (as numpy's default)."""
    if not values:
        return float("nan")
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    rank = (len(data) - 1) * pct / 100.0
    low = int(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def summary(values_s: list[float]) -> dict:
    ms = [v * 1000 for v in values_s]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "p99_ms": percentile(ms, 99), "max_ms": max(ms) if ms else float("nan")}


class HttpClient:
    """One keep-alive connection (http.client: the least client overhead Python offers)."""

    def __init__(self, url: str, headers: dict | None = None, *, expect: int = 200, timeout: float = 30.0):
        require_loopback(url)
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.headers = dict(headers or {})
        self.expect, self.timeout = expect, timeout
        self.conn: http.client.HTTPConnection | None = None
        self.last_body: bytes = b""

    def __call__(self) -> bool:
        for attempt in range(2):  # one reconnect: a server may close an idle keep-alive connection
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request("GET", self.path, headers=self.headers)
                response = self.conn.getresponse()
                self.last_body = response.read()
                if response.will_close:
                    self.close()
                return response.status == self.expect
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    return False
        return False

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclass
class Sample:
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0


def run_closed_loop(make_client: Callable[[], Client], *, concurrency: int, per_client: int, warmup: int = 2,
                    deadline_s: float = 60.0) -> Sample:
    """``concurrency`` threads, each with its own client, each doing ``warmup`` + ``per_client`` requests
    back to back (bounded by ``deadline_s``). Returns the latencies of the measured requests."""
    sample = Sample()
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency)
    stop_at = time.monotonic() + deadline_s

    def worker():
        client = make_client()
        try:
            for _ in range(warmup):
                client()
            try:
                barrier.wait(timeout=deadline_s)
            except threading.BrokenBarrierError:
                return
            for _ in range(per_client):
                if time.monotonic() > stop_at:
                    break
                started = time.perf_counter()
                ok = client()
                elapsed = time.perf_counter() - started
                with lock:
                    if ok:
                        sample.latencies_s.append(elapsed)
                    else:
                        sample.errors += 1
        finally:
            close = getattr(client, "close", None)
            if close is not None:
                close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(1.0, stop_at - time.monotonic() + 5))
    sample.wall_s = time.monotonic() - started
    return sample


class RssSampler:
    """Samples the RSS (KiB, process tree) of named processes every ``interval`` s in a thread; ``mark(label)``
    starts a window whose maximum is kept per process."""

    def __init__(self, procs: dict, interval: float = 0.1, max_seconds: float = 900.0):
        self.procs = procs  # name -> object with rss_kib()
        self.interval = interval
        self.max_seconds = max_seconds
        self.window: str | None = None
        self.peaks: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def snapshot(self) -> dict[str, int | None]:
        return {name: proc.rss_kib() for name, proc in self.procs.items()}

    def mark(self, window: str | None) -> None:
        with self._lock:
            self.window = window

    def _run(self) -> None:
        end = time.monotonic() + self.max_seconds
        while not self._stop.wait(self.interval) and time.monotonic() < end:
            with self._lock:
                window = self.window
            if window is None:
                continue
            for name, value in self.snapshot().items():
                if value is None:
                    continue
                with self._lock:
                    peaks = self.peaks.setdefault(window, {})
                    peaks[name] = max(peaks.get(name, 0), value)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")
