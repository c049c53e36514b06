"""Client sub-commands of ``gpu-bridge``: ``models list|pull|delete``, ``jobs [ID] [--cancel]``, ``health``.

They talk to a backend (default) or straight to one GPU server (``--url http://gpu-01:8001``); which
one is found by probing: a GPU server answers ``GET /api/health`` with an ``ollama`` key, a backend
publishes ``/api/openapi.json`` titled "gpu-bridge backend". Pulls show a live progress bar on a
terminal and plain progress lines otherwise; ``--json`` prints JSON for scripts. Failures raise
``GpuBridgeError`` with one line that says what to fix (``cli.main`` prints it and exits 1).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TextIO
from urllib.parse import quote, urlsplit

import requests

from . import __version__, names
from .config import (
    API_TOKEN_CREDENTIAL,
    BACKEND_TOKEN_CREDENTIAL,
    DEFAULT_GPU_PORT,
    ClientSettings,
    GpuHost,
    read_secret,
    read_secret_file,
    tls_client_files,
)
from .errors import ConfigError, GpuBridgeError, GpuHostError

DEFAULT_URL = "http://127.0.0.1:8000"
POLL_INTERVAL = 0.5          # seconds between progress polls
NO_PROGRESS_LIMIT = 900.0    # give up following a pull that shows no change for this long (GPU side stalls at 300 s)
POLL_ERROR_LIMIT = 60.0      # give up following when polling itself fails for this long
ACTIVE = ("queued", "running")
ABSENT = ("model_not_found",)  # a delete's per-host code for "was not there": nothing to do


# --- formatting -----------------------------------------------------------------------------------
def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover


def human_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0 or seconds > 360000:
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


_FRACTION = re.compile(r"(\.\d+)")


def utc_time(value: object) -> str:
    """An ISO 8601 time (Ollama's local time with offset, nanoseconds; the backend's ``...Z``) as
    ``YYYY-MM-DD HH:MM:SS`` in UTC: the one convention every table uses (their headers say "UTC").
    A time without an offset is taken as UTC; anything unparseable is shown as it came."""
    if not isinstance(value, str) or not value.strip():
        return ""
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    text = _FRACTION.sub(lambda m: m.group(1)[:7], text, count=1)  # Python parses at most microseconds
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return value
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


# A host label (name:port) said twice: "gpu-01:8001: gpu-01:8001 refused ..." (a per-host message already
# names its host, and a summary prefixes the host again).
_TWICE = re.compile(r"(?<![\w.\-])([A-Za-z0-9_.\-]+:\d+): \1(?![\w.\-])")


def host_message(label: str, message: object) -> str:
    """``label: message``, unless the message already starts with the host's label."""
    text = once(str(message or "failed"))
    return text if text.startswith(label) else f"{label}: {text}"


def once(text: str) -> str:
    """``text`` with each doubled host label said once."""
    return _TWICE.sub(r"\1", text)


def _table(rows: list[list[str]], headers: list[str], out: TextIO) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip(), file=out)


class Progress:
    """A pull's progress: a live ``\\r`` bar on a terminal, plain lines (every ~10 % or status change) otherwise."""

    def __init__(self, label: str, out: TextIO | None = None, *, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, hosts: int = 1):
        self.label = label
        # Several hosts pull the same model: the byte figures are their sum, and say so.
        self.scope = f" across {hosts} hosts" if hosts > 1 else ""
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.clock = clock
        self.started = clock()
        self.rate: float | None = None
        self._last: tuple[float, int] | None = None
        self._decile = -1
        self._status: str | None = None
        self._width = 0

    def update(self, completed: int | None, total: int | None, status: str | None = None) -> None:
        now = self.clock()
        completed = int(completed or 0)
        total = int(total or 0)
        if self._last is not None:
            dt, db = now - self._last[0], completed - self._last[1]
            if dt >= 0.2 and db >= 0:
                sample = db / dt
                self.rate = sample if self.rate is None else 0.3 * sample + 0.7 * self.rate
                self._last = (now, completed)
        else:
            self._last = (now, completed)
        percent = 100.0 * completed / total if total else None
        if self.tty:
            self._draw(completed, total, percent, status)
        else:
            self._line(completed, total, percent, status)

    def _eta(self, completed: int, total: int) -> float | None:
        if not total or not self.rate:
            return None
        return max(0, total - completed) / self.rate

    def _draw(self, completed: int, total: int, percent: float | None, status: str | None) -> None:
        columns = shutil.get_terminal_size((100, 20)).columns
        if percent is None:
            bar, pct = "[" + " " * 20 + "]", "   ?%"
        else:
            filled = int(20 * min(percent, 100.0) / 100)
            bar, pct = "[" + "#" * filled + "-" * (20 - filled) + "]", f"{percent:5.1f}%"
        speed = f"{human_bytes(self.rate)}/s" if self.rate else "--/s"
        text = (f"{self.label} {bar} {pct}  {human_bytes(completed)}/{human_bytes(total) if total else '?'}"
                f"{self.scope}  "
                f"{speed}  ETA {human_duration(self._eta(completed, total))}  {status or ''}").rstrip()
        text = text[: max(10, columns - 1)]
        pad = " " * max(0, self._width - len(text))
        self.out.write("\r" + text + pad)
        self.out.flush()
        self._width = len(text)

    def _line(self, completed: int, total: int, percent: float | None, status: str | None) -> None:
        decile = int(percent // 10) if percent is not None else -1
        if decile <= self._decile and status == self._status:
            return
        self._decile = max(decile, self._decile)
        self._status = status
        parts = [f"{self.label}:"]
        if percent is not None:
            parts.append(f"{percent:.0f}% ({human_bytes(completed)} of {human_bytes(total)}{self.scope})")
        if self.rate:
            parts.append(f"{human_bytes(self.rate)}/s")
        if status:
            parts.append(status)
        print(" ".join(parts), file=self.out, flush=True)

    def finish(self, message: str | None = None) -> None:
        if self.tty and self._width:
            self.out.write("\n")
        if message:
            print(message, file=self.out, flush=True)


# --- targets --------------------------------------------------------------------------------------
def target_url(args) -> str:
    url = (getattr(args, "url", None) or os.environ.get("GPU_BRIDGE_URL") or DEFAULT_URL).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--url {url!r} is not an http(s) URL such as http://127.0.0.1:8000")
    return url


def _unreachable(url: str, what: str) -> GpuBridgeError:
    port = urlsplit(url).port
    if port == DEFAULT_GPU_PORT:
        return GpuBridgeError(f"cannot reach the GPU server at {url} ({what}): is gpu-http-server.service running? "
                              "(set --url or GPU_BRIDGE_URL)", code="unreachable", status=503)
    return GpuBridgeError(f"cannot reach the backend at {url} ({what}): is gpu-bridge-backend.service running? "
                          "(set --url or GPU_BRIDGE_URL)", code="unreachable", status=503)


def _session() -> requests.Session:
    s = requests.Session()
    s.headers["User-Agent"] = f"gpu-bridge-cli/{__version__}"
    s.headers["Accept"] = "application/json"
    return s


def detect(url: str, timeout: float) -> str:
    """``"gpu"`` or ``"backend"``."""
    s = _session()
    try:
        r = s.get(url + "/api/health", timeout=(3, timeout))
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code == 200 and isinstance(body, dict) and "ollama" in body:
            return "gpu"
        r = s.get(url + "/api/openapi.json", timeout=(3, timeout))
        try:
            doc = r.json()
        except ValueError:
            doc = None
        if r.status_code == 200 and isinstance(doc, dict) and "backend" in str((doc.get("info") or {}).get("title")):
            return "backend"
    except requests.ConnectionError as exc:
        raise _unreachable(url, "connection refused" if "refused" in str(exc) else "connection failed") from None
    except requests.Timeout:
        raise _unreachable(url, f"no answer within {timeout:g} s") from None
    finally:
        s.close()
    raise GpuBridgeError(f"{url} is neither a gpu-bridge backend nor a GPU server (no /api/openapi.json backend "
                         "document, no /api/health with 'ollama'): check --url or GPU_BRIDGE_URL")


class BackendClient:
    """The backend's ``/config/*`` API, with errors turned into one-line ``GpuBridgeError``s."""

    def __init__(self, url: str, token: str | None, timeout: float):
        self.url = url
        self.timeout = timeout
        self.session = _session()
        if token:
            if not token.isascii() or not token.isprintable():
                raise ConfigError("the backend token holds characters that cannot travel in an HTTP header: use "
                                  "printable ASCII")
            self.session.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            r = self.session.request(method, self.url + path, json=body, timeout=(3, self.timeout))
        except requests.ConnectionError as exc:
            raise _unreachable(self.url, "connection refused" if "refused" in str(exc) else "connection failed") \
                from None
        except requests.Timeout:
            raise GpuBridgeError(f"the backend at {self.url} did not answer {method} {path} within {self.timeout:g} s "
                                 "(raise --timeout, or check the GPU hosts with `gpu-bridge health`)",
                                 code="timeout", status=504) from None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code == 401:
            raise GpuBridgeError(f"the backend at {self.url} refused the admin token: pass --token-file or set "
                                 "GPU_BRIDGE_BACKEND_TOKEN(_FILE) to the backend's token", code="unauthorized",
                                 status=401)
        if not isinstance(data, dict):
            raise GpuBridgeError(f"{self.url} answered {method} {path} with HTTP {r.status_code} and no JSON: is it "
                                 "a gpu-bridge backend? (check --url)", status=502)
        if r.status_code >= 400:
            raise GpuBridgeError(once(str(data.get("error") or f"HTTP {r.status_code}")), code=data.get("code"),
                                 status=r.status_code, extra={"body": data})
        return data

    def close(self) -> None:
        self.session.close()


def _gpu_transport(url: str, token: str | None, timeout: float):
    from .client.http import HttpTransport

    parts = urlsplit(url)
    host = GpuHost(name=parts.hostname or "127.0.0.1", port=parts.port or DEFAULT_GPU_PORT, scheme=parts.scheme)
    if token is None:
        token = read_secret(os.environ, "GPU_BRIDGE_API_TOKEN_FILE", "GPU_BRIDGE_API_TOKEN", API_TOKEN_CREDENTIAL)
    # Straight at a GPU host over https (its nginx asks for a client certificate): the same
    # GPU_BRIDGE_GPU_CA_FILE / GPU_BRIDGE_CLIENT_CERT_FILE / GPU_BRIDGE_CLIENT_KEY_FILE as the backend.
    ca_file, cert_file, key_file = tls_client_files(os.environ)
    settings = ClientSettings(hosts=(host,), api_token=token, read_timeout=timeout, connect_timeout=3.0,
                              pull_timeout=max(timeout, 300.0), ca_file=ca_file, client_cert_file=cert_file,
                              client_key_file=key_file)
    return HttpTransport(host, settings)


def read_token_file(path: str | None) -> str | None:
    """``--token-file PATH``: the token it holds (None without the option). Tokens never travel on the
    command line, where every user sees them in ``ps``; a file, the environment or credentials do."""
    if path is None:
        return None
    return read_secret_file(path, "--token-file")


class _Ctx:
    def __init__(self, args):
        self.args = args
        self.url = target_url(args)
        self.timeout = float(getattr(args, "timeout", 30.0) or 30.0)
        self.kind = detect(self.url, self.timeout)
        self.json = bool(getattr(args, "json", False))
        self.out = sys.stdout
        token = read_token_file(getattr(args, "token_file", None))
        if self.kind == "gpu":
            self.gpu = _gpu_transport(self.url, token, self.timeout)
            self.backend = None
        else:
            if token is None:
                token = read_secret(os.environ, "GPU_BRIDGE_BACKEND_TOKEN_FILE", "GPU_BRIDGE_BACKEND_TOKEN",
                                    BACKEND_TOKEN_CREDENTIAL)
            self.backend = BackendClient(self.url, token, self.timeout)
            self.gpu = None

    def close(self) -> None:
        client = self.gpu or self.backend
        assert client is not None  # __init__ sets one of the two
        client.close()

    def dump(self, data) -> None:
        print(json.dumps(data, indent=2, sort_keys=False), file=self.out)


def _warn(message: str) -> None:
    print(f"gpu-bridge: warning: {message}", file=sys.stderr)


# --- models ---------------------------------------------------------------------------------------
def cmd_models(args) -> int:
    ctx = _Ctx(args)
    try:
        return {"list": _models_list, "pull": _models_pull, "delete": _models_delete}[args.action](ctx)
    finally:
        ctx.close()


def _models_list(ctx: _Ctx) -> int:
    if ctx.gpu is not None:
        models = ctx.gpu.list_models()
        if ctx.json:
            ctx.dump({"models": models})
            return 0
        rows = [[m.get("name", "?"), human_bytes(m.get("size")), utc_time(m.get("modified_at"))] for m in models]
        _table(rows, ["NAME", "SIZE", "MODIFIED (UTC)"], ctx.out)
        return 0
    assert ctx.backend is not None  # a backend URL: _Ctx set backend (gpu is None)
    data = ctx.backend.call("GET", "/config/models")
    if ctx.json:
        ctx.dump(data)
        return 0
    for label, st in (data.get("hosts") or {}).items():
        if not st.get("ok"):
            _warn(host_message(label, st.get("error")))
    if data.get("stale"):
        _warn(f"no GPU host answered: showing the cached list from {utc_time(data.get('fetched_at'))} UTC")
    rows = [[m.get("name", "?"), human_bytes(m.get("size")), utc_time(m.get("modified_at")),
             ", ".join(m.get("hosts") or [])] for m in data.get("models") or []]
    _table(rows, ["NAME", "SIZE", "MODIFIED (UTC)", "HOSTS"], ctx.out)
    return 0


def _models_delete(ctx: _Ctx) -> int:
    """Idempotent for the operator: exit 0 when the model is gone from every chosen host afterwards (hosts
    that already lacked it are named); exit 1 when a host failed, or when no host had it (a misspelt name)."""
    name = names.parse(ctx.args.name).display
    if ctx.gpu is not None:
        if ctx.args.hosts:
            raise GpuBridgeError("--host only works through a backend (this URL is a GPU server)", code="usage")
        label = ctx.gpu.host.label
        try:
            result = {"ok": True, **ctx.gpu.delete_model(name)}
        except GpuBridgeError as exc:
            if exc.code not in ABSENT:
                raise
            result = {"ok": False, "error": exc.message, "code": exc.code, "status": exc.status}
        return _delete_outcome(ctx, name, {"model": name, "results": {label: result}})
    assert ctx.backend is not None  # a backend URL: _Ctx set backend (gpu is None)
    body = {"model": name}
    if ctx.args.hosts:
        body["hosts"] = ctx.args.hosts
    data: dict | None  # a dict on both paths: the except branch re-raises anything else
    try:
        data = ctx.backend.call("POST", "/config/delete-model", body)
    except GpuBridgeError as exc:
        # Every host failed; the answer still says how each one did.
        data = exc.extra.get("body")
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or not data["results"]:
            raise
    return _delete_outcome(ctx, name, data)


def _delete_outcome(ctx: _Ctx, name: str, data: dict) -> int:
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


def _models_pull(ctx: _Ctx) -> int:
    name = names.parse(ctx.args.name).display
    if ctx.gpu is not None:
        if ctx.args.hosts:
            raise GpuBridgeError("--host only works through a backend (this URL is a GPU server)", code="usage")
        job = ctx.gpu.start_pull(name)
        if ctx.args.no_wait:
            if ctx.json:
                ctx.dump(job)
            else:
                print(f"started pull of {name} on {ctx.gpu.host.label}: job {job.get('id')} "
                      f"(follow it with `gpu-bridge jobs {job.get('id')} --url {ctx.url}`)", file=ctx.out)
            return 0
        job_id = job.get("id")

        def poll() -> dict:
            j = ctx.gpu.get_job(job_id)
            state = j.get("state")
            failed = state not in ACTIVE and state != "succeeded"
            return {"state": state, "completed": j.get("completed"), "total": j.get("total"),
                    "status": j.get("status"), "raw": j, "done": state not in ACTIVE,
                    "failures": {ctx.gpu.host.label: j.get("error") or state} if failed else {}}

        final = _follow(ctx, name, poll, ref=f"{job_id} --url {ctx.url}")
        return _pull_outcome(ctx, name, final, [ctx.gpu.host.label])

    assert ctx.backend is not None  # a backend URL: _Ctx set backend (gpu is None)
    body = {"model": name, "wait": False}
    if ctx.args.hosts:
        body["hosts"] = ctx.args.hosts
    started = ctx.backend.call("POST", "/config/pull-model", body)
    pull_id = started.get("id")
    for label, r in (started.get("results") or {}).items():
        if not r.get("ok") and not ctx.json:
            _warn(host_message(label, r.get("error")))
    if ctx.args.no_wait or not pull_id:
        if ctx.json:
            ctx.dump(started)
        else:
            hosts = [lbl for lbl, r in (started.get("results") or {}).items() if r.get("ok")]
            print(f"started pull {pull_id} of {name} on {', '.join(hosts)} (follow it with `gpu-bridge jobs "
                  f"{pull_id}`)", file=ctx.out)
        return 0

    def poll_backend() -> dict:
        assert ctx.backend is not None  # narrowed above, but not inside this closure
        s = ctx.backend.call("GET", f"/config/pull-status/{quote(pull_id, safe='')}")
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
    final = _follow(ctx, name, poll_backend, ref=pull_id, hosts=pulling)
    return _pull_outcome(ctx, name, final, list((final["raw"].get("results") or {}).keys()))


def _follow(ctx: _Ctx, name: str, poll: Callable[[], dict], *, ref: str, hosts: int = 1) -> dict:
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


def _pull_outcome(ctx: _Ctx, name: str, final: dict, hosts: list[str]) -> int:
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


# --- jobs -------------------------------------------------------------------------------------------
def cmd_jobs(args) -> int:
    if args.cancel and not args.id:
        print("gpu-bridge: error: jobs --cancel needs a job id (gpu-bridge jobs ID --cancel)", file=sys.stderr)
        return 2
    ctx = _Ctx(args)
    try:
        return _jobs(ctx)
    finally:
        ctx.close()


def _job_row(job: dict) -> list[str]:
    pct = job.get("percent")
    return [str(job.get("id", "")), str(job.get("state", "")), f"{pct:.1f}%" if isinstance(pct, int | float) else "-",
            str(job.get("model", "")), str(job.get("status") or job.get("error") or "")]


def _jobs(ctx: _Ctx) -> int:
    a = ctx.args
    if ctx.gpu is not None:
        if a.id:
            try:
                job = ctx.gpu.cancel_job(a.id) if a.cancel else ctx.gpu.get_job(a.id)
            except GpuBridgeError as exc:
                if exc.code != "job_not_found":
                    raise
                raise GpuBridgeError(f"{exc.message}: see `gpu-bridge jobs --url {ctx.url}` for the jobs it knows",
                                     code=exc.code, status=exc.status) from None
            if ctx.json:
                ctx.dump(job)
            else:
                _table([_job_row(job)], ["ID", "STATE", "PERCENT", "MODEL", "STATUS"], ctx.out)
            return 0
        jobs = ctx.gpu.list_jobs()
        if ctx.json:
            ctx.dump({"jobs": jobs})
        else:
            _table([_job_row(j) for j in jobs], ["ID", "STATE", "PERCENT", "MODEL", "STATUS"], ctx.out)
        return 0
    assert ctx.backend is not None  # a backend URL: _Ctx set backend (gpu is None)
    if a.id:
        if a.cancel:
            data = ctx.backend.call("POST", "/config/cancel-pull", {"id": a.id})
        else:
            data = ctx.backend.call("GET", f"/config/pull-status/{quote(a.id, safe='')}")
        if ctx.json:
            ctx.dump(data)
            return 0
        pct = data.get("percent")
        print(f"pull {data.get('id')} of {data.get('model')}: {data.get('state')}"
              + (f" {pct:.1f}%" if isinstance(pct, int | float) else ""), file=ctx.out)
        rows = []
        for label, r in (data.get("results") or {}).items():
            job = r.get("job") or {}
            jpct = job.get("percent")
            state = job.get("state") or ("error" if not r.get("ok") else "")
            rows.append([label, str(job.get("id") or "-"), str(state),
                         f"{jpct:.1f}%" if isinstance(jpct, int | float) else "-",
                         once(str(r.get("error") or job.get("error") or job.get("status") or ""))])
        _table(rows, ["HOST", "JOB", "STATE", "PERCENT", "STATUS"], ctx.out)
        return 0
    data = ctx.backend.call("GET", "/config/pulls")
    if ctx.json:
        ctx.dump(data)
        return 0
    _table([[p["id"], p["state"], p["model"], utc_time(p.get("created_at")), ", ".join(p.get("hosts") or [])]
            for p in data.get("pulls") or []], ["ID", "STATE", "MODEL", "CREATED (UTC)", "HOSTS"], ctx.out)
    return 0


# --- health -----------------------------------------------------------------------------------------
def cmd_health(args) -> int:
    ctx = _Ctx(args)
    try:
        if ctx.gpu is not None:
            doc = ctx.gpu.health()
            if ctx.json:
                ctx.dump(doc)
            else:
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
            return 0 if doc.get("status") == "ok" else 1
        assert ctx.backend is not None  # a backend URL: _Ctx set backend (gpu is None)
        doc = ctx.backend.call("GET", "/health")
        if ctx.json:
            ctx.dump(doc)
        else:
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
                trial = f" (trial in {retry:g} s)" if breaker.get("state") == "open" and \
                    isinstance(retry, int | float) else ""
                rows.append([label, _host_state(h), f"{lat:.0f} ms" if lat is not None else "-",
                             f"breaker {breaker.get('state', '?')}{trial}",
                             once(str(h.get("error") or h.get("reason") or ""))])
            _table(rows, ["GPU HOST", "STATE", "LATENCY", "BREAKER", "ERROR / REASON"], ctx.out)
        return 0 if doc.get("status") == "ok" else 1
    finally:
        ctx.close()


def _host_state(h: dict) -> str:
    """A GPU host's state as the backend's JSON says it: FAILING (not usable), else the host's own status
    (``ok``, or ``degraded`` with a ``reason``, e.g. no GPU visible: models still work)."""
    if not h.get("ok"):
        return "FAILING"
    return str(h.get("status") or "ok")
