#!/usr/bin/env python3
"""The Python half of scripts/gpu-check: HTTP polling, comparisons with nvidia-smi, the report.

Standard library only, and written for any Python 3.7+, because it may run under a host's own
python3 before (or instead of) the check's venv. Comparison commands print one line per check,
``CHECK<TAB>name<TAB>PASS|FAIL|SKIP<TAB>detail``, which scripts/gpu-check collects.

    free-port
    wait-http URL --timeout S [--pid PID]       exit 0 once URL answers below 500
    fetch URL --out FILE [--token T]            exit 0 on 200; prints the status
    check-health --health FILE --smi CSV        /api/health against nvidia-smi --query-gpu
    check-metrics --metrics FILE --smi CSV      /metrics: served, and GPU series if it has any
    probe --src DIR --nvml PATH --out FILE --smi CSV
                                                fallback: GpuProbe().snapshot() in this process
    report --checks TSV --info TSV --out-dir DIR [--smi CSV] [--health FILE] [--probe FILE]
                                                writes summary.txt and gpu-check.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
import types
import urllib.error
import urllib.request

MEMORY_TOLERANCE = 0.01      # memory total: within 1 % of nvidia-smi's
TEMPERATURE_RANGE = (0, 120)
TEMPERATURE_DRIFT_C = 15     # probe and nvidia-smi read seconds apart; the die does not move faster
SMI_FIELDS = ("index", "name", "memory_total_mib", "memory_used_mib", "utilization_percent", "temperature_c")


def emit(name: str, status: str, detail: str) -> None:
    detail = " ".join(str(detail).split())  # one line, no tabs
    print(f"CHECK\t{name}\t{status}\t{detail}", flush=True)


# --- nvidia-smi -----------------------------------------------------------------------------------
def _number(text: str):
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None  # "[N/A]", "N/A", "[Not Supported]", ...


def read_smi(path: str | None) -> list:
    """Rows of ``nvidia-smi --query-gpu=index,name,memory.total,memory.used,utilization.gpu,
    temperature.gpu --format=csv,noheader,nounits``; the name may itself hold commas."""
    rows = []
    if not path or not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = [part.strip() for part in line.strip().split(",")]
            if len(parts) < 6 or _number(parts[0]) is None:
                continue
            values = [_number(parts[0]), ", ".join(parts[1:-4])] + [_number(p) for p in parts[-4:]]
            rows.append({field: values[i] for i, field in enumerate(SMI_FIELDS)})  # zip(strict=) needs 3.10
    return rows


# --- comparisons ----------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def compare_gpu(gpu: dict, smi: list, where: str) -> None:
    """Checks of a GpuProbe report (``/api/health``'s ``gpu`` or a snapshot) against nvidia-smi."""
    if not isinstance(gpu, dict):
        emit(f"{where}: gpu report", "FAIL", f"no gpu object: {gpu!r}")
        return
    available = gpu.get("available")
    emit(f"{where}: gpu.available", "PASS" if available is True else "FAIL",
         f"available={available!r}" + (f", error={gpu.get('error')!r}" if gpu.get("error") else ""))
    devices = gpu.get("devices") or []
    if not smi:
        emit(f"{where}: matches nvidia-smi", "FAIL", "nvidia-smi listed no GPU, nothing to compare with")
        return
    emit(f"{where}: device count", "PASS" if len(devices) == len(smi) else "FAIL",
         f"probe {len(devices)}, nvidia-smi {len(smi)}")
    names = [d.get("name") for d in devices]
    smi_names = [row["name"] for row in smi]
    emit(f"{where}: device names", "PASS" if names == smi_names else "FAIL", f"probe {names}, nvidia-smi {smi_names}")
    by_index = {row["index"]: row for row in smi}
    for position, device in enumerate(devices):
        index = device.get("index")
        row = by_index.get(index)
        tag = f"{where}: GPU {index}"
        if index != position or row is None:
            emit(f"{tag} index", "FAIL",
                 f"device #{position} has index {index!r}; nvidia-smi indexes {sorted(by_index)}")
            continue
        error = device.get("error")
        suffix = f" (device error: {error})" if error else ""
        total, used = device.get("memory_total_bytes"), device.get("memory_used_bytes")
        smi_total = row["memory_total_mib"]
        if _is_int(total) and smi_total:
            smi_bytes = smi_total * 1024 * 1024
            deviation = abs(total - smi_bytes) / smi_bytes
            emit(f"{tag} memory total", "PASS" if deviation <= MEMORY_TOLERANCE else "FAIL",
                 f"probe {total} B = {total / 2**20:.0f} MiB, nvidia-smi {smi_total} MiB, off by {deviation:.3%}"
                 f" (limit {MEMORY_TOLERANCE:.0%})")
        else:
            emit(f"{tag} memory total", "FAIL", f"probe {total!r}, nvidia-smi {smi_total!r}{suffix}")
        if _is_int(used) and _is_int(total):
            smi_used = row["memory_used_mib"]
            close = smi_used is not None and abs(used - smi_used * 2**20) <= MEMORY_TOLERANCE * total
            emit(f"{tag} memory used", "PASS" if 0 <= used <= total and close else "FAIL",
                 f"probe {used / 2**20:.0f} MiB of {total / 2**20:.0f} MiB; nvidia-smi {smi_used} MiB"
                 f" (limit: {MEMORY_TOLERANCE:.0%} of the total apart)")
        else:
            emit(f"{tag} memory used", "FAIL", f"probe {used!r}{suffix}")
        _ranged(f"{tag} temperature", device.get("temperature_c"), row["temperature_c"], TEMPERATURE_RANGE, "C",
                TEMPERATURE_DRIFT_C, suffix)
        _ranged(f"{tag} utilization", device.get("utilization_percent"), row["utilization_percent"], (0, 100),
                "%", None, suffix)


def _ranged(name, value, smi_value, bounds, unit, drift, suffix) -> None:
    low, high = bounds
    if value is None and smi_value is None:
        emit(name, "PASS", f"not reported by the probe nor by nvidia-smi (N/A on this board){suffix}")
        return
    if not _is_int(value):
        emit(name, "FAIL", f"probe {value!r} is not an integer; nvidia-smi {smi_value!r}{suffix}")
        return
    problems = []
    if not low <= value <= high:
        problems.append(f"outside {low}..{high}")
    if drift is not None and smi_value is not None and abs(value - smi_value) > drift:
        problems.append(f"more than {drift} {unit} from nvidia-smi")
    emit(name, "FAIL" if problems else "PASS",
         f"probe {value} {unit}, nvidia-smi {smi_value!r} {unit}, range {low}..{high}"
         + (f": {', '.join(problems)}" if problems else ""))


def cmd_check_health(args) -> int:
    try:
        with open(args.health, encoding="utf-8") as fh:
            body = json.load(fh)
    except (OSError, ValueError) as exc:
        emit("health: JSON body", "FAIL", f"cannot read {args.health}: {exc}")
        return 1
    ollama = body.get("ollama") or {}
    emit("health: status", "PASS" if body.get("status") == "ok" else "FAIL",
         f"status={body.get('status')!r}, ollama reachable={ollama.get('reachable')!r}, "
         f"version={body.get('version')!r}")
    compare_gpu(body.get("gpu"), read_smi(args.smi), "health")
    return 0


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_GPU_SERIES = re.compile(r"gpu_(memory|temperature|utili[sz]ation|devices?|available)|nvml", re.I)


def cmd_check_metrics(args) -> int:
    try:
        with open(args.metrics, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError as exc:
        emit("metrics: served", "FAIL", f"cannot read {args.metrics}: {exc}")
        return 1
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            samples.append((match.group(1), match.group(2) or "", _number(match.group(3))))
    ours = [s for s in samples if s[0].startswith("gpu_bridge_")]
    emit("metrics: served", "PASS" if ours else "FAIL", f"{len(samples)} samples, {len(ours)} gpu_bridge_* samples")
    gpu = [s for s in samples if _GPU_SERIES.search(s[0])]
    if not gpu:
        emit("metrics: GPU series", "FAIL", "/metrics exports no gpu_bridge_gpu_* series (gpu_server/metrics.py "
                                            "GpuCollector should)")
        return 0
    smi = read_smi(args.smi)
    smi_totals = sorted(row["memory_total_mib"] * 2**20 for row in smi if row["memory_total_mib"])
    for name, labels, value in gpu:
        where = f"metrics: {name}{labels}"
        if value is None:
            emit(where, "FAIL", "not a number")
        elif "memory_total" in name:
            ok = any(abs(value - t) / t <= MEMORY_TOLERANCE for t in smi_totals)
            emit(where, "PASS" if ok else "FAIL", f"{value:.0f} B; nvidia-smi totals {smi_totals}")
        elif "temperature" in name:
            emit(where, "PASS" if TEMPERATURE_RANGE[0] <= value <= TEMPERATURE_RANGE[1] else "FAIL", f"{value} C")
        elif "utili" in name:
            emit(where, "PASS" if 0 <= value <= 100 else "FAIL", f"{value} %")
        else:
            emit(where, "PASS", f"{value}")
    return 0


def cmd_probe(args) -> int:
    """Fallback without the venv: GpuProbe from the source tree, pynvml from the carried wheel.

    Importing ``gpu_bridge.gpu_server`` normally imports the Flask app too (and needs Python 3.11);
    when that fails, a bare package object stands in for it so that only health.py is loaded.
    """
    if args.nvml:
        sys.path.insert(0, args.nvml)
    sys.path.insert(0, args.src)
    try:
        from gpu_bridge.gpu_server.health import GpuProbe
        how = "imported normally"
    except Exception as exc:  # noqa: BLE001 - any import failure: fall back to health.py alone
        for name in [n for n in sys.modules if n.startswith("gpu_bridge")]:
            del sys.modules[name]
        import gpu_bridge
        package = types.ModuleType("gpu_bridge.gpu_server")
        package.__path__ = [os.path.join(args.src, "gpu_bridge", "gpu_server")]
        sys.modules["gpu_bridge.gpu_server"] = package
        gpu_bridge.gpu_server = package
        from gpu_bridge.gpu_server.health import GpuProbe
        how = f"health.py alone (the package import failed: {exc})"
    try:
        import pynvml
        nvml_from = getattr(pynvml, "__file__", "?")
    except ImportError as exc:
        nvml_from = f"not importable: {exc}"
    started = time.monotonic()
    snapshot = GpuProbe().snapshot()
    elapsed = time.monotonic() - started
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"snapshot": snapshot, "python": sys.version, "pynvml": nvml_from, "import": how,
                   "seconds": round(elapsed, 3)}, fh, indent=2)
    emit("probe: GpuProbe().snapshot() ran", "PASS", f"{elapsed:.2f} s, pynvml from {nvml_from}, {how}")
    compare_gpu(snapshot, read_smi(args.smi), "probe")
    return 0


# --- HTTP -----------------------------------------------------------------------------------------
def _alive(pid: int | None) -> bool:
    if not pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still "exists"
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def cmd_wait_http(args) -> int:
    deadline = time.monotonic() + args.timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not _alive(args.pid):
            print(f"process {args.pid} exited before {args.url} answered ({last})")
            return 1
        try:
            with urllib.request.urlopen(args.url, timeout=2) as response:  # noqa: S310 - loopback URL we built
                waited = args.timeout - (deadline - time.monotonic())
                print(f"{args.url} answered {response.status} after {waited:.1f} s")
                return 0
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                print(f"{args.url} answered {exc.code}")
                return 0
            last = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            last = str(exc)
        time.sleep(0.2)
    print(f"{args.url} did not answer within {args.timeout} s (last: {last})")
    return 1


def cmd_fetch(args) -> int:
    request = urllib.request.Request(args.url)  # noqa: S310 - a loopback http URL that gpu-check built
    if args.token:
        request.add_header("Authorization", f"Bearer {args.token}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:  # noqa: S310 - loopback URL
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (OSError, ValueError) as exc:
        print(f"error: {exc}")
        return 1
    with open(args.out, "wb") as fh:
        fh.write(body)
    print(status)
    return 0 if status == 200 else 1


def cmd_free_port(_args) -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        print(sock.getsockname()[1])
    return 0


# --- report ---------------------------------------------------------------------------------------
def _rows(path: str, width: int) -> list:
    rows = []
    if path and os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= width:
                    rows.append(parts[:width - 1] + ["\t".join(parts[width - 1:])])
    return rows


def _json_file(path: str | None):
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        return {"unreadable": str(exc)}


def cmd_report(args) -> int:
    checks = [{"name": n, "status": s, "detail": d} for n, s, d in _rows(args.checks, 3)]
    info = {k: v for k, v in _rows(args.info, 2)}
    counts = {status: sum(1 for c in checks if c["status"] == status) for status in ("PASS", "FAIL", "SKIP")}
    result = "PASS" if checks and not counts["FAIL"] else "FAIL"
    headline = (f"gpu-check: {result}: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"
                + ("" if checks else " (no check ran)"))
    width = max([len(c["name"]) for c in checks] + [10])
    lines = [headline, ""]
    lines += [f"{key}: {value}" for key, value in info.items()]
    lines.append("")
    lines += [f"{c['status']:<4}  {c['name']:<{width}}  {c['detail']}" for c in checks]
    with open(os.path.join(args.out_dir, "summary.txt"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    document = {"result": result, "counts": counts, "info": info, "checks": checks,
                "nvidia_smi": read_smi(args.smi), "health": _json_file(args.health), "probe": _json_file(args.probe)}
    with open(os.path.join(args.out_dir, "gpu-check.json"), "w", encoding="utf-8") as fh:
        json.dump(document, fh, indent=2)
    print(headline)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("free-port")
    p = sub.add_parser("wait-http")
    p.add_argument("url")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--pid", type=int)
    p = sub.add_parser("fetch")
    p.add_argument("url")
    p.add_argument("--out", required=True)
    p.add_argument("--token")
    p.add_argument("--timeout", type=float, default=15.0)
    p = sub.add_parser("check-health")
    p.add_argument("--health", required=True)
    p.add_argument("--smi")
    p = sub.add_parser("check-metrics")
    p.add_argument("--metrics", required=True)
    p.add_argument("--smi")
    p = sub.add_parser("probe")
    p.add_argument("--src", required=True)
    p.add_argument("--nvml")
    p.add_argument("--out", required=True)
    p.add_argument("--smi")
    p = sub.add_parser("report")
    p.add_argument("--checks", required=True)
    p.add_argument("--info")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--smi")
    p.add_argument("--health")
    p.add_argument("--probe")
    args = parser.parse_args(argv)
    handlers = {"free-port": cmd_free_port, "wait-http": cmd_wait_http, "fetch": cmd_fetch,
                "check-health": cmd_check_health, "check-metrics": cmd_check_metrics, "probe": cmd_probe,
                "report": cmd_report}
    if args.command not in handlers:
        parser.print_help()
        return 2
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
