"""Network faults between the backend and a GPU server, injected by a TCP proxy switched at run time.

backend (gunicorn) ─► FaultProxy ─► GPU server (gunicorn) ─► Ollama emulator

For each mode: model listings keep answering 200 (the last good list, ``stale: true``) and never a
5xx; once the proxy passes traffic again the backend serves fresh listings within seconds.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests
from fault_helpers import get, measure_recovery, start_backend, start_gpu_server, tally
from faultproxy import FaultProxy

pytestmark = pytest.mark.integration


# --- the proxy itself ----------------------------------------------------------------------------------------
@pytest.fixture
def echo_server():
    """A loopback echo server (one thread per connection), for checking the proxy's modes."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def echo(conn):
        with conn:
            conn.settimeout(5)
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()
    stop.set()
    thread.join(2)
    listener.close()


def _roundtrip(port: int, timeout: float = 1.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"ping")
        return sock.recv(4096)


def test_faultproxy_modes_do_what_they_say(echo_server):
    with FaultProxy(echo_server) as proxy:
        assert _roundtrip(proxy.port) == b"ping"

        proxy.set_mode("latency", latency=0.25)
        started = time.monotonic()
        assert _roundtrip(proxy.port) == b"ping"
        assert time.monotonic() - started >= 0.25

        proxy.set_mode("drop")
        assert _roundtrip(proxy.port) == b""  # closed without an answer (FIN)

        proxy.set_mode("reset")
        with pytest.raises(ConnectionResetError):
            _roundtrip(proxy.port)

        proxy.set_mode("blackhole")
        with pytest.raises(TimeoutError):
            _roundtrip(proxy.port, timeout=0.3)

        # A connection opened in "pass" meets a fault switched on later (kept-alive pooled connections).
        proxy.set_mode("pass")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=1) as sock:
            sock.sendall(b"one")
            assert sock.recv(16) == b"one"
            proxy.set_mode("reset")
            sock.sendall(b"two")
            with pytest.raises(ConnectionResetError):
                sock.recv(16)
        assert proxy.stats["reset"] >= 2 and proxy.stats["dropped"] >= 1 and proxy.stats["blackholed"] >= 1


def test_faultproxy_refuses_non_loopback_addresses():
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(("192.0.2.1", 80))
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(("127.0.0.1", 80), host="0.0.0.0")


# --- the backend behind a faulty network -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chain(module_emulator, tmp_path_factory):
    gpu = start_gpu_server(module_emulator.url)
    proxy = FaultProxy(("127.0.0.1", gpu.port)).start()
    backend = None
    try:
        backend = start_backend(f"127.0.0.1:{proxy.port}", tmp_path_factory.mktemp("faults") / "backend.db")
        yield proxy, backend
    finally:
        if backend is not None:
            backend.stop()
        proxy.stop()
        gpu.stop()


def _fresh(session: requests.Session, url: str) -> bool:
    r = session.get(url, timeout=10)
    return r.status_code == 200 and r.json()["source"] == "gpu" and r.json()["stale"] is False


# mode, added latency (s): 0.2 s stays well below the backend's read timeout (0.6 s); the others are failures.
MODES = [("latency", 0.2), ("drop", 0.0), ("reset", 0.0), ("blackhole", 0.0)]


@pytest.mark.parametrize(("mode", "latency"), MODES, ids=[m for m, _ in MODES])
def test_listing_never_5xx_through_proxy_fault(chain, mode, latency):
    proxy, backend = chain
    url = f"{backend.url}/config/models"
    t = tally(f"proxy {mode}" + (f" +{latency:g}s" if latency else ""))
    with requests.Session() as session:
        proxy.set_mode("pass")
        measure_recovery(lambda: _fresh(session, url))  # a good listing is in the cache
        proxy.set_mode(mode, latency=latency)
        durations, sources = [], []
        window_end = time.monotonic() + 3.0  # at most 3 s (and 40 requests) of fault
        for _ in range(40):
            if time.monotonic() > window_end:
                break
            started = time.monotonic()
            r = get(session, url, t)
            durations.append(time.monotonic() - started)
            assert r is not None, "the backend gave no HTTP answer"
            assert r.status_code == 200, f"{mode}: listing answered {r.status_code}: {r.text[:300]}"
            body = r.json()
            sources.append((body["source"], body["stale"]))
            if body["stale"]:
                label = next(iter(body["hosts"]))
                assert body["hosts"][label]["ok"] is False and body["hosts"][label]["code"], body["hosts"]
        proxy.set_mode("pass")
        t.recovery_s = measure_recovery(lambda: _fresh(session, url))

    assert t.server_errors == 0 and t.transport_errors == 0, t.line()
    if mode == "latency":
        assert set(sources) == {("gpu", False)}, sources  # slow but within the read timeout: fresh answers
        assert min(durations) >= latency, durations
    else:
        assert ("cache", True) in sources, sources  # the fault was seen and the cached list served instead
        # After the breaker opens, a listing costs no timeout any more: the last answers are quick.
        t.notes.append(f"slowest {max(durations):.2f} s, last {durations[-1]:.3f} s")
        assert sorted(durations[-5:])[len(durations[-5:]) // 2] < 0.5, durations
    assert t.recovery_s < 5.0, t.line()
    print(t.line())
