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

from .errors import ConfigError

DEFAULT_GPU_PORT = 8001
DEFAULT_BACKEND_BIND = "127.0.0.1:8000"
DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"
DEFAULT_ALLOWED_REGISTRIES = ("registry.ollama.ai", "hf.co")
DEFAULT_NFS_ROOT = "/mnt/shared"
DEFAULT_DATABASE_URL = "sqlite:////var/lib/gpu-bridge/backend.db"
# systemd LoadCredential= exposes secrets under $CREDENTIALS_DIRECTORY/<name>; the roles use these names.
API_TOKEN_CREDENTIAL = "api-token"  # noqa: S105 - a file name, not a secret
BACKEND_TOKEN_CREDENTIAL = "backend-token"  # noqa: S105
CLIENT_KEY_CREDENTIAL = "client-key"  # the backend's TLS client key (mutual TLS with the GPU hosts)


def _get(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip()


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    return _get(env, name, default)  # type: ignore[return-value]


def env_int(env: Mapping[str, str], name: str, default: int, *, minimum: int | None = 0) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value != value or value < minimum:  # NaN or below the floor
        raise ConfigError(f"{name}={raw} must be a number >= {minimum}")
    return value


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _get(env, name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true or false)")


def env_list(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = _get(env, name)
    if raw is None:
        return default
    return tuple(item.strip() for item in raw.split(",") if item.strip())


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
    path = _get(env, file_var)
    if path is None:
        cred_dir = _get(env, "CREDENTIALS_DIRECTORY")
        candidate = os.path.join(cred_dir, credential) if cred_dir else None
        if candidate and os.path.exists(candidate):
            path = candidate
    if path is not None:
        return read_secret_file(path, file_var)
    return _get(env, value_var)


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
    path = _get(env, name)
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
        cred_dir = _get(env, "CREDENTIALS_DIRECTORY")
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
    ollama_url: str = DEFAULT_OLLAMA_URL
    api_token: str | None = None
    allow_no_token: bool = False
    allowed_registries: tuple[str, ...] = DEFAULT_ALLOWED_REGISTRIES
    ollama_connect_timeout: float = 2.0
    ollama_read_timeout: float = 30.0
    pull_stall_timeout: float = 300.0
    max_concurrent_pulls: int = 2
    max_queued_pulls: int = 16
    max_waiting_pulls: int = 2
    rate_limit_per_minute: int = 60
    max_body_bytes: int = 64 * 1024
    ollama_models_dir: str | None = None
    min_free_bytes: int = 10 * 1024**3
    metrics_public: bool = False
    log_health_checks: bool = False
    job_retention_seconds: float = 3600.0
    # The job table on disk, so that a reload (SIGHUP) or a restart keeps pulls and their jobs
    # (job_state.py); None: jobs live in memory only.
    job_state_file: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GpuServerSettings:
        env = os.environ if env is None else env
        return cls(
            ollama_url=env_str(env, "GPU_BRIDGE_OLLAMA_URL", DEFAULT_OLLAMA_URL).rstrip("/"),
            api_token=read_secret(env, "GPU_BRIDGE_API_TOKEN_FILE", "GPU_BRIDGE_API_TOKEN", API_TOKEN_CREDENTIAL),
            allow_no_token=env_bool(env, "GPU_BRIDGE_ALLOW_NO_TOKEN", False),
            allowed_registries=env_list(env, "GPU_BRIDGE_ALLOWED_REGISTRIES", DEFAULT_ALLOWED_REGISTRIES),
            ollama_connect_timeout=env_float(env, "GPU_BRIDGE_OLLAMA_CONNECT_TIMEOUT", 2.0, minimum=0.01),
            ollama_read_timeout=env_float(env, "GPU_BRIDGE_OLLAMA_READ_TIMEOUT", 30.0, minimum=0.01),
            pull_stall_timeout=env_float(env, "GPU_BRIDGE_PULL_STALL_TIMEOUT", 300.0, minimum=0.1),
            max_concurrent_pulls=env_int(env, "GPU_BRIDGE_MAX_CONCURRENT_PULLS", 2, minimum=1),
            max_queued_pulls=env_int(env, "GPU_BRIDGE_MAX_QUEUED_PULLS", 16, minimum=0),
            max_waiting_pulls=env_int(env, "GPU_BRIDGE_MAX_WAITING_PULLS", 2, minimum=0),
            rate_limit_per_minute=env_int(env, "GPU_BRIDGE_RATE_LIMIT_PER_MINUTE", 60, minimum=0),
            max_body_bytes=env_int(env, "GPU_BRIDGE_MAX_BODY_BYTES", 64 * 1024, minimum=1024),
            ollama_models_dir=_get(env, "GPU_BRIDGE_OLLAMA_MODELS_DIR"),
            min_free_bytes=int(env_float(env, "GPU_BRIDGE_MIN_FREE_GB", 10.0) * 1024**3),
            metrics_public=env_bool(env, "GPU_BRIDGE_METRICS_PUBLIC", False),
            log_health_checks=env_bool(env, "GPU_BRIDGE_LOG_HEALTH_CHECKS", False),
            job_retention_seconds=env_float(env, "GPU_BRIDGE_JOB_RETENTION", 3600.0),
            job_state_file=_get(env, "GPU_BRIDGE_JOB_STATE_FILE"),
        )


@dataclass(frozen=True)
class GpuHost:
    """One GPU host as production addresses it. ``name`` is the host part: the NFS channel's id."""

    name: str
    port: int = DEFAULT_GPU_PORT
    scheme: str = "http"

    @property
    def base_url(self) -> str:
        host = f"[{self.name}]" if ":" in self.name else self.name
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def label(self) -> str:
        return f"{self.name}:{self.port}"


def parse_gpu_hosts(env: Mapping[str, str]) -> tuple[GpuHost, ...]:
    port = env_int(env, "GPU_BRIDGE_GPU_PORT", DEFAULT_GPU_PORT, minimum=1)
    scheme = env_str(env, "GPU_BRIDGE_GPU_SCHEME", "http")
    if scheme not in ("http", "https"):
        raise ConfigError(f"GPU_BRIDGE_GPU_SCHEME={scheme!r} must be http or https")
    raw = _get(env, "GPU_INSTANCE_HOSTS") or _get(env, "GPU_INSTANCE_HOST") or ""
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
    connect_timeout: float = 3.0
    read_timeout: float = 30.0
    pull_timeout: float = 300.0
    retries: int = 2
    breaker_threshold: int = 3
    breaker_cooldown: float = 15.0
    transport: str = "http"
    fanout_deadline: float = 2.5
    pull_deadline: float = 0.0
    # TLS towards the GPU hosts (https): the CA bundle that signed their certificates (None: the
    # system's bundle), and this client's certificate and key for mutual TLS (None: no certificate).
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientSettings:
        env = os.environ if env is None else env
        transport = env_str(env, "GPU_BRIDGE_TRANSPORT", "http").lower()
        if transport not in ("http", "nfs"):
            raise ConfigError(f"GPU_BRIDGE_TRANSPORT={transport!r} must be http or nfs")
        ca_file, cert_file, key_file = tls_client_files(env)
        return cls(
            hosts=parse_gpu_hosts(env),
            api_token=read_secret(env, "GPU_BRIDGE_API_TOKEN_FILE", "GPU_BRIDGE_API_TOKEN", API_TOKEN_CREDENTIAL),
            connect_timeout=env_float(env, "GPU_BRIDGE_CONNECT_TIMEOUT", 3.0, minimum=0.01),
            read_timeout=env_float(env, "GPU_BRIDGE_READ_TIMEOUT", 30.0, minimum=0.01),
            pull_timeout=env_float(env, "GPU_BRIDGE_PULL_TIMEOUT", 300.0, minimum=0.01),
            retries=env_int(env, "GPU_BRIDGE_RETRIES", 2, minimum=0),
            breaker_threshold=env_int(env, "GPU_BRIDGE_BREAKER_THRESHOLD", 3, minimum=1),
            breaker_cooldown=env_float(env, "GPU_BRIDGE_BREAKER_COOLDOWN", 15.0),
            transport=transport,
            fanout_deadline=env_float(env, "GPU_BRIDGE_FANOUT_DEADLINE", 2.5, minimum=0.05),
            pull_deadline=env_float(env, "GPU_BRIDGE_PULL_DEADLINE", 0.0, minimum=0.0),
            ca_file=ca_file,
            client_cert_file=cert_file,
            client_key_file=key_file,
        )


@dataclass(frozen=True)
class NfsSettings:
    root: str = DEFAULT_NFS_ROOT
    host_id: str = field(default_factory=socket.gethostname)
    poll_interval: float = 0.05
    heartbeat_interval: float = 2.0
    command_timeout: float = 30.0
    answer_retention: float = 3600.0
    # Worker side: refuse to run unless the root (or an ancestor other than /) is a mount point.
    require_mount: bool = True
    # Worker side: how often models.json is rewritten from Ollama's list (also after pull/delete).
    models_refresh_interval: float = 5.0
    # Worker side: optional local file, one JSON line per command executed/answered (audit, tests).
    audit_log: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NfsSettings:
        env = os.environ if env is None else env
        return cls(
            root=env_str(env, "GPU_BRIDGE_NFS_ROOT", DEFAULT_NFS_ROOT),
            host_id=env_str(env, "GPU_BRIDGE_NFS_HOST_ID", socket.gethostname()),
            poll_interval=env_float(env, "GPU_BRIDGE_NFS_POLL_INTERVAL", 0.05, minimum=0.001),
            heartbeat_interval=env_float(env, "GPU_BRIDGE_NFS_HEARTBEAT_INTERVAL", 2.0, minimum=0.05),
            command_timeout=env_float(env, "GPU_BRIDGE_NFS_COMMAND_TIMEOUT", 30.0, minimum=0.1),
            answer_retention=env_float(env, "GPU_BRIDGE_NFS_ANSWER_RETENTION", 3600.0),
            require_mount=env_bool(env, "GPU_BRIDGE_NFS_REQUIRE_MOUNT", True),
            models_refresh_interval=env_float(env, "GPU_BRIDGE_NFS_MODELS_REFRESH", 5.0, minimum=0.05),
            audit_log=_get(env, "GPU_BRIDGE_NFS_AUDIT_LOG"),
        )


@dataclass(frozen=True)
class BackendSettings:
    database_url: str = DEFAULT_DATABASE_URL
    admin_token: str | None = None
    bind: str = DEFAULT_BACKEND_BIND
    cache_max_age: float = 10.0
    max_body_bytes: int = 64 * 1024
    # The GPU servers' allow-list, checked here too: a pull the GPU hosts would refuse is refused
    # before any host is asked, and the published document can say which names are accepted.
    allowed_registries: tuple[str, ...] = DEFAULT_ALLOWED_REGISTRIES
    client: ClientSettings = field(default_factory=ClientSettings)
    nfs: NfsSettings = field(default_factory=NfsSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BackendSettings:
        env = os.environ if env is None else env
        return cls(
            database_url=env_str(env, "GPU_BRIDGE_DATABASE_URL", DEFAULT_DATABASE_URL),
            admin_token=read_secret(env, "GPU_BRIDGE_BACKEND_TOKEN_FILE", "GPU_BRIDGE_BACKEND_TOKEN",
                                    BACKEND_TOKEN_CREDENTIAL),
            bind=env_str(env, "GPU_BRIDGE_BACKEND_BIND", DEFAULT_BACKEND_BIND),
            cache_max_age=env_float(env, "GPU_BRIDGE_CACHE_MAX_AGE", 10.0),
            max_body_bytes=env_int(env, "GPU_BRIDGE_MAX_BODY_BYTES", 64 * 1024, minimum=1024),
            allowed_registries=env_list(env, "GPU_BRIDGE_ALLOWED_REGISTRIES", DEFAULT_ALLOWED_REGISTRIES),
            client=ClientSettings.from_env(env),
            nfs=NfsSettings.from_env(env),
        )
