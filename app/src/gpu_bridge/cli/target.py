"""Whom a client command talks to: the target URL, whether it is a backend or a GPU server, and the
client for each (``BackendClient`` for the backend's ``/config/*`` API, the HTTP transport for a GPU
server), with the token from ``--token-file``, the environment or systemd's credentials.

Which kind of server answers is found by probing: a GPU server answers ``GET /api/health`` with an
``ollama`` key, a backend publishes ``/api/openapi.json`` titled "gpu-bridge backend". Failures raise
``GpuBridgeError`` with one line that says what to fix (``cli.main`` prints it and exits 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests

from .. import __version__
from ..config import (
    API_TOKEN_CREDENTIAL,
    BACKEND_TOKEN_CREDENTIAL,
    DEFAULT_GPU_PORT,
    ClientSettings,
    GpuHost,
    read_secret,
    read_secret_file,
    tls_client_files,
)
from ..errors import ConfigError, GpuBridgeError
from .output import once

if TYPE_CHECKING:
    from ..client.http import HttpTransport

# A JSON object as a server sent it: the commands read it key by key and print what they find.
JsonDict = dict[str, Any]

DEFAULT_URL = "http://127.0.0.1:8000"


def target_url(args: object) -> str:
    chosen: str = getattr(args, "url", None) or os.environ.get("GPU_BRIDGE_URL") or DEFAULT_URL
    url = chosen.strip().rstrip("/")
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

    def call(self, method: str, path: str, body: JsonDict | None = None) -> JsonDict:
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


def gpu_transport(url: str, token: str | None, timeout: float) -> HttpTransport:
    # Imported here: only a command aimed straight at a GPU server needs the transport.
    from ..client.http import HttpTransport

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


class Context:
    """One client command's target: exactly one of ``gpu`` (a GPU server's URL) or ``backend`` is set.
    Use it as a context manager so the connections close whatever the command raises."""

    gpu: HttpTransport | None
    backend: BackendClient | None

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.url = target_url(args)
        self.timeout = float(getattr(args, "timeout", 30.0) or 30.0)
        self.kind = detect(self.url, self.timeout)
        self.json = bool(getattr(args, "json", False))
        self.out = sys.stdout
        token = read_token_file(getattr(args, "token_file", None))
        if self.kind == "gpu":
            self.gpu = gpu_transport(self.url, token, self.timeout)
            self.backend = None
        else:
            if token is None:
                token = read_secret(os.environ, "GPU_BRIDGE_BACKEND_TOKEN_FILE", "GPU_BRIDGE_BACKEND_TOKEN",
                                    BACKEND_TOKEN_CREDENTIAL)
            self.backend = BackendClient(self.url, token, self.timeout)
            self.gpu = None

    def __enter__(self) -> Context:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        client = self.gpu or self.backend
        assert client is not None  # __init__ sets one of the two
        client.close()

    def dump(self, data: object) -> None:
        print(json.dumps(data, indent=2, sort_keys=False), file=self.out)
