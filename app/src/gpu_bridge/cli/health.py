"""``gpu-bridge health``: the backend with its database and every GPU host (state, latency, breaker), or
one GPU server with Ollama, its GPUs and its pulls. Exit 0 only when the status is ``ok``, so scripts and
monitoring can use the exit status alone."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .options import client_options
from .output import human_bytes, once, table

if TYPE_CHECKING:
    from .options import SubParsers
    from .target import Context, JsonDict


def register(sub: SubParsers) -> None:
    p = sub.add_parser("health", help="show health of the backend and GPU hosts, or of one GPU host")
    client_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: the target pulls in requests (~0.1 s), which `gpu-bridge --help` need not pay.
    from .target import Context

    with Context(args) as ctx:
        doc = _gpu_server(ctx) if ctx.gpu is not None else _backend(ctx)
        return 0 if doc.get("status") == "ok" else 1


def _gpu_server(ctx: Context) -> JsonDict:
    assert ctx.gpu is not None  # the caller checked
    doc = ctx.gpu.health()
    if ctx.json:
        ctx.dump(doc)
        return doc
    ollama = doc.get("ollama") or {}
    gpu = doc.get("gpu") or {}
    pulls = doc.get("pulls") or {}
    print(f"GPU server {ctx.url}: {doc.get('status')} (version {doc.get('version')})", file=ctx.out)
    print(f"  ollama: {'reachable' if ollama.get('reachable') else 'UNREACHABLE'}"
          + (f", version {ollama.get('version')}" if ollama.get("version") else "")
          + (f", {ollama.get('latency_ms')} ms" if ollama.get("latency_ms") is not None else "")
          + (f" ({ollama.get('error')})" if ollama.get("error") else ""), file=ctx.out)
    if gpu.get("available"):
        for d in gpu.get("devices") or []:
            print(f"  gpu {d.get('index')}: {d.get('name')}, {human_bytes(d.get('memory_used_bytes'))} of "
                  f"{human_bytes(d.get('memory_total_bytes'))} used, {d.get('utilization_percent')}% busy",
                  file=ctx.out)
    else:
        print(f"  gpu: not available ({gpu.get('error') or 'no devices'})", file=ctx.out)
    print(f"  pulls: {pulls.get('running', 0)} running, {pulls.get('queued', 0)} queued", file=ctx.out)
    return doc


def _backend(ctx: Context) -> JsonDict:
    assert ctx.backend is not None  # a backend URL: Context set backend (gpu is None)
    doc = ctx.backend.call("GET", "/health")
    if ctx.json:
        ctx.dump(doc)
        return doc
    db = doc.get("db") or {}
    print(f"backend {ctx.url}: {doc.get('status')} (version {doc.get('version')}, transport "
          f"{doc.get('transport')})", file=ctx.out)
    print(f"  database: {'ok' if db.get('ok') else 'FAILING'} ({db.get('dialect')}"
          + (f", schema v{db.get('schema_version')}" if db.get("schema_version") else "")
          + (f": {db.get('error')}" if db.get("error") else "") + ")", file=ctx.out)
    rows = []
    for label, h in (doc.get("gpu_hosts") or {}).items():
        breaker = h.get("breaker") or {}
        lat = h.get("latency_ms")
        retry = breaker.get("retry_in_s")
        trial = f" (trial in {retry:g} s)" if breaker.get("state") == "open" and isinstance(retry, int | float) else ""
        rows.append([label, _host_state(h), f"{lat:.0f} ms" if lat is not None else "-",
                     f"breaker {breaker.get('state', '?')}{trial}",
                     once(str(h.get("error") or h.get("reason") or ""))])
    table(rows, ["GPU HOST", "STATE", "LATENCY", "BREAKER", "ERROR / REASON"], ctx.out)
    return doc


def _host_state(h: JsonDict) -> str:
    """A GPU host's state as the backend's JSON says it: FAILING (not usable), else the host's own status
    (``ok``, or ``degraded`` with a ``reason``, e.g. no GPU visible: models still work)."""
    if not h.get("ok"):
        return "FAILING"
    return str(h.get("status") or "ok")
