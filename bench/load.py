"""Throughput: wrk (Debian's /usr/bin/wrk) when present, else a Python load generator (lower bound)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time

from bench.measure import HttpClient, require_loopback

WRK = shutil.which("wrk") or ("/usr/bin/wrk" if os.path.exists("/usr/bin/wrk") else None)


def _seconds(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def run_wrk(url: str, *, connections: int, duration: float, headers: dict | None = None, threads: int = 2) -> dict:
    require_loopback(url)
    argv = [WRK, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "--timeout", "5s"]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    done = subprocess.run([*argv, url], capture_output=True, text=True, timeout=duration + 30, check=False)
    out = done.stdout
    if done.returncode != 0 or "Requests/sec" not in out:
        raise RuntimeError(f"wrk failed ({done.returncode}): {out}{done.stderr}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = sum(int(x) for x in sock.groups()) if sock else 0
    latency = {}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)
        if m:
            latency[f"p{pct}_ms"] = _seconds(*m.groups()) * 1000
    return {"tool": "wrk", "rps": rps, "requests": total, "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": socket_errors, **latency}


def run_python(url: str, *, connections: int, duration: float, headers: dict | None = None,
               expect: int = 200) -> dict:
    """Fallback: ``connections`` threads with keep-alive connections for ``duration`` seconds."""
    counts = {"ok": 0, "bad": 0}
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def worker():
        client = HttpClient(url, headers, expect=expect, timeout=5)
        ok = bad = 0
        for _ in range(1_000_000):
            if time.monotonic() >= stop_at:
                break
            if client():
                ok += 1
            else:
                bad += 1
        client.close()
        with lock:
            counts["ok"] += ok
            counts["bad"] += bad

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(connections, 64))]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + 15)
    wall = time.monotonic() - started
    total = counts["ok"] + counts["bad"]
    return {"tool": "python", "rps": total / wall, "requests": total, "non_2xx": counts["bad"], "socket_errors": 0}


def run_load(url: str, *, connections: int, duration: float, headers: dict | None = None,
             expect: int = 200) -> dict:
    if WRK:
        result = run_wrk(url, connections=connections, duration=duration, headers=headers)
        if expect != 200:  # wrk counts any non-2xx; an expected 401 is not an error
            result["non_2xx"] = 0 if result["non_2xx"] == result["requests"] else result["non_2xx"]
        return result
    return run_python(url, connections=connections, duration=duration, headers=headers, expect=expect)
