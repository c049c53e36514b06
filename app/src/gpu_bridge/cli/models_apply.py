"""``gpu-bridge models apply|rollback``: change the GPU hosts through a backend, one host at a time.

``apply [--update] [--canary N] [--yes]`` asks the backend for a fresh plan (``GET /config/plan``),
shows it, asks for confirmation (on a terminal; elsewhere only ``--yes`` goes ahead), then runs each
host's actions with ``model_exec`` over ``BackendModelOps`` (pull, delete, copy, load, each aimed at
that one host). Hosts go in batches (``reconcile.canary_batches``): the first ``--canary N`` hosts,
then the rest; the first failure stops everything, with what was done and what was not touched.

``rollback NAME [--host H] [--yes]`` copies the snapshot an update kept back over NAME (no pull) and
checks the digest, on the hosts given, else on every host holding a snapshot of NAME.

Exit codes: 0 done (or nothing to do), 1 a step failed or a host could not be planned, 2 nothing was
started (no confirmation, no declared state, the backend failed).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import model_exec, names, reconcile
from ..errors import GpuBridgeError
from .backend_ops import BackendModelOps
from .models_plan import INCOMPLETE, action_line, backend_of, print_plan, report, run, unreachable

if TYPE_CHECKING:
    from .options import SubParsers
    from .target import Context

DONE, FAILED = 0, 1


def register(msub: SubParsers) -> None:
    from .options import client_options

    m = msub.add_parser("apply", help="carry out the plan host by host (canary batch first, stop on a failure)")
    m.add_argument("--update", action="store_true", help="re-pull every declared model for a newer build (the "
                                                         "replaced build is kept as a snapshot)")
    m.add_argument("--canary", type=int, default=0, metavar="N",
                   help="apply to N hosts first, alone; the others only when they succeeded (default 0: one batch)")
    m.add_argument("--yes", action="store_true", help="apply without asking (required when not on a terminal)")
    client_options(m)
    m.set_defaults(handler=lambda args: run(args, _apply))
    m = msub.add_parser("rollback", help="put back the build a model had before its last update (no download)")
    m.add_argument("name")
    m.add_argument("--host", action="append", dest="hosts", help="only this GPU host (repeatable); default: every "
                                                                 "host that holds a snapshot of NAME")
    m.add_argument("--yes", action="store_true", help="roll back without asking (required when not on a terminal)")
    client_options(m)
    m.set_defaults(handler=lambda args: run(args, _rollback))


def fail(message: str) -> int:
    """A step failed after changes may have started: one error line, exit 1 (2 is for nothing started)."""
    print(f"gpu-bridge: error: {message}", file=sys.stderr)
    return FAILED


def confirm(ctx: Context, question: str) -> None:
    """Go ahead with --yes, or with 'y' from a person at a terminal; otherwise refuse (nothing started)."""
    if ctx.args.yes:
        return
    if not sys.stdin.isatty():
        raise GpuBridgeError(f"{question}: not on a terminal, so nothing was changed; pass --yes to go ahead "
                             "without asking", code="usage")
    answer = input(f"{question}? [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise GpuBridgeError("cancelled: nothing was changed", code="usage")


def _apply(ctx: Context) -> int:
    if ctx.args.canary < 0:
        raise GpuBridgeError(f"--canary must be 0 or more, not {ctx.args.canary}", code="usage")
    data = report(ctx, "/config/plan?refresh=true" + ("&update=true" if ctx.args.update else ""))
    actions = [reconcile.Action(host=a["host"], op=a["op"], model=a["model"], reason=a.get("reason", ""),
                                snapshot=a.get("snapshot"), keep_alive=a.get("keep_alive"))
               for a in data.get("plan") or []]
    down = unreachable(data)
    print_plan(data, ctx)
    if not actions:
        if down:
            return fail("nothing applied: " + "; ".join(f"{d['host']} is unreachable ({d['detail']})" for d in down))
        return DONE
    hosts = list(dict.fromkeys(a.host for a in actions))
    confirm(ctx, f"Apply {len(actions)} action(s) on {len(hosts)} GPU host(s)")
    batches = reconcile.canary_batches(hosts, ctx.args.canary)
    assert ctx.backend is not None  # report() checked it is a backend
    done: list[model_exec.Outcome] = []
    for number, batch in enumerate(batches, 1):
        kind = " (canary)" if ctx.args.canary and number == 1 and len(batches) > 1 else ""
        print(f"batch {number} of {len(batches)}{kind}: {', '.join(batch)}", file=ctx.out)
        for host in batch:
            ops = BackendModelOps(ctx.backend, host, say=progress(ctx, host))
            for action in (a for a in actions if a.host == host):
                print(f"{host}: {action_line(action.to_dict())}", file=ctx.out)
                try:
                    outcome = model_exec.execute(action, ops)
                except GpuBridgeError as exc:
                    untouched = [h for h in hosts if h not in {o.action.host for o in done} and h != host]
                    return fail(f"apply stopped: {action.op} {action.model} on {host} failed: {exc.message}; "
                                f"{len(done)} of {len(actions)} action(s) done" +
                                (f"; not touched: {', '.join(untouched)}" if untouched else ""))
                done.append(outcome)
                print(f"{host}:   {outcome.detail}" + (f" (digest {outcome.digest_after[:12]})"
                                                        if outcome.digest_after else ""), file=ctx.out)
    changed = sum(1 for o in done if o.changed)
    print(f"Applied: {changed} changed, {len(done) - changed} already as declared, on {len(hosts)} host(s); "
          f"{after(ctx)}.", file=ctx.out)
    if down:
        return fail("not applied on " + "; ".join(f"{d['host']}: unreachable ({d['detail']})" for d in down))
    return DONE


def progress(ctx: Context, host: str) -> Callable[[str], None]:
    """Where a long step (a pull) reports how far it got."""
    def say(line: str) -> None:
        print(f"{host}:   {line}", file=ctx.out)
    return say


def _rollback(ctx: Context) -> int:
    backend_of(ctx)
    assert ctx.backend is not None  # backend_of raised otherwise
    name = names.parse(ctx.args.name).display
    snapshot = reconcile.snapshot_name(name)
    listing = ctx.backend.call("GET", "/config/models?refresh=true")
    known = list((listing.get("hosts") or {}).keys())
    if ctx.args.hosts:
        hosts = [_label(h, known) for h in ctx.args.hosts]
    else:
        holders = [m for m in listing.get("models") or [] if names.same_model(str(m.get("name")), snapshot)]
        hosts = list(holders[0].get("hosts") or []) if holders else []
        if not hosts:
            raise GpuBridgeError(f"no GPU host holds a snapshot of {name} ({snapshot}): nothing to roll back to; "
                                 "`models apply --update` keeps one when an update changes the build")
    confirm(ctx, f"Roll {name} back to {snapshot} on {', '.join(hosts)}")
    outcomes: list[dict[str, object]] = []
    for host in hosts:
        try:
            outcome = model_exec.rollback(host, name, BackendModelOps(ctx.backend, host))
        except GpuBridgeError as exc:
            return fail(f"rollback of {name} on {host} failed: {exc.message}" +
                        (f" (done on {', '.join(str(o['host']) for o in outcomes)})" if outcomes else ""))
        outcomes.append(outcome.to_dict())
        if not ctx.json:
            print(f"{host}: {outcome.detail}", file=ctx.out)
    if ctx.json:
        ctx.dump({"model": name, "snapshot": snapshot, "results": outcomes})
    else:
        print(f"{after(ctx)}.", file=ctx.out)
    return DONE


def after(ctx: Context) -> str:
    """Have the backend observe the fleet again, so its drift report and metric show the change at
    once (not at its next scheduled check), and say what it sees."""
    try:
        data = report(ctx, "/config/drift?refresh=true")
    except GpuBridgeError as exc:
        return f"drift not checked: {exc.message}"
    drift = data.get("drift") or []
    return "drift now: none" if not drift else \
        f"drift now: {len(drift)} item(s) (`gpu-bridge models drift`)"


def _label(wanted: str, known: list[str]) -> str:
    """A --host value (label or bare name) as the backend's label."""
    matches = [lbl for lbl in known if wanted in (lbl, lbl.rsplit(":", 1)[0])]
    if len(matches) != 1:
        raise GpuBridgeError(f"unknown GPU host {wanted!r}: the backend's hosts are {', '.join(known)}", code="usage")
    return matches[0]


__all__ = ["INCOMPLETE", "register"]
