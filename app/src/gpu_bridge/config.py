"""Environment → typed settings, in one place, with explicit defaults.

Every variable the services read is declared here (and documented in the README's configuration
table). ``from_env`` takes any mapping so tests can pass a plain dict instead of patching
``os.environ``. A malformed value raises ``ConfigError`` naming the variable to fix.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config_fields import (
    BoolSetting,
    FloatSetting,
    IntSetting,
    ListSetting,
    OptionalStrSetting,
    Setting,
    StrSetting,
    field_for,
    raw_value,
    read_fields,
)
from .errors import ConfigError

# --- the settings: each variable's default, written here only ---------------------------------------
# GPU server (gpu-http-server, and the NFS worker, which runs the same Ollama adapter and pull jobs)
OLLAMA_URL = StrSetting("GPU_BRIDGE_OLLAMA_URL", "http://127.0.0.1:11434", "Ollama's address", rstrip="/")
ALLOW_NO_TOKEN = BoolSetting("GPU_BRIDGE_ALLOW_NO_TOKEN", False, "development only: no authentication")
ALLOWED_REGISTRIES = ListSetting("GPU_BRIDGE_ALLOWED_REGISTRIES", ("registry.ollama.ai", "hf.co"),
                                 "registry hosts a pull may name (GPU server and backend)")
OLLAMA_CONNECT_TIMEOUT = FloatSetting("GPU_BRIDGE_OLLAMA_CONNECT_TIMEOUT", 2.0, "seconds to connect to Ollama",
                                      minimum=0.01)
OLLAMA_READ_TIMEOUT = FloatSetting("GPU_BRIDGE_OLLAMA_READ_TIMEOUT", 30.0, "seconds to wait for Ollama's answer",
                                   minimum=0.01)
PULL_STALL_TIMEOUT = FloatSetting("GPU_BRIDGE_PULL_STALL_TIMEOUT", 300.0, "seconds without progress: pull fails",
                                  minimum=0.1)
MAX_CONCURRENT_PULLS = IntSetting("GPU_BRIDGE_MAX_CONCURRENT_PULLS", 2, "pulls running at once", minimum=1)
MAX_QUEUED_PULLS = IntSetting("GPU_BRIDGE_MAX_QUEUED_PULLS", 16, "queued pulls before 429", minimum=0)
MAX_WAITING_PULLS = IntSetting("GPU_BRIDGE_MAX_WAITING_PULLS", 2, "requests waiting for a pull at once", minimum=0)
RATE_LIMIT_PER_MINUTE = IntSetting("GPU_BRIDGE_RATE_LIMIT_PER_MINUTE", 60, "state changes per minute; 0: off",
                                   minimum=0)
MAX_BODY_BYTES = IntSetting("GPU_BRIDGE_MAX_BODY_BYTES", 64 * 1024, "larger request bodies get 413 (both apps)",
                            minimum=1024)
OLLAMA_MODELS_DIR = OptionalStrSetting("GPU_BRIDGE_OLLAMA_MODELS_DIR", None, "where the free-space floor applies")
MIN_FREE_GB = FloatSetting("GPU_BRIDGE_MIN_FREE_GB", 10.0, "free GiB a pull needs there")
METRICS_PUBLIC = BoolSetting("GPU_BRIDGE_METRICS_PUBLIC", False, "serve /metrics without the token")
LOG_HEALTH_CHECKS = BoolSetting("GPU_BRIDGE_LOG_HEALTH_CHECKS", False, "access-log successful health checks")
JOB_RETENTION = FloatSetting("GPU_BRIDGE_JOB_RETENTION", 3600.0, "seconds a finished job stays listed")
JOB_STATE_FILE = OptionalStrSetting("GPU_BRIDGE_JOB_STATE_FILE", None, "the job table on disk; unset: memory only")

# The client towards the GPU hosts (backend, CLI)
GPU_PORT = IntSetting("GPU_BRIDGE_GPU_PORT", 8001, "port of GPU host entries without one", minimum=1)
GPU_SCHEME = StrSetting("GPU_BRIDGE_GPU_SCHEME", "http", "http or https towards the GPU hosts",
                        choices=("http", "https"))
TRANSPORT = StrSetting("GPU_BRIDGE_TRANSPORT", "http", "http, or nfs for the fallback channel",
                       choices=("http", "nfs"), lower=True)
CONNECT_TIMEOUT = FloatSetting("GPU_BRIDGE_CONNECT_TIMEOUT", 3.0, "seconds to connect to a GPU host", minimum=0.01)
READ_TIMEOUT = FloatSetting("GPU_BRIDGE_READ_TIMEOUT", 30.0, "seconds to wait for one answer", minimum=0.01)
PULL_TIMEOUT = FloatSetting("GPU_BRIDGE_PULL_TIMEOUT", 300.0, "a waited pull's seconds without progress",
                            minimum=0.01)
RETRIES = IntSetting("GPU_BRIDGE_RETRIES", 2, "retries where a retry is safe", minimum=0)
BREAKER_THRESHOLD = IntSetting("GPU_BRIDGE_BREAKER_THRESHOLD", 3, "failures that open a host's breaker", minimum=1)
BREAKER_COOLDOWN = FloatSetting("GPU_BRIDGE_BREAKER_COOLDOWN", 15.0, "seconds before an open breaker probes")
FANOUT_DEADLINE = FloatSetting("GPU_BRIDGE_FANOUT_DEADLINE", 2.5, "seconds a listing waits for all hosts",
                               minimum=0.05)
PULL_DEADLINE = FloatSetting("GPU_BRIDGE_PULL_DEADLINE", 0.0, "a waited pull's total limit; 0: none")
CLI_URL = StrSetting("GPU_BRIDGE_URL", "http://127.0.0.1:8000", "where the CLI sends requests (read by cli_ops)")

# The NFS channel (worker and backend)
NFS_ROOT = StrSetting("GPU_BRIDGE_NFS_ROOT", "/mnt/shared", "the share root")
NFS_HOST_ID = OptionalStrSetting("GPU_BRIDGE_NFS_HOST_ID", None, "the worker's id on the share",
                                 shown="the host name")
NFS_POLL_INTERVAL = FloatSetting("GPU_BRIDGE_NFS_POLL_INTERVAL", 0.05, "seconds between scans", minimum=0.001)
NFS_HEARTBEAT_INTERVAL = FloatSetting("GPU_BRIDGE_NFS_HEARTBEAT_INTERVAL", 2.0, "seconds between heartbeats",
                                      minimum=0.05)
NFS_COMMAND_TIMEOUT = FloatSetting("GPU_BRIDGE_NFS_COMMAND_TIMEOUT", 30.0, "deadline of a command", minimum=0.1)
NFS_ANSWER_RETENTION = FloatSetting("GPU_BRIDGE_NFS_ANSWER_RETENTION", 3600.0, "seconds answers are kept")
NFS_REQUIRE_MOUNT = BoolSetting("GPU_BRIDGE_NFS_REQUIRE_MOUNT", True, "refuse a root that is no mount point")
NFS_MODELS_REFRESH = FloatSetting("GPU_BRIDGE_NFS_MODELS_REFRESH", 5.0, "seconds between models.json rewrites",
                                  minimum=0.05)
NFS_AUDIT_LOG = OptionalStrSetting("GPU_BRIDGE_NFS_AUDIT_LOG", None, "the worker's local command log")

# The backend
DATABASE_URL = StrSetting("GPU_BRIDGE_DATABASE_URL", "sqlite:////var/lib/gpu-bridge/backend.db", "SQLAlchemy URL")
BACKEND_BIND = StrSetting("GPU_BRIDGE_BACKEND_BIND", "127.0.0.1:8000", "the backend's listen address")
CACHE_MAX_AGE = FloatSetting("GPU_BRIDGE_CACHE_MAX_AGE", 10.0, "seconds a fresh listing is reused")
AUDIT_RETENTION_DAYS = IntSetting("GPU_BRIDGE_AUDIT_RETENTION_DAYS", 90, "days audit entries are kept; 0: forever",
                                  minimum=0)
PULL_RETENTION_DAYS = IntSetting("GPU_BRIDGE_PULL_RETENTION_DAYS", 30, "days finished pulls are kept; 0: forever",
                                 minimum=0)
# Models as code: the declared models of every GPU host (the prod_backend role writes the file from the
# inventory) and how often the backend compares them with what the hosts hold.
DECLARED_MODELS_FILE = OptionalStrSetting("GPU_BRIDGE_DECLARED_MODELS_FILE", None,
                                          "the declared models (JSON); unset: no drift report")
DRIFT_INTERVAL = FloatSetting("GPU_BRIDGE_DRIFT_INTERVAL", 60.0, "seconds between drift checks; 0: on request only")

# Every setting above (tests/test_docs.py compares them with the README and the roles).
SETTINGS: tuple[Setting[Any], ...] = tuple(v for v in list(globals().values()) if isinstance(v, Setting))

# Older names, still imported elsewhere.
DEFAULT_GPU_PORT = GPU_PORT.default
DEFAULT_BACKEND_BIND = BACKEND_BIND.default
DEFAULT_OLLAMA_URL = OLLAMA_URL.default
DEFAULT_ALLOWED_REGISTRIES = ALLOWED_REGISTRIES.default
DEFAULT_NFS_ROOT = NFS_ROOT.default
DEFAULT_DATABASE_URL = DATABASE_URL.default
# systemd LoadCredential= exposes secrets under $CREDENTIALS_DIRECTORY/<name>; the roles use these names.
API_TOKEN_CREDENTIAL = "api-token"  # noqa: S105 - a file name, not a secret
BACKEND_TOKEN_CREDENTIAL = "backend-token"  # noqa: S105
CLIENT_KEY_CREDENTIAL = "client-key"  # the backend's TLS client key (mutual TLS with the GPU hosts)


def _gib_to_bytes(gib: float) -> int:
    return int(gib * 1024**3)


def token_lines(secret: str | None) -> tuple[str, ...]:
    """The tokens in a token secret: one per line (blank lines and ``#`` comments skipped).

    A GPU server accepts every token listed; a client sends the first and tries the others when a
    host refuses it. Two lines during a rotation (new, then old) keep every request working while
    hosts and backends switch one at a time (README, "Rotating the API token")."""
    if not secret:
        return ()
    return tuple(line.strip() for line in secret.splitlines() if line.strip() and not line.strip().startswith("#"))


def read_secret(env: Mapping[str, str], file_var: str, value_var: str, credential: str) -> str | None:
    """A secret from, in order: ``<file_var>``, ``<value_var>``, systemd's credentials directory."""
    path = raw_value(env, file_var)
    if path is None:
        cred_dir = raw_value(env, "CREDENTIALS_DIRECTORY")
        candidate = os.path.join(cred_dir, credential) if cred_dir else None
        if candidate and os.path.exists(candidate):
            path = candidate
    if path is not None:
        return read_secret_file(path, file_var)
    return raw_value(env, value_var)


def read_secret_file(path: str, what: str) -> str:
    """A secret file's text, stripped; ``ConfigError`` naming ``what`` (the variable or option that
    named the file) when it cannot be read, is not UTF-8 or is empty."""
    try:
        with open(path, encoding="utf-8") as fh:
            secret = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {path} is not UTF-8 text") from None
    if not secret:
        raise ConfigError(f"{what}: {path} is empty")
    return secret


def _readable_file(env: Mapping[str, str], name: str) -> str | None:
    path = raw_value(env, name)
    if path is not None:
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None
    return path


def tls_client_files(env: Mapping[str, str]) -> tuple[str | None, str | None, str | None]:
    """(CA bundle, client certificate, client key) for https towards the GPU hosts.

    The key comes from ``GPU_BRIDGE_CLIENT_KEY_FILE``, else from systemd's credentials directory
    (``client-key``, how the roles deliver it), else from the certificate file itself (a PEM with both).
    """
    ca_file = _readable_file(env, "GPU_BRIDGE_GPU_CA_FILE")
    cert_file = _readable_file(env, "GPU_BRIDGE_CLIENT_CERT_FILE")
    key_file = _readable_file(env, "GPU_BRIDGE_CLIENT_KEY_FILE")
    if key_file is None and cert_file is not None:
        cred_dir = raw_value(env, "CREDENTIALS_DIRECTORY")
        candidate = os.path.join(cred_dir, CLIENT_KEY_CREDENTIAL) if cred_dir else None
        if candidate and os.path.exists(candidate):
            key_file = candidate
    if key_file is not None and cert_file is None:
        raise ConfigError("GPU_BRIDGE_CLIENT_KEY_FILE is set but GPU_BRIDGE_CLIENT_CERT_FILE is not: a client key "
                          "needs its certificate")
    return ca_file, cert_file, key_file


def split_host_port(entry: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` → (host, port)."""
    entry = entry.strip()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, port_text = entry.split(":")
    else:
        host, port_text = entry, ""
    if not host:
        raise ConfigError(f"GPU host entry {entry!r} has no host name")
    if port_text:
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"GPU host entry {entry!r}: port {port_text!r} is not a number") from None
        if not 0 < port < 65536:
            raise ConfigError(f"GPU host entry {entry!r}: port out of range")
    else:
        port = default_port
    return host, port


@dataclass(frozen=True)
class GpuServerSettings:
    ollama_url: str = field_for(OLLAMA_URL)
    api_token: str | None = None
    allow_no_token: bool = field_for(ALLOW_NO_TOKEN)
    allowed_registries: tuple[str, ...] = field_for(ALLOWED_REGISTRIES)
    ollama_connect_timeout: float = field_for(OLLAMA_CONNECT_TIMEOUT)
    ollama_read_timeout: float = field_for(OLLAMA_READ_TIMEOUT)
    pull_stall_timeout: float = field_for(PULL_STALL_TIMEOUT)
    max_concurrent_pulls: int = field_for(MAX_CONCURRENT_PULLS)
    max_queued_pulls: int = field_for(MAX_QUEUED_PULLS)
    max_waiting_pulls: int = field_for(MAX_WAITING_PULLS)
    rate_limit_per_minute: int = field_for(RATE_LIMIT_PER_MINUTE)
    max_body_bytes: int = field_for(MAX_BODY_BYTES)
    ollama_models_dir: str | None = field_for(OLLAMA_MODELS_DIR)
    min_free_bytes: int = field_for(MIN_FREE_GB, _gib_to_bytes)
    metrics_public: bool = field_for(METRICS_PUBLIC)
    log_health_checks: bool = field_for(LOG_HEALTH_CHECKS)
    job_retention_seconds: float = field_for(JOB_RETENTION)
    # The job table on disk, so that a reload (SIGHUP) or a restart keeps pulls and their jobs
    # (job_state.py); None: jobs live in memory only.
    job_state_file: str | None = field_for(JOB_STATE_FILE)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GpuServerSettings:
        env = os.environ if env is None else env
        fields = read_fields(cls, env)
        return cls(api_token=read_secret(env, "GPU_BRIDGE_API_TOKEN_FILE", "GPU_BRIDGE_API_TOKEN",
                                         API_TOKEN_CREDENTIAL), **fields)


@dataclass(frozen=True)
class GpuHost:
    """One GPU host as production addresses it. ``name`` is the host part: the NFS channel's id."""

    name: str
    port: int = DEFAULT_GPU_PORT
    scheme: str = GPU_SCHEME.default

    @property
    def base_url(self) -> str:
        host = f"[{self.name}]" if ":" in self.name else self.name
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def label(self) -> str:
        return f"{self.name}:{self.port}"


def parse_gpu_hosts(env: Mapping[str, str]) -> tuple[GpuHost, ...]:
    port = GPU_PORT.read(env)
    scheme = GPU_SCHEME.read(env)
    raw = raw_value(env, "GPU_INSTANCE_HOSTS") or raw_value(env, "GPU_INSTANCE_HOST") or ""
    hosts: list[GpuHost] = []
    for entry in raw.split(","):
        if entry.strip():
            name, p = split_host_port(entry, port)
            if any(h.name == name and h.port == p for h in hosts):
                continue
            hosts.append(GpuHost(name=name, port=p, scheme=scheme))
    return tuple(hosts)


@dataclass(frozen=True)
class ClientSettings:
    hosts: tuple[GpuHost, ...] = ()
    api_token: str | None = None
    connect_timeout: float = field_for(CONNECT_TIMEOUT)
    read_timeout: float = field_for(READ_TIMEOUT)
    pull_timeout: float = field_for(PULL_TIMEOUT)
    retries: int = field_for(RETRIES)
    breaker_threshold: int = field_for(BREAKER_THRESHOLD)
    breaker_cooldown: float = field_for(BREAKER_COOLDOWN)
    transport: str = field_for(TRANSPORT)
    fanout_deadline: float = field_for(FANOUT_DEADLINE)
    pull_deadline: float = field_for(PULL_DEADLINE)
    # TLS towards the GPU hosts (https): the CA bundle that signed their certificates (None: the
    # system's bundle), and this client's certificate and key for mutual TLS (None: no certificate).
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientSettings:
        env = os.environ if env is None else env
        fields = read_fields(cls, env)  # first, as before: a bad transport is named before the TLS files
        ca_file, cert_file, key_file = tls_client_files(env)
        return cls(
            hosts=parse_gpu_hosts(env),
            api_token=read_secret(env, "GPU_BRIDGE_API_TOKEN_FILE", "GPU_BRIDGE_API_TOKEN", API_TOKEN_CREDENTIAL),
            ca_file=ca_file,
            client_cert_file=cert_file,
            client_key_file=key_file,
            **fields,
        )


@dataclass(frozen=True)
class NfsSettings:
    root: str = field_for(NFS_ROOT)
    host_id: str = field(default_factory=socket.gethostname)
    poll_interval: float = field_for(NFS_POLL_INTERVAL)
    heartbeat_interval: float = field_for(NFS_HEARTBEAT_INTERVAL)
    command_timeout: float = field_for(NFS_COMMAND_TIMEOUT)
    answer_retention: float = field_for(NFS_ANSWER_RETENTION)
    # Worker side: refuse to run unless the root (or an ancestor other than /) is a mount point.
    require_mount: bool = field_for(NFS_REQUIRE_MOUNT)
    # Worker side: how often models.json is rewritten from Ollama's list (also after pull/delete).
    models_refresh_interval: float = field_for(NFS_MODELS_REFRESH)
    # Worker side: optional local file, one JSON line per command executed/answered (audit, tests).
    audit_log: str | None = field_for(NFS_AUDIT_LOG)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NfsSettings:
        env = os.environ if env is None else env
        # The host id's default is this machine's name, known only at run time.
        return cls(host_id=NFS_HOST_ID.read(env) or socket.gethostname(), **read_fields(cls, env))


@dataclass(frozen=True)
class RetentionSettings:
    """How long the backend keeps audit entries and finished pulls (days; 0 keeps them forever)."""

    audit_days: int = field_for(AUDIT_RETENTION_DAYS)
    pull_days: int = field_for(PULL_RETENTION_DAYS)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RetentionSettings:
        return cls(**read_fields(cls, os.environ if env is None else env))


@dataclass(frozen=True)
class BackendSettings:
    database_url: str = field_for(DATABASE_URL)
    admin_token: str | None = None
    bind: str = field_for(BACKEND_BIND)
    cache_max_age: float = field_for(CACHE_MAX_AGE)
    max_body_bytes: int = field_for(MAX_BODY_BYTES)
    metrics_public: bool = field_for(METRICS_PUBLIC)  # /metrics without the admin token, as on the GPU server
    # The GPU servers' allow-list, checked here too: a pull the GPU hosts would refuse is refused
    # before any host is asked, and the published document can say which names are accepted.
    allowed_registries: tuple[str, ...] = field_for(ALLOWED_REGISTRIES)
    client: ClientSettings = field(default_factory=ClientSettings)
    nfs: NfsSettings = field(default_factory=NfsSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    declared_models_file: str | None = field_for(DECLARED_MODELS_FILE)
    drift_interval: float = field_for(DRIFT_INTERVAL)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BackendSettings:
        env = os.environ if env is None else env
        fields = read_fields(cls, env)
        return cls(
            admin_token=read_secret(env, "GPU_BRIDGE_BACKEND_TOKEN_FILE", "GPU_BRIDGE_BACKEND_TOKEN",
                                    BACKEND_TOKEN_CREDENTIAL),
            client=ClientSettings.from_env(env),
            nfs=NfsSettings.from_env(env),
            retention=RetentionSettings.from_env(env),
            **fields,
        )
