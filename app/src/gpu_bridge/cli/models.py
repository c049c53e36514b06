"""``gpu-bridge models list|pull|delete`` (``drift|plan|apply|rollback``: models_plan.py): through a backend
(every GPU host it knows, or ``--host``) or straight at one GPU server (``--url http://gpu-01:8001``).

A pull is followed until it ends: a live progress bar on a terminal, plain progress lines otherwise,
bounded by progress (no change for ``NO_PROGRESS_LIMIT``), not by a total deadline, since a large model
may take hours. ``--no-wait`` starts it and prints how to follow it with ``gpu-bridge jobs``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import quote

from .. import names
from ..errors import GpuBridgeError, GpuHostError
from . import models_loaded, models_plan
from .options import client_options
from .output import Progress, host_message, human_bytes, table, utc_time, warn

if TYPE_CHECKING:
    from .options import SubParsers
    from .target import Context, JsonDict

POLL_INTERVAL = 0.5          # seconds between progress polls
NO_PROGRESS_LIMIT = 900.0    # give up following a pull that shows no change for this long (GPU side stalls at 300 s)
POLL_ERROR_LIMIT = 60.0      # give up following when polling itself fails for this long
ACTIVE = ("queued", "running")
ABSENT = ("model_not_found",)  # a delete's per-host code for "was not there": nothing to do


def register(sub: SubParsers) -> None:
    p = sub.add_parser("models", help="list, pull or delete models; drift, plan, apply, rollback (models as code); "
                                         "ps, load, unload (GPU memory)")
    msub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    m = msub.add_parser("list", help="list installed models")
    client_options(m)
    m = msub.add_parser("pull", help="pull a model (live progress)")
    m.add_argument("name")
    m.add_argument("--host", action="append", dest="hosts", help="only this GPU host (repeatable; backend only)")
    m.add_argument("--no-wait", action="store_true", help="start the pull and return")
    client_options(m)
    m = msub.add_parser("delete", help="delete a model")
    m.add_argument("name")
    m.add_argument("--host", action="append", dest="hosts", help="only this GPU host (repeatable; backend only)")
    client_options(m)
    # drift, plan, apply, rollback (models as code): their own handlers and exit codes
    models_plan.register(msub)
    models_loaded.register(msub)  # ps, load, unload: GPU memory
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: the target pulls in requests (~0.1 s), which `gpu-bridge --help` need not pay.
    from .target import Context

    with Context(args) as ctx:
        action: Callable[[Context], int] = {"list": _list, "pull": _pull, "delete": _delete}[args.action]
        return action(ctx)


def _list(ctx: Context) -> int:
    if ctx.gpu is not None:
        models = ctx.gpu.list_models()
        if ctx.json:
            ctx.dump({"models": models})
            return 0
        rows = [[m.get("name", "?"), human_bytes(m.get("size")), utc_time(m.get("modified_at"))] for m in models]
        table(rows, ["NAME", "SIZE", "MODIFIED (UTC)"], ctx.out)
        return 0
    assert ctx.backend is not None  # a backend URL: Context set backend (gpu is None)
    data = ctx.backend.call("GET", "/config/models")
    if ctx.json:
        ctx.dump(data)
        return 0
    for label, st in (data.get("hosts") or {}).items():
        if not st.get("ok"):
            warn(host_message(label, st.get("error")))
    if data.get("stale"):
        warn(f"no GPU host answered: showing the cached list from {utc_time(data.get('fetched_at'))} UTC")
    rows = [[m.get("name", "?") + (" (snapshot)" if m.get("snapshot") else ""), human_bytes(m.get("size")),
             utc_time(m.get("modified_at")), *_digest_cells(m)] for m in data.get("models") or []]
    table(rows, ["NAME", "SIZE", "MODIFIED (UTC)", "DIGEST", "HOSTS"], ctx.out)
    return 0


def _digest_cells(model: JsonDict) -> list[str]:
    """DIGEST and HOSTS: one short digest when every host holds the same build; when they differ,
    ``DIVERGED`` and each host's own short digest, so two builds of one tag never look alike."""
    hosts = model.get("hosts") or []
    digests = model.get("digests") or {}
    if model.get("diverged"):
        return ["DIVERGED", ", ".join(f"{h}={str(digests.get(h) or '?')[:12]}" for h in hosts)]
    return [str(model.get("digest") or "?")[:12], ", ".join(hosts)]


def _no_hosts_on_a_gpu_server(ctx: Context) -> None:
    if ctx.args.hosts:
        raise GpuBridgeError("--host only works through a backend (this URL is a GPU server)", code="usage")


def _delete(ctx: Context) -> int:
    """Idempotent for the operator: exit 0 when the model is gone from every chosen host afterwards (hosts
    that already lacked it are named); exit 1 when a host failed, or when no host had it (a misspelt name)."""
    name = names.parse(ctx.args.name).display
    if ctx.gpu is not None:
        _no_hosts_on_a_gpu_server(ctx)
        label = ctx.gpu.host.label
        try:
            result = {"ok": True, **ctx.gpu.delete_model(name)}
        except GpuBridgeError as exc:
            if exc.code not in ABSENT:
                raise
            result = {"ok": False, "error": exc.message, "code": exc.code, "status": exc.status}
        return _delete_outcome(ctx, name, {"model": name, "results": {label: result}})
    assert ctx.backend is not None  # a backend URL: Context set backend (gpu is None)
    body: JsonDict = {"model": name}
    if ctx.args.hosts:
        body["hosts"] = ctx.args.hosts
    data: JsonDict | None  # a dict on both paths: the except branch re-raises anything else
    try:
        data = ctx.backend.call("POST", "/config/delete-model", body)
    except GpuBridgeError as exc:
        # Every host failed; the answer still says how each one did.
        data = exc.extra.get("body")
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or not data["results"]:
            raise
    return _delete_outcome(ctx, name, data)


def _delete_outcome(ctx: Context, name: str, data: JsonDict) -> int:
    results = data.get("results") or {}
    deleted = [lbl for lbl, r in results.items() if r.get("ok")]
    absent = [lbl for lbl, r in results.items() if not r.get("ok") and r.get("code") in ABSENT]
    failed = {lbl: r for lbl, r in results.items() if not r.get("ok") and r.get("code") not in ABSENT}
    if ctx.json:
        ctx.dump(data)
    else:
        if deleted:
            print(f"deleted {name} on {', '.join(deleted)}", file=ctx.out)
        if absent and (deleted or failed):
            print(f"{name} was already absent on {', '.join(absent)}", file=ctx.out)
    if failed:
        raise GpuBridgeError(f"deleting {name} failed on " + "; ".join(host_message(lbl, r.get("error"))
                                                                      for lbl, r in failed.items()))
    if not deleted:
        raise GpuBridgeError(f"deleting {name} failed: it is not installed on {', '.join(absent)}: check the name "
                             "with `gpu-bridge models list`", code="model_not_found", status=404)
    return 0


def _pull(ctx: Context) -> int:
    name = names.parse(ctx.args.name).display
    if ctx.gpu is not None:
        _no_hosts_on_a_gpu_server(ctx)
        return _pull_on_gpu_server(ctx, name)
    return _pull_through_backend(ctx, name)


def _pull_on_gpu_server(ctx: Context, name: str) -> int:
    gpu = ctx.gpu
    assert gpu is not None  # the caller checked
    job = gpu.start_pull(name)
    if ctx.args.no_wait:
        if ctx.json:
            ctx.dump(job)
        else:
            print(f"started pull of {name} on {gpu.host.label}: job {job.get('id')} "
                  f"(follow it with `gpu-bridge jobs {job.get('id')} --url {ctx.url}`)", file=ctx.out)
        return 0
    job_id = job.get("id")
    if not isinstance(job_id, str) or not job_id:
        raise GpuBridgeError(f"{gpu.host.label} started the pull of {name} but answered no job id to follow: is "
                             f"{ctx.url} a gpu-bridge GPU server? (check --url)", status=502)

    def poll() -> JsonDict:
        j = gpu.get_job(job_id)
        state = j.get("state")
        failed = state not in ACTIVE and state != "succeeded"
        return {"state": state, "completed": j.get("completed"), "total": j.get("total"),
                "status": j.get("status"), "raw": j, "done": state not in ACTIVE,
                "failures": {gpu.host.label: j.get("error") or state} if failed else {}}

    final = _follow(ctx, name, poll, ref=f"{job_id} --url {ctx.url}")
    return _pull_outcome(ctx, name, final, [gpu.host.label])


def _pull_through_backend(ctx: Context, name: str) -> int:
    backend = ctx.backend
    assert backend is not None  # a backend URL: Context set backend (gpu is None)
    body: JsonDict = {"model": name, "wait": False}
    if ctx.args.hosts:
        body["hosts"] = ctx.args.hosts
    started = backend.call("POST", "/config/pull-model", body)
    pull_id = started.get("id")
    for label, r in (started.get("results") or {}).items():
        if not r.get("ok") and not ctx.json:
            warn(host_message(label, r.get("error")))
    if ctx.args.no_wait or not pull_id:
        if ctx.json:
            ctx.dump(started)
        else:
            hosts = [lbl for lbl, r in (started.get("results") or {}).items() if r.get("ok")]
            print(f"started pull {pull_id} of {name} on {', '.join(hosts)} (follow it with `gpu-bridge jobs "
                  f"{pull_id}`)", file=ctx.out)
        return 0

    def poll() -> JsonDict:
        s = backend.call("GET", f"/config/pull-status/{quote(pull_id, safe='')}")
        statuses = []
        failures = {}
        for label, r in (s.get("results") or {}).items():
            job = r.get("job") or {}
            if job.get("state") in ACTIVE and job.get("status"):
                statuses.append(job["status"])
            if job.get("state") in ("failed", "cancelled") or (not r.get("ok") and not job):
                failures[label] = job.get("error") or r.get("error") or job.get("state")
        status = statuses[0] if statuses else s.get("state")
        return {"state": s.get("state"), "completed": s.get("completed"), "total": s.get("total"),
                "status": status, "raw": s, "done": bool(s.get("done")), "failures": failures}

    pulling = sum(1 for r in (started.get("results") or {}).values() if r.get("ok"))
    final = _follow(ctx, name, poll, ref=pull_id, hosts=pulling)
    return _pull_outcome(ctx, name, final, list((final["raw"].get("results") or {}).keys()))


def _follow(ctx: Context, name: str, poll: Callable[[], JsonDict], *, ref: str, hosts: int = 1) -> JsonDict:
    """Poll until done; bounded by progress (no change for NO_PROGRESS_LIMIT), not by a total deadline."""
    progress = None if ctx.json else Progress(f"pulling {name}", ctx.out, hosts=hosts)
    last_change = time.monotonic()
    last_key = None
    first_error_at: float | None = None
    try:
        while True:
            try:
                p = poll()
                first_error_at = None
            except (GpuHostError, GpuBridgeError) as exc:
                if getattr(exc, "status", 500) < 500 and exc.code not in ("unreachable", "timeout"):
                    raise
                now = time.monotonic()
                first_error_at = first_error_at or now
                if now - first_error_at > POLL_ERROR_LIMIT:
                    raise GpuBridgeError(f"lost track of the pull for {POLL_ERROR_LIMIT:.0f} s ({exc.message}); it "
                                         f"may still run: check it with `gpu-bridge jobs {ref}`") from None
                time.sleep(POLL_INTERVAL)
                continue
            if progress is not None:
                progress.update(p["completed"], p["total"], p["status"])
            if p["done"]:
                if progress is not None:
                    progress.finish()
                return p
            key = (p["state"], p["completed"], p["status"])
            if key != last_key:
                last_key, last_change = key, time.monotonic()
            elif time.monotonic() - last_change > NO_PROGRESS_LIMIT:
                raise GpuBridgeError(f"no progress for {NO_PROGRESS_LIMIT:.0f} s; the pull may still run: check it "
                                     f"with `gpu-bridge jobs {ref}`")
            time.sleep(POLL_INTERVAL)
    except BaseException:
        if progress is not None and progress.tty:
            progress.finish()
        raise


def _pull_outcome(ctx: Context, name: str, final: JsonDict, hosts: list[str]) -> int:
    if ctx.json:
        ctx.dump(final["raw"])
    failures = final.get("failures") or {}
    if final.get("state") == "succeeded" and not failures:
        if not ctx.json:
            print(f"pulled {name} on {', '.join(hosts)}", file=ctx.out)
        return 0
    if not failures:
        failures = {", ".join(hosts): final.get("state")}
    raise GpuBridgeError(f"pull of {name} failed on " + "; ".join(host_message(h, e) for h, e in failures.items()))
