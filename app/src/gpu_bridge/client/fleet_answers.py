"""What the fleet's per-host answers look like once merged: the merged model listing (per-host
digests, divergence, snapshots), the summary of a fan-out, a failure as a per-host result and its
``reason``. Pure functions over plain JSON: ``fleet.py`` (which re-exports them) and the backend's
routes use them.
"""

from __future__ import annotations

from datetime import UTC, datetime

from ..errors import CircuitOpen, GpuBridgeError, GpuHostTimeout, GpuHostUnauthorized, GpuHostUnreachable
from ..reconcile import is_snapshot
from .base import JsonDict


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def failure_reason(exc: GpuBridgeError) -> str:
    """What an operator should read first about a host's failure."""
    if isinstance(exc, CircuitOpen):
        return "circuit_open"
    if isinstance(exc, GpuHostUnauthorized):
        return "unauthorized"
    if isinstance(exc, GpuHostTimeout):
        return "timeout"
    if isinstance(exc, GpuHostUnreachable):
        return "unreachable"
    return "error"


def error_summary(exc: GpuBridgeError) -> JsonDict:
    """A failure as a per-host result: ``{"ok": false, "error", "code", "status", "reason"}`` (+ ``job``)."""
    out: JsonDict = {"ok": False, "error": exc.message, "code": exc.code, "status": exc.status,
           "reason": failure_reason(exc)}
    if "job" in exc.extra:
        out["job"] = exc.extra["job"]
    return out


def degraded_reason(doc: JsonDict) -> str:
    """Why a GPU host's ``/api/health`` says ``degraded``, in words (no Ollama, no GPU visible)."""
    reasons = []
    ollama, gpu = doc.get("ollama") or {}, doc.get("gpu") or {}
    if ollama.get("reachable") is False:
        reasons.append("Ollama not reachable" + (f" ({ollama['error']})" if ollama.get("error") else ""))
    if gpu.get("available") is False:
        reasons.append("no GPU visible" + (f" ({gpu['error']})" if gpu.get("error") else ""))
    return "; ".join(reasons) or f"the host reports {doc.get('status')!r}"


def merge_models(per_host: dict[str, list[JsonDict]]) -> list[JsonDict]:
    """One entry per model name (first host's fields), with ``hosts``: the labels that have it;
    ``digests``: each of those hosts' digest, since two hosts may hold different builds of one tag;
    ``diverged``: true when those digests differ (``digest_differs``, the earlier name of the same
    flag, is still set then for callers that read it); ``snapshot``: a name models as code keeps
    for rollback (``reconcile.is_snapshot``: a tag ending ``-gpubridge-prev`` or ``-gpubridge-next``)."""
    merged: dict[str, JsonDict] = {}
    for label, models in per_host.items():
        for m in models:
            if not isinstance(m, dict) or not isinstance(m.get("name"), str):
                continue
            key = m["name"].lower()
            entry = merged.get(key)
            if entry is None:
                entry = {"name": m["name"], "size": m.get("size"), "digest": m.get("digest"),
                         "modified_at": m.get("modified_at"), "details": m.get("details"), "hosts": [],
                         "digests": {}, "diverged": False, "snapshot": is_snapshot(m["name"])}
                merged[key] = entry
            if label not in entry["hosts"]:
                entry["hosts"].append(label)
                entry["digests"][label] = m.get("digest")
    for entry in merged.values():
        if len({d for d in entry["digests"].values() if d}) > 1:
            entry["diverged"] = entry["digest_differs"] = True  # same name, different build on some host
    return list(merged.values())


def summarize(results: dict[str, JsonDict]) -> JsonDict:
    """Outcome of a per-host fan-out: ok/failed host lists, ``partial``, and the status to answer with
    when every host failed (their common status, else 502)."""
    ok = [lbl for lbl, r in results.items() if r.get("ok")]
    failed = [lbl for lbl, r in results.items() if not r.get("ok")]
    statuses = {results[lbl].get("status", 502) for lbl in failed}
    codes = {results[lbl].get("code") for lbl in failed}
    return {"ok": ok, "failed": failed, "partial": bool(ok and failed),
            "status": statuses.pop() if len(statuses) == 1 else 502,
            "code": codes.pop() if len(codes) == 1 else "gpu_hosts_failed"}


__all__ = ["degraded_reason", "error_summary", "failure_reason", "merge_models", "summarize", "utc_now_iso"]
