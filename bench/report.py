"""Tables on stdout and the JSON file."""

from __future__ import annotations

import json
import math
from pathlib import Path

MOLECULE_PLACEHOLDER = "see README (molecule)"


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def table(title: str, headers: list[str], rows: list[list], note: str = "") -> str:
    cells = [[_fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    out = [f"\n{title}", line, "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |", line]
    for row in cells:
        out.append("| " + " | ".join((c.rjust(w) if _numeric(c) else c.ljust(w))
                                     for c, w in zip(row, widths, strict=True)) + " |")
    out.append(line)
    if note:
        out.append(note)
    return "\n".join(out)


def _numeric(text: str) -> bool:
    try:
        float(text.rstrip("x%"))
    except ValueError:
        return text == "-"
    return True


def render(results: dict) -> str:
    parts = []
    meta = results["meta"]
    kind = "quick" if meta["quick"] else "full"
    parts.append(f"gpu-bridge benchmark ({kind}): {meta['cpus']} CPUs ({meta['cpu']}), Python {meta['python']}, "
                 f"{meta['rounds']} round(s), medians over rounds; load tool: {meta['load_tool']}")
    busiest = max(meta.get("loadavg_before") or 0, meta.get("loadavg_after") or 0)
    if busiest > (meta.get("cpus") or 1):
        parts.append(f"WARNING: the machine was busy (1-minute load average up to {busiest:g} on {meta['cpus']} CPUs): "
                     "other work shared the CPUs, so absolute figures are pessimistic and noisy; rerun on an idle "
                     "machine before publishing them.")

    lat = results.get("latency")
    if lat:
        rows = []
        for entry in lat["rows"]:
            rows.append([entry["path"], entry["concurrency"], entry["p50_ms"], entry["p95_ms"], entry["p99_ms"],
                         _ratio(entry.get("ratio_p50")), _ratio(entry.get("ratio_p95")), entry["n"], entry["errors"]])
        title = "Model listing latency (ms; medians over rounds; ratio: p50 or p95 / the floor's in the same round)"
        headers = ["path", "conc", "p50", "p95", "p99", "x floor p50", "x floor p95", "n", "errors"]
        parts.append(table(title, headers, rows, lat.get("note", "")))
    tp = results.get("throughput")
    if tp:
        rows = [[e["route"], e["threads"], e["connections"], e["rps"], e.get("p50_ms"), e.get("p99_ms"), e["errors"],
                 e["tool"]] for e in tp["rows"]]
        parts.append(table("Throughput (req/s, median over rounds; gunicorn: 1 gthread worker, N threads)",
                           ["route", "threads", "conns", "req/s", "p50 ms", "p99 ms", "errors", "tool"], rows,
                           tp.get("note", "")))
    mem = results.get("memory")
    if mem:
        rows = [[name, _mib(v.get("idle_kib")), _mib(v.get("load_kib"))] for name, v in mem["rows"].items()]
        parts.append(table("Memory (RSS of the process tree, MiB; VmRSS from /proc)", ["process", "idle", "under load"],
                           rows, mem.get("note", "")))
    pulls = results.get("pulls")
    if pulls:
        rows = [[p["path"], p["lines"], p["matched"], p["p50_ms"], p["p95_ms"], p["max_ms"]] for p in pulls["progress"]]
        parts.append(table("Pull progress: Ollama's progress line -> seen by a client polling every "
                           f"{pulls['poll_ms']:g} ms (ms)", ["path", "lines", "matched", "p50", "p95", "max"], rows,
                           pulls.get("note", "")))
        rows = [[s["path"], s["configured_s"], s["detected_s"], s["error_code"] or "-"] for s in pulls["stall"]]
        parts.append(table("Stalled pull: last byte from Ollama -> the client sees the job failed (s)",
                           ["path", "configured", "detected", "error_code"], rows))
    fleet = results.get("fleet")
    if fleet:
        parts.extend(_fleet(fleet))
    if "deployment" in results:
        parts.append(table("Deployment (molecule lab, Docker; not run by this benchmark)", ["figure", "value"],
                           [["deploy / converge / idempotence times", MOLECULE_PLACEHOLDER]]))
    targets = results.get("targets")
    if targets:
        rows = [[t["target"], t["measured"], "MET" if t["met"] else "NOT MET", t.get("comment", "")] for t in targets]
        parts.append(table("Targets", ["target", "measured", "verdict", "comment"], rows))
    return "\n".join(parts)


def _fleet(f: dict) -> list[str]:
    parts = []
    sc = f["scale"]
    rows = [[r["hosts"], r["p50_ms"], r["p95_ms"], _fmt(r["backend_cpu_ms"], 2), _fmt(r["backend_cpu_ms_per_host"], 2),
             f"{r['backend_cpu_share'] * 100:.0f}%", _fmt(r["hosts_cpu_ms"], 2), r["n"], r["errors"]]
            for r in sc["rows"]]
    parts.append(table("Fleet: backend /config/models?refresh=true with N canned GPU hosts (ms; CPU ms per listing)",
                       ["hosts", "p50", "p95", "backend CPU", "backend CPU / host", "backend busy", "hosts CPU", "n",
                        "errors"], rows,
                       f"backend CPU per listing = {_fmt(sc['backend_cpu_ms_fixed'], 2)} ms + "
                       f"{_fmt(sc['backend_cpu_ms_per_host'], 2)} ms per host (least-squares line)\n" + sc["note"]))
    rows = []
    for r in f["hung"]["rows"]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["hung_host_reasons"].items()))
        rows.append([r["case"], r["calls"], *(_fmt(r[k], 3) for k in ("first_s", "p50_s", "min_s", "max_s")),
                     r["over_3s"], r["failed"], reasons])
    parts.append(table("Fleet: listing with one of N hosts hung (blackhole; seconds)",
                       ["case", "calls", "first", "later p50", "later min", "later max", "> 3 s", "failed",
                        "hung host reported as"], rows, f["hung"]["note"]))
    h = f["health"]
    rows = [["idle (baseline)", h["idle"]["p50_ms"], h["idle"]["p99_ms"], h["idle"]["max_ms"], h["idle"]["n"],
             h["idle"]["errors"]],
            [f"{sum(h['wait_answers'].values())} clients waiting (?wait=true)", h["waiting"]["p50_ms"],
             h["waiting"]["p99_ms"], h["waiting"]["max_ms"], h["waiting"]["n"], h["waiting"]["errors"]]]
    answers = ", ".join(f"{k}: {v}" for k, v in sorted(h["wait_answers"].items()))
    parts.append(table("Fleet: GPU server /api/health while clients wait for pulls (ms)",
                       ["condition", "p50", "p99", "max", "n", "errors"], rows,
                       f"p99 waiting / idle: {_ratio(h['ratio_p99'])}; answers to the waits: {answers}; the refused "
                       f"ones within {_fmt(h['refused_within_ms'])} ms\n" + h["note"]))
    p = f["pulls"]
    rows = [["GPU server ?wait=true (baseline)", _fmt(p["direct_s"], 3), "1.00x"],
            ["backend wait: true (polls every 0.25 s)", _fmt(p["backend_s"], 3), _ratio(p["ratio"])]]
    parts.append(table(f"Fleet: one waited pull, start to answer (s; transfer alone {p['ideal_s']:g} s)",
                       ["path", "median", "x baseline"], rows, p["note"]))
    return parts


def _ratio(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}x"


def _mib(kib) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def write_json(results: dict, path: Path) -> None:
    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(results), indent=2) + "\n")
