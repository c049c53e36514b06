"""``gpu-bridge models ps|load|unload``: what is in GPU memory, through a backend (every GPU host it knows,
or ``--host``) or straight at one GPU server (``--url http://gpu-01:8001``), like the other model commands.

``load`` waits until the model is resident (a large model takes minutes); ``--no-wait`` starts the load
job and prints how to follow it. ``--keep-alive`` takes a duration (``30m``, ``1h30m``), seconds, or
``forever``; absent, Ollama's default applies (5 minutes unless ``OLLAMA_KEEP_ALIVE`` says otherwise).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import keep_alive, names
from ..errors import GpuBridgeError
from .options import client_options
from .output import host_message, human_bytes, table, utc_time, warn

if TYPE_CHECKING:
    from .options import SubParsers
    from .target import Context, JsonDict

# A load through a backend is one request that answers when every host has loaded: wait at least
# this long for it (the hosts give a load GPU_BRIDGE_PULL_STALL_TIMEOUT, 300 s by default).
LOAD_REQUEST_TIMEOUT = 900.0
_SECONDS = re.compile(r"-?\d+(?:\.\d+)?")
_FOREVER_AFTER_YEAR = 2200  # Ollama's "forever" expires about 292 years ahead


def register(msub: SubParsers) -> None:
    """The three actions, added to ``gpu-bridge models``' sub-parsers (cli/models.py)."""
    m = msub.add_parser("ps", help="list the models loaded in GPU memory")
    client_options(m)
    m.set_defaults(handler=run)
    m = msub.add_parser("load", help="load an installed model into GPU memory")
    m.add_argument("name")
    m.add_argument("--keep-alive", metavar="DURATION",
                   help="how long it stays loaded after its last use: 30m, 1h30m, seconds, or forever "
                        "(default: Ollama's, 5m)")
    m.add_argument("--host", action="append", dest="hosts", help="only this GPU host (repeatable; backend only)")
    m.add_argument("--no-wait", action="store_true", help="start the load and return")
    client_options(m)
    m.set_defaults(handler=run)
    m = msub.add_parser("unload", help="unload a model from GPU memory now")
    m.add_argument("name")
    m.add_argument("--host", action="append", dest="hosts", help="only this GPU host (repeatable; backend only)")
    client_options(m)
    m.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from .target import Context  # requests and the transports only for a command that runs

    with Context(args) as ctx:
        action: Callable[[Context], int] = {"ps": _ps, "load": _load, "unload": _unload}[args.action]
        return action(ctx)


# --- ps ---------------------------------------------------------------------------------------------
def _expires(value: object) -> str:
    shown = utc_time(value)
    return "forever" if shown[:4].isdigit() and int(shown[:4]) >= _FOREVER_AFTER_YEAR else shown


def _row(m: JsonDict) -> list[str]:
    size, vram = m.get("size") or 0, m.get("size_vram") or 0
    spill = f"{100 * (size - vram) / size:.0f}% CPU" if m.get("cpu_spill") and size else "-"
    context = m.get("context_length")
    return [str(m.get("name", "?")), human_bytes(size), human_bytes(vram), spill,
            str(context) if context is not None else "?", _expires(m.get("expires_at"))]


_HEADERS = ["NAME", "SIZE", "VRAM", "SPILL", "CONTEXT", "EXPIRES (UTC)"]


def _ps(ctx: Context) -> int:
    if ctx.gpu is not None:
        models = ctx.gpu.loaded_models()
        if ctx.json:
            ctx.dump({"models": models})
        else:
            table([_row(m) for m in models], _HEADERS, ctx.out)
        return 0
    assert ctx.backend is not None  # a backend URL: Context set backend (gpu is None)
    data = ctx.backend.call("GET", "/config/loaded")
    if ctx.json:
        ctx.dump(data)
        return 0
    for label, st in (data.get("hosts") or {}).items():
        if not st.get("ok"):
            seen = f" (showing its last answer, {st.get('age_s')} s old)" if st.get("stale") else ""
            warn(host_message(label, st.get("error")) + seen)
    rows = [[str(m.get("host", "?")), *_row(m)] for m in data.get("models") or []]
    table(rows, ["HOST", *_HEADERS], ctx.out)
    return 0


# --- load ---------------------------------------------------------------------------------------------
def _keep_alive(raw: str | None) -> float | int | None:
    """``--keep-alive``: a number on the command line means seconds; checked before anything is sent."""
    value: object = raw
    if raw is not None and _SECONDS.fullmatch(raw.strip()):
        value = float(raw)
    try:
        return keep_alive.parse(value)
    except GpuBridgeError as exc:
        raise GpuBridgeError(exc.message.replace("keep_alive", "--keep-alive", 1), code="usage") from None


def _no_hosts_on_a_gpu_server(ctx: Context) -> None:
    if ctx.args.hosts:
        raise GpuBridgeError("--host only works through a backend (this URL is a GPU server)", code="usage")


def _load(ctx: Context) -> int:
    name = names.parse(ctx.args.name).display
    seconds = _keep_alive(ctx.args.keep_alive)
    wait = not ctx.args.no_wait
    kept = f" (keep_alive {keep_alive.describe(seconds)})" if seconds is not None else ""
    if ctx.gpu is not None:
        _no_hosts_on_a_gpu_server(ctx)
        job = ctx.gpu.load_model(name, seconds, wait=wait)
        if ctx.json:
            ctx.dump(job)
        elif wait:
            print(f"loaded {name} on {ctx.gpu.host.label}{kept}", file=ctx.out)
        else:
            print(f"started loading {name} on {ctx.gpu.host.label}: job {job.get('id')} (follow it with "
                  f"`gpu-bridge jobs {job.get('id')} --url {ctx.url}`)", file=ctx.out)
        return 0
    backend = ctx.backend
    assert backend is not None  # a backend URL: Context set backend (gpu is None)
    body: JsonDict = {"model": name, "wait": wait}
    if seconds is not None:
        body["keep_alive"] = seconds
    if ctx.args.hosts:
        body["hosts"] = ctx.args.hosts
    if wait:
        backend.timeout = max(backend.timeout, LOAD_REQUEST_TIMEOUT)
    data = backend.call("POST", "/config/load-model", body)
    verb = "loaded" if wait else "started loading"
    return _outcome(ctx, data, f"{verb} {name}", kept, f"loading {name}")


def _unload(ctx: Context) -> int:
    name = names.parse(ctx.args.name).display
    if ctx.gpu is not None:
        _no_hosts_on_a_gpu_server(ctx)
        result = ctx.gpu.unload_model(name)
        if ctx.json:
            ctx.dump(result)
        else:
            print(f"unloaded {name} on {ctx.gpu.host.label}", file=ctx.out)
        return 0
    assert ctx.backend is not None  # a backend URL: Context set backend (gpu is None)
    body: JsonDict = {"model": name}
    if ctx.args.hosts:
        body["hosts"] = ctx.args.hosts
    data = ctx.backend.call("POST", "/config/unload-model", body)
    return _outcome(ctx, data, f"unloaded {name}", "", f"unloading {name}")


def _outcome(ctx: Context, data: JsonDict, done: str, suffix: str, what: str) -> int:
    """Print which hosts did it; exit 1 naming each host that failed (every host failing is already
    the backend's error answer, raised by ``BackendClient.call``)."""
    results = data.get("results") or {}
    ok = [label for label, r in results.items() if r.get("ok")]
    failed = {label: r for label, r in results.items() if not r.get("ok")}
    if ctx.json:
        ctx.dump(data)
    elif ok:
        print(f"{done} on {', '.join(ok)}{suffix}", file=ctx.out)
    if failed:
        raise GpuBridgeError(f"{what} failed on " + "; ".join(host_message(label, r.get("error"))
                                                             for label, r in failed.items()))
    return 0


__all__ = ["register", "run"]
