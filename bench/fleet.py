"""The fleet section (``scripts/bench --only fleet``): the backend's fan-out with many hosts, a hung host,
health while clients wait for pulls, and waited pulls that poll.

1. **Scale.** Backends with N = 1, 4, 16, 64 GPU hosts, each host a stand-in that answers from a canned
   body (bench/canned.py: every port in one asyncio process, the body a real GPU server's answer).
   Listings with ``?refresh=true`` and the cache off, one client; the CPU time of the backend's process
   tree (utime + stime from /proc) and of the canned hosts' process is read before and after, so the
   backend's CPU per listing, and per host (the slope of a least-squares line over N), are figures.
2. **One host hung.** N = 2 and 16 hosts, one of them behind a fault proxy switched to ``blackhole``
   (accepts, never answers) after a few good listings: the first listing after the hang and the next
   ones, one client, back to back, with the deployed settings (deadline 2.5 s, read timeout 30 s,
   breaker threshold 3). A third case, N = 2 with ``GPU_BRIDGE_READ_TIMEOUT=1``, shows the breaker
   opening within the same number of calls (with the defaults it opens after 3 x 30 s).
3. **Health under waits.** ``/api/health`` on one GPU server (deployed settings: 2 waits allowed),
   polled every 10 ms while idle (the baseline) and while 16 clients ask for pulls with ``?wait=true``.
4. **Waited pull.** The same fixed-size pull at the same emulator speed, started directly on a GPU
   server with ``?wait=true`` (the baseline) and through the backend with ``wait: true`` (the backend
   polls the job every 0.25 s); the ratio of the two times, per round.

Every loop is bounded by a count and a time; every process and proxy is stopped by the caller's Stack.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass

import requests
from faultproxy import FaultProxy

from bench import REPO
from bench.measure import HttpClient, median, percentile, summary
from bench.procs import Proc, Stack, auth, tree_files
from support.procs import emulator_control, wait_until

SCALE_NS = (1, 4, 16, 64)
HUNG_NS = (2, 16)
WAITERS = 16
HEALTH_POLL_S = 0.01
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class FleetProfile:
    scale_listings: int  # listings per N (at most)
    scale_seconds: float  # and at most this long per N
    hung_calls: int  # listings after the hang, per case
    health_samples: int  # idle baseline samples
    wait_pull_s: float  # how long the waited pulls of part 3 last
    pull_rounds: int
    pull_bytes: int
    pull_speed: float
    allowance_s: int  # added to the benchmark's hard time limit


FLEET_FULL = FleetProfile(100, 6.0, 20, 300, 3.0, 3, 20_000_000, 10e6, 150)
FLEET_QUICK = FleetProfile(30, 2.0, 5, 150, 2.0, 1, 10_000_000, 10e6, 75)


# --- CPU time ----------------------------------------------------------------------------------------------------
def tree_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` and its descendants (all threads), in seconds; /proc's clock ticks."""
    total = 0
    for _, stat in tree_files(pid, "stat"):
        fields = stat.rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / CLK_TCK


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line: (slope, intercept)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if not sxx:
        return float("nan"), my
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


# --- set-up ------------------------------------------------------------------------------------------------------
def start(stack: Stack) -> dict:
    ollama = stack.emulator("fleet-emulator")
    ollama.wait_http("/")
    gpu_waits = stack.gpu_server("fleet-gpu-waits", ollama.url)  # deployed: GPU_BRIDGE_MAX_WAITING_PULLS=2
    gpu_pulls = stack.gpu_server("fleet-gpu-pulls", ollama.url)
    for proc in (gpu_waits, gpu_pulls):
        proc.wait_http("/api/health")
    r = requests.get(f"{gpu_waits.url}/api/models", headers=auth(), timeout=10)
    r.raise_for_status()
    body_file, ports_file = stack.tmp / "canned-models.json", stack.tmp / "canned-ports.json"
    body_file.write_bytes(r.content)
    count = max(SCALE_NS) + 4
    canned = stack.process("canned-hosts", [sys.executable, "-m", "bench.canned", str(body_file), str(ports_file),
                                            str(count), "900"],
                           PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))

    def ports_ready():
        if not canned.alive():
            raise RuntimeError(f"canned hosts exited:\n{canned.output()}")
        return ports_file.exists()

    wait_until(ports_ready, 20, 0.05, what="the canned hosts' ports")
    ports = json.loads(ports_file.read_text())
    hosts = [f"127.0.0.1:{p}" for p in ports]
    scale = {n: stack.backend(f"fleet-backend-{n}hosts", ",".join(hosts[:n])) for n in SCALE_NS}
    # Hung-host cases: the first host goes through its own fault proxy (to a canned port of its own).
    spare = iter(range(max(SCALE_NS), count))
    cases = [(f"N={n}", n, {}) for n in HUNG_NS] + [("N=2, GPU_BRIDGE_READ_TIMEOUT=1", 2,
                                                     {"GPU_BRIDGE_READ_TIMEOUT": 1})]
    hung = []
    for label, n, extra in cases:
        proxy = FaultProxy(("127.0.0.1", ports[next(spare)])).start()
        members = [f"127.0.0.1:{proxy.port}", *hosts[: n - 1]]
        backend = stack.backend(f"fleet-backend-hung-{len(hung)}", ",".join(members), **extra)
        hung.append({"label": label, "n": n, "proxy": proxy, "backend": backend,
                     "hung_label": members[0], "settings": extra})
    pulls_backend = stack.backend("fleet-backend-pulls", f"127.0.0.1:{gpu_pulls.port}")
    for proc in [*scale.values(), *(c["backend"] for c in hung), pulls_backend]:
        proc.wait_http("/api/openapi.json")
    return {"ollama": ollama, "gpu_waits": gpu_waits, "gpu_pulls": gpu_pulls, "canned": canned, "scale": scale,
            "hung": hung, "pulls_backend": pulls_backend, "models_per_host": len(r.json()["models"]),
            "body_bytes": len(r.content)}


def stop_proxies(env: dict | None) -> None:
    for case in (env or {}).get("hung", []):
        case["proxy"].stop()


# --- 1. scale ----------------------------------------------------------------------------------------------------
def _listing_ok(body: bytes, n: int) -> bool:
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    hosts = doc.get("hosts") or {}
    return doc.get("source") == "gpu" and len(hosts) == n and all(h.get("ok") for h in hosts.values())


def scale(env: dict, fp: FleetProfile) -> dict:
    canned: Proc = env["canned"]
    rows = []
    for n, backend in env["scale"].items():
        client = HttpClient(f"{backend.url}/config/models?refresh=true", timeout=30)
        for _ in range(5):  # warm-up: the pool's threads, keep-alive connections, the SQLite cache rows
            client()
        latencies, errors = [], 0
        cpu_b0, cpu_h0, started = tree_cpu_s(backend.pid), tree_cpu_s(canned.pid), time.monotonic()
        for _ in range(fp.scale_listings):
            if time.monotonic() - started > fp.scale_seconds:
                break
            t0 = time.perf_counter()
            ok = client()
            elapsed = time.perf_counter() - t0
            if ok and _listing_ok(client.last_body, n):
                latencies.append(elapsed)
            else:
                errors += 1
        wall = time.monotonic() - started
        cpu_b, cpu_h = tree_cpu_s(backend.pid) - cpu_b0, tree_cpu_s(canned.pid) - cpu_h0
        client.close()
        count = len(latencies) + errors
        rows.append({"hosts": n, **summary(latencies), "errors": errors, "wall_s": wall,
                     "backend_cpu_ms": cpu_b * 1000 / count, "hosts_cpu_ms": cpu_h * 1000 / count,
                     "backend_cpu_ms_per_host": cpu_b * 1000 / count / n,
                     "backend_cpu_share": cpu_b / wall if wall else float("nan")})
    slope, intercept = _fit([r["hosts"] for r in rows], [r["backend_cpu_ms"] for r in rows])
    return {"rows": rows, "backend_cpu_ms_per_host": slope, "backend_cpu_ms_fixed": intercept,
            "models_per_host": env["models_per_host"], "body_bytes": env["body_bytes"],
            "clock_tick_ms": 1000 / CLK_TCK,
            "note": f"one client, back to back, ?refresh=true, GPU_BRIDGE_CACHE_MAX_AGE=0; each host a canned "
                    f"answer ({env['models_per_host']} models, {env['body_bytes']} bytes: a real GPU server's "
                    f"/api/models) from one asyncio process; CPU: utime+stime of the gunicorn process tree "
                    f"from /proc ({1000 / CLK_TCK:g} ms ticks) over all listings of the row, divided by their "
                    f"count; per host: the slope of a least-squares line through the four rows"}


# --- 2. one host hung --------------------------------------------------------------------------------------------
def _hung_case(case: dict, calls: int, out: dict) -> None:
    backend, proxy, hung_label = case["backend"], case["proxy"], case["hung_label"]
    client = HttpClient(f"{backend.url}/config/models?refresh=true", timeout=40)
    warm_ok = sum(bool(client() and _listing_ok(client.last_body, case["n"])) for _ in range(3))
    proxy.set_mode("blackhole")
    records = []
    end = time.monotonic() + calls * 5 + 10
    try:
        for _ in range(calls):
            if time.monotonic() > end:
                break
            t0 = time.perf_counter()
            ok = client()
            elapsed = time.perf_counter() - t0
            try:
                doc = json.loads(client.last_body) if ok else {}
            except ValueError:
                doc = {}
            status = (doc.get("hosts") or {}).get(hung_label) or {}
            records.append({"s": elapsed, "ok": ok, "reason": status.get("reason") or ("ok" if status.get("ok")
                                                                                      else None),
                            "stale": bool(status.get("stale")), "models": len(doc.get("models") or [])})
    finally:
        client.close()
        proxy.set_mode("pass")
    out.update(warm_ok=warm_ok, records=records)


def hung_host(env: dict, fp: FleetProfile) -> dict:
    results = [{} for _ in env["hung"]]
    threads = [threading.Thread(target=_hung_case, args=(case, fp.hung_calls, results[i]), daemon=True)
               for i, case in enumerate(env["hung"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(fp.hung_calls * 5 + 30)
    rows = []
    for case, got in zip(env["hung"], results, strict=True):
        records = got.get("records", [])
        later = [r["s"] for r in records[1:]]
        reasons: dict[str, int] = {}
        for r in records:
            reasons[str(r["reason"])] = reasons.get(str(r["reason"]), 0) + 1
        rows.append({"case": case["label"], "hosts": case["n"], "settings": case["settings"],
                     "warm_ok": got.get("warm_ok"), "calls": len(records),
                     "first_s": records[0]["s"] if records else float("nan"),
                     "p50_s": percentile(later, 50), "max_s": max(later) if later else float("nan"),
                     "min_s": min(later) if later else float("nan"),
                     "over_3s": sum(r["s"] > 3.0 for r in records), "failed": sum(not r["ok"] for r in records),
                     "hung_host_reasons": reasons, "stale_listed": sum(r["stale"] for r in records),
                     "calls_s": [round(r["s"], 3) for r in records]})
    return {"rows": rows, "note": "one client per case, back to back; the cases run at the same time (they "
                                  "mostly wait); 'later': every listing after the first; the hung host's "
                                  "models come from the cache, marked stale"}


# --- 3. health while 16 clients wait for pulls -------------------------------------------------------------------
def _poll_health(url: str, *, count: int, until=None, max_s: float) -> tuple[list[float], int]:
    client = HttpClient(url, timeout=10)
    out, errors = [], 0
    end = time.monotonic() + max_s
    try:
        while len(out) + errors < count and time.monotonic() < end:
            if until is not None and until():
                break
            t0 = time.perf_counter()
            ok = client()
            elapsed = time.perf_counter() - t0
            if ok:
                out.append(elapsed)
            else:
                errors += 1
            time.sleep(HEALTH_POLL_S)
    finally:
        client.close()
    return out, errors


def health_under_waits(env: dict, fp: FleetProfile) -> dict:
    gpu, ollama = env["gpu_waits"], env["ollama"]
    url = f"{gpu.url}/api/health"
    idle, idle_errors = _poll_health(url, count=fp.health_samples, max_s=fp.health_samples * 0.05 + 5)
    speed = 10e6
    models = [f"bench/wait-{i}:v1" for i in range(WAITERS)]
    emulator_control(ollama, "config", {"add_remote": {m: [int(speed * fp.wait_pull_s)] for m in models},
                                        "pull_speed": speed})
    answers: list[tuple[int, str | None, float]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(WAITERS + 1)

    def waiter(model: str) -> None:
        try:
            barrier.wait(10)
        except threading.BrokenBarrierError:
            return
        t0 = time.monotonic()
        try:
            r = requests.post(f"{gpu.url}/api/models/{model}", params={"wait": "true"}, headers=auth(),
                              timeout=fp.wait_pull_s + 30)
            code = r.json().get("code") if r.status_code != 200 else None
            status = r.status_code
        except (requests.RequestException, ValueError) as exc:
            status, code = 0, type(exc).__name__
        with lock:
            answers.append((status, code, time.monotonic() - t0))

    threads = [threading.Thread(target=waiter, args=(m,), daemon=True) for m in models]
    for thread in threads:
        thread.start()
    barrier.wait(10)
    loaded, loaded_errors = _poll_health(url, count=100_000, until=lambda: not any(t.is_alive() for t in threads),
                                         max_s=fp.wait_pull_s + 20)
    for thread in threads:
        thread.join(fp.wait_pull_s + 35)
    statuses: dict[str, int] = {}
    for status, code, _ in answers:
        key = f"{status} {code}" if code else str(status)
        statuses[key] = statuses.get(key, 0) + 1
    base, load = summary(idle), summary(loaded)
    return {"idle": {**base, "errors": idle_errors}, "waiting": {**load, "errors": loaded_errors},
            "ratio_p99": load["p99_ms"] / base["p99_ms"] if base["p99_ms"] else float("nan"),
            "wait_answers": statuses,
            "waited_s": max((s for st, _, s in answers if st == 200), default=float("nan")),
            "refused_within_ms": max((s for st, _, s in answers if st == 429), default=float("nan")) * 1000,
            "note": f"one client polling /api/health every {HEALTH_POLL_S * 1000:g} ms; 'waiting': while "
                    f"{WAITERS} clients POST /api/models/<a model each>?wait=true (pulls of "
                    f"{fp.wait_pull_s:g} s) on the same server, deployed settings (8 threads, "
                    f"GPU_BRIDGE_MAX_WAITING_PULLS=2)"}


# --- 4. a waited pull: polled by the backend vs held by ?wait=true ------------------------------------------------
def waited_pulls(env: dict, fp: FleetProfile) -> dict:
    gpu, backend, ollama = env["gpu_pulls"], env["pulls_backend"], env["ollama"]

    def direct(model: str) -> float:
        t0 = time.monotonic()
        r = requests.post(f"{gpu.url}/api/models/{model}", params={"wait": "true"}, headers=auth(), timeout=60)
        elapsed = time.monotonic() - t0
        if r.status_code != 200 or r.json().get("state") != "succeeded":
            raise RuntimeError(f"direct waited pull of {model}: {r.status_code} {r.text[:300]}")
        return elapsed

    def through_backend(model: str) -> float:
        t0 = time.monotonic()
        r = requests.post(f"{backend.url}/config/pull-model", json={"model": model, "wait": True}, timeout=60)
        elapsed = time.monotonic() - t0
        if r.status_code != 200 or not all(v.get("ok") for v in r.json().get("results", {}).values()):
            raise RuntimeError(f"backend waited pull of {model}: {r.status_code} {r.text[:300]}")
        return elapsed

    rounds = []
    for index in range(fp.pull_rounds):
        models = {kind: f"bench/waited-{kind}-{index}:v1" for kind in ("direct", "backend")}
        emulator_control(ollama, "config", {"add_remote": {m: [fp.pull_bytes] for m in models.values()},
                                            "pull_speed": fp.pull_speed})
        order = ("direct", "backend") if index % 2 == 0 else ("backend", "direct")
        got = {}
        for kind in order:
            got[kind] = (direct if kind == "direct" else through_backend)(models[kind])
        rounds.append({**got, "ratio": got["backend"] / got["direct"]})
    return {"direct_s": median([r["direct"] for r in rounds]), "backend_s": median([r["backend"] for r in rounds]),
            "ratio": median([r["ratio"] for r in rounds]), "rounds": rounds,
            "ideal_s": fp.pull_bytes / fp.pull_speed,
            "note": f"one layer of {fp.pull_bytes / 1e6:g} MB at {fp.pull_speed / 1e6:g} MB/s (emulator), then its "
                    f"0.3 s digest check; a new model each time; direct first in even rounds, the backend first in "
                    f"odd ones; ratio per round, median over {fp.pull_rounds} round(s)"}


def run(stack: Stack, quick: bool) -> dict:
    fp = FLEET_QUICK if quick else FLEET_FULL
    env = None
    started = time.monotonic()
    try:
        env = start(stack)
        out = {"scale": scale(env, fp), "hung": hung_host(env, fp), "health": health_under_waits(env, fp),
               "pulls": waited_pulls(env, fp)}
    finally:
        stop_proxies(env)
    out["seconds"] = round(time.monotonic() - started, 1)
    return out
