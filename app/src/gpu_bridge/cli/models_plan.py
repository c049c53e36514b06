"""``gpu-bridge models drift|plan``: the fleet against its declared models (models as code), read from a
backend (``GET /config/drift``, ``GET /config/plan``), which holds the declaration the roles wrote.

Exit codes, the same for both (usable from monitoring and CI):

- 0: every GPU host is in its declared state (drift: none; plan: nothing to do);
- 1: drift exists (drift), or actions are planned (plan);
- 2: the answer is incomplete or missing: a GPU host could not be read (``unreachable``), or the
  backend failed (no declared state, backend down, a GPU server URL instead of a backend).

``apply`` and ``rollback`` (models_apply.py) carry plans out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import GpuBridgeError
from .options import client_options
from .output import table, utc_time

if TYPE_CHECKING:
    from .options import SubParsers
    from .target import Context, JsonDict

IN_SYNC, CHANGES, INCOMPLETE = 0, 1, 2
# How each operation reads in a plan, as in `terraform plan`.
SYMBOLS = {"pull": "+", "delete": "-", "update": "~", "load": ">"}
VERBS = {"pull": "to pull", "delete": "to delete", "update": "to update", "load": "to load"}


def register(msub: SubParsers) -> None:
    """The sub-commands of ``gpu-bridge models`` for models as code (backend only)."""
    from . import models_apply

    m = msub.add_parser("drift", help="how the GPU hosts differ from their declared models (exit 0 in sync, "
                                      "1 drift, 2 error)")
    m.add_argument("--refresh", action="store_true", help="have the backend observe the hosts now")
    client_options(m)
    m.set_defaults(handler=lambda args: run(args, _drift))
    m = msub.add_parser("plan", help="what `models apply` would change, host by host (exit 0 nothing, 1 changes, "
                                     "2 error)")
    m.add_argument("--update", action="store_true", help="re-pull every declared model for a newer build")
    client_options(m)
    m.set_defaults(handler=lambda args: run(args, _plan))
    models_apply.register(msub)


def run(args: argparse.Namespace, command: Callable[[Context], int]) -> int:
    """A models-as-code command: its own exit codes, so errors are 2 (``INCOMPLETE``), not main's 1."""
    from .target import Context

    try:
        with Context(args) as ctx:
            return command(ctx)
    except GpuBridgeError as exc:
        print(f"gpu-bridge: error: {exc.message}", file=sys.stderr)
        return INCOMPLETE


def backend_of(ctx: Context) -> None:
    if ctx.backend is None:
        raise GpuBridgeError(f"{ctx.url} is a GPU server: models drift, plan, apply and rollback work through a "
                             "backend, which holds the declared models (drop --url, or point it at the backend)",
                             code="usage")


def report(ctx: Context, path: str) -> JsonDict:
    backend_of(ctx)
    assert ctx.backend is not None  # backend_of raised otherwise
    return ctx.backend.call("GET", path)


def unreachable(data: JsonDict) -> list[JsonDict]:
    return [d for d in data.get("drift") or [] if d.get("kind") == "unreachable"]


def observed_line(data: JsonDict) -> str:
    return f"observed {utc_time(data.get('checked_at'))} UTC ({data.get('age_s')} s ago)"


def _drift(ctx: Context) -> int:
    data = report(ctx, "/config/drift" + ("?refresh=true" if ctx.args.refresh else ""))
    drift = data.get("drift") or []
    if ctx.json:
        ctx.dump(data)
    elif not drift:
        print(f"in sync: every GPU host holds its declared models ({observed_line(data)})", file=ctx.out)
    else:
        table([[d.get("host", "?"), d.get("model", "?"), d.get("kind", "?"), d.get("detail", "")] for d in drift],
              ["HOST", "MODEL", "KIND", "DETAIL"], ctx.out)
        print(f"{len(drift)} drift item(s); {observed_line(data)}; `gpu-bridge models plan` shows the fix",
              file=ctx.out)
    if unreachable(data):
        return INCOMPLETE
    return CHANGES if drift else IN_SYNC


def _plan(ctx: Context) -> int:
    data = report(ctx, "/config/plan?refresh=true" + ("&update=true" if ctx.args.update else ""))
    if ctx.json:
        ctx.dump(data)
    else:
        print_plan(data, ctx)
    if unreachable(data):
        return INCOMPLETE
    return CHANGES if data.get("plan") else IN_SYNC


def action_line(action: JsonDict) -> str:
    op = str(action.get("op"))
    reason = str(action.get("reason") or "")
    if action.get("snapshot"):
        reason += f"; the current build is kept as {action['snapshot']}"
    if action.get("keep_alive") is not None:
        reason += f"; keep_alive {action['keep_alive']}"
    return f"{SYMBOLS.get(op, '?')} {op:<6} {action.get('model')}  ({reason})"


def print_plan(data: JsonDict, ctx: Context) -> None:
    """Host by host, like `terraform plan`, then one summary line."""
    actions = data.get("plan") or []
    hosts = data.get("hosts") or {}
    down = {d.get("host"): d.get("detail") for d in unreachable(data)}
    for label, info in hosts.items():
        if not info.get("declared"):
            continue
        mine = [a for a in actions if a.get("host") == label]
        group = f" (group {info.get('group')})"
        if label in down:
            print(f"{label}{group}: not planned, unreachable: {down[label]}", file=ctx.out)
        elif not mine:
            print(f"{label}{group}: in the declared state", file=ctx.out)
        else:
            print(f"{label}{group}:", file=ctx.out)
            for action in mine:
                print(f"  {action_line(action)}", file=ctx.out)
    counts = data.get("counts") or {}
    summary = ", ".join(f"{counts.get(op, 0)} {verb}" for op, verb in VERBS.items())
    tail = f"; {len(down)} host(s) unreachable" if down else ""
    print(f"Plan: {summary}{tail}. ({observed_line(data)})", file=ctx.out)


__all__ = ["CHANGES", "INCOMPLETE", "IN_SYNC", "action_line", "print_plan", "register", "run"]
