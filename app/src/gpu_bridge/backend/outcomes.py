"""How the backend's routes report a fan-out over GPU hosts and keep its trace: the answer when
every host failed, the audit entry, and database failures that must not fail the request."""

from __future__ import annotations

import logging
from typing import Any

from flask import Response, g, jsonify
from sqlalchemy.exc import SQLAlchemyError

from ..client.fleet import Outcome, error_summary, summarize
from ..logs import Fields
from .state import current_state

log = logging.getLogger("gpu_bridge.backend")

JsonDict = dict[str, Any]


def db_failed(what: str, exc: Exception) -> None:
    """Log a database failure the request survives (the cache, the audit log, a pull record)."""
    # The first line only: a driver's message can run to pages (the statement and its parameters).
    log.error(Fields(message=f"database error: {what}", event="database_error", what=what,
                     error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))


def host_error(label: str, result: JsonDict) -> str:
    """A host's error with its label once (transport messages already start with it)."""
    error = str(result.get("error"))
    return error if error.startswith(label) else f"{label}: {error}"


def all_failed(what: str, results: dict[str, JsonDict], summary: JsonDict,
               extra: JsonDict) -> tuple[Response, int]:
    """The answer when every host failed: that failure's status, every host's error in the message."""
    detail = "; ".join(host_error(lbl, results[lbl]) for lbl in summary["failed"])
    body = {"error": f"{what} failed on every GPU host: {detail}", "code": summary["code"],
            "hosts": summary["failed"], **extra}
    return jsonify(body), int(summary["status"])


def outcome(summary: JsonDict) -> str:
    return "partial" if summary["partial"] else ("ok" if summary["ok"] else "failed")


def audit(action: str, model: str | None, hosts: list[str], result: str, detail: JsonDict) -> None:
    """One audit entry; a database failure is logged, never the caller's error."""
    try:
        current_state().db.audit(action, model, hosts, result, detail, g.get("request_id"))
    except SQLAlchemyError as exc:
        db_failed("audit", exc)


def brief(results: dict[str, JsonDict]) -> dict[str, JsonDict]:
    """Per-host results as the audit log keeps them (no progress noise)."""
    out: dict[str, JsonDict] = {}
    for lbl, r in results.items():
        if r.get("ok"):
            job = r.get("job") or {}
            out[lbl] = {"ok": True, **({"job_id": job.get("id"), "state": job.get("state")} if job else {})}
        else:
            out[lbl] = {"ok": False, "code": r.get("code"), "error": r.get("error")}
    return out


def per_host(answers: dict[str, Outcome]) -> dict[str, JsonDict]:
    """A fan-out's answers as per-host results: ``{"ok": true, **answer}`` or the host's error."""
    return {lbl: ({"ok": True, **(value or {})} if ok else error_summary(value)) for lbl, (ok, value) in
            answers.items()}


def change_answer(what: str, action: str, model: str, labels: list[str], results: dict[str, JsonDict],
                  payload: JsonDict, audit_detail: JsonDict, *, status: int = 200) -> tuple[Response, int]:
    """The end of every route that changes something on GPU hosts: one audit entry, ``partial`` when
    some hosts failed, and the all-failed answer when every one did (``what`` names the change)."""
    summary = summarize(results)
    audit(action, model, labels, outcome(summary), {**audit_detail, "results": brief(results)})
    if summary["partial"]:
        payload["partial"] = True
    if not summary["ok"]:
        return all_failed(what, results, summary, payload)
    return jsonify(payload), status
