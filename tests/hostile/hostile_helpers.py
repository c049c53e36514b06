"""Shared pieces of the hostile-input tests: apps, input strategies and the oracles that say what each
input must produce (importable: pytest puts this directory on sys.path)."""

from __future__ import annotations

import signal
from urllib.parse import quote

from hypothesis import strategies as st

from gpu_bridge import names
from gpu_bridge.config import DEFAULT_ALLOWED_REGISTRIES
from gpu_bridge.errors import InvalidModelName, RegistryNotAllowed
from support.procs import VENV_BIN, QuickStopProcess, free_port

GPU_TOKEN = "hostile-gpu-token-Zq8mW2xR7tY4"
ADMIN_TOKEN = "hostile-admin-token-Lp3vN9kE1sA6"
GPU_AUTH = {"Authorization": f"Bearer {GPU_TOKEN}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
HOST_FAILURE_STATUSES = (502, 503, 504)


def gpu_config(ollama_url: str, **extra) -> dict:
    return {"GPU_BRIDGE_API_TOKEN": GPU_TOKEN, "GPU_BRIDGE_OLLAMA_URL": ollama_url,
            "GPU_BRIDGE_RATE_LIMIT_PER_MINUTE": "0", "GPU_BRIDGE_MAX_QUEUED_PULLS": "100000",
            "GPU_BRIDGE_MIN_FREE_GB": "0", "GPU_BRIDGE_OLLAMA_CONNECT_TIMEOUT": "0.5",
            "GPU_BRIDGE_OLLAMA_READ_TIMEOUT": "5", **{k: str(v) for k, v in extra.items()}}


def backend_config(hosts: str, db_path, *, bind: str = "0.0.0.0:8000", **extra) -> dict:
    """A backend that requires the admin token (bound beyond loopback, as far as it knows: the test client
    binds nothing, and gunicorn is told to bind 127.0.0.1)."""
    return {"GPU_INSTANCE_HOSTS": hosts, "GPU_BRIDGE_API_TOKEN": GPU_TOKEN, "GPU_BRIDGE_TRANSPORT": "http",
            "GPU_BRIDGE_DATABASE_URL": f"sqlite:///{db_path}", "GPU_BRIDGE_BACKEND_BIND": bind,
            "GPU_BRIDGE_BACKEND_TOKEN": ADMIN_TOKEN, "GPU_BRIDGE_CONNECT_TIMEOUT": "0.5",
            "GPU_BRIDGE_READ_TIMEOUT": "10", "GPU_BRIDGE_CACHE_MAX_AGE": "0",
            **{k: str(v) for k, v in extra.items()}}


class QuickStop(QuickStopProcess):
    def graceful_stop(self, timeout: float = 15.0) -> None:
        """SIGTERM and wait: every log line is written before the process exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        self.proc.wait(timeout)


def gunicorn(app: str, env: dict, *, probe: str, name: str, access_log: bool = True) -> QuickStop:
    """gunicorn as deployed by the roles: one gthread worker, gunicorn's access log on stdout."""
    port = free_port()
    argv = [str(VENV_BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "1", "--worker-class", "gthread",
            "--threads", "8", "--timeout", "60", "--graceful-timeout", "3", "--no-control-socket",
            "--error-logfile", "-", "--log-level", "info"]
    if access_log:
        argv += ["--access-logfile", "-"]
    return QuickStop([*argv, app], port, env=env, probe=probe, name=name).start()


# --- inputs ------------------------------------------------------------------------------------------------------
_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}"
_part = st.from_regex(_PART, fullmatch=True)
_host = st.one_of(
    st.sampled_from(["registry.ollama.ai", "hf.co", "HF.CO", "localhost:5000", "evil.example.com", "127.0.0.1:11434"]),
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,12}", fullmatch=True))


@st.composite
def _grammar_names(draw) -> str:
    """Names built like Ollama's grammar (mostly valid; '..' and long parts still make some invalid)."""
    parts = [draw(_part)]
    if draw(st.booleans()):
        parts.insert(0, draw(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,10}", fullmatch=True)))
        if draw(st.booleans()):
            parts.insert(0, draw(_host))
    name = "/".join(parts)
    if draw(st.booleans()):
        name += ":" + draw(_part)
    return name


TRICKY_NAMES = [
    "llama3.2", "llama3.2:latest", "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", "library/llama3:8b",
    "registry.ollama.ai/library/llama3:latest", "REGISTRY.OLLAMA.AI/library/x:y", "localhost:5000/ns/m:t",
    "..", ".", "../../etc/passwd", "a/../b", "a/./b", "%2e%2e", "a..b", "a:b:c", "a//b", "a/", ":tag", "m:",
    "a:", "/abs", "a/b/c/d", "x" * 80, "x" * 81, "h" * 350 + "/n/m:t", "h" * 351 + "/n/m:t", "m:" + "t" * 81,
    "a b", "a\tb", "a\nb", "a\x00b", "ünïcode", "emoji\U0001F600", "a;rm -rf /", "$(reboot)", "`id`", "a|b",
    "<script>", "a%00b", "a%2Fb", "a?b=c", "a#b", "a\\b", "C:\\models", "-rf", "_x", "x_", "a-", "-a",
    "evil.example.com/x/y:z", "hf.co/org/repo", "hf.co:443/org/repo:q", "a" * 600,
]

names_strategy = st.one_of(
    _grammar_names(),
    st.sampled_from(TRICKY_NAMES),
    st.text(alphabet=st.sampled_from(list("aZ09_.-:/%\\ \t\n\x00é?#&;'\"<>|*~")), max_size=30),
    st.text(max_size=40),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)

latin1_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                      max_size=60)


def path_of(value: str) -> str:
    """A path segment that decodes to exactly ``value`` ('/' sent as %2F: Werkzeug decodes before routing)."""
    return quote(value, safe="")


def route_miss_allowed(value: str) -> bool:
    """May a ``<path:...>`` route miss ``value`` (404 ``not_found``)? Empty values and a leading '/' never
    match; a newline may or may not (the converter's regex), and such a value is invalid anyway."""
    return not value or value.startswith("/") or "\n" in value


def route_miss_certain(value: str) -> bool:
    return not value or value.startswith("/")


def name_verdict(name: object, registries: tuple[str, ...] | None = DEFAULT_ALLOWED_REGISTRIES) -> str | None:
    """None when ``name`` is acceptable, else the error code the services must answer."""
    try:
        names.validate(name, registries)
    except InvalidModelName:
        return "invalid_model_name"
    except RegistryNotAllowed:
        return "registry_not_allowed"
    return None
