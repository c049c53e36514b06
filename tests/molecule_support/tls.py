"""TLS helpers for the molecule scenarios: requests over mutual TLS made *on* a host, and slow
clients held open against a GPU host's proxy (nginx). Standard library only, run with the host's
``/usr/bin/python3``."""

from __future__ import annotations

import json
import time
from typing import Any

TLS_DIR = "/etc/gpu-bridge/tls"
GPU_UPSTREAM = "127.0.0.1:8002"  # gunicorn behind nginx (gpu_http_server_upstream)
# On the backend host (prod_backend): the GPU hosts' CA, the client certificate, its key.
BACKEND_CA = f"{TLS_DIR}/gpu-ca.pem"
BACKEND_CERT = f"{TLS_DIR}/client.pem"
BACKEND_KEY = "/etc/gpu-bridge/credentials/client-key"
# On a GPU host (gpu_http_server): its certificate, key, and the CA of client certificates.
GPU_CERT = f"{TLS_DIR}/server.pem"
GPU_KEY = f"{TLS_DIR}/server.key"
GPU_CLIENT_CA = f"{TLS_DIR}/client-ca.pem"

_TLS = r"""
import http.client, json, ssl, sys, time
method, host, port, path, ca, cert, key, timeout = json.loads(sys.argv[1])
ctx = ssl.create_default_context(cafile=ca)
if cert:
    ctx.load_cert_chain(cert, key)
t = time.monotonic()
try:
    c = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
    c.request(method, path, headers={"Accept": "application/json"})
    r = c.getresponse()
    raw = r.read()
    status = r.status
except OSError as e:
    print(json.dumps({"status": 0, "body": None, "error": repr(e), "seconds": time.monotonic() - t}))
    sys.exit(0)
try:
    body = json.loads(raw)
except ValueError:
    body = raw.decode(errors="replace")
print(json.dumps({"status": status, "body": body, "seconds": time.monotonic() - t}))
"""


def https(host, method: str, target: str, port: int, path: str, ca: str, cert: str | None = None,
          key: str | None = None, timeout: float = 10) -> dict:
    """One HTTPS request made on ``host`` (verifying ``target`` against ``ca``; with a client
    certificate when given): ``{"status": int (0: no answer), "body", "seconds", "error"?}``."""
    arg = json.dumps([method, target, port, path, ca, cert, key, timeout])
    return json.loads(host.check_output("/usr/bin/python3 -c %s %s", _TLS, arg))


# Slow clients: each opens a connection and then trickles, one byte every `gap` seconds:
#   handshake  TCP only, never starts TLS
#   header     TLS (no client certificate; plain TCP without a CA), then the request line and
#              headers, never finished
#   body       TLS with a client certificate, complete headers announcing a body, then the body
# At the end: how many connected, and how many the server closed (and after how long).
_SLOW = r"""
import json, socket, ssl, sys, threading, time
target, port, mode, count, duration, gap, ca, cert, key, out = json.loads(sys.argv[1])
ctx = ssl.create_default_context(cafile=ca) if ca else None
if ctx is not None and cert:
    ctx.load_cert_chain(cert, key)
results = []
lock = threading.Lock()
start = time.monotonic()

def one(i):
    res = {"connected": False, "closed_after": None}
    try:
        s = socket.create_connection((target, port), timeout=5)
        if mode != "handshake" and ctx is not None:
            s = ctx.wrap_socket(s, server_hostname=target)
        s.settimeout(gap)
        res["connected"] = True
        if mode == "header":
            data = b"GET /api/health HTTP/1.1\r\nHost: " + target.encode() + b"\r\nX-Slow: " + b"a" * 100000
        elif mode == "body":
            head = ("POST /api/models/tinyllama:latest HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                    "Content-Length: 60000\r\n\r\n" % target).encode()
            s.sendall(head)
            data = b" " * 60000
        else:
            data = b""
        pos = 0
        while time.monotonic() - start < duration:
            if mode != "handshake" and pos < len(data):
                s.send(data[pos:pos + 1])
                pos += 1
            try:
                s.recv(4096)  # an answer (408, 400) or the end: the server is done with us
                res["closed_after"] = round(time.monotonic() - start, 2)
                break
            except (socket.timeout, ssl.SSLWantReadError):
                pass
    except OSError as e:
        if res["connected"] and res["closed_after"] is None:
            res["closed_after"] = round(time.monotonic() - start, 2)
        res["error"] = repr(e)
    with lock:
        results.append(res)

threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
for t in threads:
    t.start()
for t in threads:
    t.join()
closed = [r["closed_after"] for r in results if r["closed_after"] is not None]
json.dump({"mode": mode, "count": count, "connected": sum(r["connected"] for r in results),
           "closed_by_server": len(closed), "first_closed_after": min(closed) if closed else None,
           "errors": sorted({r.get("error", "") for r in results if r.get("error")})[:3]}, open(out, "w"))
"""


def start_slow_clients(host, target: str, port: int, mode: str, count: int, duration: float, out: str,
                       ca: str | None = None, cert: str | None = None, key: str | None = None,
                       gap: float = 1.0) -> None:
    """Start ``count`` slow clients on ``host`` in the background (results to ``out`` when done)."""
    arg = json.dumps([target, port, mode, count, duration, gap, ca, cert, key, out])
    host.check_output("rm -f %s; nohup /usr/bin/python3 -c %s %s >%s.log 2>&1 &", out, _SLOW, arg, out)


def slow_clients_result(host, out: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = host.run("cat %s", out)
        if r.rc == 0 and r.stdout.strip():
            return json.loads(r.stdout)
        time.sleep(0.5)
    log = host.run("cat %s.log", out).stdout
    raise AssertionError(f"the slow clients on {host} wrote no result to {out} within {timeout:g} s: {log}")


_PROBES = r"""
import http.client, json, ssl, sys, time
target, port, path, ca, cert, key, n, interval, timeout = json.loads(sys.argv[1])
ctx = None
if ca:
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
out = []
for _ in range(n):
    t = time.monotonic()
    try:
        if ctx is None:
            c = http.client.HTTPConnection(target, port, timeout=timeout)
        else:
            c = http.client.HTTPSConnection(target, port, context=ctx, timeout=timeout)
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        status = r.status
        c.close()
    except OSError as e:
        status = 0
    out.append({"status": status, "seconds": round(time.monotonic() - t, 4)})
    time.sleep(max(0.0, interval - (time.monotonic() - t)))
print(json.dumps(out))
"""


def probes(host, target: str, port: int, path: str, n: int, interval: float, timeout: float,
           ca: str | None = None, cert: str | None = None, key: str | None = None) -> list[dict[str, Any]]:
    """``n`` requests, one new connection each, every ``interval`` seconds: status and seconds."""
    arg = json.dumps([target, port, path, ca, cert, key, n, interval, timeout])
    return json.loads(host.check_output("/usr/bin/python3 -c %s %s", _PROBES, arg))
