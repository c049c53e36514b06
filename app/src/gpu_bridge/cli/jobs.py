"""``gpu-bridge jobs [ID] [--cancel]``: pull jobs. Through a backend a job is a pull over several hosts
(one GPU job each); straight at a GPU server it is that server's job."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING
from urllib.parse import quote

from ..errors import GpuBridgeError
from .options import client_options
from .output import once, table, utc_time

if TYPE_CHECKING:
    from .options import SubParsers
    from .target import Context, JsonDict

GPU_JOB_HEADERS = ["ID", "STATE", "PERCENT", "MODEL", "STATUS"]


def register(sub: SubParsers) -> None:
    p = sub.add_parser("jobs", help="list pull jobs, or show one")
    p.add_argument("id", nargs="?")
    p.add_argument("--cancel", action="store_true", help="cancel the job ID")
    client_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.cancel and not args.id:
        print("gpu-bridge: error: jobs --cancel needs a job id (gpu-bridge jobs ID --cancel)", file=sys.stderr)
        return 2
    # Imported here: the target pulls in requests (~0.1 s), which `gpu-bridge --help` need not pay.
    from .target import Context

    with Context(args) as ctx:
        return _on_gpu_server(ctx) if ctx.gpu is not None else _through_backend(ctx)


def _percent(value: object) -> str:
    return f"{value:.1f}%" if isinstance(value, int | float) else "-"


def _job_row(job: JsonDict) -> list[str]:
    return [str(job.get("id", "")), str(job.get("state", "")), _percent(job.get("percent")),
            str(job.get("model", "")), str(job.get("status") or job.get("error") or "")]


def _on_gpu_server(ctx: Context) -> int:
    a, gpu = ctx.args, ctx.gpu
    assert gpu is not None  # the caller checked
    if a.id:
        try:
            job = gpu.cancel_job(a.id) if a.cancel else gpu.get_job(a.id)
        except GpuBridgeError as exc:
            if exc.code != "job_not_found":
                raise
            raise GpuBridgeError(f"{exc.message}: see `gpu-bridge jobs --url {ctx.url}` for the jobs it knows",
                                 code=exc.code, status=exc.status) from None
        if ctx.json:
            ctx.dump(job)
        else:
            table([_job_row(job)], GPU_JOB_HEADERS, ctx.out)
        return 0
    jobs = gpu.list_jobs()
    if ctx.json:
        ctx.dump({"jobs": jobs})
    else:
        table([_job_row(j) for j in jobs], GPU_JOB_HEADERS, ctx.out)
    return 0


def _through_backend(ctx: Context) -> int:
    a, backend = ctx.args, ctx.backend
    assert backend is not None  # a backend URL: Context set backend (gpu is None)
    if a.id:
        if a.cancel:
            data = backend.call("POST", "/config/cancel-pull", {"id": a.id})
        else:
            data = backend.call("GET", f"/config/pull-status/{quote(a.id, safe='')}")
        if ctx.json:
            ctx.dump(data)
            return 0
        pct = data.get("percent")
        print(f"pull {data.get('id')} of {data.get('model')}: {data.get('state')}"
              + (f" {pct:.1f}%" if isinstance(pct, int | float) else ""), file=ctx.out)
        rows = []
        for label, r in (data.get("results") or {}).items():
            job = r.get("job") or {}
            state = job.get("state") or ("error" if not r.get("ok") else "")
            rows.append([label, str(job.get("id") or "-"), str(state), _percent(job.get("percent")),
                         once(str(r.get("error") or job.get("error") or job.get("status") or ""))])
        table(rows, ["HOST", "JOB", "STATE", "PERCENT", "STATUS"], ctx.out)
        return 0
    data = backend.call("GET", "/config/pulls")
    if ctx.json:
        ctx.dump(data)
        return 0
    table([[p["id"], p["state"], p["model"], utc_time(p.get("created_at")), ", ".join(p.get("hosts") or [])]
           for p in data.get("pulls") or []], ["ID", "STATE", "MODEL", "CREATED (UTC)", "HOSTS"], ctx.out)
    return 0
