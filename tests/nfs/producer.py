"""A producer process for the channel tests: N sequential pings through NfsTransport.

    python producer.py ROOT HOST_ID COUNT OUT.json [COMMAND_TIMEOUT]

Writes {"ok": n, "errors": [...], "retries": n, "boots": {boot: n}} to OUT.json. A ping that fails
because the worker was judged down (it is being restarted by the test) is retried: the worker side
must still have answered each command it received exactly once.
"""

from __future__ import annotations

import json
import sys
import time

from gpu_bridge.client.nfs import NfsTransport
from gpu_bridge.config import BackendSettings, ClientSettings, GpuHost, NfsSettings
from gpu_bridge.errors import GpuHostError


def main() -> int:
    root, host_id, count, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 20.0
    nfs = NfsSettings(root=root, host_id="producer", poll_interval=0.005, command_timeout=timeout)
    t = NfsTransport(GpuHost(host_id), BackendSettings(client=ClientSettings(transport="nfs"), nfs=nfs))
    ok, retries, errors, boots = 0, 0, [], {}
    deadline = time.monotonic() + 90
    for _ in range(count):
        while True:
            try:
                result = t.ping()
            except GpuHostError as exc:
                retries += 1
                if time.monotonic() > deadline or retries > 200:
                    errors.append(f"{type(exc).__name__}: {exc.message}")
                    break
                time.sleep(0.05)
                continue
            ok += 1
            boots[result["boot"]] = boots.get(result["boot"], 0) + 1
            break
    with open(out, "w") as fh:
        json.dump({"ok": ok, "errors": errors, "retries": retries, "boots": boots}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
