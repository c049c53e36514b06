"""End to end from prod-01, over the HTTP channel: list, pull, delete; crash recovery."""

import time

from molecule_support import (
    GPU_PORT,
    HTTP_UNIT,
    INSTALLED_MODEL,
    VENV,
    backend,
    hosts_of,
    list_pull_delete,
    main_pid,
    poll,
)
from molecule_support.tls import BACKEND_CA, BACKEND_CERT, BACKEND_KEY, https

testinfra_hosts = ["prod-01"]  # prod-02 (the second backend): test_30_prod.py, test_60_ha.py
RESTART_DEADLINE = 10.0


def test_cli_models_list(host):
    """The example scripts/lab prints."""
    out = host.check_output("%s/bin/gpu-bridge models list", VENV)
    assert INSTALLED_MODEL in out


def test_list_pull_delete(host, gpus):
    list_pull_delete(host, gpus)


def test_sigkill_restart_and_stale_cache(host, gpus):
    """Every GPU server killed with SIGKILL: systemd restarts each within 10 s, and meanwhile the
    backend answers from its cache with stale: true (it marks a listing stale only when no GPU host
    answers, so all of them go down together)."""
    fresh = backend(host, "GET", "/config/models?refresh=true")
    assert fresh["status"] == 200 and fresh["body"]["stale"] is False, fresh
    old = {name: main_pid(gpu, HTTP_UNIT) for name, gpu in gpus.items()}
    assert all(old.values()), old

    killed_at = {}
    for name, gpu in gpus.items():
        gpu.check_output("kill -KILL %s", str(old[name]))
        killed_at[name] = time.monotonic()

    # Meanwhile: the cached list, marked stale, still naming every host. (Polled: for a moment
    # after the kill a gunicorn worker may still answer, until it sees its master is gone.)
    first_kill = min(killed_at.values())
    during = poll(
        lambda: backend(host, "GET", "/config/models?refresh=true"),
        lambda r: r["status"] == 200 and r["body"].get("stale") is True,
        RESTART_DEADLINE - (time.monotonic() - first_kill),
        "a stale listing from the cache while every GPU server is down",
    )
    body = during["body"]
    assert body["source"] == "cache", body
    assert hosts_of(body, INSTALLED_MODEL) == set(gpus), body

    # systemd restarts each one within the deadline (counted from its kill).
    for name, gpu in gpus.items():
        remaining = RESTART_DEADLINE - (time.monotonic() - killed_at[name])

        def state(g=gpu, n=name):
            pid = main_pid(g, HTTP_UNIT)
            health = https(host, "GET", n, GPU_PORT, "/api/health", ca=BACKEND_CA, cert=BACKEND_CERT, key=BACKEND_KEY,
                           timeout=2)["status"]
            return pid, health

        poll(
            state,
            lambda s, n=name: s[0] not in (0, old[n]) and s[1] == 200,
            max(remaining, 0.1),
            f"{HTTP_UNIT} on {name} restarted and healthy within {RESTART_DEADLINE:g} s of SIGKILL",
        )
        assert int(gpu.check_output("systemctl show -p NRestarts --value %s", HTTP_UNIT)) >= 1

    # And the backend recovers by itself (the circuit breakers close again).
    poll(
        lambda: backend(host, "GET", "/config/models?refresh=true"),
        lambda r: r["status"] == 200 and not r["body"]["stale"] and hosts_of(r["body"], INSTALLED_MODEL) == set(gpus),
        40,
        "a fresh listing from every GPU host after the restart",
    )
