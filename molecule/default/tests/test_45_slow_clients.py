"""Slow clients cannot starve gunicorn: 64 slow connections to gpu-01's proxy (nginx) while the
backend keeps asking gpu-01 for its health over mutual TLS.

- 24 from gpu-02 that open TCP and never start TLS (handshake),
- 24 from gpu-02 that finish TLS without a client certificate and trickle the request headers,
- 16 from prod-01 with the backend's client certificate that send complete headers announcing a
  body and trickle it (nginx buffers it: gunicorn would only ever see it complete).

Meanwhile prod-01 probes gpu-01's /api/health (new connection each, mutual TLS) and the backend's
listing. The figures are printed (run with -s to see them). Without nginx, the same kind of
connections straight at gunicorn starve its 8 threads (the README gives both figures)."""

import pytest
from molecule_support import GPU_PORT, backend
from molecule_support.tls import BACKEND_CA, BACKEND_CERT, BACKEND_KEY, probes, slow_clients_result, start_slow_clients

testinfra_hosts = ["prod-01"]  # prod-02 (the second backend): test_30_prod.py, test_60_ha.py
TARGET = "gpu-01"
DURATION = 14.0  # seconds the slow clients stay (the proxy's header timeout is 10 s)
PROBES, INTERVAL = 12, 0.5


@pytest.fixture
def others(gpus):
    assert TARGET in gpus and len(gpus) >= 2, sorted(gpus)
    return gpus[next(n for n in sorted(gpus) if n != TARGET)]


def test_health_answers_while_64_slow_clients_are_connected(host, gpus, others):
    runs = [
        (others, "handshake", 24, None, None, None, "/tmp/slow-handshake.json"),
        (others, "header", 24, "/etc/gpu-bridge/tls/client-ca.pem", None, None, "/tmp/slow-header.json"),
        (host, "body", 16, BACKEND_CA, BACKEND_CERT, BACKEND_KEY, "/tmp/slow-body.json"),
    ]
    for where, mode, count, ca, cert, key, out in runs:
        start_slow_clients(where, TARGET, GPU_PORT, mode, count, DURATION, out, ca=ca, cert=cert, key=key)
    # Let them connect, then probe for 6 s while all 64 are open.
    host.check_output("sleep 1.5")
    health = probes(host, TARGET, GPU_PORT, "/api/health", PROBES, INTERVAL, 5.0, ca=BACKEND_CA, cert=BACKEND_CERT,
                    key=BACKEND_KEY)
    listing = backend(host, "GET", "/config/models?refresh=true", timeout=10)
    results = {mode: slow_clients_result(where, out, DURATION + 20) for where, mode, _, _, _, _, out in runs}

    latencies = sorted(p["seconds"] for p in health)
    print(f"\n64 slow clients at {TARGET}'s proxy: " + ", ".join(
        f"{m}: {r['connected']}/{r['count']} connected, {r['closed_by_server']} closed by nginx "
        f"(first after {r['first_closed_after']} s)" for m, r in results.items()))
    print(f"health over mutual TLS meanwhile: {sum(p['status'] == 200 for p in health)}/{len(health)} answered, "
          f"p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms; "
          f"backend listing: HTTP {listing['status']}, stale={listing['body'].get('stale')}")

    assert sum(r["connected"] for r in results.values()) == 64, results
    assert all(p["status"] == 200 for p in health), health
    assert latencies[-1] < 2.0, health
    assert listing["status"] == 200 and listing["body"]["stale"] is False, listing
    # nginx times the handshake and header trickles out (client_header_timeout, 10 s).
    for mode in ("handshake", "header"):
        r = results[mode]
        assert r["closed_by_server"] == r["count"] and r["first_closed_after"] >= 9, results
